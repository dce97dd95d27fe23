"""Dispatcher: place queued jobs on runners, record each decision atomically, publish it.

Queued jobs arrive as ``job.<id>.queued`` events through the durable consumer ``dispatcher``; a job
that cannot be placed yet is held (its message unacked and kept alive: ``HoldingConsumer``) and
tried again the moment the runners bucket changes, so there is no polling delay. What to try, in
which order and where is pure logic (``DispatchQueue``); the commits in flight are ``Commits``',
the writes of one dispatch and their order ``Dispatching``'s. The dispatcher also answers
``<prefix>.jobs.explain`` and ``jobs.queue`` (``Explainer``).
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    JobExplanation,
    JobQueued,
    JobRecord,
    JobSucceeded,
    QueueSnapshot,
    RunnerRecord,
    typed_event,
)
from valkyrie.bus import EVENT_DECODER, Versioned, new_id, now_ms
from valkyrie.config import ValkyrieConfig
from valkyrie.domain.scheduling import (
    Breach,
    DispatchQueue,
    Expire,
    HeldJob,
    Offer,
    RunnerIndex,
    queue_snapshot,
)
from valkyrie.runtime import (
    Commits,
    Dispatching,
    Explainer,
    HandlerBase,
    HandlerContext,
    HoldingConsumer,
    QueueCollector,
    publish_queue,
    same_message,
    settle,
)

__all__ = ["DispatcherWorker", "create"]

log = logging.getLogger("valkyrie.dispatcher")
#: placement rounds longer than this (a long backlog) are followed by a rest as long, at most
#: PACE_MAX_S: a short line (the usual case) is placed without any pause
PACE_FROM_S = 0.002
PACE_MAX_S = 0.05
#: event kinds that say a dispatch was answered (or the job left its runner)
_TAKEN = frozenset(
    {"accepted", "succeeded", "failed", "cancelled", "timed_out", "expired", "requeued"}
)


class DispatcherWorker(HandlerBase):
    """Places jobs; run one or more per installation."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        #: the held jobs and their order (pure logic)
        self.queue = DispatchQueue()
        #: runners with free slots, from the process's runner view
        self.index = RunnerIndex()
        bus, perf = ctx.bus, ctx.config.current.performance  # read once: configures the consumer
        #: the held jobs' messages, kept alive until placed
        self.holding = HoldingConsumer(
            bus,
            stream=bus.names.stream("events"),
            durable=self.name,
            filter_subject=bus.names.event("job", "*", "queued"),
            ack_wait_s=perf.ack_wait_s,
            batch=perf.fetch_batch,
            deliver=self._on_queued,
        )
        #: this dispatcher in the queue ledger (``queue.<instance>`` in the stats bucket)
        self.instance = new_id()[:12]
        #: the last snapshot made for the ledger, also what the queue gauges export
        self.latest: QueueSnapshot | None = None
        ctx.registry.register(QueueCollector(lambda: self.latest))
        self._wake = anyio.Event()
        self._commits = Commits(
            name=self.name,
            metrics=ctx.metrics,
            queue=self.queue,
            index=self.index,
            holding=self.holding,
            config=self._cfg,
            drop=self._drop,
            load=self._load,
            poke=self._poke,
        )
        self._stopping = False

    def _cfg(self) -> ValkyrieConfig:
        return self._ctx.config.current

    def _poke(self) -> None:
        self._wake.set()

    def _on_runner(self, runner_id: str, versioned: Versioned[RunnerRecord] | None) -> None:
        if versioned is None:
            self.index.remove(runner_id)
        else:
            self.index.upsert(versioned.value)
        if self.queue.jobs:  # a freed slot matters only to jobs waiting here
            self._poke()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Place jobs until ``stop`` is set."""
        bus = self._bus
        view = await self._ctx.views.runners()
        self._ops.runners = view
        self._writes = self._commits.writes = Dispatching(
            bus, self._events, self._ops, view, await bus.kv("jobs"), await bus.kv("runners")
        )
        self._explainer = Explainer(
            queue=self.queue,
            index=self.index,
            config=self._cfg,
            read=self._writes.read,
            decision_of=self._writes.decision_of,
            now_ms=now_ms,
            instance=self.instance,
        )
        view.add_listener(self._on_runner)
        self._ctx.config.on_change(lambda _old, _new: self._poke())
        subs = [
            # only the kinds that matter here: every job emits several others we need not decode
            *[
                await bus.nc.subscribe(bus.names.event("job", "*", kind), cb=self._on_progress)
                for kind in sorted(_TAKEN)
            ],
            *await self._explainer.subscribe(bus),
        ]
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.holding.run, stop)
                tg.start_soon(self._place_loop)
                tg.start_soon(self._upkeep_loop, stop)
                tg.start_soon(publish_queue, bus, self.snapshot, stop)
                self._ctx.views.placer = self
                task_status.started()
                await stop.wait()
                self._stopping = True
                if self._ctx.views.placer is self:
                    self._ctx.views.placer = None
                self._poke()
                # let commits in flight finish, then hand held jobs to other dispatchers at once
                with anyio.move_on_after(10):
                    await self._commits.finish()
                    # and let the last pull requests end: what they deliver is handed back
                    await self.holding.consumed()
                tg.cancel_scope.cancel()
        finally:
            self.latest = None  # what it held is handed back: it exports nothing any more
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await self.holding.hand_back(keep=self._committing)
                for sub in subs:
                    await sub.unsubscribe()

    def _committing(self, job_id: str) -> bool:
        job = self.queue.get(job_id)
        return job is not None and job.committing

    # -- inputs -----------------------------------------------------------------------------------
    async def _on_progress(self, msg: Msg) -> None:
        # Core delivery of the job events the stream stores: cheap news that a dispatch was taken,
        # that a job we hold ended elsewhere, and how long jobs of each type take.
        _, job_id, kind = msg.subject.rsplit(".", 2)
        self._writes.answered(job_id)
        if kind in ("cancelled", "expired"):
            job = self.queue.get(job_id)
            if job is not None and not job.committing:
                self._drop(job)
        if kind == "succeeded":
            try:
                event = typed_event(EVENT_DECODER.decode(msg.data))
            except msgspec.DecodeError:  # a ValidationError too
                return
            if isinstance(event, JobSucceeded) and event.duration_ms is not None:
                self.queue.durations.observe(event.job_type, event.duration_ms)

    async def _on_queued(self, msg: Msg) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except msgspec.DecodeError:
            await settle(msg)
            return
        job_id, attempt = event.subject_id or "", event.attempt or 0
        try:
            queued: JobQueued | None = JobQueued.from_envelope(event)
        except msgspec.ValidationError:
            queued = None  # not a job.queued as we know it: the job is read instead
        self.queue.arrived(job_id)
        if queued is not None and (queued.placed_attempt or 0) > attempt:
            await settle(msg)  # a dispatcher placed it as it was queued
            return
        held = self.holding.held(job_id)
        if held is not None and same_message(held, msg):
            # the held message itself, delivered again (a keep-alive came too late): acking it
            # would release the job while still held; hold the new delivery instead
            self.holding.hold(job_id, msg)
            return
        offer, replaced = self.queue.offer(job_id, attempt)
        if offer is Offer.STALE:
            await settle(msg)
            return
        if replaced is not None:
            await settle(held)
        self.holding.hold(job_id, msg)
        job = self.queue.get(job_id)
        assert job is not None
        if queued is None or queued.record is None or queued.revision is None:
            self._tg.start_soon(self._load, job)  # not carried (a large record): read it
        elif self.queue.known(job, queued.record, queued.revision):
            self._poke()
        else:
            self.holding.release(job_id)

    async def _load(self, job: HeldJob) -> None:
        latest = await self._writes.read_patiently(job.job_id)
        record, revision = (latest.value, latest.revision) if latest else (None, None)
        if self.queue.known(job, record, revision):
            self._poke()
        elif self.queue.get(job.job_id) is None:
            self.holding.release(job.job_id)

    def _drop(self, job: HeldJob) -> None:
        if self.queue.drop(job):
            self.holding.release(job.job_id)  # the job is no longer ours to place
        self._poke()

    # -- placement --------------------------------------------------------------------------------
    async def place_new(self, record: JobRecord) -> bool:
        """Place a job intake has accepted but not stored, unless others wait ahead (LocalPlacer).

        ``True``: dispatched (its record created dispatched, its events emitted); ``False``: nothing
        was stored, intake stores it queued and it takes the usual way (``Commits.commit_fresh``).
        """
        commit = None
        if not self._stopping:
            commit = self.queue.place_new(
                record,
                now_ms=now_ms(),
                monotonic_s=time.monotonic(),
                config=self._cfg(),
                index=self.index,
            )
        if commit is None:
            self._commits.decline(record.id)
            return False
        return await self._commits.commit_fresh(commit)

    async def _place_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while not self._stopping:
                with anyio.move_on_after(0.25):  # also the tick for backoffs, boosts and deadlines
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self.holding.flush_released()
                began = time.monotonic()
                try:
                    actions = self.queue.plan(now_ms(), self._cfg(), self.index)
                except Exception:
                    log.exception("placement round failed")
                    continue
                spent = time.monotonic() - began
                for action in actions:
                    if isinstance(action, Expire):
                        tg.start_soon(self._expire, action.job)
                    elif isinstance(action, Breach):
                        tg.start_soon(self._writes.breach, action.job, action.waited_ms)
                    else:
                        await self._commits.start(tg, action)
                if spent > PACE_FROM_S:
                    # A round orders every held job: with a long backlog, one round per freed
                    # slot would spend the loop ordering. Resting as long as the round took
                    # keeps ordering to half of it, and the next round fills every slot freed
                    # meanwhile.
                    await anyio.sleep(min(spent, PACE_MAX_S))

    async def _expire(self, job: HeldJob) -> None:
        try:
            if await self._writes.expire(job, now_ms=now_ms()) is not None:
                self._ctx.metrics.jobs.labels(self.name, "expired").inc()
        except Exception:
            log.exception("expiring %s failed", job.job_id)
            self.queue.settled(job, index=self.index, runner_id=None)
            return
        self._drop(job)

    def snapshot(self) -> QueueSnapshot:
        """What this dispatcher holds now (the queue ledger's entry, and its queue gauges)."""
        self.latest = queue_snapshot(
            self.queue,
            instance=self.instance,
            now_ms=now_ms(),
            tenant_key=self._cfg().scheduling.tenant_key,
        )
        return self.latest

    async def explain(self, job_id: str) -> JobExplanation:
        """Why ``job_id`` is pending, or why it went where it went."""
        return await self._explainer.explain(job_id)

    # -- upkeep -----------------------------------------------------------------------------------
    async def _upkeep_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            with anyio.move_on_after(self._cfg().dispatch.reconcile_interval_ms / 1000):
                await stop.wait()
            accept_ms = self._cfg().dispatch.accept_timeout_ms
            await self._writes.take_back_late(now_ms=now_ms(), accept_timeout_ms=accept_ms)


def create(ctx: HandlerContext) -> DispatcherWorker:
    """Entry point: build the dispatcher."""
    return DispatcherWorker(ctx)
