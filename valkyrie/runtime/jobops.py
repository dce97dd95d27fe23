"""Multi-step job operations shared by handlers, each step idempotent so a crash can be redone.

The order is always: job record first (the source of truth), then the runner's slot, then the event.
A crash between steps leaves a state the reconciler or a redelivery completes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
import nats.js.errors
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from schemas import (
    JOB_ENDED,
    TERMINAL_STATES,
    JobQueued,
    JobRecord,
    JobRequeued,
    JobState,
    JobTargetMissed,
    RunnerCommand,
)
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER, UPDATE_DECODER, encode, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher
from valkyrie.bus.kv import Versioned, cas_update, get_versioned
from valkyrie.bus.outbox import Outbox
from valkyrie.domain.lifecycle import release_slot, retry_after_failure, time_out
from valkyrie.runtime.consumer import OUTAGE_PATIENCE_S, UNAVAILABLE
from valkyrie.runtime.secrets import SecretStore
from valkyrie.runtime.views import RunnerView

__all__ = ["INLINE_RECORD_BYTES", "JobOps", "terminal_ttl", "through_outages"]

#: job records up to this size travel inside their ``job.queued`` event
INLINE_RECORD_BYTES = 4096

log = logging.getLogger("valkyrie.jobops")

MAX_UNAPPLIED_SCAN = 500  # unapplied updates of one runner looked through before giving it time

T = TypeVar("T")


async def through_outages(step: Callable[[], Awaitable[T]]) -> T:
    """Run an idempotent ``step``, again and again while the bus is unavailable (then re-raise)."""
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(UNAVAILABLE),
        stop=stop_after_delay(OUTAGE_PATIENCE_S),
        wait=wait_exponential(multiplier=0.1, max=2.0),
        reraise=True,
    ):
        with attempt:
            return await step()
    raise AssertionError("unreachable: tenacity re-raises the last error")


def terminal_ttl(retention_s: float | None) -> Callable[[JobRecord], float | None]:
    """Time to live for a job record: ended jobs are removed after ``retention_s``."""

    def ttl(record: JobRecord) -> float | None:
        return retention_s if retention_s and record.state in TERMINAL_STATES else None

    return ttl


class JobOps:
    """Take jobs back, free slots, announce queued jobs and outcomes.

    ``retention_s`` (read on every write, so it can change live) bounds how long ended jobs stay.
    Announcing that a job ended also deletes its secret values (:attr:`secrets`).
    """

    def __init__(
        self,
        bus: Bus,
        events: EventPublisher,
        retention_s: Callable[[], float | None] | None = None,
    ) -> None:
        self._bus = bus
        self._events = events
        self._retention_s = retention_s or (lambda: None)
        #: the process's runner view, when its handler holds one: slot releases then start from
        #: the record it already has instead of reading it first
        self.runners: RunnerView | None = None
        #: the jobs' secret values (deleted here when a job ends)
        self.secrets = SecretStore(bus)

    def job_ttl(self) -> Callable[[JobRecord], float | None]:
        """The TTL function for job-record writes now."""
        return terminal_ttl(self._retention_s())

    async def announce_queued(
        self,
        record: JobRecord,
        *,
        revision: int | None = None,
        at_ms: int | None = None,
        placed_attempt: int | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """Emit ``job.queued`` for the record's current attempt (dispatchers consume these).

        With the record's KV ``revision``, a small record travels in the event (``record``,
        ``revision``) so a dispatcher can place the job without reading it back first. A job a
        dispatcher placed the moment it was queued says so (``placed_attempt``): dispatchers
        then settle the event without placing it again.
        """
        inline = (
            placed_attempt is None
            and revision is not None
            and len(encode(record)) <= INLINE_RECORD_BYTES
        )
        await self._events.emit(
            JobQueued(
                subject_id=record.id,
                attempt=record.attempt,
                correlation_id=record.spec.correlation_id,
                job_type=record.spec.job_type,
                priority=record.spec.priority,
                api_version=record.api_version,
                reason=record.reason,
                not_before_at_ms=record.not_before_at_ms,
                placed_attempt=placed_attempt,
                record=record if inline else None,
                revision=revision if inline else None,
            ),
            at_ms=at_ms,
            outbox=outbox,
        )

    async def release(
        self,
        runner_id: str,
        job_id: str,
        attempt: int | None,
        *,
        succeeded: bool | None = None,
        accept_latency_ms: float | None = None,
    ) -> bool:
        """Free the runner's slot held for ``job_id`` (at ``attempt`` when given)."""
        kv = await self._bus.kv("runners")
        view = self.runners
        latest, written = await cas_update(
            kv,
            runner_id,
            RUNNER_DECODER,
            lambda r: release_slot(
                r, job_id, attempt, succeeded=succeeded, accept_latency_ms=accept_latency_ms
            ),
            known=view.records.get(runner_id) if view is not None else None,
        )
        if view is not None and latest is not None:
            view.offer(runner_id, latest)
        return written

    async def take_back(
        self,
        job_id: str,
        *,
        attempt: int,
        runner_id: str,
        reason: str,
        outcome: str = "runner_lost",
        known: Versioned[JobRecord] | None = None,
    ) -> JobRecord | None:
        """Take ``job_id`` back if it is still on ``runner_id`` at ``attempt``; free that slot.

        The job is re-queued for a new attempt, or ends (failed, or cancelled when a cancel was
        requested) when its retry budget is spent. Returns the new record, or ``None`` when the
        job had moved on (nothing to do).
        """
        now = now_ms()
        unaccepted = outcome == "not_accepted"

        def on_runner(record: JobRecord) -> bool:
            if record.attempt != attempt or record.runner_id != runner_id:
                return False
            if unaccepted:  # accepted meanwhile: it is not ours to take back
                return record.state == JobState.DISPATCHED
            return record.state not in TERMINAL_STATES and record.state != JobState.QUEUED

        def decide(record: JobRecord) -> JobRecord | None:
            if not on_runner(record):
                return None
            # a taken-back attempt is a failed one: it counts against the retry budget, and a
            # job whose cancel was requested ends cancelled instead of going to another runner
            return retry_after_failure(record, outcome, now_ms=now, reason=reason)

        jobs = await self._bus.kv("jobs")
        if unaccepted:
            known = known or await get_versioned(jobs, job_id, JOB_DECODER)
            if (
                known is not None
                and on_runner(known.value)
                and await self.unapplied_update(runner_id, job_id, attempt)
            ):
                # The runner did answer; its update waits to be applied (e.g. it was held by a
                # results handler that died): taking the job back would run it twice.
                return None
        latest, written = await cas_update(
            jobs, job_id, JOB_DECODER, decide, known=known, ttl_for=self.job_ttl()
        )
        if latest is None:
            await through_outages(lambda: self.release(runner_id, job_id, attempt))
            return None
        record = latest.value
        last = record.attempts[-1] if record.attempts else None
        redo = last is not None and last.attempt == attempt and last.outcome == outcome
        if record.attempt == attempt and (written or redo):
            # Announce before freeing the slot: a slot still held is what brings a scan back here
            # (a crash in between is redone), and no message would. Both steps are idempotent, and
            # a bus outage (a leader election) is waited out rather than leave a queued job that
            # no dispatcher hears of. Also on a redo (the record moved for this attempt already).
            await through_outages(
                lambda: self.announce_outcome(
                    record, from_runner=runner_id, revision=latest.revision
                )
            )
        await through_outages(lambda: self.release(runner_id, job_id, attempt))
        if record.attempt != attempt or not (written or redo):
            return None
        return record if written else None

    async def unapplied_update(self, runner_id: str, job_id: str, attempt: int) -> bool:
        """Whether ``runner_id`` sent an update of ``job_id`` at ``attempt`` not yet applied.

        The updates stream is a work queue: what it still holds is what the results handler has
        not settled. A longer backlog than ``MAX_UNAPPLIED_SCAN`` also counts as "not yet".
        """
        stream = self._bus.names.stream("updates")
        subject = self._bus.names.updates(runner_id)
        seq = 1
        for _ in range(MAX_UNAPPLIED_SCAN):
            try:
                msg = await self._bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return False
            try:
                update = UPDATE_DECODER.decode(msg.data or b"")
            except msgspec.DecodeError:
                update = None
            if update is not None and update.job_id == job_id and update.attempt == attempt:
                return True
            seq = int(msg.seq or seq) + 1
        return True

    async def announce_outcome(
        self,
        record: JobRecord,
        *,
        from_runner: str | None,
        revision: int | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """Emit the events for a record that left its runner: re-queued, or its terminal state.

        A job that ended has its secret values deleted too (best effort: the bucket's TTL is the
        backstop).
        """
        if record.state == JobState.QUEUED and record.runner_id is None:
            await self._events.emit(
                JobRequeued(
                    subject_id=record.id,
                    attempt=record.attempt,
                    reason=record.reason,
                    from_runner=from_runner,
                    not_before_at_ms=record.not_before_at_ms,
                ),
                outbox=outbox,
            )
            await self.announce_queued(record, revision=revision, outbox=outbox)
        elif record.state in TERMINAL_STATES:
            res = record.result
            await self._events.emit(
                JOB_ENDED[record.state](
                    subject_id=record.id,
                    attempt=record.attempt,
                    correlation_id=record.spec.correlation_id,
                    runner_id=from_runner,
                    job_type=record.spec.job_type,
                    exit_code=res.exit_code if res else None,
                    duration_ms=res.duration_ms if res else None,
                    reason=record.reason,
                ),
                outbox=outbox,
            )
            targets = record.spec.performance_targets
            took_ms = (record.finished_at_ms or 0) - record.submitted_at_ms
            if (
                targets is not None
                and targets.target_completion_time_s is not None
                and took_ms > targets.target_completion_time_s * 1000
            ):
                await self._events.emit(
                    JobTargetMissed(
                        subject_id=record.id,
                        attempt=record.attempt,
                        target_completion_time_s=targets.target_completion_time_s,
                        took_ms=took_ms,
                    ),
                    outbox=outbox,
                )
            if record.spec.secret_env:
                await self.secrets.forget(record.id)

    async def time_out(
        self, runner_id: str, job_id: str, attempt: int, *, grace_ms: int, cancel_grace_s: float
    ) -> bool:
        """End an attempt past its execution deadline: record, cancel command, events, slot.

        ``False``: the attempt had moved on (or another supervisor timed it out first).
        """
        now = now_ms()
        latest, written = await cas_update(
            await self._bus.kv("jobs"),
            job_id,
            JOB_DECODER,
            lambda record: time_out(record, runner_id, attempt, now_ms=now, grace_ms=grace_ms),
            ttl_for=self.job_ttl(),
        )
        if latest is None or not written:
            return False
        try:
            await self._bus.nc.publish(
                self._bus.names.control(runner_id),
                encode(
                    RunnerCommand(
                        command="cancel",
                        job_id=job_id,
                        attempt=attempt,
                        reason="timed out",
                        grace_period_s=cancel_grace_s,
                    )
                ),
            )
        except nats.errors.Error as e:
            log.warning("could not tell %s to stop %s: %r", runner_id, job_id, e)
        # announce, then free the slot: while the slot is held, a scan redoes what a crash left
        await through_outages(
            lambda: self.announce_outcome(
                latest.value, from_runner=runner_id, revision=latest.revision
            )
        )
        await through_outages(lambda: self.release(runner_id, job_id, attempt, succeeded=False))
        return True
