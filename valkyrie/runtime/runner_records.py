"""The registry's writes to the runners bucket: each record transition as a compare-and-set.

The transitions themselves are pure (:mod:`valkyrie.domain.lifecycle.runners`); this applies them
to the stored record, so several registry processes can run at once, and finishes what a change
implies elsewhere (the jobs an earlier session of a runner held are taken back).
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js.kv import KeyValue

from schemas import (
    JobRecord,
    RegistrationVerdict,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER
from valkyrie.bus.kv import Versioned, cas_update, get_versioned, put_new
from valkyrie.domain.lifecycle import (
    DEREGISTER_RETRY_MS,
    deregistration_refusal,
    holding_refusal,
    new_runner,
    refused,
    reregister,
    set_drain,
    touch,
)
from valkyrie.runtime.jobops import JobOps

__all__ = ["HeartbeatRecorded", "RegisteredRunner", "RunnerRecords"]


@dataclass(frozen=True, slots=True)
class RegisteredRunner:
    """A registration that was stored: the runner's state and the jobs its old session held."""

    state: RunnerState
    #: job id -> attempt, taken back because a new session of the runner registered
    abandon: dict[str, int]


@dataclass(frozen=True, slots=True)
class HeartbeatRecorded:
    """What a heartbeat did to its runner's record."""

    #: the record now (``None``: no such runner)
    latest: Versioned[RunnerRecord] | None
    #: this heartbeat wrote it
    written: bool
    #: the runner was offline and is back
    came_back: bool


class RunnerRecords:
    """Registers, touches, drains and forgets runner records."""

    def __init__(self, runners: KeyValue, jobs: KeyValue, ops: JobOps) -> None:
        self._runners = runners
        self._jobs = jobs
        self._ops = ops

    async def register(self, registration: RunnerRegistration, *, now_ms: int) -> RegisteredRunner:
        """Create the runner's record, or renew it; take back what an earlier session held."""
        rid = registration.runner_id
        abandon: dict[str, int] = {}

        def again(old: RunnerRecord) -> RunnerRecord:
            outcome = reregister(old, registration, now_ms=now_ms)
            abandon.clear()
            abandon.update(outcome.abandon)
            return outcome.record

        state = RunnerState.ACTIVE
        if await put_new(self._runners, rid, new_runner(registration, now_ms=now_ms)) is None:
            latest, _ = await cas_update(self._runners, rid, RUNNER_DECODER, again)
            state = latest.value.state if latest else RunnerState.ACTIVE
            for job_id, attempt in abandon.items():
                await self._ops.take_back(
                    job_id,
                    attempt=attempt,
                    runner_id=rid,
                    reason=f"runner {rid} restarted (new session)",
                    outcome="runner_restarted",
                )
        return RegisteredRunner(state=state, abandon=abandon)

    async def touch(
        self,
        beat: RunnerHeartbeat,
        *,
        now_ms: int,
        known: Versioned[RunnerRecord] | None = None,
    ) -> HeartbeatRecorded:
        """Record a heartbeat (``known``: the view's copy, saving a read)."""
        came_back = False

        def fold(old: RunnerRecord) -> RunnerRecord | None:
            nonlocal came_back
            touched = touch(old, beat, now_ms=now_ms)
            came_back = touched is not None and touched.back_online
            return touched.record if touched is not None else None

        latest, written = await cas_update(
            self._runners, beat.runner_id, RUNNER_DECODER, fold, known=known
        )
        return HeartbeatRecorded(latest=latest, written=written, came_back=came_back)

    async def set_drain(
        self, runner_id: str, draining: bool
    ) -> tuple[Versioned[RunnerRecord] | None, bool]:
        """Drain or undrain: ``(latest, changed)``; latest is ``None`` when there is no such runner."""
        return await cas_update(
            self._runners, runner_id, RUNNER_DECODER, lambda old: set_drain(old, draining)
        )

    async def current(self, runner_id: str) -> Versioned[RunnerRecord] | None:
        """The stored record of ``runner_id`` (``None``: unknown)."""
        return await get_versioned(self._runners, runner_id, RUNNER_DECODER)

    async def deregister(self, runner_id: str, session_id: object) -> RegistrationVerdict:
        """Forget a runner leaving cleanly: only its own session, only with no jobs held."""
        current = await self.current(runner_id)
        refusal = deregistration_refusal(current.value if current else None, runner_id, session_id)
        if refusal is None and current is not None:
            slots = current.value.assigned_jobs
            jobs = {job_id: await self._job(job_id) for job_id in slots}
            refusal = holding_refusal(slots, runner_id, jobs)
        if refusal is not None or current is None:
            return refused(
                refusal.reason if refusal else "unknown",
                path="$.runner_id",
                runner_id=runner_id,
                retry_after_ms=refusal.retry_after_ms if refusal else None,
            )
        try:
            await self._runners.delete(runner_id, last=current.revision)
        except nats.js.errors.APIError as e:
            if e.err_code not in (10071, 10164):  # wrong last sequence: it changed meanwhile
                raise
            return refused(
                "the record changed meanwhile; retry",
                runner_id=runner_id,
                retry_after_ms=DEREGISTER_RETRY_MS,
            )
        return RegistrationVerdict(accepted=True, runner_id=runner_id)

    async def _job(self, job_id: str) -> JobRecord | None:
        current = await get_versioned(self._jobs, job_id, JOB_DECODER)
        return current.value if current is not None else None
