"""Health reports of worker processes, the monitor's summary, and the automatic-fallback record.

Every worker process publishes a :class:`HealthReport` on ``<prefix>.health.<component>`` (core
NATS); the monitor handler folds them, the consumer lags and the runner pool into a
:class:`HealthSummary` kept in the stats KV bucket under ``health``. While an automatic fallback is
in force, the stats bucket also holds a :class:`FallbackRecord` under ``fallback``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from schemas._common import NonNegativeInt, TimestampMs

__all__ = [
    "HEALTH_STATUSES",
    "CheckResult",
    "ComponentHealth",
    "ConsumerLag",
    "FallbackRecord",
    "HealthReport",
    "HealthStatus",
    "HealthSummary",
    "RunnerPool",
]

HealthStatus = Literal["healthy", "degraded", "unhealthy"]

#: Every status, best first: the overall status is the last one any input reaches.
HEALTH_STATUSES: tuple[HealthStatus, ...] = ("healthy", "degraded", "unhealthy")


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one check: its status, the measured value (if any) and why."""

    status: HealthStatus
    value: float | None = None
    detail: str = ""


class HealthReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one worker process says about itself, on ``<prefix>.health.<component>``.

    ``component`` is the process's handler names joined with ``+``; ``instance`` is random per
    process. ``stopping`` marks the last report of a process that shuts down on purpose, so that
    the monitor forgets it instead of calling it stalled.
    """

    component: str
    instance: str
    at_ms: TimestampMs
    status: HealthStatus
    config_revision: NonNegativeInt = 0
    checks: dict[str, CheckResult] = msgspec.field(default_factory=dict)
    handlers: list[str] = msgspec.field(default_factory=list)
    host: str = ""
    pid: int | None = None
    started_at_ms: TimestampMs | None = None
    stopping: bool = False


class ComponentHealth(msgspec.Struct, frozen=True, kw_only=True):
    """The monitor's verdict on one reporting process (one instance of a component)."""

    component: str
    instance: str
    status: HealthStatus
    config_revision: NonNegativeInt = 0
    last_report_at_ms: TimestampMs
    age_ms: NonNegativeInt = 0
    failing: dict[str, CheckResult] = msgspec.field(default_factory=dict)
    host: str = ""
    pid: int | None = None


class ConsumerLag(msgspec.Struct, frozen=True, kw_only=True):
    """How far one durable consumer is behind its stream.

    ``pending`` is the consumer's undelivered messages; for a durable that does not exist yet on a
    work-queue stream, the messages stored on its filter (all of them wait for it). ``None`` when
    it could not be measured.
    """

    durable: str
    stream: str
    pending: NonNegativeInt | None = None
    status: HealthStatus = "healthy"
    detail: str = ""


class RunnerPool(msgspec.Struct, frozen=True, kw_only=True):
    """The runners in the runners KV bucket by state; ``available`` counts the active and busy ones.

    ``status`` is ``unhealthy`` with none available, ``degraded`` with fewer than ``min_active``
    (``health.min_active_runners``; 0 switches the check off).
    """

    total: NonNegativeInt = 0
    available: NonNegativeInt = 0
    active: NonNegativeInt = 0
    busy: NonNegativeInt = 0
    draining: NonNegativeInt = 0
    offline: NonNegativeInt = 0
    min_active: NonNegativeInt = 0
    status: HealthStatus = "healthy"


class FallbackRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The automatic fallback the monitor put in force (stats KV bucket, key ``fallback``).

    ``state`` is ``active`` while the automatic fallback holds, ``overridden`` after an operator
    changed the mode by hand (the monitor then does not fall back again until it sees the system
    healthy). ``previous_mode`` is the mode to return to; ``previous_override`` tells whether it
    was a runtime override (restored as such) or came from the processes' own config (restored by
    removing the override).
    """

    state: Literal["active", "overridden"] = "active"
    previous_mode: str
    previous_override: bool = False
    config_revision: NonNegativeInt = 0
    at_ms: TimestampMs
    reason: str = ""
    monitor: str = ""


class HealthSummary(msgspec.Struct, frozen=True, kw_only=True):
    """The monitor's view of the whole installation (stats KV bucket, key ``health``).

    ``status`` is the worst of every component, consumer and the runner pool; ``reasons`` says in
    words what is not healthy.
    """

    status: HealthStatus
    at_ms: TimestampMs
    mode: str
    config_revision: NonNegativeInt = 0
    components: list[ComponentHealth] = msgspec.field(default_factory=list)
    consumers: list[ConsumerLag] = msgspec.field(default_factory=list)
    runner_pool: RunnerPool = msgspec.field(default_factory=RunnerPool)
    reasons: list[str] = msgspec.field(default_factory=list)
    monitor: str = ""
    report_interval_ms: NonNegativeInt = 0
    stale_after_ms: NonNegativeInt = 0
    fallback: FallbackRecord | None = None
