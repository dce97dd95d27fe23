"""Runner registration, heartbeats, dispatches, job updates and control messages."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec

from schemas._common import (
    Identifier,
    Label,
    NonNegativeFloat,
    NonNegativeInt,
    Ratio,
    TimestampMs,
)
from schemas.jobs import REDACTED, FieldError, JobResult, JobSubmission

__all__ = [
    "CancelJob",
    "Dispatch",
    "JobAccepted",
    "JobFinished",
    "JobLog",
    "JobStarted",
    "JobUpdate",
    "RegistrationVerdict",
    "RunnerCapabilities",
    "RunnerCommand",
    "RunnerHeartbeat",
    "RunnerLocation",
    "RunnerRecord",
    "RunnerRegistration",
    "RunnerResources",
    "RunnerState",
    "RunnerStats",
]


class RunnerCapabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What kinds of work a runner can do."""

    job_types: list[Label] = msgspec.field(default_factory=list)
    languages: list[Label] = msgspec.field(default_factory=list)
    frameworks: list[Label] = msgspec.field(default_factory=list)
    custom: dict[str, str] = msgspec.field(default_factory=dict)


class RunnerResources(msgspec.Struct, frozen=True, kw_only=True):
    """The resources a runner offers in total."""

    cpu_cores: NonNegativeFloat = 1.0
    memory_mb: NonNegativeInt = 1024
    storage_gb: NonNegativeFloat = 10.0
    gpu_count: NonNegativeInt = 0
    gpu_type: str | None = None


class RunnerLocation(msgspec.Struct, frozen=True, kw_only=True):
    """Where a runner is."""

    region: Label | None = None
    zone: Label | None = None
    datacenter: Label | None = None


class RunnerRegistration(msgspec.Struct, frozen=True, kw_only=True):
    """Sent by a runner (request/reply) on ``<prefix>.runners.register``."""

    runner_id: Identifier
    capabilities: RunnerCapabilities = msgspec.field(default_factory=RunnerCapabilities)
    resources: RunnerResources = msgspec.field(default_factory=RunnerResources)
    max_concurrent_jobs: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1
    location: RunnerLocation = msgspec.field(default_factory=RunnerLocation)
    performance_tier: Literal["high", "medium", "low", "specialized"] = "medium"
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    heartbeat_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 1000
    session_id: Identifier | None = None


class RunnerHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """Published by a runner every ``heartbeat_interval_ms`` on ``<prefix>.runners.heartbeat.<id>``."""

    runner_id: Identifier
    sent_at_ms: TimestampMs
    load: Ratio = 0.0
    running_jobs: list[str] = msgspec.field(default_factory=list)
    draining: bool = False
    session_id: Identifier | None = None


class RunnerState(enum.StrEnum):
    """A runner's state in the registry."""

    ACTIVE = "active"
    BUSY = "busy"
    DRAINING = "draining"
    OFFLINE = "offline"


class RunnerStats(msgspec.Struct, frozen=True, kw_only=True):
    """Measured behaviour of a runner, kept current from the event flow."""

    jobs_completed: NonNegativeInt = 0
    jobs_failed: NonNegativeInt = 0
    success_rate: Ratio = 1.0
    accept_latency_ms: NonNegativeFloat = 0.0
    recent_failures: NonNegativeInt = 0


class RunnerRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A runner's entry in the runners KV bucket (key = runner id)."""

    registration: RunnerRegistration
    state: RunnerState
    registered_at_ms: TimestampMs
    last_heartbeat_at_ms: TimestampMs
    load: Ratio = 0.0
    assigned_jobs: dict[str, int] = msgspec.field(default_factory=dict)
    drain_requested: bool = False
    stats: RunnerStats = msgspec.field(default_factory=RunnerStats)


class Dispatch(msgspec.Struct, frozen=True, kw_only=True):
    """A placement decision, published on ``<prefix>.dispatch.<runner_id>``.

    ``spec`` is the job as recorded (secret values are ``"***"`` there); ``secret_env`` holds
    the values, for this attempt's runner only: it sets them in the job's environment and
    replaces them with ``***`` in every log line and result it publishes. ``log_max_bytes``
    bounds what it publishes of the attempt's log (``None``: the runner's own default).
    """

    job_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    runner_id: Identifier
    spec: JobSubmission
    dispatched_at_ms: TimestampMs
    accept_by_at_ms: TimestampMs
    secret_env: dict[str, str] = msgspec.field(default_factory=dict)
    log_max_bytes: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def __repr__(self) -> str:
        # never show the values in a log line or a traceback
        if not self.secret_env:
            return msgspec.Struct.__repr__(self)
        hidden = dict.fromkeys(self.secret_env, REDACTED)
        return msgspec.Struct.__repr__(msgspec.structs.replace(self, secret_env=hidden))


class JobAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="accepted", tag_field="kind"):
    """The runner has taken the dispatch."""

    job_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    runner_id: Identifier
    at_ms: TimestampMs


class JobStarted(msgspec.Struct, frozen=True, kw_only=True, tag="started", tag_field="kind"):
    """The job's process has started."""

    job_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    runner_id: Identifier
    at_ms: TimestampMs


class JobFinished(msgspec.Struct, frozen=True, kw_only=True, tag="finished", tag_field="kind"):
    """The attempt ended; ``outcome`` says how."""

    job_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    runner_id: Identifier
    at_ms: TimestampMs
    outcome: Literal["succeeded", "failed", "timed_out", "cancelled", "error", "rejected"]
    result: JobResult = msgspec.field(default_factory=JobResult)


JobUpdate = JobAccepted | JobStarted | JobFinished


class JobLog(msgspec.Struct, frozen=True, kw_only=True):
    """Log lines of one attempt, published on ``<prefix>.logs.<job_id>``."""

    job_id: Identifier
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    runner_id: Identifier
    at_ms: TimestampMs
    stream: Literal["stdout", "stderr", "system"] = "stdout"
    seq: NonNegativeInt = 0
    lines: list[str] = msgspec.field(default_factory=list)


class RegistrationVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """The registry's answer to a registration (or drain/undrain) request."""

    accepted: bool
    runner_id: str | None = None
    state: RunnerState | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)
    abandon_jobs: list[str] = msgspec.field(default_factory=list)
    lost_after_ms: int | None = None
    #: a refusal that may pass soon (a deregistration while the last slot releases are being
    #: written): ask again after this many milliseconds
    retry_after_ms: int | None = None
    #: fields of the request that were ignored or converted (the HTTP bridge fills these in)
    warnings: list[FieldError] = msgspec.field(default_factory=list)


class CancelJob(msgspec.Struct, frozen=True, kw_only=True):
    """Request to cancel a job, on ``<prefix>.jobs.cancel``."""

    job_id: Identifier
    reason: str = "cancelled by request"
    requested_by: str | None = None


class RunnerCommand(msgspec.Struct, frozen=True, kw_only=True):
    """A command to one runner on ``<prefix>.control.<runner_id>``."""

    command: Literal["cancel", "abandon", "drain", "undrain"]
    job_id: str | None = None
    attempt: int | None = None
    reason: str | None = None
    grace_period_s: NonNegativeFloat = 10.0
