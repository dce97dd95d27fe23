"""Job submission (v2), its parts, and the job record kept in the jobs KV bucket."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

from schemas._common import (
    Identifier,
    Label,
    NonNegativeFloat,
    NonNegativeInt,
    Priority,
    Ratio,
    TimestampMs,
)

__all__ = [
    "MAX_SECRET_ENV",
    "MAX_SECRET_VALUE_CHARS",
    "REDACTED",
    "TERMINAL_STATES",
    "AffinityRule",
    "AttemptRecord",
    "FieldError",
    "JobRecord",
    "JobResult",
    "JobState",
    "JobSubmission",
    "PerformanceTargets",
    "QosRequirements",
    "Refusal",
    "Requirements",
    "ResourceUsage",
    "RetryPolicy",
    "RoutingHints",
    "SecretName",
    "SubmitVerdict",
]

#: what every copy of a job shows in place of a secret value
REDACTED = "***"
#: secret environment variables one job may declare
MAX_SECRET_ENV = 64
#: characters one secret value may have
MAX_SECRET_VALUE_CHARS = 32 * 1024

#: an environment variable name (it is also a JSON-path member and a log word)
SecretName = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="an environment variable name: letters, digits and '_', not starting with a digit",
    ),
]

#: why intake refused a submission: it is ``invalid`` (``errors`` say where), its tenant has as
#: many queued jobs as its ``quota`` allows, JetStream is full (``storage_full``), or it reuses
#: the idempotency key, ``Nats-Msg-Id`` or job id of job ``job_id`` with another body
#: (``conflict``)
Refusal = Literal["invalid", "quota", "storage_full", "conflict"]


class Requirements(msgspec.Struct, frozen=True, kw_only=True):
    """Resources and capabilities a runner must offer to take the job (hard constraints)."""

    cpu_cores: NonNegativeFloat = 0.0
    memory_mb: NonNegativeInt = 0
    storage_gb: NonNegativeFloat = 0.0
    gpu_count: NonNegativeInt = 0
    max_execution_time_s: Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)] = 3600
    required_capabilities: list[Label] = msgspec.field(default_factory=list)
    preferred_regions: list[Label] = msgspec.field(default_factory=list)


class QosRequirements(msgspec.Struct, frozen=True, kw_only=True):
    """Quality-of-service demands measured against runner statistics."""

    max_latency_ms: NonNegativeFloat | None = None
    min_throughput_bytes_per_s: NonNegativeInt | None = None
    reliability_threshold: Ratio | None = None
    priority_class: Literal["platinum", "gold", "silver", "bronze", "best_effort"] | None = None


class AffinityRule(msgspec.Struct, frozen=True, kw_only=True):
    """Match on a runner label or metadata key.

    ``required`` is hard, ``preferred`` adds ``weight`` to matching runners, ``anti_affinity``
    removes runners whose ``key`` has one of ``values`` (hard unless ``weight`` is set).
    """

    rule_type: Literal["required", "preferred", "anti_affinity"]
    key: Label
    values: list[str] = msgspec.field(default_factory=list)
    weight: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None


class RoutingHints(msgspec.Struct, frozen=True, kw_only=True):
    """Soft and hard hints on where the job should run."""

    preferred_runners: list[Identifier] = msgspec.field(default_factory=list)
    excluded_runners: list[Identifier] = msgspec.field(default_factory=list)
    geographic_preference: Label | None = None
    affinity_rules: list[AffinityRule] = msgspec.field(default_factory=list)
    preferred_wait_s: NonNegativeFloat = 0.0


class PerformanceTargets(msgspec.Struct, frozen=True, kw_only=True):
    """Service-level targets; breaching them raises events and boosts the job."""

    max_dispatch_latency_ms: NonNegativeFloat | None = None
    target_completion_time_s: NonNegativeFloat | None = None
    resource_efficiency_target: Ratio | None = None


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a failed attempt is retried; exponential backoff with full jitter."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    initial_backoff_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 1000
    backoff_multiplier: Annotated[float, msgspec.Meta(ge=1, le=10)] = 2.0
    max_backoff_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] = 60_000
    retry_on_exit_code: bool = False


class JobSubmission(msgspec.Struct, frozen=True, kw_only=True):
    """A v2 job submission, published on ``<prefix>.jobs.submit.<identity>``.

    ``job_id`` lets a client choose the id; ``idempotency_key`` makes resubmissions return the
    first job. ``deadline_at_ms`` is the instant after which the job may no longer start.
    ``secret_env`` holds environment variables only the runner of an attempt receives: every
    copy of the job (its record, events, HTTP and CLI views) shows their names with the value
    ``"***"`` (docs/security.md#secrets).
    """

    job_type: Label
    priority: Priority = 2
    payload: Any = None
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    qos_requirements: QosRequirements | None = None
    routing_hints: RoutingHints | None = None
    performance_targets: PerformanceTargets | None = None
    deadline_at_ms: (
        Annotated[
            TimestampMs,
            msgspec.Meta(
                description="must be in the future: a deadline already past is refused "
                "(a job whose deadline passes while it waits ends `expired`)"
            ),
        ]
        | None
    ) = None
    correlation_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    job_id: Identifier | None = None
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    retry_policy: RetryPolicy | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    secret_env: Annotated[
        dict[SecretName, Annotated[str, msgspec.Meta(max_length=MAX_SECRET_VALUE_CHARS)]],
        msgspec.Meta(max_length=MAX_SECRET_ENV),
    ] = msgspec.field(default_factory=dict)

    def __repr__(self) -> str:
        # a submission in memory still holds its secret values: a log line or a traceback that
        # shows it must not
        if not self.secret_env or all(v == REDACTED for v in self.secret_env.values()):
            return msgspec.Struct.__repr__(self)
        hidden = dict.fromkeys(self.secret_env, REDACTED)
        return msgspec.Struct.__repr__(msgspec.structs.replace(self, secret_env=hidden))


class JobState(enum.StrEnum):
    """Where a job is in its lifecycle."""

    QUEUED = "queued"
    DISPATCHED = "dispatched"
    ACCEPTED = "accepted"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"


TERMINAL_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT, JobState.EXPIRED}
)


class ResourceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """What an attempt consumed on its runner."""

    cpu_time_ms: NonNegativeInt = 0
    memory_peak_mb: NonNegativeFloat = 0.0
    storage_used_mb: NonNegativeFloat = 0.0
    network_bytes_sent: NonNegativeInt = 0
    network_bytes_received: NonNegativeInt = 0


class JobResult(msgspec.Struct, frozen=True, kw_only=True):
    """The final result of one attempt, as the runner reported it."""

    exit_code: int | None = None
    duration_ms: NonNegativeInt = 0
    output_tail: str = ""
    resource_usage: ResourceUsage = msgspec.field(default_factory=ResourceUsage)
    error: str | None = None


class AttemptRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One placement of the job on a runner, kept in the record's history."""

    attempt: int
    runner_id: str
    dispatched_at_ms: TimestampMs
    ended_at_ms: TimestampMs | None = None
    outcome: str | None = None
    reason: str | None = None


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The authoritative state of one job (jobs KV bucket, key = job id)."""

    id: Identifier
    state: JobState
    spec: JobSubmission
    api_version: Literal["v1", "v2"] = "v2"
    submitted_at_ms: TimestampMs
    updated_at_ms: TimestampMs
    attempt: int = 0
    runner_id: str | None = None
    dispatched_at_ms: TimestampMs | None = None
    accepted_at_ms: TimestampMs | None = None
    started_at_ms: TimestampMs | None = None
    finished_at_ms: TimestampMs | None = None
    not_before_at_ms: TimestampMs | None = None
    result: JobResult | None = None
    reason: str | None = None
    cancel_requested: bool = False
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    source_seq: int | None = None
    #: who submitted it, as the submit subject proves (``admin``, ``submitter-ci``, or
    #: ``http:<token name>`` through the gateway); the body's word on an open installation
    submitted_by: str | None = None
    #: SHA-256 of the submission's canonical JSON: a later submission with this job id but
    #: another body is refused rather than taken for a duplicate
    request_sha256: str | None = None


class FieldError(msgspec.Struct, frozen=True, kw_only=True):
    """One problem with an input, located by a JSON path such as ``$.requirements.cpu_cores``."""

    path: str
    reason: str


class SubmitVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a submission, sent to the ``Valkyrie-Reply-To`` subject when present.

    A refusal (``accepted`` false) says why in ``refusal`` (``None`` from intakes that predate
    it: then the submission was invalid) and ``errors``.
    """

    accepted: bool
    job_id: str | None = None
    duplicate: bool = False
    state: JobState | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)
    warnings: list[FieldError] = msgspec.field(default_factory=list)
    refusal: Refusal | None = None
