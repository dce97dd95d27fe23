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
import time

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    JobRecord,
    JobState,
    RunnerCommand,
    RunnerForgotten,
    RunnerLost,
    RunnerRecord,
    RunnerState,
)
from valkyrie import HandlerContext
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER, encode, now_ms
from valkyrie.bus.kv import Versioned, cas_update, get_versioned
from valkyrie.config.model import DispatchConfig
from valkyrie.domain.lifecycle import is_on, retry_after_failure
from valkyrie.runtime.base import HandlerBase
from valkyrie.runtime.jobops import through_outages

__all__ = ["SupervisorWorker", "create"]

log = logging.getLogger("valkyrie.supervisor")
MIN_EXECUTION_MS = 1000  # the smallest max_execution_time_s: younger assignments need no check
#: take-backs of lost runners' jobs in flight at once
TAKE_BACK_CONCURRENCY = 32


class SupervisorWorker(HandlerBase):
    """Liveness and execution-time enforcement."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._seen: dict[str, int] = {}
        self._started_ms = 0
        self._last_pass = time.monotonic()
        self._first_seen: dict[tuple[str, int], int] = {}
        self._deadline: dict[tuple[str, int], int] = {}
        self._suspect: set[tuple[str, int]] = set()
        self._take_backs = anyio.Semaphore(TAKE_BACK_CONCURRENCY)

    def _cfg(self) -> DispatchConfig:
        return self._ctx.config.current.dispatch

    def _last_seen(self, rid: str, record: RunnerRecord) -> int:
        # Before we heard the runner ourselves, count from our own start (a grace period) so a
        # restarted supervisor does not declare every runner lost at once.
        return max(self._seen.get(rid, 0), record.last_heartbeat_at_ms, self._started_ms)

    async def _on_heartbeat(self, msg: Msg) -> None:
        runner_id = msg.subject.rsplit(".", 1)[-1]
        self._seen[runner_id] = now_ms()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise until ``stop`` is set."""
        self._jobs = await self._bus.kv("jobs")
        self._runners_kv = await self._bus.kv("runners")
        self._view = await self._ctx.views.runners()
        self._ops.runners = self._view
        self._started_ms = now_ms()
        # Every supervisor hears every heartbeat (no queue group): liveness is judged live.
        sub = await self._bus.nc.subscribe(self._bus.names.heartbeat("*"), cb=self._on_heartbeat)
        self._beats = sub
        try:
            async with anyio.create_task_group() as tg:
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
                    finally:
                        self._last_pass = time.monotonic()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()

    async def _check(self) -> None:
        now = now_ms()
        if not self._bus.nc.is_connected:
            # Deaf while disconnected: that silence is ours, not the runners'. Count from the
            # reconnection on, as from a start (else a server restart "loses" every runner).
            self._started_ms = now
            return
        live: set[tuple[str, int]] = set()
        lost_after = self._cfg().runner_lost_after_ms
        # Silence we caused ourselves is not a runner's fault: after a pass that came late (this
        # process was starved) judge nobody, and before judging anyone silent read every
        # heartbeat already sent to us (_caught_up; skipping the pass whenever one waited unread
        # held a busy process's judgement back by seconds). Late is measured from the end of the
        # previous pass: a pass made long by our own take-backs is not starvation.
        judge = (
            time.monotonic() - self._last_pass <= 2 * self._cfg().supervise_interval_ms / 1000 + 0.5
        )
        silent = [
            rid
            for rid, versioned in self._view.records.items()
            if versioned.value.state != RunnerState.OFFLINE
            and now - self._last_seen(rid, versioned.value) > lost_after
        ]
        if judge and silent:
            judge = await self._caught_up()
            now = now_ms()
        lost = {
            rid: (versioned, seen)
            for rid, versioned in list(self._view.records.items())
            if judge
            and versioned.value.state != RunnerState.OFFLINE
            and now - (seen := self._last_seen(rid, versioned.value)) > lost_after
        }
        if lost:
            # first, and all at once: their jobs wait for it (one by one, runners lost together
            # were handled a take-back round trip apart each, seconds on a busy machine)
            async with anyio.create_task_group() as tg:
                for rid, (versioned, seen) in lost.items():
                    tg.start_soon(self._lose_logged, rid, versioned, seen)
        for rid, versioned in list(self._view.records.items()):
            record = versioned.value
            seen = self._last_seen(rid, record)
            if rid in lost:
                continue
            if record.state == RunnerState.OFFLINE:
                for job_id, attempt in list(record.assigned_jobs.items()):
                    await self._take_back(rid, job_id, attempt, seen)
                retention_ms = self._ctx.config.current.limits.offline_runner_retention_s * 1000
                if not record.assigned_jobs and now - seen > retention_ms:
                    await self._forget(rid, versioned)
                continue
            for job_id, attempt in record.assigned_jobs.items():
                key = (job_id, attempt)
                live.add(key)
                first = self._first_seen.setdefault(key, now)
                if now - first < MIN_EXECUTION_MS:
                    continue
                deadline = self._deadline.get(key)
                if deadline is None:
                    deadline = await self._inspect(rid, key)
                if deadline is not None and now > deadline:
                    await self._time_out(rid, job_id, attempt)
        for key in list(self._first_seen):
            if key not in live:
                self._first_seen.pop(key, None)
                self._deadline.pop(key, None)

    async def _caught_up(self) -> bool:
        """Read every heartbeat the server already sent us before judging anyone silent.

        A flush is a round trip: its answer comes after every message the server sent before it,
        so once it returns and our subscription's buffer is empty, a runner still silent really
        sent nothing (and not merely: we had not read it yet, because this process was busy).
        """
        try:
            await self._bus.nc.flush(timeout=2)
        except (nats.errors.Error, TimeoutError):
            return False
        with anyio.move_on_after(1):
            while self._beats.pending_msgs:  # noqa: ASYNC110 - nats-py signals no emptied buffer
                await anyio.sleep(0.01)
            return True
        return False

    async def _forget(self, rid: str, versioned: Versioned[RunnerRecord]) -> None:
        """Remove a runner offline for longer than ``limits.offline_runner_retention_s``."""
        try:
            await self._runners_kv.delete(rid, last=versioned.revision)
        except nats.js.errors.APIError as e:
            if e.err_code not in (10071, 10164):  # it changed meanwhile: look again next pass
                raise
            return
        await self._events.emit(RunnerForgotten(subject_id=rid, reason="offline too long"))

    async def _lose_logged(self, rid: str, versioned: Versioned[RunnerRecord], seen: int) -> None:
        # one failure must not cancel the others: the next pass looks at this runner again
        try:
            await self._lose(rid, versioned, seen)
        except Exception:
            log.exception("handling lost runner %s failed", rid)

    async def _lose(self, rid: str, versioned: Versioned[RunnerRecord], seen: int) -> None:
        now = now_ms()

        def mark(record: RunnerRecord) -> RunnerRecord | None:
            if record.state == RunnerState.OFFLINE or record.last_heartbeat_at_ms > seen:
                return None  # already offline, or a newer heartbeat was recorded meanwhile
            return msgspec.structs.replace(record, state=RunnerState.OFFLINE)

        latest, written = await cas_update(
            self._runners_kv, rid, RUNNER_DECODER, mark, known=versioned
        )
        if latest is None or latest.value.state != RunnerState.OFFLINE:
            return
        record = latest.value
        if written:
            self._view.offer(rid, latest)
            await self._events.emit(
                RunnerLost(
                    subject_id=rid,
                    last_heartbeat_at_ms=seen,
                    silent_ms=now - seen,
                    jobs=sorted(record.assigned_jobs),
                )
            )
            log.warning(
                "runner %s lost (silent %d ms); re-queueing %d job(s)",
                rid,
                now - seen,
                len(record.assigned_jobs),
            )
        async with anyio.create_task_group() as tg:
            for job_id, attempt in list(record.assigned_jobs.items()):
                tg.start_soon(self._take_back_logged, rid, job_id, attempt, seen)

    async def _take_back_logged(
        self, rid: str, job_id: str, attempt: int, last_heartbeat_ms: int
    ) -> None:
        # one failure must not cancel the others: the next pass takes back what is left
        async with self._take_backs:
            try:
                await self._take_back(rid, job_id, attempt, last_heartbeat_ms)
            except Exception:
                log.exception("taking %s (attempt %d) back from %s failed", job_id, attempt, rid)

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

    async def _inspect(self, rid: str, key: tuple[str, int]) -> int | None:
        """Look at a slot's job once it is old enough; return its execution deadline.

        A slot whose job is not on this runner at this attempt is an orphan (a crash between the
        two writes of a decision): freed on the second look. A dispatch still not accepted past
        the acceptance window is taken back (its dispatcher may have died).
        """
        job_id, attempt = key
        current = await get_versioned(self._jobs, job_id, JOB_DECODER)
        rec = current.value if current else None
        if not is_on(rec, rid, attempt):
            if key in self._suspect:
                self._suspect.discard(key)
                last = rec.attempts[-1] if rec is not None and rec.attempts else None
                if (
                    rec is not None
                    and rec.attempt == attempt
                    and last is not None
                    and (last.attempt, last.runner_id) == (attempt, rid)
                    and last.outcome is not None
                ):
                    # This attempt was ended here (taken back, timed out) by a process that died
                    # before it announced the outcome and freed the slot: finish both.
                    await self._ops.take_back(
                        job_id,
                        attempt=attempt,
                        runner_id=rid,
                        reason=last.reason or last.outcome,
                        outcome=last.outcome,
                        known=current,
                    )
                else:
                    await self._ops.release(rid, job_id, attempt)
                log.info("freed orphan slot of %s (attempt %d) on %s", job_id, attempt, rid)
            else:
                self._suspect.add(key)
            return None
        self._suspect.discard(key)
        accept_ms = self._ctx.config.current.dispatch.accept_timeout_ms
        if rec.state == JobState.DISPATCHED:
            if rec.dispatched_at_ms is not None and now_ms() - rec.dispatched_at_ms > accept_ms:
                await self._ops.take_back(
                    job_id,
                    attempt=attempt,
                    runner_id=rid,
                    known=current,
                    reason=f"runner {rid} did not accept within {accept_ms} ms",
                    outcome="not_accepted",
                )
            return None
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
            if not is_on(record, rid, attempt):
                return None
            limit[:] = [record.spec.requirements.max_execution_time_s]
            return retry_after_failure(
                record,
                "timed_out",
                now_ms=now,
                reason=f"no result within max_execution_time_s={record.spec.requirements.max_execution_time_s}"
                f" + {self._cfg().execution_grace_ms} ms grace (runner {rid} silent)",
            )

        latest, written = await cas_update(
            self._jobs, job_id, JOB_DECODER, decide, ttl_for=self._ops.job_ttl()
        )
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
        # announce, then free the slot: while the slot is held, a scan redoes what a crash left
        await through_outages(
            lambda: self._ops.announce_outcome(
                latest.value, from_runner=rid, revision=latest.revision
            )
        )
        await through_outages(lambda: self._ops.release(rid, job_id, attempt, succeeded=False))


def create(ctx: HandlerContext) -> SupervisorWorker:
    """Entry point: build the supervisor."""
    return SupervisorWorker(ctx)
