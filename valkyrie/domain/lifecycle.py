"""The job lifecycle and runner slot accounting as pure functions (no I/O, unit-testable).

Job states move forward only: queued -> dispatched -> accepted -> running -> terminal. A re-queue
(lost runner, refused dispatch, retry) starts a new attempt; updates carrying an older attempt are
stale and refused, which is what stops a runner that comes back late from overwriting newer work.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

import msgspec

from schemas import (
    TERMINAL_STATES,
    AttemptRecord,
    JobAccepted,
    JobFinished,
    JobRecord,
    JobResult,
    JobStarted,
    JobState,
    JobUpdate,
    RetryPolicy,
    RunnerRecord,
    RunnerState,
    RunnerStats,
)

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "INFRA_OUTCOMES",
    "UpdateOutcome",
    "UpdateResult",
    "apply_update",
    "assign_slot",
    "backoff_ms",
    "dispatch_job",
    "finish_job",
    "is_on",
    "release_slot",
    "requeue_job",
    "retry_after_failure",
    "runner_state",
]

_RANK = {
    JobState.QUEUED: 0,
    JobState.DISPATCHED: 1,
    JobState.ACCEPTED: 2,
    JobState.RUNNING: 3,
}
DEFAULT_RETRY_POLICY = RetryPolicy()
#: attempt outcomes that are the infrastructure's fault: retried by default
INFRA_OUTCOMES = frozenset({"runner_lost", "error", "not_accepted", "runner_restarted"})
#: attempt outcomes that are the job's own failure: retried only with ``retry_on_exit_code``
JOB_OUTCOMES = frozenset({"failed", "timed_out"})
MAX_REFUSALS = 10  # runners refusing a dispatch (draining, full) do not use up retries, up to this
STATS_WINDOW = 50  # success rate and accept latency are moving averages over about this many jobs


def backoff_ms(
    policy: RetryPolicy, failures: int, *, jitter: Callable[[], float] = random.random
) -> int:
    """Delay before the next attempt after ``failures`` failed ones.

    Exponential and capped, with "equal jitter" (half fixed, half uniformly random) so that retries
    of many jobs spread out.
    """
    base = min(
        policy.max_backoff_ms,
        policy.initial_backoff_ms * policy.backoff_multiplier ** max(0, failures - 1),
    )
    return int(base / 2 + jitter() * base / 2)


def _counted_failures(record: JobRecord, policy: RetryPolicy) -> int:
    counted = set(INFRA_OUTCOMES) | (set(JOB_OUTCOMES) if policy.retry_on_exit_code else set())
    return sum(1 for a in record.attempts if a.outcome in counted)


def retry_after_failure(
    record: JobRecord,
    outcome: str,
    *,
    now_ms: int,
    reason: str,
    result: JobResult | None = None,
    jitter: Callable[[], float] = random.random,
) -> JobRecord:
    """The record after attempt ``record.attempt`` ended with ``outcome``: re-queued, or terminal.

    Runner-side failures (``INFRA_OUTCOMES``) are retried at once when the runner was lost (the job
    did not fail, its runner did) and after a backoff otherwise; the job's own failures only when
    its policy says so; a cancel request is never retried. When the budget (``max_attempts``
    counted failures) is spent, the job fails with the reason.
    """
    policy = record.spec.retry_policy or DEFAULT_RETRY_POLICY
    closed = msgspec.structs.replace(
        record, attempts=_close_attempt(record, now_ms=now_ms, outcome=outcome, reason=reason)
    )
    terminal = {
        "failed": JobState.FAILED,
        "timed_out": JobState.TIMED_OUT,
        "cancelled": JobState.CANCELLED,
    }.get(outcome, JobState.FAILED)
    if record.cancel_requested:
        return finish_job(
            closed, JobState.CANCELLED, now_ms=now_ms, reason="cancelled by request", result=result
        )
    if outcome == "rejected":
        refusals = sum(1 for a in closed.attempts if a.outcome == "rejected")
        if refusals >= MAX_REFUSALS:
            return finish_job(
                closed,
                JobState.FAILED,
                now_ms=now_ms,
                reason=f"refused by runners {refusals} times; last: {reason}",
                result=result,
            )
        return _requeued(closed, now_ms=now_ms, reason=reason, not_before_ms=None)
    retryable = outcome in INFRA_OUTCOMES or (outcome in JOB_OUTCOMES and policy.retry_on_exit_code)
    if not retryable:
        return finish_job(closed, terminal, now_ms=now_ms, reason=reason, result=result)
    failures = _counted_failures(closed, policy)
    if failures >= policy.max_attempts:
        return finish_job(
            closed,
            terminal,
            now_ms=now_ms,
            reason=f"retries exhausted after {failures} failed attempts; last: {reason}",
            result=result,
        )
    delay = 0 if outcome == "runner_lost" else backoff_ms(policy, failures, jitter=jitter)
    return _requeued(
        closed, now_ms=now_ms, reason=reason, not_before_ms=now_ms + delay if delay else None
    )


def _requeued(
    record: JobRecord, *, now_ms: int, reason: str, not_before_ms: int | None
) -> JobRecord:
    return msgspec.structs.replace(
        record,
        state=JobState.QUEUED,
        runner_id=None,
        updated_at_ms=now_ms,
        reason=reason,
        not_before_at_ms=not_before_ms,
    )


def _rank(state: JobState) -> int:
    return _RANK.get(state, 10)


def is_on(record: JobRecord | None, runner_id: str, attempt: int) -> TypeGuard[JobRecord]:
    """Whether the job is on ``runner_id`` at ``attempt`` now (dispatched, accepted or running).

    A runner slot held for any other (runner, attempt) is an orphan, or one whose release is on
    its way.
    """
    return (
        record is not None
        and record.runner_id == runner_id
        and record.attempt == attempt
        and record.state in (JobState.DISPATCHED, JobState.ACCEPTED, JobState.RUNNING)
    )


def dispatch_job(record: JobRecord, runner_id: str, *, now_ms: int) -> JobRecord:
    """A queued job placed on ``runner_id``: a new attempt begins."""
    attempt = record.attempt + 1
    return msgspec.structs.replace(
        record,
        state=JobState.DISPATCHED,
        attempt=attempt,
        runner_id=runner_id,
        dispatched_at_ms=now_ms,
        accepted_at_ms=None,
        started_at_ms=None,
        updated_at_ms=now_ms,
        reason=None,
        attempts=[
            *record.attempts,
            AttemptRecord(attempt=attempt, runner_id=runner_id, dispatched_at_ms=now_ms),
        ],
    )


def _close_attempt(
    record: JobRecord, *, now_ms: int, outcome: str, reason: str | None
) -> list[AttemptRecord]:
    attempts = list(record.attempts)
    if attempts and attempts[-1].attempt == record.attempt and attempts[-1].ended_at_ms is None:
        attempts[-1] = msgspec.structs.replace(
            attempts[-1], ended_at_ms=now_ms, outcome=outcome, reason=reason
        )
    return attempts


def requeue_job(
    record: JobRecord,
    *,
    now_ms: int,
    reason: str,
    not_before_ms: int | None = None,
    outcome: str = "requeued",
) -> JobRecord:
    """Take a job back from its runner unconditionally; it is placed again as a new attempt.

    (Taking back through the retry policy is :func:`retry_after_failure`.)
    """
    closed = msgspec.structs.replace(
        record, attempts=_close_attempt(record, now_ms=now_ms, outcome=outcome, reason=reason)
    )
    return _requeued(closed, now_ms=now_ms, reason=reason, not_before_ms=not_before_ms)


def finish_job(
    record: JobRecord,
    state: JobState,
    *,
    now_ms: int,
    reason: str | None,
    result: JobResult | None = None,
) -> JobRecord:
    """End a job in terminal ``state``."""
    return msgspec.structs.replace(
        record,
        state=state,
        updated_at_ms=now_ms,
        finished_at_ms=now_ms,
        reason=reason,
        result=result if result is not None else record.result,
        attempts=_close_attempt(record, now_ms=now_ms, outcome=state.value, reason=reason),
    )


class UpdateOutcome(enum.Enum):
    """What applying a runner's update to a job record means."""

    APPLIED = "applied"
    ALREADY = (
        "already"  # a redelivery of an update already applied, or one overtaken by a later one
    )
    STALE = "stale"  # from an attempt or runner the job no longer belongs to: refuse it
    REQUEUE = "requeue"  # the runner refused the dispatch: place the job again


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """The verdict on one update and, when it changes the record, the new record."""

    outcome: UpdateOutcome
    record: JobRecord | None = None
    reason: str | None = None


def _requeued_by(record: JobRecord, update: JobUpdate) -> bool:
    if not isinstance(update, JobFinished) or record.state != JobState.QUEUED:
        return False
    last = record.attempts[-1] if record.attempts else None
    return (
        last is not None
        and last.attempt == update.attempt == record.attempt
        and last.runner_id == update.runner_id
        and last.outcome == update.outcome
    )


def apply_update(
    record: JobRecord,
    update: JobUpdate,
    *,
    now_ms: int,
    jitter: Callable[[], float] = random.random,
) -> UpdateResult:
    """Apply a runner's update to the job record (pure)."""
    if _requeued_by(record, update):
        # A redelivery of the very result that re-queued this attempt (the handler stopped before
        # announcing it): not stale, so that the announcement is redone.
        return UpdateResult(UpdateOutcome.ALREADY)
    if update.attempt != record.attempt or update.runner_id != record.runner_id:
        if update.attempt < record.attempt or update.runner_id != record.runner_id:
            return UpdateResult(
                UpdateOutcome.STALE,
                reason=f"update for attempt {update.attempt} on {update.runner_id}; the job is at "
                f"attempt {record.attempt} on {record.runner_id or 'no runner'}",
            )
        return UpdateResult(UpdateOutcome.STALE, reason=f"unknown attempt {update.attempt}")
    if record.state in TERMINAL_STATES:
        return UpdateResult(UpdateOutcome.ALREADY)
    if record.state == JobState.QUEUED:
        # This attempt was already taken back (refused, timed out, or runner lost).
        return UpdateResult(UpdateOutcome.STALE, reason=f"attempt {update.attempt} was taken back")
    match update:
        case JobAccepted():
            if _rank(record.state) >= _rank(JobState.ACCEPTED):
                return UpdateResult(UpdateOutcome.ALREADY)
            return UpdateResult(
                UpdateOutcome.APPLIED,
                msgspec.structs.replace(
                    record,
                    state=JobState.ACCEPTED,
                    accepted_at_ms=update.at_ms,
                    updated_at_ms=now_ms,
                ),
            )
        case JobStarted():
            if _rank(record.state) >= _rank(JobState.RUNNING):
                return UpdateResult(UpdateOutcome.ALREADY)
            return UpdateResult(
                UpdateOutcome.APPLIED,
                msgspec.structs.replace(
                    record,
                    state=JobState.RUNNING,
                    accepted_at_ms=record.accepted_at_ms or update.at_ms,
                    started_at_ms=update.at_ms,
                    updated_at_ms=now_ms,
                ),
            )
        case JobFinished(outcome="succeeded"):
            return UpdateResult(
                UpdateOutcome.APPLIED,
                finish_job(
                    record, JobState.SUCCEEDED, now_ms=now_ms, reason=None, result=update.result
                ),
            )
        case JobFinished():
            if update.outcome == "rejected":
                reason = f"runner {update.runner_id} refused the dispatch" + (
                    f": {update.result.error}" if update.result.error else ""
                )
            elif update.outcome == "cancelled":
                reason = update.result.error or "cancelled"
            elif update.outcome == "timed_out":
                reason = update.result.error or "exceeded max_execution_time_s"
            else:
                reason = update.result.error or f"exit code {update.result.exit_code}"
            new = retry_after_failure(
                record,
                update.outcome,
                now_ms=now_ms,
                reason=reason,
                result=update.result,
                jitter=jitter,
            )
            kind = UpdateOutcome.REQUEUE if new.state == JobState.QUEUED else UpdateOutcome.APPLIED
            return UpdateResult(kind, new)
    raise AssertionError(f"unhandled update {update!r}")  # pragma: no cover


def runner_state(
    record: RunnerRecord, *, now_ms: int | None = None, lost_after_ms: int | None = None
) -> RunnerState:
    """The state a runner record implies (offline is decided by the registry's liveness check)."""
    if record.state == RunnerState.OFFLINE:
        return RunnerState.OFFLINE
    if (
        now_ms is not None
        and lost_after_ms is not None
        and now_ms - record.last_heartbeat_at_ms > lost_after_ms
    ):
        return RunnerState.OFFLINE
    if record.drain_requested:
        return RunnerState.DRAINING
    if len(record.assigned_jobs) >= record.registration.max_concurrent_jobs:
        return RunnerState.BUSY
    return RunnerState.ACTIVE


def assign_slot(record: RunnerRecord, job_id: str, attempt: int) -> RunnerRecord | None:
    """Reserve a slot for ``job_id``; ``None`` when the runner cannot take it."""
    if job_id in record.assigned_jobs:
        return record if record.assigned_jobs[job_id] == attempt else None
    if record.state in (RunnerState.OFFLINE, RunnerState.DRAINING) or record.drain_requested:
        return None
    if len(record.assigned_jobs) >= record.registration.max_concurrent_jobs:
        return None
    updated = msgspec.structs.replace(
        record, assigned_jobs={**record.assigned_jobs, job_id: attempt}
    )
    return msgspec.structs.replace(updated, state=runner_state(updated))


def release_slot(
    record: RunnerRecord,
    job_id: str,
    attempt: int | None = None,
    *,
    succeeded: bool | None = None,
    accept_latency_ms: float | None = None,
) -> RunnerRecord | None:
    """Free ``job_id``'s slot (only for ``attempt`` when given) and fold the outcome into stats.

    Returns ``None`` when there is nothing to change.
    """
    held = record.assigned_jobs.get(job_id)
    if held is None or (attempt is not None and held != attempt):
        return None
    assigned = {k: v for k, v in record.assigned_jobs.items() if k != job_id}
    stats = record.stats
    if succeeded is not None:
        alpha = 1.0 / STATS_WINDOW
        stats = RunnerStats(
            jobs_completed=stats.jobs_completed + (1 if succeeded else 0),
            jobs_failed=stats.jobs_failed + (0 if succeeded else 1),
            success_rate=(1 - alpha) * stats.success_rate + alpha * (1.0 if succeeded else 0.0),
            accept_latency_ms=(
                stats.accept_latency_ms
                if accept_latency_ms is None
                else (
                    accept_latency_ms
                    if stats.jobs_completed + stats.jobs_failed == 0
                    else (1 - alpha) * stats.accept_latency_ms + alpha * accept_latency_ms
                )
            ),
            recent_failures=0 if succeeded else stats.recent_failures + 1,
        )
    updated = msgspec.structs.replace(record, assigned_jobs=assigned, stats=stats)
    return msgspec.structs.replace(updated, state=runner_state(updated))
