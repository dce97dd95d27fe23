"""Dispatcher: place queued jobs on runners, record each decision atomically, publish it.

Queued jobs arrive as ``job.<id>.queued`` events through the durable consumer ``dispatcher``; a job
that cannot be placed yet is held (its message unacked and kept alive: ``HoldingConsumer``) and
tried again the moment the runners bucket changes, so there is no polling delay. What to try, in
which order and where is pure logic (``DispatchQueue``); the writes of a dispatch and their order
are ``Dispatching``'s. The dispatcher also answers ``<prefix>.jobs.explain``.
"""

from __future__ import annotations

import logging
import time

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import ExplainRequest, JobExplanation, JobRecord, JobState, RunnerRecord
from valkyrie.bus.codec import EVENT_DECODER, JOB_DECODER, encode, now_ms
from valkyrie.bus.kv import Versioned, cas_update, get_versioned
from valkyrie.bus.outbox import Outbox
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.explain import QueueFacts, explain_dispatched, explain_queued
from valkyrie.domain.lifecycle import finish_job
from valkyrie.domain.modes import uses_advanced_placement
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.priority import tenant_of
from valkyrie.domain.scheduling.queue import (
    Breach,
    Commit,
    DispatchQueue,
    Expire,
    HeldJob,
    Offer,
    dispatch_decision,
    predicted_finish_at_ms,
    target_at_risk,
)
from valkyrie.runtime.base import HandlerBase
from valkyrie.runtime.dispatching import Dispatching
from valkyrie.runtime.holding import HoldingConsumer, same_message, settle
from valkyrie.runtime.workers import HandlerContext

__all__ = ["DispatcherWorker", "create"]

log = logging.getLogger("valkyrie.dispatcher")
COMMIT_CONCURRENCY = 64
#: how long a job sent the usual way holds back direct placement until its queued event arrives
#: here (its event may go to another dispatcher process: then this bounds the wait)
DECLINED_WAIT_S = 0.5
#: event kinds that say a dispatch was answered (or the job left its runner)
_TAKEN = frozenset(
    {"accepted", "succeeded", "failed", "cancelled", "timed_out", "expired", "requeued"}
)
_EXPLAIN = msgspec.json.Decoder(ExplainRequest)


def _inline_record(data: dict[str, object]) -> Versioned[JobRecord] | None:
    """The record a ``job.queued`` event carries (small ones do), saving a read of the bucket.

    It may be stale; the compare-and-set on its revision catches that when the job is placed.
    """
    raw, revision = data.get("record"), data.get("revision")
    if not isinstance(raw, dict) or not isinstance(revision, int):
        return None
    try:
        return Versioned(msgspec.convert(raw, JobRecord), revision)
    except msgspec.ValidationError:
        return None


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
        #: dispatched, not yet accepted: job id -> (runner, attempt, accept-by instant)
        self._awaiting: dict[str, tuple[str, int, int]] = {}
        self._wake = anyio.Event()
        self._commits = anyio.Semaphore(COMMIT_CONCURRENCY)
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
        self._jobs = await bus.kv("jobs")
        view = await self._ctx.views.runners()
        self._ops.runners = view
        self._writes = Dispatching(bus, self._ops, view, self._jobs, await bus.kv("runners"))
        view.add_listener(self._on_runner)
        self._ctx.config.on_change(lambda _old, _new: self._poke())
        subs = [
            # only the kinds that matter here: every job emits several others we need not decode
            *[
                await bus.nc.subscribe(bus.names.event("job", "*", kind), cb=self._on_progress)
                for kind in sorted(_TAKEN)
            ],
            # every dispatcher answers (no queue group): only the one holding a queued job knows
            # its place in line, and the client waits a moment for that answer
            await bus.nc.subscribe(bus.names.explain, cb=self._on_explain),
        ]
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.holding.run, stop)
                tg.start_soon(self._place_loop)
                tg.start_soon(self._upkeep_loop, stop)
                self._ctx.views.placer = self
                task_status.started()
                await stop.wait()
                self._stopping = True
                if self._ctx.views.placer is self:
                    self._ctx.views.placer = None
                self._poke()
                # let commits in flight finish, then hand held jobs to other dispatchers at once
                with anyio.move_on_after(10):
                    for _ in range(COMMIT_CONCURRENCY):
                        await self._commits.acquire()
                    # and let the last pull requests end: what they deliver is handed back
                    await self.holding.consumed()
                tg.cancel_scope.cancel()
        finally:
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
        self._awaiting.pop(job_id, None)
        if kind in ("cancelled", "expired"):
            job = self.queue.get(job_id)
            if job is not None and not job.committing:
                self._drop(job)
        if kind == "succeeded":
            try:
                data = EVENT_DECODER.decode(msg.data).data
            except msgspec.DecodeError:
                return
            job_type, duration = data.get("job_type"), data.get("duration_ms")
            if isinstance(job_type, str) and isinstance(duration, int | float):
                self.queue.durations.observe(job_type, duration)

    async def _on_queued(self, msg: Msg) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except msgspec.DecodeError:
            await settle(msg)
            return
        job_id, attempt = event.subject_id or "", event.attempt or 0
        placed = event.data.get("placed_attempt")
        self.queue.arrived(job_id)
        if isinstance(placed, int) and placed > attempt:
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
        inline = _inline_record(event.data)
        if inline is None:
            self._tg.start_soon(self._load, job)
        elif self.queue.known(job, inline.value, inline.revision):
            self._poke()
        else:
            self.holding.release(job_id)

    async def _load(self, job: HeldJob) -> None:
        while True:
            try:
                latest = await get_versioned(self._jobs, job.job_id, JOB_DECODER)
                break
            except (nats.errors.Error, nats.js.errors.Error) as e:
                log.warning("could not read job %s (%r); will retry", job.job_id, e)
                await anyio.sleep(0.5)
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

        ``True`` when it was dispatched: its record created in the dispatched state, its ``queued``
        and ``dispatched`` events emitted. ``False`` when nothing was stored: intake stores it as
        queued and it takes the usual way through its ``job.queued`` event.
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
            self.queue.decline(record.id, time.monotonic() + DECLINED_WAIT_S)
            return False
        job = commit.job
        try:
            try:
                self._commits.acquire_nowait()
            except anyio.WouldBlock:
                with anyio.fail_after(10):
                    await self._commits.acquire()
            try:
                await self._try_commit(commit, fresh=True)
            finally:
                self._commits.release()
        except Exception:
            if job.was_dispatched():
                raise  # placed, but not announced: the caller's message must come back
            log.exception("placing %s at once failed; it takes the usual way", record.id)
            self.queue.decline(record.id, time.monotonic() + DECLINED_WAIT_S)
            return False
        finally:
            self.index.unreserve(commit.runner_id, record.id)
        if job.was_dispatched():
            return True
        if job.record is not None:  # None: the record exists already (a redelivered submission)
            self.queue.decline(record.id, time.monotonic() + DECLINED_WAIT_S)
        return False

    async def _place_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while not self._stopping:
                with anyio.move_on_after(0.25):  # also the tick for backoffs, boosts and deadlines
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self.holding.flush_released()
                try:
                    actions = self.queue.plan(now_ms(), self._cfg(), self.index)
                except Exception:
                    log.exception("placement round failed")
                    continue
                for action in actions:
                    if isinstance(action, Expire):
                        tg.start_soon(self._expire, action.job)
                    elif isinstance(action, Breach):
                        tg.start_soon(self._slo_breach, action)
                    else:
                        await self._commits.acquire()
                        tg.start_soon(self._commit, action)

    async def _slo_breach(self, breach: Breach) -> None:
        job = breach.job
        assert job.record is not None
        targets = job.record.spec.performance_targets
        assert targets is not None
        try:
            await self._events.emit(
                "job",
                job.job_id,
                "slo_breach",
                data={
                    "target": "max_dispatch_latency_ms",
                    "limit_ms": targets.max_dispatch_latency_ms,
                    "waited_ms": breach.waited_ms,
                    "action": "boosted ahead of unboosted jobs",
                },
                attempt=job.attempt,
                event_id=f"{job.job_id}.slo_breach.{job.attempt}",
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.warning("could not record SLO breach of %s: %r", job.job_id, e)

    async def _expire(self, job: HeldJob) -> None:
        assert job.record is not None
        now = now_ms()

        def decide(record: JobRecord) -> JobRecord | None:
            if record.state != JobState.QUEUED or record.attempt != job.attempt:
                return None
            reason = f"deadline {record.spec.deadline_at_ms} passed before the job could start"
            return finish_job(record, JobState.EXPIRED, now_ms=now, reason=reason)

        known = Versioned(job.record, job.revision or 0)
        try:
            jobs = self._jobs
            latest, _ = await cas_update(
                jobs, job.job_id, JOB_DECODER, decide, known=known, ttl_for=self._ops.job_ttl()
            )
            if latest is not None and latest.value.state == JobState.EXPIRED:
                await self._ops.announce_outcome(latest.value, from_runner=None)
                self._ctx.metrics.jobs.labels(self.name, "expired").inc()
        except Exception:
            log.exception("expiring %s failed", job.job_id)
            self.queue.settled(job, index=self.index, runner_id=None)
            return
        self._drop(job)

    async def _commit(self, commit: Commit) -> None:
        job = commit.job
        try:
            ok = await self._try_commit(commit)
        except Exception:
            log.exception("dispatching %s to %s failed; will retry", job.job_id, commit.runner_id)
            ok = False
            job.record = None
            await anyio.sleep(0.1)
            await self._load(job)
        finally:
            self.index.unreserve(commit.runner_id, job.job_id)
            self._commits.release()
        if not ok:
            job.committing = False
            self._poke()

    async def _try_commit(self, commit: Commit, *, fresh: bool = False) -> bool:
        """Claim the slot, move the job record to dispatched, publish, announce; ``False``: retry.

        ``fresh``: the record is not stored yet (intake's hand-over); it is created dispatched,
        and its ``queued`` event is emitted here, before ``dispatched``.
        """
        job, rid = commit.job, commit.runner_id
        assert job.record is not None
        queued = job.record
        queued_at = job.queued_at_ms()
        attempt = job.attempt + 1
        runner, claimed = await self._writes.claim_slot(rid, job.job_id, attempt)
        if runner is None:
            return False  # the runner filled up or went away meanwhile: place again
        now = now_ms()
        dispatched = await self._writes.record(job, rid, now_ms=now, fresh=fresh)
        if dispatched is None:
            # Someone else dispatched, cancelled or expired it: give the slot back and drop the
            # job. Only a slot this call took: one that was already there may be the slot of
            # whoever did dispatch this attempt here (or ours from before a crash, which the
            # supervisor frees if nobody holds it).
            if claimed:
                await self._writes.give_back(rid, job.job_id, attempt)
            self._drop(job)
            return True
        config = self._cfg()
        accept_by = now + config.dispatch.accept_timeout_ms
        self._awaiting[job.job_id] = (rid, attempt, accept_by)
        await self._writes.send(dispatched, now_ms=now, accept_by_at_ms=accept_by)
        tenant = tenant_of(dispatched.spec, config.scheduling.tenant_key)
        data = dispatch_decision(
            job,
            commit.placement,
            runner,
            queued_ms=now - queued_at,
            tenant=tenant,
            mode=config.mode.value,
        )
        finish = predicted_finish_at_ms(now, self.queue.durations.get(dispatched.spec.job_type))
        if finish is not None:
            data["predicted_finish_at_ms"] = finish
        outbox = Outbox(self._bus)
        if fresh:
            await self._ops.announce_queued(
                queued, at_ms=queued.submitted_at_ms, placed_attempt=attempt, outbox=outbox
            )
        await self._events.emit(
            "job",
            job.job_id,
            "dispatched",
            data=data,
            attempt=attempt,
            correlation_id=dispatched.spec.correlation_id,
            event_id=f"{job.job_id}.dispatched.{attempt}",
            at_ms=now,
            outbox=outbox,
        )
        if target_at_risk(dispatched, finish):
            targets = dispatched.spec.performance_targets
            assert targets is not None
            await self._events.emit(
                "job",
                job.job_id,
                "target_at_risk",
                data={
                    "target_completion_time_s": targets.target_completion_time_s,
                    "predicted_finish_at_ms": finish,
                },
                attempt=attempt,
                event_id=f"{job.job_id}.target_at_risk.{attempt}",
                outbox=outbox,
            )
        await outbox.confirm()
        self._ctx.metrics.jobs.labels(self.name, "dispatched").inc()
        self.queue.dispatched(job, tenant=tenant, now_ms=now)
        if not fresh:
            await self.holding.done(job.job_id)
        return True

    # -- explain ----------------------------------------------------------------------------------
    async def _on_explain(self, msg: Msg) -> None:
        job_id = ""
        try:
            job_id = _EXPLAIN.decode(msg.data).job_id
            if not self._cfg().features.explain:
                error = "explain is switched off (features.explain = false)"
                answer = JobExplanation(job_id=job_id, state="", summary="", error=error)
            else:
                answer = await self.explain(job_id)
        except msgspec.DecodeError as e:
            answer = JobExplanation(job_id="", state="", summary="", error=f"bad request: {e}")
        except Exception as e:
            log.exception("explain %s failed", job_id)
            answer = JobExplanation(job_id=job_id, state="", summary="", error=repr(e))
        if msg.reply:
            try:
                await msg.respond(encode(answer))
            except nats.errors.Error as e:
                log.warning("could not answer explain: %r", e)

    async def explain(self, job_id: str) -> JobExplanation:
        """Why ``job_id`` is pending, or why it went where it went."""
        current = await get_versioned(self._jobs, job_id, JOB_DECODER)
        if current is None:
            return JobExplanation(
                job_id=job_id, state="unknown", summary="", error=f"no job {job_id!r}"
            )
        record = current.value
        if record.state != JobState.QUEUED:
            decision = None
            if record.attempt:
                try:
                    raw = await self._bus.js.get_last_msg(
                        self._bus.names.stream("events"),
                        self._bus.names.event("job", job_id, "dispatched"),
                    )
                    decision = EVENT_DECODER.decode(raw.data or b"").data
                except nats.js.errors.NotFoundError:
                    decision = None
            return explain_dispatched(record, decision)
        config = self._cfg()
        now = now_ms()
        position, length = self.queue.position(job_id, now, config)
        job = self.queue.get(job_id)
        facts = QueueFacts(
            mode=config.mode.value,
            advanced=uses_advanced_placement(record.spec, config.mode),
            effective_priority=job.effective if job else None,
            position=position,
            length=length,
            boosted=bool(job and job.boosted),
            waiting_for_preferred=bool(job and job.last and job.last.waiting_for_preferred),
            avg_duration_ms=self.queue.durations.get(record.spec.job_type),
        )
        explanation = explain_queued(record, self.index.all_views(), facts, now_ms=now)
        return msgspec.structs.replace(explanation, held=job is not None)

    # -- upkeep -----------------------------------------------------------------------------------
    async def _upkeep_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            with anyio.move_on_after(self._cfg().dispatch.reconcile_interval_ms / 1000):
                await stop.wait()
            now = now_ms()
            for job_id, (rid, attempt, accept_by) in list(self._awaiting.items()):
                if accept_by > now:
                    continue
                self._awaiting.pop(job_id, None)
                try:
                    await self._writes.take_back_unaccepted(
                        job_id,
                        runner_id=rid,
                        attempt=attempt,
                        accept_timeout_ms=self._cfg().dispatch.accept_timeout_ms,
                    )
                except Exception:
                    log.exception("taking back unaccepted %s failed", job_id)


def create(ctx: HandlerContext) -> DispatcherWorker:
    """Entry point: build the dispatcher."""
    return DispatcherWorker(ctx)
