"""The attempts a runner runs: take a dispatch, run it through the handler, report its updates."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import msgspec
from anyio.abc import TaskGroup
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from schemas import Dispatch, JobFinished, JobResult, JobStarted, JobUpdate
from valkyrie.bus.codec import DISPATCH_DECODER, now_ms
from valkyrie.bus.names import Names
from valkyrie.runner._context import JobContext, JobHandler, StopReason
from valkyrie.runner._errors import JobError
from valkyrie.runner._logs import DEFAULT_LOG_MAX_BYTES, LogPublisher
from valkyrie.runner._outcome import Outcome, decide_outcome
from valkyrie.runner._protocol import publish_update

__all__ = ["Attempts", "RunningJob"]

log = logging.getLogger("valkyrie.runner")

JobKey = tuple[str, int]

#: Attempts remembered after they ended, so a repeated dispatch of one is ignored, not re-run.
_REMEMBERED = 4096


@dataclass(eq=False)
class RunningJob:
    """One attempt in progress here."""

    ctx: JobContext
    logs: LogPublisher
    #: its ``JobFinished`` is being published: the control plane frees the slot the moment it
    #: stores it, so the slot counts as free here from then on (a dispatch for it may come first)
    finishing: bool = False

    @property
    def key(self) -> JobKey:
        """``(job_id, attempt)``."""
        return (self.ctx.job_id, self.ctx.attempt)


@dataclass(frozen=True, slots=True)
class Timing:
    """How long the runner waits for what (see :class:`~valkyrie.runner.Runner`'s arguments)."""

    kill_grace_s: float
    stop_timeout_s: float
    publish_retry_s: float
    log_flush_interval_s: float
    log_batch_lines: int


class Attempts:
    """Every attempt a runner has in progress, and how each one runs and is reported.

    ``draining`` says whether new dispatches must be refused; ``changed`` is called whenever the
    set of running jobs or their state changes (the runner then heartbeats at once).
    """

    def __init__(
        self,
        *,
        runner_id: str,
        capacity: int,
        handler: JobHandler,
        js: JetStreamContext,
        names: Names,
        timing: Timing,
        draining: Callable[[], bool],
        changed: Callable[[], None],
    ) -> None:
        self._runner_id = runner_id
        self._capacity = capacity
        self._handler = handler
        self._js = js
        self._names = names
        self._t = timing
        self._draining = draining
        self._changed = changed
        self.jobs: dict[JobKey, RunningJob] = {}
        self._ended: OrderedDict[JobKey, None] = OrderedDict()
        self._jobs_changed = anyio.Event()
        #: where accepted jobs run (set while the runner serves)
        self.group: TaskGroup | None = None

    def busy(self) -> int:
        """Slots in use: attempts running, not those whose result is being reported."""
        return sum(1 for job in self.jobs.values() if not job.finishing)

    async def wait_idle(self) -> None:
        """Wait until no attempt is in progress."""
        while self.jobs:
            await self._jobs_changed.wait()

    # -- stopping ---------------------------------------------------------------------------------
    def stop(self, job: RunningJob, reason: StopReason, grace_s: float, detail: str) -> None:
        """Ask ``job``'s handler to stop (``grace_s`` before it is forced)."""
        if job.ctx._request_stop(reason, grace_s, detail):
            log.info(
                "runner %s: stopping %s attempt %d (%s: %s)",
                self._runner_id,
                job.ctx.job_id,
                job.ctx.attempt,
                reason,
                detail,
            )
            job.logs.write(
                job.ctx.redact(f"[valkyrie] stopping the job ({reason}): {detail}"), "system"
            )
        self._changed()

    def abandon(self, job_ids: list[str], why: str) -> None:
        """Stop every attempt of ``job_ids`` without reporting it (it is no longer ours)."""
        wanted = set(job_ids)
        for (job_id, _attempt), job in list(self.jobs.items()):
            if job_id in wanted:
                self.stop(job, "abandon", self._t.kill_grace_s, why)

    def of(self, job_id: str | None, attempt: int | None) -> list[RunningJob]:
        """The attempts of ``job_id`` running here (only ``attempt`` when given)."""
        return [
            job for (jid, att), job in self.jobs.items() if jid == job_id and attempt in (None, att)
        ]

    # -- dispatches -----------------------------------------------------------------------------
    async def take_dispatches(self, sub: Subscription, tg: TaskGroup) -> None:
        """Take every dispatch sent to this runner."""
        async for msg in sub.messages:
            try:
                dispatch = DISPATCH_DECODER.decode(msg.data)
            except msgspec.DecodeError as e:
                log.warning("runner %s: ignoring unreadable dispatch: %s", self._runner_id, e)
                continue
            self.take(dispatch, tg)

    def take(self, dispatch: Dispatch, tg: TaskGroup) -> None:
        """Run ``dispatch`` here, or refuse it (draining, at capacity); repeats are ignored."""
        key = (dispatch.job_id, dispatch.attempt)
        if dispatch.runner_id != self._runner_id:
            log.warning(
                "runner %s: ignoring dispatch of %s meant for %s",
                self._runner_id,
                dispatch.job_id,
                dispatch.runner_id,
            )
            return
        if key in self.jobs or key in self._ended:
            log.info(
                "runner %s: ignoring repeated dispatch of %s attempt %d", self._runner_id, *key
            )
            return
        refusal = None
        if self._draining():
            refusal = "the runner is draining"
        elif self.busy() >= self._capacity:
            refusal = f"the runner is at capacity ({self.busy()}/{self._capacity} jobs)"
        if refusal is not None:
            log.info("runner %s: rejecting %s attempt %d: %s", self._runner_id, *key, refusal)
            tg.start_soon(self._reject, dispatch, refusal)
            return
        assert self.group is not None
        logs = LogPublisher(
            self._js,
            self._names.logs(self._runner_id, dispatch.job_id),
            job_id=dispatch.job_id,
            attempt=dispatch.attempt,
            runner_id=self._runner_id,
            flush_interval_s=self._t.log_flush_interval_s,
            batch_lines=self._t.log_batch_lines,
            max_bytes=dispatch.log_max_bytes or DEFAULT_LOG_MAX_BYTES,
        )
        job = RunningJob(ctx=JobContext(dispatch, self._runner_id, logs), logs=logs)
        self.jobs[key] = job
        self._changed()
        self.group.start_soon(self._run_job, job)

    async def _reject(self, dispatch: Dispatch, refusal: str) -> None:
        finished = JobFinished(
            job_id=dispatch.job_id,
            attempt=dispatch.attempt,
            runner_id=self._runner_id,
            at_ms=now_ms(),
            outcome="rejected",
            result=JobResult(error=refusal),
        )
        # Its own message id, not <job>.<attempt>.finished: a refused attempt never comes back (the
        # job's next dispatch is a new attempt), but the two kinds of ending stay apart in the
        # stream's duplicate window whatever happens.
        await self._send(finished, f"{dispatch.job_id}.{dispatch.attempt}.rejected")

    async def _send(self, update: JobUpdate, msg_id: str) -> bool:
        return await publish_update(
            self._js,
            self._names.updates(self._runner_id),
            update,
            msg_id,
            retry_s=self._t.publish_retry_s,
        )

    async def _report(self, ctx: JobContext, update: JobUpdate) -> bool:
        if ctx.stop_reason == "abandon":
            return False
        tag = update.__struct_config__.tag
        return await self._send(update, f"{ctx.job_id}.{ctx.attempt}.{tag}")

    # -- one job --------------------------------------------------------------------------------
    async def _run_job(self, job: RunningJob) -> None:
        ctx = job.ctx
        job_id, attempt, rid = ctx.job_id, ctx.attempt, self._runner_id
        try:
            # It starts the job at once, so `started` is also its acceptance: the control plane
            # records both (and emits job.accepted and job.started), one stored update fewer.
            started = JobStarted(job_id=job_id, attempt=attempt, runner_id=rid, at_ms=now_ms())
            if not await self._report(ctx, started):
                return
            async with anyio.create_task_group() as tg:
                tg.start_soon(job.logs.run)
                outcome = await self._execute(ctx)
                await job.logs.close(discard=ctx.stop_reason == "abandon")
                tg.cancel_scope.cancel()  # close() gave up waiting: the result matters more
            if ctx.stop_reason == "abandon":
                log.info("runner %s: abandoned %s attempt %d", rid, *job.key)
                return
            log.info(
                "runner %s: %s attempt %d %s (exit code %s)",
                rid,
                ctx.job_id,
                ctx.attempt,
                outcome.outcome,
                outcome.result.exit_code,
            )
            finished = JobFinished(
                job_id=job_id,
                attempt=attempt,
                runner_id=rid,
                at_ms=now_ms(),
                outcome=outcome.outcome,
                result=ctx.redact_result(outcome.result),
            )
            job.finishing = True
            self._changed()
            await self._report(ctx, finished)
        finally:
            self.jobs.pop(job.key, None)
            self._ended[job.key] = None
            while len(self._ended) > _REMEMBERED:
                self._ended.popitem(last=False)
            self._jobs_changed.set()
            self._jobs_changed = anyio.Event()
            self._changed()

    async def _execute(self, ctx: JobContext) -> Outcome:
        started = anyio.current_time()
        result: JobResult | None = None
        error: str | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watchdog, ctx, tg)
            try:
                returned = await self._handler(ctx)
                if isinstance(returned, JobResult):
                    result = returned
                else:
                    error = f"the job handler returned {type(returned).__name__}, not a JobResult"
            except JobError as e:
                error = e.reason
            except Exception as e:
                log.exception("runner %s: job handler failed on %s", self._runner_id, ctx.job_id)
                error = f"the job handler raised {e!r}"
            tg.cancel_scope.cancel()
        if result is None and error is None:
            limit_s = ctx.grace_period_s + self._t.stop_timeout_s
            error = f"the job handler ignored the stop request for {limit_s:g}s and was cancelled"
        elapsed_ms = int((anyio.current_time() - started) * 1000)
        return decide_outcome(ctx, result, error, elapsed_ms)

    async def _watchdog(self, ctx: JobContext, tg: TaskGroup) -> None:
        with anyio.move_on_after(ctx.timeout_s):
            await ctx.stop_requested.wait()
        job = self.jobs.get((ctx.job_id, ctx.attempt))
        if not ctx.stop_requested.is_set() and job is not None:
            limit = ctx.dispatch.spec.requirements.max_execution_time_s
            self.stop(
                job, "timeout", self._t.kill_grace_s, f"exceeded max_execution_time_s={limit}"
            )
        await anyio.sleep(ctx.grace_period_s + self._t.stop_timeout_s)
        log.warning(
            "runner %s: handler of %s ignored the stop request (%s); cancelling it",
            self._runner_id,
            ctx.job_id,
            ctx.stop_reason,
        )
        tg.cancel_scope.cancel()
