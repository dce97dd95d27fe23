"""Dispatcher: place queued jobs on runners, record each decision atomically, publish it.

Queued jobs arrive as ``job.<id>.queued`` events through the durable consumer ``dispatcher``; a job
that cannot be placed yet is held (its message unacked, kept alive with ``in_progress``) and retried
the moment the runners bucket changes, so there is no polling delay. A decision is two
compare-and-sets, runner slot first, then job record, so a job is dispatched once and a runner never
exceeds its capacity however many dispatchers run. A crash between them leaves an orphan slot that the
reconciler frees; a dispatch that is not accepted in time is taken back and placed again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import TERMINAL_STATES, Dispatch, JobRecord, JobState, RunnerRecord
from valkyrie import EventPublisher, HandlerContext
from valkyrie._codec import EVENT_DECODER, JOB_DECODER, RUNNER_DECODER, encode, now_ms
from valkyrie._config import IntegrationMode, ValkyrieConfig
from valkyrie._jobops import JobOps
from valkyrie._kvstore import Versioned, cas_update, get_versioned
from valkyrie._lifecycle import assign_slot, dispatch_job, finish_job
from valkyrie._modes import uses_advanced_placement
from valkyrie._placement import Placement, ScoreWeights, place

__all__ = ["DispatcherWorker", "create"]

log = logging.getLogger("valkyrie.dispatcher")
ACK_WAIT_S = 30.0
KEEPALIVE_S = 10.0
ORPHAN_SCAN_S = 5.0
MAX_SCAN = 2000
COMMIT_CONCURRENCY = 64
_TAKEN = frozenset(
    {"accepted", "started", "succeeded", "failed", "cancelled", "timed_out", "expired", "requeued"}
)


@dataclass
class Pending:
    """A queued job this dispatcher holds."""

    job_id: str
    attempt: int
    priority: int
    order: int
    msg: Msg
    record: Versioned[JobRecord] | None = None
    committing: bool = False
    last: Placement | None = field(default=None, repr=False)


class DispatcherWorker:
    """Places jobs; run one or more per installation."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        self._ctx = ctx
        self._bus = ctx.bus
        self._events = EventPublisher(ctx.bus, ctx.name)
        self._ops = JobOps(ctx.bus, self._events)
        self._runners: dict[str, Versioned[RunnerRecord]] = {}
        self._reserved: dict[str, set[str]] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._pending: dict[str, Pending] = {}
        self._awaiting: dict[str, tuple[str, int, int]] = {}
        self._suspect: set[tuple[str, str, int]] = set()
        self._order = 0
        self._wake = anyio.Event()
        self._commits = anyio.Semaphore(COMMIT_CONCURRENCY)
        self._stopping = False
        self._ack_later: list[Msg] = []

    def _cfg(self) -> ValkyrieConfig:
        return self._ctx.config.current

    @property
    def _lost_after_ms(self) -> int:
        return self._cfg().dispatch.runner_lost_after_ms

    @property
    def _accept_ms(self) -> int:
        return self._cfg().dispatch.accept_timeout_ms

    def _poke(self) -> None:
        self._wake.set()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Place jobs until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._runners_kv = await bus.kv("runners")
        self._ctx.config.on_change(lambda _old, _new: self._poke())
        progress = await bus.nc.subscribe(bus.names.event("job", "*", "*"), cb=self._on_progress)
        psub = None
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self._watch_runners)
                psub = await bus.js.pull_subscribe(
                    bus.names.event("job", "*", "queued"),
                    durable=self.name,
                    stream=bus.names.stream("events"),
                    config=ConsumerConfig(
                        durable_name=self.name,
                        deliver_policy=DeliverPolicy.ALL,
                        ack_policy=AckPolicy.EXPLICIT,
                        ack_wait=ACK_WAIT_S,
                        max_ack_pending=1_000_000,
                        filter_subject=bus.names.event("job", "*", "queued"),
                    ),
                )
                tg.start_soon(self._consume, psub, stop)
                tg.start_soon(self._place_loop, stop)
                tg.start_soon(self._reconcile_loop, stop)
                tg.start_soon(self._keepalive_loop, stop)
                task_status.started()
                await stop.wait()
                self._stopping = True
                self._poke()
                # let commits in flight finish, then hand held jobs to other dispatchers at once
                with anyio.move_on_after(10):
                    for _ in range(COMMIT_CONCURRENCY):
                        await self._commits.acquire()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                for pending in list(self._pending.values()):
                    if not pending.committing:
                        await self._settle(pending.msg, nak=True)
                await progress.unsubscribe()
                if psub is not None:
                    await psub.unsubscribe()

    # -- inputs -----------------------------------------------------------------------------------
    async def _watch_runners(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        watcher = await self._runners_kv.watchall()
        started = False
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    if not started:
                        started = True
                        task_status.started()
                    continue
                if entry is None:
                    if not started:
                        started = True
                        task_status.started()
                    continue
                if entry.operation in ("DEL", "PURGE") or not entry.value:
                    self._runners.pop(entry.key, None)
                    continue
                try:
                    record = RUNNER_DECODER.decode(entry.value)
                except msgspec.DecodeError:
                    continue
                known = self._runners.get(entry.key)
                if known is None or int(entry.revision or 0) > known.revision:
                    self._runners[entry.key] = Versioned(record, int(entry.revision or 0))
                self._poke()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await watcher.stop()

    async def _on_progress(self, msg: Msg) -> None:
        # Core delivery of the job events the stream stores: cheap news that a dispatch was taken,
        # or that a job we hold was cancelled or expired elsewhere.
        _, job_id, kind = msg.subject.rsplit(".", 2)
        if kind in _TAKEN:
            self._awaiting.pop(job_id, None)
        if kind in ("cancelled", "expired"):
            pending = self._pending.get(job_id)
            if pending is not None and not pending.committing:
                self._drop(pending)

    async def _consume(self, psub: object, stop: anyio.Event) -> None:
        from nats.js.client import JetStreamContext

        assert isinstance(psub, JetStreamContext.PullSubscription)
        async with anyio.create_task_group() as tg:
            while not stop.is_set():
                try:
                    msgs = await psub.fetch(batch=256, timeout=0.5)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    continue
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    log.warning("fetch failed (%r)", e)
                    await anyio.sleep(0.25)
                    continue
                for msg in msgs:
                    try:
                        event = EVENT_DECODER.decode(msg.data)
                    except msgspec.DecodeError:
                        await self._settle(msg)
                        continue
                    job_id = event.subject_id or ""
                    old = self._pending.get(job_id)
                    if old is not None:
                        if old.committing or old.attempt >= (event.attempt or 0):
                            await self._settle(msg)
                            continue
                        await self._settle(old.msg)
                    self._order += 1
                    pending = Pending(
                        job_id=job_id,
                        attempt=event.attempt or 0,
                        priority=int(event.data.get("priority", 2)),
                        order=self._order,
                        msg=msg,
                    )
                    self._pending[job_id] = pending
                    tg.start_soon(self._load, pending)

    async def _load(self, pending: Pending) -> None:
        while True:
            try:
                pending.record = await get_versioned(self._jobs, pending.job_id, JOB_DECODER)
                break
            except (nats.errors.Error, nats.js.errors.Error) as e:
                log.warning("could not read job %s (%r); will retry", pending.job_id, e)
                await anyio.sleep(0.5)
        if pending.record is None or not self._still_queued(pending):
            self._drop(pending)
            return
        self._poke()

    def _still_queued(self, pending: Pending) -> bool:
        record = pending.record
        return (
            record is not None
            and record.value.state == JobState.QUEUED
            and record.value.attempt == pending.attempt
        )

    def _drop(self, pending: Pending) -> None:
        if self._pending.get(pending.job_id) is pending:
            del self._pending[pending.job_id]
        # fire-and-forget ack: the job is no longer ours to place
        self._ack_later.append(pending.msg)
        self._poke()

    async def _settle(self, msg: Msg, *, nak: bool = False) -> None:
        try:
            if nak:
                await msg.nak()
            else:
                await msg.ack()
        except (nats.errors.Error, OSError) as e:
            log.debug("ack/nak failed (%r): the message will be redelivered and dropped", e)

    # -- placement --------------------------------------------------------------------------------
    def _view(self, runner_id: str, record: RunnerRecord) -> RunnerRecord:
        reserved = self._reserved.get(runner_id)
        if not reserved:
            return record
        extra = {j: 0 for j in reserved if j not in record.assigned_jobs}
        if not extra:
            return record
        return msgspec.structs.replace(record, assigned_jobs={**record.assigned_jobs, **extra})

    async def _place_loop(self, stop: anyio.Event) -> None:
        async with anyio.create_task_group() as tg:
            while not self._stopping:
                with anyio.move_on_after(0.25):
                    await self._wake.wait()
                self._wake = anyio.Event()
                acks, self._ack_later[:] = list(self._ack_later), []
                for msg in acks:
                    await self._settle(msg)
                await self._place_pending(tg)

    async def _place_pending(self, tg: anyio.abc.TaskGroup) -> None:
        now = now_ms()
        config = self._cfg()
        mode = config.mode
        s = config.scheduling
        weights = ScoreWeights(
            free_capacity=s.weight_free_capacity,
            success_rate=s.weight_success_rate,
            preferred_runner=s.weight_preferred_runner,
            region=s.weight_region,
            affinity=s.weight_affinity,
        )
        free = 0
        views: list[RunnerRecord] = []
        for rid, versioned in self._runners.items():
            view = self._view(rid, versioned.value)
            views.append(view)
            free += max(0, view.registration.max_concurrent_jobs - len(view.assigned_jobs))
        candidates = sorted(
            (p for p in self._pending.values() if p.record is not None and not p.committing),
            key=lambda p: (p.priority, p.order),
        )
        for pending in candidates[: config.dispatch.max_queue_scan]:
            assert pending.record is not None
            spec = pending.record.value.spec
            if spec.deadline_at_ms is not None and spec.deadline_at_ms <= now:
                pending.committing = True
                tg.start_soon(self._expire, pending)
                continue
            nb = pending.record.value.not_before_at_ms
            if nb is not None and nb > now:
                continue
            if free <= 0 or mode == IntegrationMode.DISABLED:
                continue  # still evaluate deadlines of the rest
            advanced = uses_advanced_placement(spec, mode)
            placement = place(
                spec,
                views,
                now_ms=now,
                lost_after_ms=self._lost_after_ms,
                weights=weights,
                advanced=advanced,
            )
            pending.last = placement
            if placement.runner_id is None:
                continue
            rid = placement.runner_id
            self._reserved.setdefault(rid, set()).add(pending.job_id)
            pending.committing = True
            free -= 1
            views = [
                self._view(v.registration.runner_id, self._runners[v.registration.runner_id].value)
                if v.registration.runner_id == rid
                else v
                for v in views
            ]
            await self._commits.acquire()
            tg.start_soon(self._commit, pending, rid, placement)

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
                self._jobs, pending.job_id, JOB_DECODER, decide, known=pending.record
            )
            if latest is not None and latest.value.state == JobState.EXPIRED:
                await self._events.emit(
                    "job",
                    pending.job_id,
                    "expired",
                    data={"reason": latest.value.reason},
                    attempt=latest.value.attempt,
                    event_id=f"{pending.job_id}.expired",
                )
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
            self._reserved.get(rid, set()).discard(pending.job_id)
            await anyio.sleep(0.1)
            await self._load(pending)
        finally:
            self._commits.release()
        if not ok:
            pending.committing = False
            self._poke()

    async def _try_commit(self, pending: Pending, rid: str, placement: Placement) -> bool:
        assert pending.record is not None
        job_id = pending.job_id
        attempt = pending.record.value.attempt + 1
        reserved = self._reserved.setdefault(rid, set())
        lock = self._locks.setdefault(rid, anyio.Lock())
        try:
            async with lock:
                latest, _ = await cas_update(
                    self._runners_kv,
                    rid,
                    RUNNER_DECODER,
                    lambda r: (
                        None
                        if r.assigned_jobs.get(job_id) == attempt
                        else assign_slot(r, job_id, attempt)
                    ),
                    known=self._runners.get(rid),
                )
                if latest is not None:
                    known = self._runners.get(rid)
                    if known is None or latest.revision > known.revision:
                        self._runners[rid] = latest
        finally:
            reserved.discard(job_id)
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
                revision = await self._jobs.update(job_id, encode(new), last=record.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                record = await get_versioned(self._jobs, job_id, JOB_DECODER)
                continue
            dispatched = new
            pending.record = Versioned(new, int(revision))
            break
        if dispatched is None:
            # someone else dispatched, cancelled or expired it: give the slot back, drop the job
            await self._ops.release(rid, job_id, attempt)
            if record is not None and record.value.state in TERMINAL_STATES:
                pass
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
        runners_up = [
            {"runner_id": s.runner_id, "score": round(s.score, 4)} for s in placement.ranked[1:4]
        ]
        await self._events.emit(
            "job",
            job_id,
            "dispatched",
            data={
                "runner_id": rid,
                "score": round(placement.ranked[0].score, 4) if placement.ranked else None,
                "runners_up": runners_up,
                "rejected": dict(placement.reasons()),
                "slots_used": len(latest.value.assigned_jobs),
                "capacity": latest.value.registration.max_concurrent_jobs,
                "queued_ms": now
                - (dispatched.updated_at_ms if attempt > 1 else dispatched.submitted_at_ms),
            },
            attempt=attempt,
            correlation_id=dispatched.spec.correlation_id,
            event_id=f"{job_id}.dispatched.{attempt}",
            at_ms=now,
        )
        self._ctx.metrics.jobs.labels(self.name, "dispatched").inc()
        self._pending.pop(job_id, None)
        await self._settle(pending.msg)
        return True

    # -- upkeep -----------------------------------------------------------------------------------
    async def _keepalive_loop(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            with anyio.move_on_after(KEEPALIVE_S):
                await stop.wait()
            for pending in list(self._pending.values()):
                try:
                    await pending.msg.in_progress()
                except (nats.errors.Error, OSError):
                    pass

    async def _reconcile_loop(self, stop: anyio.Event) -> None:
        last_scan = time.monotonic()
        while not stop.is_set():
            with anyio.move_on_after(self._cfg().dispatch.reconcile_interval_ms / 1000):
                await stop.wait()
            try:
                await self._expire_acceptance()
                if time.monotonic() - last_scan >= ORPHAN_SCAN_S:
                    last_scan = time.monotonic()
                    await self._scan_orphans()
            except Exception:
                log.exception("reconciliation pass failed")

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

    async def _scan_orphans(self) -> None:
        """Free orphan slots and take back dispatches nobody waits on any more.

        An orphan slot comes from a crash between the two writes of a decision; an unwatched
        dispatch from a dispatcher that crashed after dispatching.
        """
        now = now_ms()
        suspects: set[tuple[str, str, int]] = set()
        for rid, versioned in list(self._runners.items()):
            for job_id, attempt in versioned.value.assigned_jobs.items():
                if job_id in self._awaiting or job_id in self._reserved.get(rid, ()):
                    continue
                pending = self._pending.get(job_id)
                if pending is not None and pending.committing:
                    continue
                current = await get_versioned(self._jobs, job_id, JOB_DECODER)
                rec = current.value if current else None
                if (
                    rec is None
                    or rec.runner_id != rid
                    or rec.attempt != attempt
                    or rec.state in TERMINAL_STATES
                ):
                    key = (rid, job_id, attempt)
                    if key in self._suspect:
                        await self._ops.release(rid, job_id, attempt)
                        log.info("freed orphan slot of %s on %s", job_id, rid)
                    else:
                        suspects.add(key)
                elif (
                    rec.state == JobState.DISPATCHED
                    and rec.dispatched_at_ms is not None
                    and now - rec.dispatched_at_ms > self._accept_ms
                ):
                    await self._ops.take_back(
                        job_id,
                        attempt=attempt,
                        runner_id=rid,
                        known=current,
                        reason=f"runner {rid} did not accept within {self._accept_ms} ms",
                        outcome="not_accepted",
                    )
        self._suspect = suspects


def create(ctx: HandlerContext) -> DispatcherWorker:
    """Entry point: build the dispatcher."""
    return DispatcherWorker(ctx)
