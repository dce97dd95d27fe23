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
from dataclasses import replace

import anyio
import nats.js.errors
from anyio.abc import TaskStatus

from schemas import (
    JobState,
    RunnerForgotten,
    RunnerLost,
    RunnerRecord,
    RunnerState,
)
from valkyrie import HandlerContext
from valkyrie.bus import (
    JOB_DECODER,
    RUNNER_DECODER,
    Versioned,
    cas_update,
    get_versioned,
    now_ms,
)
from valkyrie.config import DispatchConfig
from valkyrie.domain.lifecycle import (
    LivenessFacts,
    acceptance_overdue,
    ended_unannounced,
    execution_deadline,
    is_on,
    judge_liveness,
    last_seen,
    mark_lost,
    pass_on_time,
    should_forget,
)
from valkyrie.runtime import HandlerBase, HeardHeartbeats

__all__ = ["SupervisorWorker", "create"]

log = logging.getLogger("valkyrie.supervisor")
MIN_EXECUTION_MS = 1000  # the smallest max_execution_time_s: younger assignments need no check
#: take-backs of lost runners' jobs in flight at once
TAKE_BACK_CONCURRENCY = 32


class SupervisorWorker(HandlerBase):
    """Liveness and execution-time enforcement."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._ear = HeardHeartbeats(ctx.bus)
        self._last_pass = time.monotonic()
        self._first_seen: dict[tuple[str, int], int] = {}
        self._deadline: dict[tuple[str, int], int] = {}
        self._suspect: set[tuple[str, int]] = set()
        self._take_backs = anyio.Semaphore(TAKE_BACK_CONCURRENCY)

    def _cfg(self) -> DispatchConfig:
        return self._ctx.config.current.dispatch

    def _records(self) -> dict[str, RunnerRecord]:
        return {rid: versioned.value for rid, versioned in self._view.records.items()}

    def _last_seen(self, rid: str, record: RunnerRecord) -> int:
        return last_seen(
            record, heard_ms=self._ear.heard.get(rid), listening_since_ms=self._ear.since_ms
        )

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Supervise until ``stop`` is set."""
        self._jobs = await self._bus.kv("jobs")
        self._runners_kv = await self._bus.kv("runners")
        self._view = await self._ctx.views.runners()
        self._ops.runners = self._view
        # Every supervisor hears every heartbeat (no queue group): liveness is judged live.
        async with self._ear.listening(), anyio.create_task_group() as tg:
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

    async def _check(self) -> None:
        now = now_ms()
        if not self._bus.nc.is_connected:
            self._ear.deaf(now)
            return
        now, lost = await self._judge(now)
        if lost:
            # first, and all at once: their jobs wait for it (one by one, runners lost together
            # were handled a take-back round trip apart each, seconds on a busy machine)
            async with anyio.create_task_group() as tg:
                for rid, (versioned, seen) in lost.items():
                    tg.start_soon(self._lose_logged, rid, versioned, seen)
        live: set[tuple[str, int]] = set()
        for rid, versioned in list(self._view.records.items()):
            record = versioned.value
            seen = self._last_seen(rid, record)
            if rid in lost:
                continue
            if record.state == RunnerState.OFFLINE:
                await self._sweep_offline(rid, versioned, seen, now)
            else:
                live.update(await self._watch_deadlines(rid, record, now))
        for key in list(self._first_seen):
            if key not in live:
                self._first_seen.pop(key, None)
                self._deadline.pop(key, None)

    async def _judge(self, now: int) -> tuple[int, dict[str, tuple[Versioned[RunnerRecord], int]]]:
        """The runners lost now (their record and when they were last seen), and when "now" is.

        A judgement that needs the heartbeats in flight first waits for them, so "now" moves.
        """
        facts = LivenessFacts(
            now_ms=now,
            lost_after_ms=self._cfg().runner_lost_after_ms,
            listening_since_ms=self._ear.since_ms,
            heard=self._ear.heard,
            on_time=pass_on_time(
                time.monotonic() - self._last_pass, self._cfg().supervise_interval_ms
            ),
        )
        judgement = judge_liveness(self._records(), facts)
        if judgement.catch_up:
            caught_up = await self._ear.caught_up()
            now = now_ms()
            facts = replace(facts, now_ms=now, caught_up=caught_up)
            judgement = judge_liveness(self._records(), facts)
        lost = {
            rid: (self._view.records[rid], seen)
            for rid, seen in judgement.lost.items()
            if rid in self._view.records
        }
        return now, lost

    async def _sweep_offline(
        self, rid: str, versioned: Versioned[RunnerRecord], seen: int, now: int
    ) -> None:
        """Take back what an offline runner still holds; forget it once retention is over."""
        record = versioned.value
        for job_id, attempt in list(record.assigned_jobs.items()):
            await self._take_back(rid, job_id, attempt, seen)
        retention_ms = self._ctx.config.current.limits.offline_runner_retention_s * 1000
        if should_forget(record, last_seen_ms=seen, now_ms=now, retention_ms=retention_ms):
            await self._forget(rid, versioned)

    async def _watch_deadlines(
        self, rid: str, record: RunnerRecord, now: int
    ) -> set[tuple[str, int]]:
        """Time out the runner's jobs past their deadline; returns the (job, attempt)s it holds."""
        held: set[tuple[str, int]] = set()
        for job_id, attempt in record.assigned_jobs.items():
            key = (job_id, attempt)
            held.add(key)
            first = self._first_seen.setdefault(key, now)
            if now - first < MIN_EXECUTION_MS:
                continue
            deadline = self._deadline.get(key)
            if deadline is None:
                deadline = await self._inspect(rid, key)
            if deadline is not None and now > deadline:
                await self._time_out(rid, job_id, attempt)
        return held

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
        latest, written = await cas_update(
            self._runners_kv,
            rid,
            RUNNER_DECODER,
            lambda record: mark_lost(record, last_seen_ms=seen),
            known=versioned,
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
                ended = ended_unannounced(rec, rid, attempt)
                if ended is not None and ended.outcome is not None:
                    # finish what the process that ended this attempt here did not
                    await self._ops.take_back(
                        job_id,
                        attempt=attempt,
                        runner_id=rid,
                        reason=ended.reason or ended.outcome,
                        outcome=ended.outcome,
                        known=current,
                    )
                else:
                    await self._ops.release(rid, job_id, attempt)
                log.info("freed orphan slot of %s (attempt %d) on %s", job_id, attempt, rid)
            else:
                self._suspect.add(key)
            return None
        self._suspect.discard(key)
        accept_ms = self._cfg().accept_timeout_ms
        if rec.state == JobState.DISPATCHED:
            if acceptance_overdue(rec, now_ms=now_ms(), accept_timeout_ms=accept_ms):
                await self._ops.take_back(
                    job_id,
                    attempt=attempt,
                    runner_id=rid,
                    known=current,
                    reason=f"runner {rid} did not accept within {accept_ms} ms",
                    outcome="not_accepted",
                )
            return None
        deadline = execution_deadline(rec, grace_ms=self._cfg().execution_grace_ms)
        self._deadline[key] = deadline
        return deadline

    async def _time_out(self, rid: str, job_id: str, attempt: int) -> None:
        cfg = self._cfg()
        try:
            await self._ops.time_out(
                rid,
                job_id,
                attempt,
                grace_ms=cfg.execution_grace_ms,
                cancel_grace_s=cfg.cancel_grace_s,
            )
        finally:
            self._deadline.pop((job_id, attempt), None)


def create(ctx: HandlerContext) -> SupervisorWorker:
    """Entry point: build the supervisor."""
    return SupervisorWorker(ctx)
