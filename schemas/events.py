"""The one event envelope and the dead-letter record."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas._common import TimestampMs
from schemas.jobs import FieldError

__all__ = ["DeadLetter", "Event"]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Every state change, on ``<prefix>.events.<entity>.<id>.<type>``.

    ``type`` is dotted (``job.queued``); ``subject_id`` is the job, runner or component it is about.
    """

    id: str
    type: str
    at_ms: TimestampMs
    source: str
    subject_id: str | None = None
    attempt: int | None = None
    correlation_id: str | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message no handler could process, on ``<prefix>.dead.<handler>``.

    ``payload`` is the original body (base64 in JSON) so that it can be replayed unchanged.
    """

    id: str
    at_ms: TimestampMs
    handler: str
    original_subject: str
    reason: str
    errors: list[FieldError] = msgspec.field(default_factory=list)
    deliveries: int = 1
    stream_seq: int | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    payload: bytes = b""
