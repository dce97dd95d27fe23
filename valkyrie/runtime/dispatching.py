"""The writes of one dispatch, in their crash-safe order: slot, job record, dispatch, events.

A decision is two compare-and-sets, runner slot first, then job record, so a job is dispatched
once and a runner never exceeds its capacity however many dispatchers run. A crash between them
leaves an orphan slot that the supervisor frees (docs/architecture.md). Only after both are
stored is the runner told (core NATS) and the decision announced (``job.dispatched``).
"""

from __future__ import annotations

import anyio
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import Dispatch, JobRecord, JobState, RunnerRecord
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER, encode
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import Versioned, cas_update, get_versioned, kv_create, kv_write
from valkyrie.domain.lifecycle import assign_slot, dispatch_job
from valkyrie.domain.scheduling.queue import HeldJob
from valkyrie.runtime.jobops import JobOps
from valkyrie.runtime.views import RunnerView

__all__ = ["Dispatching"]

#: compare-and-set retries of the job record against concurrent writers before giving up the slot
RECORD_TRIES = 10


class Dispatching:
    """Claims slots and records dispatches for one dispatcher process."""

    def __init__(
        self, bus: Bus, ops: JobOps, view: RunnerView, jobs: KeyValue, runners: KeyValue
    ) -> None:
        self._bus = bus
        self._ops = ops
        self._view = view
        self._jobs = jobs
        self._runners = runners
        self._locks: dict[str, anyio.Lock] = {}

    async def claim_slot(
        self, runner_id: str, job_id: str, attempt: int
    ) -> tuple[RunnerRecord | None, bool]:
        """Take a slot on ``runner_id`` for ``job_id`` at ``attempt``.

        Returns the runner record holding that slot (``None`` when the runner filled up or went
        away) and whether this call took it (``False``: it was held already, e.g. before a crash).
        """
        # one claim per runner at a time in this process: concurrent claims would only make each
        # other's compare-and-set fail
        lock = self._locks.setdefault(runner_id, anyio.Lock())
        async with lock:
            latest, claimed = await cas_update(
                self._runners,
                runner_id,
                RUNNER_DECODER,
                lambda r: (
                    None
                    if r.assigned_jobs.get(job_id) == attempt
                    else assign_slot(r, job_id, attempt)
                ),
                known=self._view.records.get(runner_id),
            )
            if latest is not None:
                self._view.offer(runner_id, latest)
        if latest is None or latest.value.assigned_jobs.get(job_id) != attempt:
            return None, False
        return latest.value, claimed

    async def record(
        self, job: HeldJob, runner_id: str, *, now_ms: int, fresh: bool
    ) -> JobRecord | None:
        """Move the job record to dispatched on ``runner_id`` (attempt + 1); ``None`` if it moved on.

        ``fresh``: the record is not stored yet (intake's hand-over): it is created dispatched.
        ``job.record``/``job.revision`` follow what was read and written (``None`` when a fresh
        record turned out to exist already).
        """
        for _ in range(RECORD_TRIES):
            if job.record is None or not job.is_current():
                return None
            new = dispatch_job(job.record, runner_id, now_ms=now_ms)
            try:
                if fresh:
                    written = await kv_create(self._jobs, job.job_id, encode(new))
                else:
                    written = await kv_write(
                        self._jobs, job.job_id, encode(new), last=job.revision or 0, ttl=None
                    )
            except nats.js.errors.KeyWrongLastSequenceError:
                if fresh:
                    job.record = job.revision = None
                    return None
                latest = await get_versioned(self._jobs, job.job_id, JOB_DECODER)
                job.record, job.revision = (
                    (latest.value, latest.revision) if latest else (None, None)
                )
                continue
            job.record, job.revision = new, int(written)
            return new
        return None

    async def give_back(self, runner_id: str, job_id: str, attempt: int) -> None:
        """Free a slot this dispatch took for a job someone else moved on meanwhile."""
        await self._ops.release(runner_id, job_id, attempt)

    async def send(self, record: JobRecord, *, now_ms: int, accept_by_at_ms: int) -> None:
        """Tell the runner (core NATS: the acceptance timer covers a lost message)."""
        assert record.runner_id is not None
        message = Dispatch(
            job_id=record.id,
            attempt=record.attempt,
            runner_id=record.runner_id,
            spec=record.spec,
            dispatched_at_ms=now_ms,
            accept_by_at_ms=accept_by_at_ms,
        )
        await self._bus.nc.publish(self._bus.names.dispatch(record.runner_id), encode(message))

    async def take_back_unaccepted(
        self, job_id: str, *, runner_id: str, attempt: int, accept_timeout_ms: int
    ) -> None:
        """Take back a dispatch its runner did not accept in time (if it is still unaccepted)."""
        current = await get_versioned(self._jobs, job_id, JOB_DECODER)
        if current is None:
            return
        rec = current.value
        if (
            rec.state == JobState.DISPATCHED
            and rec.attempt == attempt
            and rec.runner_id == runner_id
        ):
            await self._ops.take_back(
                job_id,
                attempt=attempt,
                runner_id=runner_id,
                known=current,
                reason=f"runner {runner_id} did not accept within {accept_timeout_ms} ms",
                outcome="not_accepted",
            )

    async def read(self, job_id: str) -> Versioned[JobRecord] | None:
        """The job record and its revision."""
        return await get_versioned(self._jobs, job_id, JOB_DECODER)
