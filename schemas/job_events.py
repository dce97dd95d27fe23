"""Typed events about jobs (``job.*``) and refused submissions (``intake.rejected``)."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from schemas._common import TimestampMs
from schemas.event_base import TypedEvent
from schemas.jobs import FieldError, JobRecord, JobState, Refusal

__all__ = [
    "JOB_ENDED",
    "IntakeRejected",
    "JobAcceptedEvent",
    "JobCancelRequested",
    "JobCancelled",
    "JobDispatched",
    "JobDuplicate",
    "JobEnded",
    "JobExpired",
    "JobFailed",
    "JobQueued",
    "JobRequeued",
    "JobSloBreach",
    "JobStaleUpdate",
    "JobStartedEvent",
    "JobSucceeded",
    "JobTargetAtRisk",
    "JobTargetMissed",
    "JobTimedOut",
    "RunnerUp",
]


class _JobEvent(TypedEvent, frozen=True, kw_only=True):
    entity: ClassVar[str] = "job"
    subject_doc: ClassVar[str] = "the job id"

    attempt: int
    correlation_id: str | None = None


class _OncePerAttempt(_JobEvent, frozen=True, kw_only=True):
    def event_id(self) -> str:
        """``<job_id>.<kind>.<attempt>``: at most one of this kind per attempt."""
        return f"{self.subject_id}.{self.kind}.{self.attempt}"


class JobQueued(_OncePerAttempt, frozen=True, kw_only=True):
    """The job waits for a runner (intake, or whoever re-queued it); dispatchers consume these.

    A record up to 4 KiB travels as ``record`` with its KV ``revision``, so a dispatcher places
    the job without reading it back (``valkyrie tail`` hides ``record``). A job placed the moment
    it was accepted has ``placed_attempt`` (the attempt it was dispatched as) instead, and
    dispatchers settle the event without placing it.
    """

    event_type: ClassVar[str] = "job.queued"
    optional_keys: ClassVar[frozenset[str]] = frozenset({"placed_attempt", "record", "revision"})

    job_type: str
    priority: int
    api_version: str
    reason: str | None
    not_before_at_ms: TimestampMs | None
    placed_attempt: int | None = None
    record: JobRecord | None = None
    revision: int | None = None


class JobRequeued(_OncePerAttempt, frozen=True, kw_only=True):
    """A new attempt waits (results, supervisor, dispatcher, registry); a ``job.queued`` follows."""

    event_type: ClassVar[str] = "job.requeued"

    reason: str | None
    from_runner: str | None
    not_before_at_ms: TimestampMs | None


class RunnerUp(msgspec.Struct, frozen=True, kw_only=True):
    """A runner that scored below the chosen one."""

    runner_id: str
    score: float


class JobDispatched(_OncePerAttempt, frozen=True, kw_only=True):
    """The dispatcher's decision: where the attempt went and why (``valkyrie jobs explain``).

    ``predicted_finish_at_ms`` is there once jobs of this type have finished before.
    """

    event_type: ClassVar[str] = "job.dispatched"
    optional_keys: ClassVar[frozenset[str]] = frozenset({"predicted_finish_at_ms"})

    runner_id: str
    score: float | None
    runners_up: list[RunnerUp]
    candidates: int
    rejected: dict[str, int]
    slots_used: int
    capacity: int
    queued_ms: int
    effective_priority: int
    boosted: bool
    tenant: str
    mode: str
    preferred: bool
    predicted_finish_at_ms: TimestampMs | None = None


class JobAcceptedEvent(_OncePerAttempt, frozen=True, kw_only=True):
    """The runner accepted the dispatch (results)."""

    event_type: ClassVar[str] = "job.accepted"

    runner_id: str


class JobStartedEvent(_OncePerAttempt, frozen=True, kw_only=True):
    """The runner started the job (results)."""

    event_type: ClassVar[str] = "job.started"

    runner_id: str


class JobEnded(_OncePerAttempt, frozen=True, kw_only=True):
    """The job reached a terminal state (whoever ended it: results, supervisor, canceller, ...)."""

    runner_id: str | None
    job_type: str
    exit_code: int | None
    duration_ms: int | None
    reason: str | None


class JobSucceeded(JobEnded, frozen=True, kw_only=True):
    """The job ended ``succeeded`` (results)."""

    event_type: ClassVar[str] = "job.succeeded"


class JobFailed(JobEnded, frozen=True, kw_only=True):
    """The job ended ``failed``: its last attempt failed or its retry budget is spent."""

    event_type: ClassVar[str] = "job.failed"


class JobCancelled(JobEnded, frozen=True, kw_only=True):
    """The job ended ``cancelled`` (canceller, results, or a take-back of a cancelled job)."""

    event_type: ClassVar[str] = "job.cancelled"


class JobTimedOut(JobEnded, frozen=True, kw_only=True):
    """The job ended ``timed_out``: it ran past its limit (runner or supervisor)."""

    event_type: ClassVar[str] = "job.timed_out"


class JobExpired(JobEnded, frozen=True, kw_only=True):
    """The job ended ``expired``: its deadline passed before it could start (dispatcher)."""

    event_type: ClassVar[str] = "job.expired"


#: the typed event of each terminal state
JOB_ENDED: dict[JobState, type[JobEnded]] = {
    JobState.SUCCEEDED: JobSucceeded,
    JobState.FAILED: JobFailed,
    JobState.CANCELLED: JobCancelled,
    JobState.TIMED_OUT: JobTimedOut,
    JobState.EXPIRED: JobExpired,
}


class JobTargetMissed(_JobEvent, frozen=True, kw_only=True):
    """The job ended later than its ``target_completion_time_s`` (whoever ended it)."""

    event_type: ClassVar[str] = "job.target_missed"

    target_completion_time_s: float
    took_ms: int

    def event_id(self) -> str:
        """``<job_id>.target_missed``: once per job."""
        return f"{self.subject_id}.target_missed"


class JobTargetAtRisk(_OncePerAttempt, frozen=True, kw_only=True):
    """At dispatch, jobs of this type take long enough to miss the completion target (dispatcher)."""

    event_type: ClassVar[str] = "job.target_at_risk"

    target_completion_time_s: float
    predicted_finish_at_ms: TimestampMs


class JobSloBreach(_OncePerAttempt, frozen=True, kw_only=True):
    """The job waited longer than its ``max_dispatch_latency_ms`` and was boosted (dispatcher)."""

    event_type: ClassVar[str] = "job.slo_breach"

    target: str
    limit_ms: float | None
    waited_ms: int
    action: str


class JobStaleUpdate(_JobEvent, frozen=True, kw_only=True):
    """A runner's update for an attempt or runner the job is no longer on was refused (results).

    ``attempt`` is the update's attempt.
    """

    event_type: ClassVar[str] = "job.stale_update"

    runner_id: str
    update: str
    reason: str

    def event_id(self) -> str:
        """``<job_id>.stale.<runner_id>.<attempt>.<update>``: once per refused update."""
        return f"{self.subject_id}.stale.{self.runner_id}.{self.attempt}.{self.update}"


class JobCancelRequested(_OncePerAttempt, frozen=True, kw_only=True):
    """The job's runner was asked to cancel it (canceller)."""

    event_type: ClassVar[str] = "job.cancel_requested"

    reason: str
    runner_id: str | None


class JobDuplicate(TypedEvent, frozen=True, kw_only=True):
    """A submission repeated an earlier one (same idempotency key, message id or job id) (intake).

    ``stream_id`` and ``stream_seq`` locate the repeated submission in the submit stream.
    """

    entity: ClassVar[str] = "job"
    event_type: ClassVar[str] = "job.duplicate"
    subject_doc: ClassVar[str] = "the first job's id"

    stream_seq: int
    stream_id: str = ""

    def event_id(self) -> str:
        """``<job_id>.duplicate.<stream_id>-<stream_seq>``: once per repeated submission."""
        return f"{self.subject_id}.duplicate.{self.stream_id}-{self.stream_seq}"


class IntakeRejected(TypedEvent, frozen=True, kw_only=True):
    """A submission was refused, with every problem (intake).

    An invalid submission (``refusal`` ``invalid``, or ``None`` from older intakes) and one
    refused because JetStream is full (``storage_full``) are also dead-lettered, so they can be
    replayed; one over its tenant's queue ``quota`` is not (its sender retries later).
    """

    entity: ClassVar[str] = "intake"
    event_type: ClassVar[str] = "intake.rejected"
    subject_doc: ClassVar[str] = "`<submit stream id>-<stream_seq>`"

    errors: list[FieldError]
    stream_seq: int
    refusal: Refusal | None = None

    def event_id(self) -> str:
        """``rejected-<subject_id>``: once per submission."""
        return f"rejected-{self.subject_id}"
