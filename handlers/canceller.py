"""Canceller: cancel requests from ``<prefix>.jobs.cancel[.<identity>]``.

Who asked is the identity the subject carries (a body's ``requested_by`` may only refine it);
a submitter may cancel only the jobs it submitted.

A queued job is cancelled at once. A job on a runner gets ``cancel_requested`` and its runner a
cancel command (SIGTERM, grace period, SIGKILL on the reference runner); the runner's ``cancelled``
result ends it. The request is then delivered again after the grace period, a durable timer: if the
job is still not finished (its runner is gone or ignored the command) it is ended cancelled here.
"""

from __future__ import annotations

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    TERMINAL_STATES,
    CancelJob,
    JobCancelRequested,
    JobRecord,
    JobState,
    RunnerCommand,
    convert_or_errors,
)
from valkyrie import (
    GiveUp,
    HandlerContext,
    RetryLater,
    delivery_count,
)
from valkyrie.bus import ANY_DECODER, JOB_DECODER, cas_update, encode, now_ms
from valkyrie.domain.identity import SUBMITTER_PREFIX, requester, speaks_for
from valkyrie.domain.lifecycle import finish_job
from valkyrie.runtime import HandlerBase

__all__ = ["CancellerWorker", "create"]

FORCE_AFTER_S = 5.0  # beyond the runner's grace period


class CancellerWorker(HandlerBase):
    """Consumes cancel requests through the durable consumer ``canceller``."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume cancel requests until ``stop`` is set."""
        self._jobs = await self._bus.kv("jobs")
        await self.consume(
            stop,
            stream="commands",
            filter_subject=self._bus.names.cancels(),
            handle=self.handle,
            concurrency=16,
            task_status=task_status,
        )

    async def handle(self, msg: Msg) -> None:
        """Process one cancel request (first delivery: request; a later one: enforce)."""
        request = _decode(msg)
        now = now_ms()
        first = delivery_count(msg) == 1
        grace = self._ctx.config.current.dispatch.cancel_grace_s
        identity = self._bus.names.sender(msg.subject, self._bus.names.cancel)
        who = requester(identity, request.requested_by)
        reason = request.reason + (f" (by {who})" if who else "")
        refusal: list[str] = []

        def decide(record: JobRecord) -> JobRecord | None:
            refusal.clear()
            if (
                identity is not None
                and identity.startswith(SUBMITTER_PREFIX)
                and not speaks_for(identity, record.submitted_by)
            ):
                refusal.append(f"{identity} may cancel only the jobs it submitted")
                return None
            return _decide(record, first=first, now=now, reason=reason)

        latest, _written = await cas_update(
            self._jobs,
            request.job_id,
            JOB_DECODER,
            decide,
            ttl_for=self._ops.job_ttl(),
        )
        if latest is None:
            raise GiveUp(f"no job {request.job_id!r}")
        if refusal:
            raise GiveUp(refusal[0])
        record = latest.value
        if record.state == JobState.CANCELLED:
            if record.runner_id is not None:
                await self._ops.release(record.runner_id, record.id, record.attempt)
            await self._ops.announce_outcome(record, from_runner=record.runner_id)
            return
        if record.state in TERMINAL_STATES:
            return
        await self._ask_to_cancel(record, reason, grace)
        raise RetryLater(
            "waiting for the runner to confirm the cancel", delay_s=grace + FORCE_AFTER_S
        )

    async def _ask_to_cancel(self, record: JobRecord, reason: str, grace: float) -> None:
        """Send the job's runner (if it has one) the cancel command; record that it was asked."""
        if record.runner_id is not None:
            await self._bus.nc.publish(
                self._bus.names.control(record.runner_id),
                encode(
                    RunnerCommand(
                        command="cancel",
                        job_id=record.id,
                        attempt=record.attempt,
                        reason=reason,
                        grace_period_s=grace,
                    )
                ),
            )
        await self._events.emit(
            JobCancelRequested(
                subject_id=record.id,
                attempt=record.attempt,
                reason=reason,
                runner_id=record.runner_id,
            )
        )


def _decode(msg: Msg) -> CancelJob:
    try:
        raw = ANY_DECODER.decode(msg.data)
    except msgspec.DecodeError as e:
        raise GiveUp(f"invalid JSON: {e}") from e
    request, errors = convert_or_errors(CancelJob, raw)
    if request is None:
        raise GiveUp("invalid cancel request", errors=errors)
    return request


def _decide(record: JobRecord, *, first: bool, now: int, reason: str) -> JobRecord | None:
    """The job after a cancel request (``first`` delivery) or its enforcement (a later one)."""
    if record.state in TERMINAL_STATES:
        return None
    if record.state == JobState.QUEUED:
        return finish_job(record, JobState.CANCELLED, now_ms=now, reason=reason)
    if first and not record.cancel_requested:
        # the reason is kept: the job ends with it whoever confirms the cancel
        return msgspec.structs.replace(
            record, cancel_requested=True, reason=reason, updated_at_ms=now
        )
    if first:
        return None
    # the runner had its chance: end it here
    return finish_job(
        record, JobState.CANCELLED, now_ms=now, reason=f"{reason}; runner did not confirm"
    )


def create(ctx: HandlerContext) -> CancellerWorker:
    """Entry point: build the canceller."""
    return CancellerWorker(ctx)
