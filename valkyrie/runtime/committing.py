"""A dispatcher's commit path: the dispatches in flight, each carried out, counted and settled.

What to commit is the pure queue's decision (:class:`~valkyrie.domain.scheduling.DispatchQueue`);
the writes of one dispatch and their order are :class:`Dispatching`'s. This bounds how many run at
once, records what a dispatch that was stored means for the queue and the metrics, and, for a job
handed over by intake before it was stored, decides whether it is placed at once or declined (it
then takes the usual way, through its ``job.queued`` event).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskGroup

from valkyrie.bus.codec import now_ms
from valkyrie.bus.storage import storage_full
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.queue import Commit, DispatchQueue, HeldJob
from valkyrie.runtime.dispatching import Dispatching
from valkyrie.runtime.holding import HoldingConsumer
from valkyrie.runtime.metrics import HandlerMetrics

__all__ = ["COMMIT_CONCURRENCY", "DECLINED_WAIT_S", "Commits"]

log = logging.getLogger("valkyrie.dispatcher")

#: dispatches in flight at once, per dispatcher
COMMIT_CONCURRENCY = 64
#: how long a job sent the usual way holds back direct placement until its queued event arrives
#: here (its event may go to another dispatcher process: then this bounds the wait)
DECLINED_WAIT_S = 0.5
#: how long intake's hand-over waits for a commit slot
FRESH_SLOT_WAIT_S = 10


class Commits:
    """Carries out one dispatcher's commits (``writes`` is set once its buckets are open)."""

    def __init__(
        self,
        *,
        name: str,
        metrics: HandlerMetrics,
        queue: DispatchQueue,
        index: RunnerIndex,
        holding: HoldingConsumer,
        config: Callable[[], ValkyrieConfig],
        drop: Callable[[HeldJob], None],
        load: Callable[[HeldJob], Awaitable[None]],
        poke: Callable[[], None],
    ) -> None:
        self._name = name
        self._metrics = metrics
        self._queue = queue
        self._index = index
        self._holding = holding
        self._config = config
        self._drop = drop
        self._load = load
        self._poke = poke
        #: one token per dispatch in flight
        self.slots = anyio.Semaphore(COMMIT_CONCURRENCY)
        self.writes: Dispatching | None = None

    def decline(self, job_id: str) -> None:
        """Let ``job_id`` take the usual way: no direct placement until its queued event is here."""
        self._queue.decline(job_id, time.monotonic() + DECLINED_WAIT_S)

    async def finish(self) -> None:
        """Wait until every dispatch in flight has finished (takes every slot: none start after)."""
        for _ in range(COMMIT_CONCURRENCY):
            await self.slots.acquire()

    async def start(self, tg: TaskGroup, commit: Commit) -> None:
        """Start committing a held job in ``tg`` once a slot is free."""
        await self.slots.acquire()
        tg.start_soon(self._commit_held, commit)

    async def _commit_held(self, commit: Commit) -> None:
        # a failed or lost commit leaves the job held: its record is read again, then placed anew
        job = commit.job
        try:
            ok = await self.commit(commit)
        except Exception:
            log.exception("dispatching %s to %s failed; will retry", job.job_id, commit.runner_id)
            ok = False
            job.record = None
            await anyio.sleep(0.1)
            await self._load(job)
        finally:
            self._index.unreserve(commit.runner_id, job.job_id)
            self.slots.release()
        if not ok:
            job.committing = False
            self._poke()

    async def commit(self, commit: Commit, *, fresh: bool = False) -> bool:
        """Dispatch as ``commit`` says; ``False``: the runner filled up, place the job again."""
        assert self.writes is not None, "commit before the dispatcher runs"
        job = commit.job
        assert job.record is not None
        began, job_type, queued_at = (
            time.perf_counter(),
            job.record.spec.job_type,
            job.queued_at_ms(),
        )
        outcome = await self.writes.dispatch(
            commit,
            fresh=fresh,
            config=self._config(),
            avg_duration_ms=self._queue.durations.get(job.record.spec.job_type),
            now_ms=now_ms,
        )
        if isinstance(outcome, bool):
            if outcome:
                self._drop(job)  # someone else dispatched, cancelled or expired it
            return outcome
        metrics, now = self._metrics, now_ms()
        metrics.jobs.labels(self._name, "dispatched").inc()
        metrics.messages.labels(self._name, "ack").inc()
        metrics.duration.labels(self._name).observe(time.perf_counter() - began)
        metrics.observe_dispatch(job_type, now - queued_at)
        self._queue.dispatched(job, tenant=outcome.tenant, now_ms=now)
        if not fresh:
            await self._holding.done(job.job_id)
        return True

    async def commit_fresh(self, commit: Commit) -> bool:
        """Commit a job intake has not stored yet: ``True`` when it was dispatched.

        ``False`` when nothing was stored for it (intake stores it as queued) or its record
        exists already (a redelivered submission). Raises when it was placed but not announced:
        intake's message must then come back.
        """
        job, job_id = commit.job, commit.job.job_id
        try:
            try:
                self.slots.acquire_nowait()
            except anyio.WouldBlock:
                with anyio.fail_after(FRESH_SLOT_WAIT_S):
                    await self.slots.acquire()
            try:
                await self.commit(commit, fresh=True)
            finally:
                self.slots.release()
        except Exception as e:
            if job.was_dispatched():
                raise  # placed, but not announced: the caller's message must come back
            if storage_full(e):  # intake refuses the job, saying so
                log.warning("placing %s at once failed: JetStream is full (%r)", job_id, e)
            else:
                log.exception("placing %s at once failed; it takes the usual way", job_id)
            self.decline(job_id)
            return False
        finally:
            self._index.unreserve(commit.runner_id, job_id)
        if job.was_dispatched():
            return True
        if job.record is not None:  # None: the record exists already (a redelivered submission)
            self.decline(job_id)
        return False
