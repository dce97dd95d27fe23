"""Multi-step job operations shared by handlers, each step idempotent so a crash can be redone.

The order is always: job record first (the source of truth), then the runner's slot, then the event.
A crash between steps leaves a state the reconciler or a redelivery completes.
"""

from __future__ import annotations

from schemas import TERMINAL_STATES, JobRecord, JobState
from valkyrie._bus import Bus
from valkyrie._codec import JOB_DECODER, RUNNER_DECODER, now_ms
from valkyrie._events import EventPublisher
from valkyrie._kvstore import Versioned, cas_update
from valkyrie._lifecycle import release_slot, requeue_job

__all__ = ["JobOps"]


class JobOps:
    """Take jobs back, free slots, announce queued jobs."""

    def __init__(self, bus: Bus, events: EventPublisher) -> None:
        self._bus = bus
        self._events = events

    async def announce_queued(self, record: JobRecord) -> None:
        """Emit ``job.queued`` for the record's current attempt (dispatchers consume these)."""
        await self._events.emit(
            "job",
            record.id,
            "queued",
            data={
                "job_type": record.spec.job_type,
                "priority": record.spec.priority,
                "api_version": record.api_version,
                "reason": record.reason,
                "not_before_at_ms": record.not_before_at_ms,
            },
            attempt=record.attempt,
            correlation_id=record.spec.correlation_id,
            event_id=f"{record.id}.queued.{record.attempt}",
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
        _, written = await cas_update(
            kv,
            runner_id,
            RUNNER_DECODER,
            lambda r: release_slot(
                r, job_id, attempt, succeeded=succeeded, accept_latency_ms=accept_latency_ms
            ),
        )
        return written

    async def take_back(
        self,
        job_id: str,
        *,
        attempt: int,
        runner_id: str,
        reason: str,
        outcome: str = "requeued",
        not_before_ms: int | None = None,
        known: Versioned[JobRecord] | None = None,
    ) -> JobRecord | None:
        """Re-queue ``job_id`` if it is still on ``runner_id`` at ``attempt``; free that slot.

        Returns the re-queued record, or ``None`` when the job had moved on (nothing to do).
        """
        now = now_ms()

        def decide(record: JobRecord) -> JobRecord | None:
            if record.attempt != attempt or record.runner_id != runner_id:
                return None
            if record.state in TERMINAL_STATES or record.state == JobState.QUEUED:
                return None
            return requeue_job(
                record, now_ms=now, reason=reason, not_before_ms=not_before_ms, outcome=outcome
            )

        jobs = await self._bus.kv("jobs")
        latest, written = await cas_update(jobs, job_id, JOB_DECODER, decide, known=known)
        await self.release(runner_id, job_id, attempt)
        if latest is None:
            return None
        record = latest.value
        # Also on a redo after a crash (written False but already re-queued for this attempt).
        if (
            record.state == JobState.QUEUED
            and record.attempt == attempt
            and record.runner_id is None
        ):
            await self._events.emit(
                "job",
                job_id,
                "requeued",
                data={"reason": record.reason, "from_runner": runner_id},
                attempt=attempt,
                event_id=f"{job_id}.requeued.{attempt}",
            )
            await self.announce_queued(record)
            return record if written else None
        return None
