"""Supervisor: notices lost runners and overrunning jobs, and acts.

* A runner silent for ``runner_lost_after_ms`` is marked offline (``runner.lost``) and every job it
  held is taken back: re-queued with attempt + 1 at once, or ended when its retry budget is spent.
  If it comes back, its stale updates are refused and it is told to abandon those jobs.
* A job still on a runner past ``max_execution_time_s`` + ``execution_grace_ms`` ends timed out
  (its runner, if alive, is told to cancel it), so a silent runner cannot hold a job forever.

Several supervisors may run: every action is a compare-and-set that only one of them wins.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus

from schemas import JobRecord, JobState, RunnerCommand, RunnerRecord, RunnerState
from valkyrie import EventPublisher, HandlerContext
from valkyrie._codec import JOB_DECODER, RUNNER_DECODER, encode, now_ms
from valkyrie._config import DispatchConfig
from valkyrie._jobops import JobOps
from valkyrie._kvstore import Versioned, cas_update, get_versioned
from valkyrie._lifecycle import retry_after_failure

__all__ = ["SupervisorWorker", "create"]

log = logging.getLogger("valkyrie.supervisor")
_ON_RUNNER = (JobState.DISPATCHED, JobState.ACCEPTED, JobState.RUNNING)
MIN_EXECUTION_MS = 1000  # the smallest max_execution_time_s: younger assignments need no check


class SupervisorWorker:
    """Liveness and execution-time enforcement."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        self._ctx = ctx
        self._bus = ctx.bus
        self._events = EventPublisher(ctx.bus, ctx.name)
        self._ops = JobOps(ctx.bus, self._events)
        self._runners: dict[str, Versioned[RunnerRecord]] = {}
        self._first_seen: dict[tuple[str, int], int] = {}
        self._deadline: dict[tuple[str, int], int] = {}

    def _cfg(self) -> DispatchConfig:
        return self._ctx.config.current.dispatch

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise until ``stop`` is set."""
        self._jobs = await self._bus.kv("jobs")
        self._runners_kv = await self._bus.kv("runners")
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch)
            task_status.started()
            while not stop.is_set():
                with anyio.move_on_after(self._cfg().supervise_interval_ms / 1000):
                    await stop.wait()
                if stop.is_set():
                    break
                try:
                    await self._check()
                except Exception:
                    log.exception("supervision pass failed")
            tg.cancel_scope.cancel()

    async def _watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        watcher = await self._runners_kv.watchall()
        started = False
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except TimeoutError:
                    entry = None
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
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await watcher.stop()

    async def _check(self) -> None:
        now = now_ms()
        live: set[tuple[str, int]] = set()
        for rid, versioned in list(self._runners.items()):
            record = versioned.value
            silent_ms = now - record.last_heartbeat_at_ms
            if record.state != RunnerState.OFFLINE and silent_ms > self._cfg().runner_lost_after_ms:
                await self._lose(rid, versioned)
                continue
            if record.state == RunnerState.OFFLINE:
                for job_id, attempt in list(record.assigned_jobs.items()):
                    await self._take_back(rid, job_id, attempt, record.last_heartbeat_at_ms)
                continue
            for job_id, attempt in record.assigned_jobs.items():
                key = (job_id, attempt)
                live.add(key)
                first = self._first_seen.setdefault(key, now)
                if now - first < MIN_EXECUTION_MS:
                    continue
                deadline = self._deadline.get(key)
                if deadline is None:
                    deadline = await self._load_deadline(key)
                if deadline is not None and now > deadline:
                    await self._time_out(rid, job_id, attempt)
        for key in list(self._first_seen):
            if key not in live:
                self._first_seen.pop(key, None)
                self._deadline.pop(key, None)

    async def _lose(self, rid: str, versioned: Versioned[RunnerRecord]) -> None:
        lost_after = self._cfg().runner_lost_after_ms
        now = now_ms()

        def mark(record: RunnerRecord) -> RunnerRecord | None:
            if (
                record.state == RunnerState.OFFLINE
                or now - record.last_heartbeat_at_ms <= lost_after
            ):
                return None
            return msgspec.structs.replace(record, state=RunnerState.OFFLINE)

        latest, written = await cas_update(
            self._runners_kv, rid, RUNNER_DECODER, mark, known=versioned
        )
        if latest is None or latest.value.state != RunnerState.OFFLINE:
            return
        record = latest.value
        if written:
            self._runners[rid] = latest
            await self._events.emit(
                "runner",
                rid,
                "lost",
                data={
                    "last_heartbeat_at_ms": record.last_heartbeat_at_ms,
                    "silent_ms": now - record.last_heartbeat_at_ms,
                    "jobs": sorted(record.assigned_jobs),
                },
                event_id=f"{rid}.lost.{record.last_heartbeat_at_ms}",
            )
            log.warning(
                "runner %s lost (silent %d ms); re-queueing %d job(s)",
                rid,
                now - record.last_heartbeat_at_ms,
                len(record.assigned_jobs),
            )
        for job_id, attempt in list(record.assigned_jobs.items()):
            await self._take_back(rid, job_id, attempt, record.last_heartbeat_at_ms)

    async def _take_back(self, rid: str, job_id: str, attempt: int, last_heartbeat_ms: int) -> None:
        record = await self._ops.take_back(
            job_id,
            attempt=attempt,
            runner_id=rid,
            reason=f"runner {rid} lost (no heartbeat since {last_heartbeat_ms})",
            outcome="runner_lost",
        )
        if record is None:
            # Not on that runner any more: make sure its slot is not held forever.
            await self._ops.release(rid, job_id, attempt)

    async def _load_deadline(self, key: tuple[str, int]) -> int | None:
        current = await get_versioned(self._jobs, key[0], JOB_DECODER)
        if current is None or current.value.attempt != key[1]:
            return None
        rec = current.value
        began = rec.started_at_ms or rec.accepted_at_ms or rec.dispatched_at_ms or rec.updated_at_ms
        deadline = (
            began
            + rec.spec.requirements.max_execution_time_s * 1000
            + self._cfg().execution_grace_ms
        )
        self._deadline[key] = deadline
        return deadline

    async def _time_out(self, rid: str, job_id: str, attempt: int) -> None:
        now = now_ms()
        limit: list[int] = []

        def decide(record: JobRecord) -> JobRecord | None:
            if (
                record.attempt != attempt
                or record.runner_id != rid
                or record.state not in _ON_RUNNER
            ):
                return None
            limit[:] = [record.spec.requirements.max_execution_time_s]
            return retry_after_failure(
                record,
                "timed_out",
                now_ms=now,
                reason=f"no result within max_execution_time_s={record.spec.requirements.max_execution_time_s}"
                f" + {self._cfg().execution_grace_ms} ms grace (runner {rid} silent)",
            )

        latest, written = await cas_update(self._jobs, job_id, JOB_DECODER, decide)
        self._deadline.pop((job_id, attempt), None)
        if latest is None or not written:
            return
        try:
            await self._bus.nc.publish(
                self._bus.names.control(rid),
                encode(
                    RunnerCommand(
                        command="cancel",
                        job_id=job_id,
                        attempt=attempt,
                        reason="timed out",
                        grace_period_s=self._cfg().cancel_grace_s,
                    )
                ),
            )
        except nats.errors.Error as e:
            log.warning("could not tell %s to stop %s: %r", rid, job_id, e)
        await self._ops.release(rid, job_id, attempt, succeeded=False)
        await self._ops.announce_outcome(latest.value, from_runner=rid)


def create(ctx: HandlerContext) -> SupervisorWorker:
    """Entry point: build the supervisor."""
    return SupervisorWorker(ctx)
