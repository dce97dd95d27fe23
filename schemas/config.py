"""Config-change messages and the records of the config KV bucket."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas._common import TimestampMs
from schemas.jobs import FieldError

__all__ = ["ConfigChange", "ConfigRevision", "ConfigVerdict"]


class ConfigChange(msgspec.Struct, frozen=True, kw_only=True):
    """A requested change, on ``<prefix>.config.change``.

    ``set`` maps dotted keys to new values (``null`` removes a runtime override); ``replace``
    (a whole config document) replaces every runtime override; ``rollback_to`` restores the
    runtime overrides of an earlier revision. Send it with a ``Valkyrie-Reply-To`` header to get a
    :class:`ConfigVerdict`.
    """

    set: dict[str, Any] = msgspec.field(default_factory=dict)
    replace: dict[str, Any] | None = None
    rollback_to: int | None = None
    requested_by: str = "unknown"
    reason: str | None = None


class ConfigRevision(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted revision of the runtime config (config KV bucket, key ``current``)."""

    revision: int
    at_ms: TimestampMs
    changed_by: str
    values: dict[str, Any]
    diff: dict[str, Any] = msgspec.field(default_factory=dict)
    reason: str | None = None


class ConfigVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """The config handler's answer to a change."""

    accepted: bool
    revision: int | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)
    warnings: list[FieldError] = msgspec.field(default_factory=list)
    diff: dict[str, Any] = msgspec.field(default_factory=dict)
