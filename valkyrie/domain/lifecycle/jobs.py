"""The job lifecycle as pure functions (no I/O, unit-testable).

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
)

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "INFRA_OUTCOMES",
    "UpdateOutcome",
    "UpdateResult",
    "acceptance_overdue",
    "apply_update",
    "backoff_ms",
    "dispatch_job",
    "ended_unannounced",
    "execution_deadline",
    "finish_job",
    "is_on",
    "requeue_job",
    "retry_after_failure",
    "still_at",
    "time_out",
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
        # the reason the cancel was asked with (the canceller keeps it in the record), else the
        # runner's account of the cancel
        why = record.reason or (reason if outcome == "cancelled" else None)
        return finish_job(
            closed,
            JobState.CANCELLED,
            now_ms=now_ms,
            reason=why or "cancelled by request",
            result=result,
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


def _not_applicable(record: JobRecord, update: JobUpdate) -> UpdateResult | None:
    """Why ``update`` does not apply to ``record`` (already applied, or stale), else ``None``."""
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
    return None


def _failure_reason(update: JobFinished) -> str:
    """The reason recorded for an attempt that did not succeed."""
    if update.outcome == "rejected":
        return f"runner {update.runner_id} refused the dispatch" + (
            f": {update.result.error}" if update.result.error else ""
        )
    if update.outcome == "cancelled":
        return update.result.error or "cancelled"
    if update.outcome == "timed_out":
        return update.result.error or "exceeded max_execution_time_s"
    return update.result.error or f"exit code {update.result.exit_code}"


def still_at(record: JobRecord, update: JobAccepted | JobStarted | JobFinished) -> bool:
    """Whether ``record`` shows ``update``'s step as the last thing that happened to the job.

    An ``accepted`` or ``started`` seen again while this holds may be a redelivery after a crash
    between the record's write and the step's events, which are then emitted again.
    """
    if record.attempt != update.attempt or record.runner_id != update.runner_id:
        return False
    match update:
        case JobAccepted():
            return record.state == JobState.ACCEPTED
        case JobStarted():
            return record.state == JobState.RUNNING
        case _:
            return False


def apply_update(
    record: JobRecord,
    update: JobUpdate,
    *,
    now_ms: int,
    jitter: Callable[[], float] = random.random,
) -> UpdateResult:
    """Apply a runner's update to the job record (pure)."""
    refused = _not_applicable(record, update)
    if refused is not None:
        return refused
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
            new = retry_after_failure(
                record,
                update.outcome,
                now_ms=now_ms,
                reason=_failure_reason(update),
                result=update.result,
                jitter=jitter,
            )
            kind = UpdateOutcome.REQUEUE if new.state == JobState.QUEUED else UpdateOutcome.APPLIED
            return UpdateResult(kind, new)
    raise AssertionError(f"unhandled update {update!r}")  # pragma: no cover


def execution_deadline(record: JobRecord, *, grace_ms: int) -> int:
    """When the attempt on its runner must have ended: ``max_execution_time_s`` + ``grace_ms``.

    Counted from the start, or the latest earlier instant known when no start was reported.
    """
    began = (
        record.started_at_ms
        or record.accepted_at_ms
        or record.dispatched_at_ms
        or record.updated_at_ms
    )
    return began + record.spec.requirements.max_execution_time_s * 1000 + grace_ms


def acceptance_overdue(record: JobRecord, *, now_ms: int, accept_timeout_ms: int) -> bool:
    """A dispatch its runner has not accepted within the window (its dispatcher may have died)."""
    return (
        record.state == JobState.DISPATCHED
        and record.dispatched_at_ms is not None
        and now_ms - record.dispatched_at_ms > accept_timeout_ms
    )


def ended_unannounced(
    record: JobRecord | None, runner_id: str, attempt: int
) -> AttemptRecord | None:
    """Attempt ``attempt`` on ``runner_id`` if it was ended but the job is still at that attempt.

    That is a take-back or time-out whose process died before it announced the outcome and freed
    the slot: both are still to be done, with the outcome the attempt records.
    """
    last = record.attempts[-1] if record is not None and record.attempts else None
    if (
        record is not None
        and record.attempt == attempt
        and last is not None
        and (last.attempt, last.runner_id) == (attempt, runner_id)
        and last.outcome is not None
    ):
        return last
    return None


def time_out(
    record: JobRecord, runner_id: str, attempt: int, *, now_ms: int, grace_ms: int
) -> JobRecord | None:
    """The attempt on ``runner_id`` overran its deadline: retried or ended ``timed_out``.

    ``None`` when the job is no longer on that runner at that attempt.
    """
    if not is_on(record, runner_id, attempt):
        return None
    limit = record.spec.requirements.max_execution_time_s
    return retry_after_failure(
        record,
        "timed_out",
        now_ms=now_ms,
        reason=f"no result within max_execution_time_s={limit}"
        f" + {grace_ms} ms grace (runner {runner_id} silent)",
    )
