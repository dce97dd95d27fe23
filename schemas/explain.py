"""The answer to "why is my job pending?" (``<prefix>.jobs.explain``, request/reply)."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas._common import Identifier, TimestampMs

__all__ = ["ConstraintGroup", "ExplainRequest", "JobExplanation"]


class ExplainRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask about one job."""

    job_id: Identifier


class ConstraintGroup(msgspec.Struct, frozen=True, kw_only=True):
    """Runners that one hard constraint rejected (grouped by the first constraint they fail)."""

    constraint: str
    count: int
    runners: list[str] = msgspec.field(default_factory=list)
    detail: str = ""


class JobExplanation(msgspec.Struct, frozen=True, kw_only=True):
    """Why a job waits, or why it went where it went.

    ``causes`` are reason codes (``no_runners``, ``mode_disabled``, ``retry_backoff``,
    ``preferred_wait``, ``capacity``, ``job_type``, ``labels``, …; docs/scheduling.md lists them).
    """

    job_id: str
    state: str
    summary: str
    causes: list[str] = msgspec.field(default_factory=list)
    mode: str | None = None
    effective_priority: int | None = None
    queue_position: int | None = None
    queue_length: int | None = None
    estimated_start_at_ms: TimestampMs | None = None
    predicted_finish_at_ms: TimestampMs | None = None
    rejected: list[ConstraintGroup] = msgspec.field(default_factory=list)
    suggestions: list[str] = msgspec.field(default_factory=list)
    placement: dict[str, Any] | None = None
    error: str | None = None
    #: the answering dispatcher holds the job: its queue position and facts are authoritative
    #: (every dispatcher answers; ``Client.explain`` prefers the holder's answer)
    held: bool = False
