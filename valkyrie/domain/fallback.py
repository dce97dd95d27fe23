"""Automatic fallback as pure functions: when to switch modes, and whose fallback is in force.

The rules say when to switch to ``fallback`` mode and back. The monitor handler counts
evaluations (:class:`Streak`), reads the config history and the stats bucket's
:class:`~schemas.FallbackRecord`, and asks these rules what to do; docs/health.md describes them
for operators.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from schemas import ConfigRevision, FallbackRecord, HealthStatus, HealthSummary
from valkyrie.config.model import HealthConfig, IntegrationMode

__all__ = [
    "AUTO_ACTOR",
    "FallbackAction",
    "RecordFate",
    "Streak",
    "decide_fallback",
    "fallback_reason",
    "fallback_record",
    "is_automatic_fallback",
    "last_mode_change",
    "may_fall_back_from",
    "needs_mode_history",
    "reconcile_record",
    "recovery_reason",
    "restore_target",
]

#: ``requested_by`` of the config changes the monitor makes; how automatic fallbacks are recognised.
#: It refines the monitor's identity, so the config handler keeps it (``domain.identity``).
AUTO_ACTOR = "monitor:auto"
#: what automatic changes were recorded as, then and now (history keeps 64 revisions)
_AUTO_ACTORS = frozenset({AUTO_ACTOR, "health-monitor"})
_FALLBACK_FROM = frozenset({IntegrationMode.FULL.value, IntegrationMode.HYBRID.value})


@dataclass(frozen=True, slots=True)
class Streak:
    """How many consecutive evaluations were not healthy (``failing``) or healthy."""

    failing: int = 0
    healthy: int = 0

    def observe(self, status: HealthStatus) -> Streak:
        """The streak after one more evaluation with ``status``."""
        if status == "healthy":
            return Streak(failing=0, healthy=self.healthy + 1)
        return Streak(failing=self.failing + 1, healthy=0)


def may_fall_back_from(mode: str) -> bool:
    """Whether the monitor may switch ``mode`` to fallback: only ``full`` and ``hybrid``."""
    return mode in _FALLBACK_FROM


class FallbackAction(enum.StrEnum):
    """What the monitor should do with the integration mode after an evaluation."""

    NONE = "none"
    FALLBACK = "fallback"
    RECOVER = "recover"


def decide_fallback(
    streak: Streak,
    *,
    mode: str,
    auto_fallback: bool,
    automatic: bool,
    held: bool,
    health: HealthConfig,
) -> FallbackAction:
    """Whether to switch to fallback, switch back, or leave the mode alone.

    Args:
        streak: consecutive evaluations, including the one just made.
        mode: the integration mode in force.
        auto_fallback: ``features.auto_fallback``; off means the monitor never touches the mode.
        automatic: the mode in force is a fallback the monitor itself put in.
        held: an operator overrode an automatic fallback and the system has not been healthy
            since; until it is, falling back again would undo the operator's decision.
        health: ``failure_threshold`` and ``recovery_threshold``.
    """
    if not auto_fallback:
        return FallbackAction.NONE
    if may_fall_back_from(mode) and not held and streak.failing >= health.failure_threshold:
        return FallbackAction.FALLBACK
    if (
        mode == IntegrationMode.FALLBACK.value
        and automatic
        and streak.healthy >= health.recovery_threshold
    ):
        return FallbackAction.RECOVER
    return FallbackAction.NONE


def last_mode_change(history: Sequence[ConfigRevision]) -> ConfigRevision | None:
    """The newest revision that changed the mode (``None`` when none in ``history`` did)."""
    for revision in sorted(history, key=lambda r: r.revision, reverse=True):
        if "mode" in revision.diff:
            return revision
    return None


def needs_mode_history(mode: str, record: FallbackRecord | None) -> bool:
    """Whether judging the fallback needs the newest mode change (else the history is not read).

    It does when the mode is ``fallback`` or an automatic fallback is recorded as active.
    """
    return mode == IntegrationMode.FALLBACK.value or (
        record is not None and record.state == "active"
    )


def is_automatic_fallback(
    mode: str, record: FallbackRecord | None, change: ConfigRevision | None
) -> bool:
    """Whether the fallback in force is one the monitor put in (and may therefore take back).

    Args:
        mode: the integration mode in force.
        record: the stats bucket's fallback record, if any.
        change: the newest revision that changed the mode (:func:`last_mode_change`); ``None``
            when the kept history has none, in which case only an active record vouches for it.
    """
    if mode != IntegrationMode.FALLBACK.value:
        return False
    if change is None:
        return record is not None and record.state == "active"
    new = change.diff.get("mode", {})
    return (
        change.changed_by in _AUTO_ACTORS
        and isinstance(new, dict)
        and new.get("new") == IntegrationMode.FALLBACK.value
    )


class RecordFate(enum.StrEnum):
    """What to do with the stats bucket's fallback record after looking at the config."""

    KEEP = "keep"
    FORGET = "forget"
    OVERRIDDEN = "overridden"


def reconcile_record(
    record: FallbackRecord | None,
    *,
    mode: str,
    change: ConfigRevision | None,
    config_revision: int,
) -> RecordFate:
    """Keep an automatic-fallback record, forget it, or note that an operator overrode it.

    Args:
        record: the fallback record.
        mode: the integration mode this process runs.
        change: the newest revision that changed the mode.
        config_revision: the revision this process runs; a record from a newer revision is kept,
            since this process has not seen the fallback it describes yet.
    """
    if record is None or record.state != "active":
        return RecordFate.KEEP
    if record.config_revision > config_revision:
        return RecordFate.KEEP
    if is_automatic_fallback(mode, record, change):
        return RecordFate.KEEP
    if change is not None and change.changed_by not in _AUTO_ACTORS:
        return RecordFate.OVERRIDDEN
    return RecordFate.FORGET


def restore_target(
    record: FallbackRecord | None, change: ConfigRevision | None, base_mode: str
) -> tuple[str | None, str]:
    """What to set ``mode`` to on recovery: ``(runtime value, resulting mode)``.

    A runtime value of ``None`` removes the override, so every process returns to the mode of its
    own config; that is what "the previous mode" was when the mode was not overridden at run time.
    Without a record (it was never written, or lost), the fallback revision's diff tells.
    """
    if record is not None:
        if record.previous_override:
            return record.previous_mode, record.previous_mode
        return None, base_mode
    if change is not None:
        old = change.diff.get("mode", {})
        if isinstance(old, dict) and isinstance(old.get("old"), str):
            return old["old"], old["old"]
    return None, base_mode


def fallback_record(
    previous_mode: str,
    overrides: Mapping[str, object],
    config_revision: int,
    at_ms: int,
    reason: str,
    monitor: str,
) -> FallbackRecord:
    """The record of an automatic fallback from ``previous_mode``, made at ``config_revision``.

    ``overrides`` are the runtime values in force before it: whether ``mode`` was among them
    decides how the recovery restores it (:func:`restore_target`).
    """
    return FallbackRecord(
        previous_mode=previous_mode,
        previous_override="mode" in overrides,
        config_revision=config_revision,
        at_ms=at_ms,
        reason=reason,
        monitor=monitor,
    )


def fallback_reason(summary: HealthSummary, streak: Streak) -> str:
    """The reason recorded with an automatic fallback: the status, how long, and its causes."""
    return (
        f"automatic fallback: overall {summary.status} for {streak.failing} consecutive "
        f"evaluations: " + ("; ".join(summary.reasons[:3]) or summary.status)
    )


def recovery_reason(streak: Streak, target: str) -> str:
    """The reason recorded with an automatic recovery to mode ``target``."""
    return (
        f"automatic recovery: healthy for {streak.healthy} consecutive evaluations; "
        f"back to {target}"
    )
