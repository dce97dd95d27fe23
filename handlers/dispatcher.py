"""Dispatcher: place queued jobs on runners, record each decision atomically, publish it.

Queued jobs arrive as ``job.<id>.queued`` events through the durable consumer ``dispatcher``; a job
that cannot be placed yet is held (its message unacked, kept alive with ``in_progress``) and tried
again the moment the runners bucket changes, so there is no polling delay. Held jobs are ordered by
effective priority (aging, SLA class, SLO boosts) and tenant fair share (valkyrie.domain.scheduling.priority).

A decision is two compare-and-sets, runner slot first, then job record, so a job is dispatched once
and a runner never exceeds its capacity however many dispatchers run. A crash between them leaves an
orphan slot that the supervisor frees; a dispatch not accepted in time is taken back and placed
again. The dispatcher also answers ``<prefix>.jobs.explain``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import (
    Dispatch,
    Event,
    ExplainRequest,
    JobDispatched,
    JobExplanation,
    JobQueued,
    JobRecord,
    JobSloBreach,
    JobState,
    JobSubmission,
    JobSucceeded,
    JobTargetAtRisk,
    RunnerRecord,
    RunnerUp,
    typed_event,
)
from valkyrie import HandlerContext
from valkyrie.bus.codec import EVENT_DECODER, JOB_DECODER, RUNNER_DECODER, encode, now_ms
from valkyrie.bus.kv import Versioned, cas_update, get_versioned, kv_create, kv_write
from valkyrie.bus.outbox import Outbox
from valkyrie.bus.pullfeed import PullFeed, ensure_consumer
from valkyrie.config.model import IntegrationMode, ValkyrieConfig
from valkyrie.domain.explain import QueueFacts, explain_dispatched, explain_queued
from valkyrie.domain.lifecycle import assign_slot, dispatch_job, finish_job
from valkyrie.domain.modes import uses_advanced_placement
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.placement import Placement, ScoreWeights, place
from valkyrie.domain.scheduling.priority import FairShare, effective_priority, tenant_of
from valkyrie.runtime.base import HandlerBase

__all__ = ["DispatcherWorker", "create"]

log = logging.getLogger("valkyrie.dispatcher")
#: held jobs are kept alive at least this often (more often when the ack wait is short)
KEEPALIVE_S = 10.0
COMMIT_CONCURRENCY = 64
FETCH_TIMEOUT_S = 0.5
FULL_SCAN_EVERY_MS = 1000
#: how long a job sent the usual way holds back direct placement until its queued event arrives
#: here (its event may go to another dispatcher process: then this bounds the wait)
DECLINED_WAIT_S = 0.5
_TAKEN = frozenset(
    {"accepted", "succeeded", "failed", "cancelled", "timed_out", "expired", "requeued"}
)
_EXPLAIN = msgspec.json.Decoder(ExplainRequest)


@dataclass
class Pending:
    """A queued job this dispatcher holds."""

    job_id: str
    attempt: int
    order: int
    msg: Msg | None  # None: handed over by intake in this process, not by an event
    record: Versioned[JobRecord] | None = None
    committing: bool = False
    boosted: bool = False
    last: Placement | None = field(default=None, repr=False)
    effective: int = 2
    full_scan_at_ms: int = 0

    def queued_at_ms(self) -> int:
        """When this attempt started waiting."""
        assert self.record is not None
        rec = self.record.value
        return rec.submitted_at_ms if rec.attempt == 0 else rec.updated_at_ms


def _queued(envelope: Event) -> JobQueued | None:
    """The typed ``job.queued`` event; ``None`` if its data is not one (the job is read instead)."""
    try:
        event = typed_event(envelope)
    except msgspec.ValidationError:
        return None
    return event if isinstance(event, JobQueued) else None


def _inline_record(event: JobQueued | None) -> Versioned[JobRecord] | None:
    """The record a ``job.queued`` event carries (small ones do), saving a read of the bucket.

    It may be stale; the compare-and-set on its revision catches that when the job is placed.
    """
    if event is None or event.record is None or event.revision is None:
        return None
    return Versioned(event.record, event.revision)


def _same_message(a: Msg, b: Msg) -> bool:
    """Two deliveries of one stream message (same stream sequence)."""
    try:
        return a.metadata.sequence.stream == b.metadata.sequence.stream
    except (AttributeError, ValueError, nats.errors.Error):
        return False


class DispatcherWorker(HandlerBase):
    """Places jobs; run one or more per installation."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._index = RunnerIndex()
        self._locks: dict[str, anyio.Lock] = {}
        self._pending: dict[str, Pending] = {}
        self._awaiting: dict[str, tuple[str, int, int]] = {}
        self._order = 0
        self._wake = anyio.Event()
        self._commits = anyio.Semaphore(COMMIT_CONCURRENCY)
        self._stopping = False
        self._consumed = anyio.Event()
        self._ack_later: list[Msg] = []
        self._fair = FairShare()
        self._durations: dict[str, float] = {}
        self._job_types: dict[str, str] = {}
        # jobs this process's intake queued the usual way whose queued event has not arrived yet
        # (job id -> monotonic time to stop waiting for it): new jobs must not pass them
        self._declined: dict[str, float] = {}
        self._hold_ack_wait_s = 30.0
        self._keepalive_s = KEEPALIVE_S

    def _cfg(self) -> ValkyrieConfig:
        return self._ctx.config.current

    @property
    def _accept_ms(self) -> int:
        return self._cfg().dispatch.accept_timeout_ms

    def _poke(self) -> None:
        self._wake.set()

    def _on_runner(self, runner_id: str, versioned: Versioned[RunnerRecord] | None) -> None:
        if versioned is None:
            self._index.remove(runner_id)
        else:
            self._index.upsert(versioned.value)
        if self._pending:  # a freed slot matters only to jobs waiting here
            self._poke()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Place jobs until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._runners_kv = await bus.kv("runners")
        self._view = await self._ctx.views.runners()
        self._ops.runners = self._view
        self._view.add_listener(self._on_runner)
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
        queued = bus.names.event("job", "*", "queued")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                stream = bus.names.stream("events")
                # read once: the consumer is configured with it when this process starts
                self._hold_ack_wait_s = self._cfg().performance.ack_wait_s
                self._keepalive_s = min(KEEPALIVE_S, self._hold_ack_wait_s / 3)
                await ensure_consumer(
                    bus,
                    stream,
                    ConsumerConfig(
                        durable_name=self.name,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        # a dead dispatcher's held jobs come back to another after this
                        ack_wait=self._hold_ack_wait_s,
                        max_ack_pending=1_000_000,
                        filter_subject=queued,
                    ),
                )
                batch = self._cfg().performance.fetch_batch
                feed = PullFeed(
                    bus,
                    stream=stream,
                    durable=self.name,
                    # held jobs do not count: they wait for runners, not for this process
                    room=lambda: batch,
                    deliver=self._on_queued,
                    expires_s=FETCH_TIMEOUT_S,
                    min_batch=max(1, batch // 4),
                    max_batch=batch,
                )
                tg.start_soon(self._consume, feed, stop)
                tg.start_soon(self._place_loop)
                tg.start_soon(self._upkeep_loop, stop)
                tg.start_soon(self._keepalive_loop, stop)
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
                    await self._consumed.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                acks, self._ack_later = self._ack_later, []
                for msg in acks:
                    await self._settle(msg)
                for pending in list(self._pending.values()):
                    if not pending.committing:
                        await self._settle(pending.msg, nak=True)
                for sub in subs:
                    await sub.unsubscribe()

    # -- inputs -----------------------------------------------------------------------------------
    async def _on_progress(self, msg: Msg) -> None:
        # Core delivery of the job events the stream stores: cheap news that a dispatch was taken,
        # that a job we hold ended elsewhere, and how long jobs of each type take.
        _, job_id, kind = msg.subject.rsplit(".", 2)
        if kind in _TAKEN:
            self._awaiting.pop(job_id, None)
        if kind in ("cancelled", "expired"):
            pending = self._pending.get(job_id)
            if pending is not None and not pending.committing:
                self._drop(pending)
        if kind == "succeeded":
            try:
                event = typed_event(EVENT_DECODER.decode(msg.data))
            except msgspec.DecodeError:  # a ValidationError too
                return
            if isinstance(event, JobSucceeded) and event.duration_ms is not None:
                job_type, duration = event.job_type, event.duration_ms
                old = self._durations.get(job_type)
                self._durations[job_type] = duration if old is None else 0.9 * old + 0.1 * duration

    async def _consume(self, feed: PullFeed, stop: anyio.Event) -> None:
        try:
            await feed.run(stop)
        finally:
            self._consumed.set()

    async def _on_queued(self, msg: Msg) -> None:
        try:
            event = EVENT_DECODER.decode(msg.data)
        except msgspec.DecodeError:
            await self._settle(msg)
            return
        job_id = event.subject_id or ""
        self._declined.pop(job_id, None)
        queued = _queued(event)
        placed = queued.placed_attempt if queued is not None else None
        if placed is not None and placed > (event.attempt or 0):
            await self._settle(msg)  # a dispatcher placed it as it was queued
            return
        old = self._pending.get(job_id)
        if old is not None:
            if old.msg is not None and _same_message(old.msg, msg):
                # the held message itself, delivered again (a keep-alive came too late): acking
                # it would release the job while still held; hold the new delivery instead
                old.msg = msg
                return
            if old.committing or old.attempt >= (event.attempt or 0):
                await self._settle(msg)
                return
            await self._settle(old.msg)
        self._order += 1
        pending = Pending(job_id=job_id, attempt=event.attempt or 0, order=self._order, msg=msg)
        self._pending[job_id] = pending
        inline = _inline_record(queued)
        if inline is None:
            self._tg.start_soon(self._load, pending)
        else:
            pending.record = inline
            self._check_loaded(pending)

    async def _load(self, pending: Pending) -> None:
        while True:
            try:
                pending.record = await get_versioned(self._jobs, pending.job_id, JOB_DECODER)
                break
            except (nats.errors.Error, nats.js.errors.Error) as e:
                log.warning("could not read job %s (%r); will retry", pending.job_id, e)
                await anyio.sleep(0.5)
        self._check_loaded(pending)

    def _check_loaded(self, pending: Pending) -> None:
        record = pending.record
        if (
            record is None
            or record.value.state != JobState.QUEUED
            or record.value.attempt != pending.attempt
        ):
            self._drop(pending)
            return
        self._poke()

    def _drop(self, pending: Pending) -> None:
        if self._pending.get(pending.job_id) is pending:
            del self._pending[pending.job_id]
        if pending.msg is not None:
            self._ack_later.append(pending.msg)  # the job is no longer ours to place
        self._poke()

    async def _settle(self, msg: Msg | None, *, nak: bool = False) -> None:
        if msg is None:
            return
        try:
            if nak:
                await msg.nak()
            else:
                await msg.ack()
        except (nats.errors.Error, OSError) as e:
            log.debug("ack/nak failed (%r): the message will be redelivered and dropped", e)

    # -- placement --------------------------------------------------------------------------------
    async def place_new(self, record: JobRecord) -> bool:
        """Place a job intake has accepted but not stored, unless others wait ahead (LocalPlacer).

        ``True`` when it was dispatched: its record created in the dispatched state, its ``queued``
        and ``dispatched`` events emitted. ``False`` when nothing was stored: intake stores it as
        queued and it takes the usual way through its ``job.queued`` event.
        """
        outcome = await self._place_new(record)
        if outcome == "declined":
            self._declined[record.id] = time.monotonic() + DECLINED_WAIT_S
        return outcome == "placed"

    async def _place_new(self, record: JobRecord) -> str:
        if self._stopping or record.attempt != 0:
            return "declined"
        if self._declined:
            now_s = time.monotonic()
            for job_id, until in list(self._declined.items()):
                if until <= now_s:
                    del self._declined[job_id]
            if self._declined:
                return "declined"  # an earlier job is on its way here: the new one queues behind it
        if any(not p.committing for p in self._pending.values()):
            return "declined"  # jobs already wait here: the new one queues behind them
        config = self._cfg()
        now = now_ms()
        spec = record.spec
        if (
            config.mode == IntegrationMode.DISABLED
            or record.state != JobState.QUEUED
            or (record.not_before_at_ms is not None and record.not_before_at_ms > now)
            or (spec.deadline_at_ms is not None and spec.deadline_at_ms <= now)
            or not self._index.has_free(spec.job_type)
        ):
            return "declined"
        placement = place(
            spec,
            self._index.candidates(spec, config.scheduling.candidate_sample),
            now_ms=now,
            weights=self._weights(config),
            advanced=uses_advanced_placement(spec, config.mode),
            queued_for_ms=0,
        )
        rid = placement.runner_id
        if rid is None:
            return "declined"
        self._order += 1
        pending = Pending(
            job_id=record.id,
            attempt=0,
            order=self._order,
            msg=None,
            record=Versioned(record, 0),  # not stored yet: the commit creates it
            committing=True,
            last=placement,
            effective=self._effective(spec, config, waited_ms=0, boosted=False),
        )
        self._index.reserve(rid, record.id)
        try:
            try:
                self._commits.acquire_nowait()
            except anyio.WouldBlock:
                with anyio.fail_after(10):
                    await self._commits.acquire()
            try:
                await self._try_commit(pending, rid, placement, fresh=True)
            finally:
                self._commits.release()
        except Exception:
            if self._dispatched(pending):
                raise  # placed, but not announced: the caller's message must come back
            log.exception("placing %s at once failed; it takes the usual way", record.id)
            return "declined"
        finally:
            self._index.unreserve(rid, record.id)
        if self._dispatched(pending):
            return "placed"
        # the record exists already (a redelivered submission): intake looks at it
        return "exists" if pending.record is None else "declined"

    @staticmethod
    def _dispatched(pending: Pending) -> bool:
        record = pending.record
        return (
            record is not None
            and record.value.state != JobState.QUEUED
            and record.value.attempt == pending.attempt + 1
        )

    async def _place_loop(self) -> None:
        async with anyio.create_task_group() as tg:
            while not self._stopping:
                with anyio.move_on_after(0.25):  # also the tick for backoffs, boosts and deadlines
                    await self._wake.wait()
                self._wake = anyio.Event()
                acks, self._ack_later = self._ack_later, []
                for msg in acks:
                    await self._settle(msg)
                try:
                    await self._place_pending(tg)
                except Exception:
                    log.exception("placement round failed")

    @staticmethod
    def _effective(
        spec: JobSubmission, config: ValkyrieConfig, *, waited_ms: int, boosted: bool
    ) -> int:
        s, features = config.scheduling, config.features
        return effective_priority(
            spec,
            waited_ms=waited_ms,
            aging_step_s=s.aging_step_s,
            max_aging_boost=s.max_aging_boost,
            sla_classes=s.sla_classes if features.qos_routing else {},
            boosted=boosted,
            aging=features.priority_aging,
        )

    def _ordered(self, now: int, config: ValkyrieConfig) -> list[Pending]:
        s = config.scheduling
        features = config.features
        self._fair.half_life_s = s.fair_share_half_life_s
        self._fair.weights = s.tenant_weights
        now_s = now / 1000
        ready = []
        for p in self._pending.values():
            if p.record is None or p.committing:
                continue
            spec = p.record.value.spec
            p.effective = self._effective(
                spec, config, waited_ms=now - p.queued_at_ms(), boosted=p.boosted
            )
            ready.append(p)

        def key(p: Pending) -> tuple[int, float, int, int]:
            assert p.record is not None
            share = (
                self._fair.share_key(tenant_of(p.record.value.spec, s.tenant_key), now_s)
                if features.fair_share
                else 0.0
            )
            # submission order, not arrival of this attempt's event: a job taken back from a lost
            # runner keeps its place in line instead of waiting behind the whole backlog again
            return (p.effective, share, p.record.value.submitted_at_ms, p.order)

        ready.sort(key=key)
        return ready

    def _weights(self, config: ValkyrieConfig) -> ScoreWeights:
        s = config.scheduling
        return ScoreWeights(
            free_capacity=s.weight_free_capacity,
            success_rate=s.weight_success_rate,
            preferred_runner=s.weight_preferred_runner,
            region=s.weight_region,
            affinity=s.weight_affinity,
            accept_latency=s.weight_accept_latency,
            efficiency=s.weight_efficiency,
        )

    async def _place_pending(self, tg: anyio.abc.TaskGroup) -> None:
        now = now_ms()
        config = self._cfg()
        mode = config.mode
        weights = self._weights(config)
        sample = config.scheduling.candidate_sample
        for pending in self._ordered(now, config)[: config.dispatch.max_queue_scan]:
            assert pending.record is not None
            record = pending.record.value
            spec = record.spec
            if spec.deadline_at_ms is not None and spec.deadline_at_ms <= now:
                pending.committing = True
                tg.start_soon(self._expire, pending)
                continue
            waited = now - pending.queued_at_ms()
            targets = spec.performance_targets
            if (
                targets is not None
                and targets.max_dispatch_latency_ms is not None
                and not pending.boosted
                and waited > targets.max_dispatch_latency_ms
            ):
                pending.boosted = True
                tg.start_soon(self._slo_breach, pending, waited)
            if record.not_before_at_ms is not None and record.not_before_at_ms > now:
                continue
            if mode == IntegrationMode.DISABLED:
                continue  # still evaluate deadlines and SLOs of the rest
            if not self._index.has_free(spec.job_type) and not (
                spec.routing_hints and spec.routing_hints.preferred_runners
            ):
                continue
            advanced = uses_advanced_placement(spec, mode)
            placement = place(
                spec,
                self._index.candidates(spec, sample),
                now_ms=now,
                weights=weights,
                advanced=advanced,
                queued_for_ms=waited,
            )
            if (
                placement.runner_id is None
                and not placement.waiting_for_preferred
                and self._index.free_count(spec.job_type) > sample
                and now - pending.full_scan_at_ms >= FULL_SCAN_EVERY_MS
            ):
                # The sample missed: few free runners may match (rare labels or resources).
                # Look at every free one of the job type, at most once a second per job.
                pending.full_scan_at_ms = now
                placement = place(
                    spec,
                    self._index.free_views(spec.job_type),
                    now_ms=now,
                    weights=weights,
                    advanced=advanced,
                    queued_for_ms=waited,
                )
            pending.last = placement
            if placement.runner_id is None:
                continue
            rid = placement.runner_id
            self._index.reserve(rid, pending.job_id)
            pending.committing = True
            await self._commits.acquire()
            tg.start_soon(self._commit, pending, rid, placement)

    async def _slo_breach(self, pending: Pending, waited: int) -> None:
        assert pending.record is not None
        spec = pending.record.value.spec
        assert spec.performance_targets is not None
        try:
            await self._events.emit(
                JobSloBreach(
                    subject_id=pending.job_id,
                    attempt=pending.attempt,
                    target="max_dispatch_latency_ms",
                    limit_ms=spec.performance_targets.max_dispatch_latency_ms,
                    waited_ms=waited,
                    action="boosted ahead of unboosted jobs",
                )
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.warning("could not record SLO breach of %s: %r", pending.job_id, e)

    async def _expire(self, pending: Pending) -> None:
        assert pending.record is not None
        now = now_ms()

        def decide(record: JobRecord) -> JobRecord | None:
            if record.state != JobState.QUEUED or record.attempt != pending.attempt:
                return None
            return finish_job(
                record,
                JobState.EXPIRED,
                now_ms=now,
                reason=f"deadline {record.spec.deadline_at_ms} passed before the job could start",
            )

        try:
            latest, _ = await cas_update(
                self._jobs,
                pending.job_id,
                JOB_DECODER,
                decide,
                known=pending.record,
                ttl_for=self._ops.job_ttl(),
            )
            if latest is not None and latest.value.state == JobState.EXPIRED:
                await self._ops.announce_outcome(latest.value, from_runner=None)
                self._ctx.metrics.jobs.labels(self.name, "expired").inc()
        except Exception:
            log.exception("expiring %s failed", pending.job_id)
            pending.committing = False
            return
        self._drop(pending)

    async def _commit(self, pending: Pending, rid: str, placement: Placement) -> None:
        try:
            ok = await self._try_commit(pending, rid, placement)
        except Exception:
            log.exception("dispatching %s to %s failed; will retry", pending.job_id, rid)
            ok = False
            pending.record = None
            await anyio.sleep(0.1)
            await self._load(pending)
        finally:
            self._index.unreserve(rid, pending.job_id)
            self._commits.release()
        if not ok:
            pending.committing = False
            self._poke()

    async def _try_commit(
        self, pending: Pending, rid: str, placement: Placement, *, fresh: bool = False
    ) -> bool:
        """Claim a slot on ``rid``, then move the job record to dispatched, then publish.

        ``fresh``: the record is not stored yet (intake's hand-over); it is created dispatched,
        and its ``queued`` event is emitted here, before ``dispatched``.
        """
        assert pending.record is not None
        queued = pending.record.value
        job_id = pending.job_id
        queued_at = pending.queued_at_ms()
        attempt = pending.record.value.attempt + 1
        lock = self._locks.setdefault(rid, anyio.Lock())
        async with lock:
            latest, claimed = await cas_update(
                self._runners_kv,
                rid,
                RUNNER_DECODER,
                lambda r: (
                    None
                    if r.assigned_jobs.get(job_id) == attempt
                    else assign_slot(r, job_id, attempt)
                ),
                known=self._view.records.get(rid),
            )
            if latest is not None:
                self._view.offer(rid, latest)
        if latest is None or latest.value.assigned_jobs.get(job_id) != attempt:
            return False  # the runner filled up or went away meanwhile: place again
        now = now_ms()
        record: Versioned[JobRecord] | None = pending.record
        dispatched: JobRecord | None = None
        for _ in range(10):
            if (
                record is None
                or record.value.state != JobState.QUEUED
                or record.value.attempt != attempt - 1
            ):
                break
            new = dispatch_job(record.value, rid, now_ms=now)
            try:
                if fresh:
                    revision = await kv_create(self._jobs, job_id, encode(new))
                else:
                    revision = await kv_write(
                        self._jobs, job_id, encode(new), last=record.revision, ttl=None
                    )
            except nats.js.errors.KeyWrongLastSequenceError:
                if fresh:
                    record = pending.record = None
                    break
                record = await get_versioned(self._jobs, job_id, JOB_DECODER)
                continue
            dispatched = new
            pending.record = Versioned(new, int(revision))
            break
        if dispatched is None:
            # Someone else dispatched, cancelled or expired it: give the slot back and drop the
            # job. Only a slot this call took: one that was already there may be the slot of
            # whoever did dispatch this attempt here (or ours from before a crash, which the
            # supervisor frees if nobody holds it).
            if claimed:
                await self._ops.release(rid, job_id, attempt)
            self._drop(pending)
            return True
        accept_by = now + self._accept_ms
        self._awaiting[job_id] = (rid, attempt, accept_by)
        message = Dispatch(
            job_id=job_id,
            attempt=attempt,
            runner_id=rid,
            spec=dispatched.spec,
            dispatched_at_ms=now,
            accept_by_at_ms=accept_by,
        )
        await self._bus.nc.publish(self._bus.names.dispatch(rid), encode(message))
        config = self._cfg()
        tenant = tenant_of(dispatched.spec, config.scheduling.tenant_key)
        self._fair.charge(tenant, now / 1000)
        avg = self._durations.get(dispatched.spec.job_type)
        targets = dispatched.spec.performance_targets
        decision = self._decision(
            placement,
            latest.value,
            pending,
            now - queued_at,
            tenant,
            attempt=attempt,
            predicted_finish_at_ms=now + int(avg) if avg is not None else None,
        )
        outbox = Outbox(self._bus)
        if fresh:
            await self._ops.announce_queued(
                queued, at_ms=queued.submitted_at_ms, placed_attempt=attempt, outbox=outbox
            )
        await self._events.emit(decision, at_ms=now, outbox=outbox)
        if (
            targets is not None
            and targets.target_completion_time_s is not None
            and avg is not None
            and now + avg > dispatched.submitted_at_ms + targets.target_completion_time_s * 1000
        ):
            await self._events.emit(
                JobTargetAtRisk(
                    subject_id=job_id,
                    attempt=attempt,
                    target_completion_time_s=targets.target_completion_time_s,
                    predicted_finish_at_ms=now + int(avg),
                ),
                outbox=outbox,
            )
        await outbox.confirm()
        self._ctx.metrics.jobs.labels(self.name, "dispatched").inc()
        self._pending.pop(job_id, None)
        await self._settle(pending.msg)
        return True

    def _decision(
        self,
        placement: Placement,
        runner: RunnerRecord,
        pending: Pending,
        queued_ms: int,
        tenant: str,
        *,
        attempt: int,
        predicted_finish_at_ms: int | None,
    ) -> JobDispatched:
        assert pending.record is not None
        spec = pending.record.value.spec
        hints = spec.routing_hints
        rid = runner.registration.runner_id
        return JobDispatched(
            subject_id=pending.job_id,
            attempt=attempt,
            correlation_id=spec.correlation_id,
            runner_id=rid,
            score=round(placement.ranked[0].score, 4) if placement.ranked else None,
            runners_up=[
                RunnerUp(runner_id=s.runner_id, score=round(s.score, 4))
                for s in placement.ranked[1:4]
            ],
            candidates=len(placement.ranked) + sum(len(v) for v in placement.rejected.values()),
            rejected=dict(placement.reasons()),
            slots_used=len(runner.assigned_jobs),
            capacity=runner.registration.max_concurrent_jobs,
            queued_ms=queued_ms,
            effective_priority=pending.effective,
            boosted=pending.boosted,
            tenant=tenant,
            mode=self._cfg().mode.value,
            preferred=hints is not None and rid in hints.preferred_runners,
            predicted_finish_at_ms=predicted_finish_at_ms,
        )

    # -- explain ----------------------------------------------------------------------------------
    async def _on_explain(self, msg: Msg) -> None:
        try:
            request = _EXPLAIN.decode(msg.data)
        except msgspec.DecodeError as e:
            await self._answer(
                msg, JobExplanation(job_id="", state="", summary="", error=f"bad request: {e}")
            )
            return
        if not self._cfg().features.explain:
            error = "explain is switched off (features.explain = false)"
            await self._answer(
                msg, JobExplanation(job_id=request.job_id, state="", summary="", error=error)
            )
            return
        try:
            await self._answer(msg, await self.explain(request.job_id))
        except Exception as e:
            log.exception("explain %s failed", request.job_id)
            await self._answer(
                msg, JobExplanation(job_id=request.job_id, state="", summary="", error=repr(e))
            )

    async def _answer(self, msg: Msg, explanation: JobExplanation) -> None:
        if msg.reply:
            try:
                await msg.respond(encode(explanation))
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
        config = self._cfg()
        if record.state != JobState.QUEUED:
            decision = None
            if record.attempt:
                try:
                    raw = await self._bus.js.get_last_msg(
                        self._bus.names.stream("events"),
                        self._bus.names.event("job", job_id, "dispatched"),
                    )
                    event = typed_event(EVENT_DECODER.decode(raw.data or b""))
                    decision = event if isinstance(event, JobDispatched) else None
                except (nats.js.errors.NotFoundError, msgspec.DecodeError):
                    decision = None
            return explain_dispatched(record, decision)
        now = now_ms()
        ordered = self._ordered(now, config)
        position = next((i for i, p in enumerate(ordered) if p.job_id == job_id), None)
        pending = self._pending.get(job_id)
        facts = QueueFacts(
            mode=config.mode.value,
            advanced=uses_advanced_placement(record.spec, config.mode),
            effective_priority=pending.effective if pending else None,
            position=position,
            length=len(ordered),
            boosted=bool(pending and pending.boosted),
            waiting_for_preferred=bool(
                pending and pending.last and pending.last.waiting_for_preferred
            ),
            avg_duration_ms=self._durations.get(record.spec.job_type),
        )
        explanation = explain_queued(record, self._index.all_views(), facts, now_ms=now)
        return msgspec.structs.replace(explanation, held=pending is not None)

    # -- upkeep -----------------------------------------------------------------------------------
    async def _upkeep_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            with anyio.move_on_after(self._cfg().dispatch.reconcile_interval_ms / 1000):
                await stop.wait()
            try:
                await self._expire_acceptance()
            except Exception:
                log.exception("upkeep pass failed")

    async def _keepalive_loop(self, stop: anyio.Event) -> None:
        # a loop of its own: take-backs waiting out an outage in the upkeep loop must not delay
        # the keep-alives past the ack wait
        while not stop.is_set():
            with anyio.move_on_after(self._keepalive_s):
                await stop.wait()
            for pending in list(self._pending.values()):
                if pending.msg is None:
                    continue
                try:
                    await pending.msg.in_progress()
                except (nats.errors.Error, OSError):
                    pass

    async def _expire_acceptance(self) -> None:
        now = now_ms()
        for job_id, (rid, attempt, accept_by) in list(self._awaiting.items()):
            if accept_by > now:
                continue
            self._awaiting.pop(job_id, None)
            current = await get_versioned(self._jobs, job_id, JOB_DECODER)
            if current is None:
                continue
            rec = current.value
            if rec.state == JobState.DISPATCHED and rec.attempt == attempt and rec.runner_id == rid:
                await self._ops.take_back(
                    job_id,
                    attempt=attempt,
                    runner_id=rid,
                    known=current,
                    reason=f"runner {rid} did not accept within {self._accept_ms} ms",
                    outcome="not_accepted",
                )


def create(ctx: HandlerContext) -> DispatcherWorker:
    """Entry point: build the dispatcher."""
    return DispatcherWorker(ctx)
