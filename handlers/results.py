"""Results: apply runners' updates (accepted, started, finished) to job records, free capacity.

A ``started`` for an attempt not accepted yet is its acceptance too (the SDK sends no separate
``accepted`` when it starts a job at once): both ``job.accepted`` and ``job.started`` are emitted.

Updates from an attempt the job no longer belongs to are refused and the runner is told to abandon
that job. An update whose body names another runner than its subject (``updates.<runner_id>``,
the only one NATS lets that runner publish) is dead-lettered: a runner speaks only for itself. Every step is idempotent: job record first, then the runner slot, then the event, then ack.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import anyio
import anyio.lowlevel
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    TERMINAL_STATES,
    JobAccepted,
    JobAcceptedEvent,
    JobFinished,
    JobRecord,
    JobStaleUpdate,
    JobStarted,
    JobStartedEvent,
    JobState,
    JobUpdate,
    RunnerCommand,
)
from valkyrie import GiveUp, HandlerContext
from valkyrie.bus import JOB_DECODER, UPDATE_DECODER, Outbox, Versioned, cas_update, encode, now_ms
from valkyrie.domain.identity import runner_mismatch
from valkyrie.domain.lifecycle import UpdateOutcome, UpdateResult, apply_update, still_at
from valkyrie.runtime import HandlerBase

__all__ = ["ResultsWorker", "create"]

log = logging.getLogger("valkyrie.results")
RECENT_RECORDS = 10_000
FOLLOW_TIMEOUT_S = 60.0  # an update waiting for another task to apply it with its job's others


class _Queued:
    """An update waiting to be applied by whichever task holds its job."""

    def __init__(self, update: JobUpdate) -> None:
        self.update = update
        self.done = anyio.Event()
        self.error: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class ResultsWorker(HandlerBase):
    """Consumes ``<prefix>.updates.*`` through the durable consumer ``results``."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        # updates of one job being applied, and those waiting to join the next write
        self._queues: dict[str, list[_Queued]] = {}
        # Records this process wrote last: the next update of the same job (finished after
        # accepted) then skips a read. A stale entry only costs the compare-and-set a retry.
        self._recent: OrderedDict[str, Versioned[JobRecord]] = OrderedDict()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume updates until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._ops.runners = await self._ctx.views.runners()
        await self.consume(
            stop,
            stream="updates",
            filter_subject=bus.names.updates("*"),
            handle=self.handle,
            task_status=task_status,
        )

    async def handle(self, msg: Msg) -> None:
        """Apply one update (together with others of the same job that arrived meanwhile)."""
        try:
            update = UPDATE_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            raise GiveUp(f"invalid job update: {e}") from e
        mismatch = runner_mismatch(msg.subject.rsplit(".", 1)[-1], update.runner_id)
        if mismatch is not None:
            raise GiveUp(f"job update refused: {mismatch}")
        item = _Queued(update)
        queue = self._queues.get(update.job_id)
        if queue is not None:
            # another task is applying this job's updates: it applies ours in its next write
            queue.append(item)
            with anyio.fail_after(FOLLOW_TIMEOUT_S):
                await item.done.wait()
            if item.error is not None:
                raise item.error
            return
        queue = self._queues[update.job_id] = [item]
        try:
            # let the updates delivered with this one (a runner that accepted and finished at
            # once sends both) reach the queue before the first write
            await anyio.lowlevel.checkpoint()
            while queue:
                batch = list(queue)
                queue.clear()
                try:
                    await self._apply(batch)
                except Exception as e:  # noqa: BLE001 - not swallowed: every waiter raises it
                    for other in [*batch, *queue]:
                        other.fail(e)  # each message is handed back and tried again
                    break
                except BaseException:  # cancelled: the waiting ones try again on their own
                    for other in [*batch, *queue]:
                        other.fail(RuntimeError("the task applying this update was cancelled"))
                    raise
                for done in batch:
                    done.done.set()
        finally:
            del self._queues[update.job_id]
        if item.error is not None:
            raise item.error

    async def _apply(self, batch: list[_Queued]) -> None:
        """Apply a job's updates in arrival order with one write; then their effects, in order.

        A runner that accepts and finishes a job at once sends two updates; applied together they
        cost one compare-and-set of the job record instead of two.
        """
        updates = [q.update for q in batch]
        job_id = updates[0].job_id
        now = now_ms()
        verdicts: list[UpdateResult] = []
        after: list[JobRecord] = []
        implied: list[bool] = []  # a `started` that was also the attempt's acceptance

        def decide(record: JobRecord) -> JobRecord | None:
            verdicts.clear()
            after.clear()
            implied.clear()
            current, changed = record, False
            for update in updates:
                result = apply_update(current, update, now_ms=now)
                verdicts.append(result)
                implied.append(
                    isinstance(update, JobStarted)
                    and result.outcome == UpdateOutcome.APPLIED
                    and current.accepted_at_ms is None
                )
                if result.record is not None:
                    current, changed = result.record, True
                after.append(current)
            return current if changed else None

        latest, written = await cas_update(
            self._jobs,
            job_id,
            JOB_DECODER,
            decide,
            known=self._recent.pop(job_id, None),
            ttl_for=self._ops.job_ttl(),
        )
        if latest is None:
            raise GiveUp(f"update for unknown job {job_id!r}")
        if written and latest.value.state not in TERMINAL_STATES:
            self._recent[job_id] = latest
            if len(self._recent) > RECENT_RECORDS:
                self._recent.popitem(last=False)
        if not verdicts:  # no decision ran (nothing to decide on): every update saw the record
            verdicts = [UpdateResult(UpdateOutcome.ALREADY)] * len(updates)
        if not after or not written:
            after = [latest.value] * len(updates)
        if len(implied) != len(updates) or not written:
            implied = [False] * len(updates)
        outbox = Outbox(self._bus)
        last = len(updates) - 1
        for i, (update, result, record) in enumerate(zip(updates, verdicts, after, strict=True)):
            if implied[i]:
                await self._emit(record, JobAcceptedEvent, update.runner_id, outbox)
            await self._effects(
                update,
                result,
                record,
                written=written,
                revision=latest.revision if i == last else None,
                outbox=outbox,
            )
        await outbox.confirm()  # events stored before the updates are acked

    async def _effects(
        self,
        update: JobUpdate,
        result: UpdateResult,
        record: JobRecord,
        *,
        written: bool,
        revision: int | None,
        outbox: Outbox,
    ) -> None:
        if result.outcome == UpdateOutcome.STALE:
            await self._refuse(update, record, result.reason or "stale")
            return
        if result.outcome == UpdateOutcome.ALREADY and not isinstance(update, JobFinished):
            # Seen before. If the record still shows exactly this step, this may be the
            # redelivery after a crash between the record's write and its events: emit them
            # again (their ids make the stream drop what was stored already).
            if not still_at(record, update):
                return
            if isinstance(update, JobStarted) and record.accepted_at_ms == record.started_at_ms:
                await self._emit(record, JobAcceptedEvent, update.runner_id, outbox)
        match update:
            case JobAccepted():
                await self._emit(record, JobAcceptedEvent, update.runner_id, outbox)
            case JobStarted():
                await self._emit(record, JobStartedEvent, update.runner_id, outbox)
                if written and result.outcome == UpdateOutcome.APPLIED and record.dispatched_at_ms:
                    # the control plane's clock at both ends: a runner's clock is never trusted
                    self._ctx.metrics.observe_start(
                        record.spec.job_type, now_ms() - record.dispatched_at_ms
                    )
            case JobFinished():
                if record.attempt != update.attempt or record.state not in (
                    {JobState.QUEUED} | TERMINAL_STATES
                ):
                    return
                if record.state == JobState.QUEUED and record.runner_id is not None:
                    return
                latency = (
                    float(record.accepted_at_ms - record.dispatched_at_ms)
                    if record.accepted_at_ms and record.dispatched_at_ms
                    else None
                )
                await self._ops.release(
                    update.runner_id,
                    update.job_id,
                    update.attempt,
                    succeeded=None
                    if update.outcome == "rejected"
                    else record.state == JobState.SUCCEEDED,
                    accept_latency_ms=latency,
                )
                await self._ops.announce_outcome(
                    record, from_runner=update.runner_id, revision=revision, outbox=outbox
                )
                if written:
                    self._ctx.metrics.jobs.labels(self.name, record.state.value).inc()

    async def _emit(
        self,
        record: JobRecord,
        kind: type[JobAcceptedEvent | JobStartedEvent],
        runner_id: str,
        outbox: Outbox,
    ) -> None:
        await self._events.emit(
            kind(
                subject_id=record.id,
                attempt=record.attempt,
                correlation_id=record.spec.correlation_id,
                runner_id=runner_id,
            ),
            outbox=outbox,
        )

    async def _refuse(self, update: JobUpdate, record: JobRecord, reason: str) -> None:
        await self._events.emit(
            JobStaleUpdate(
                subject_id=update.job_id,
                attempt=update.attempt,
                runner_id=update.runner_id,
                update=str(update.__struct_config__.tag),
                reason=reason,
            )
        )
        # Whatever slot that stale attempt still holds on its runner is freed.
        await self._ops.release(update.runner_id, update.job_id, update.attempt)
        if not isinstance(update, JobFinished):
            try:
                await self._bus.nc.publish(
                    self._bus.names.control(update.runner_id),
                    encode(
                        RunnerCommand(
                            command="abandon",
                            job_id=update.job_id,
                            attempt=update.attempt,
                            reason=reason,
                        )
                    ),
                )
            except nats.errors.Error as e:
                log.warning(
                    "could not tell %s to abandon %s: %r", update.runner_id, update.job_id, e
                )


def create(ctx: HandlerContext) -> ResultsWorker:
    """Entry point: build the results worker."""
    return ResultsWorker(ctx)
