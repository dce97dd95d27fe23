"""Typed events about runners (``runner.*``)."""

from __future__ import annotations

from typing import ClassVar

from schemas._common import TimestampMs
from schemas.event_base import TypedEvent

__all__ = [
    "RunnerBackOnline",
    "RunnerDeregistered",
    "RunnerDraining",
    "RunnerForgotten",
    "RunnerLost",
    "RunnerRegistered",
    "RunnerUndrained",
]


class _RunnerEvent(TypedEvent, frozen=True, kw_only=True):
    entity: ClassVar[str] = "runner"
    subject_doc: ClassVar[str] = "the runner id"


class RunnerRegistered(_RunnerEvent, frozen=True, kw_only=True):
    """A runner registered, or registered again (registry)."""

    event_type: ClassVar[str] = "runner.registered"

    capacity: int
    job_types: list[str]
    region: str | None
    session_id: str | None


class RunnerLost(_RunnerEvent, frozen=True, kw_only=True):
    """A runner fell silent and was marked offline; its jobs are taken back (supervisor)."""

    event_type: ClassVar[str] = "runner.lost"

    last_heartbeat_at_ms: TimestampMs
    silent_ms: int
    jobs: list[str]

    def event_id(self) -> str:
        """``<runner_id>.lost.<last_heartbeat_at_ms>``: once per silence."""
        return f"{self.subject_id}.lost.{self.last_heartbeat_at_ms}"


class RunnerBackOnline(_RunnerEvent, frozen=True, kw_only=True):
    """A runner marked offline sent a heartbeat again (registry)."""

    event_type: ClassVar[str] = "runner.back_online"


class RunnerDraining(_RunnerEvent, frozen=True, kw_only=True):
    """A runner was drained: no new work; its running jobs finish (registry)."""

    event_type: ClassVar[str] = "runner.draining"


class RunnerUndrained(_RunnerEvent, frozen=True, kw_only=True):
    """A drained runner takes work again (registry)."""

    event_type: ClassVar[str] = "runner.undrained"


class RunnerDeregistered(_RunnerEvent, frozen=True, kw_only=True):
    """A runner left cleanly and was forgotten (registry)."""

    event_type: ClassVar[str] = "runner.deregistered"

    session_id: str | None


class RunnerForgotten(_RunnerEvent, frozen=True, kw_only=True):
    """A runner offline for longer than ``limits.offline_runner_retention_s`` was removed (supervisor)."""

    event_type: ClassVar[str] = "runner.forgotten"

    reason: str
