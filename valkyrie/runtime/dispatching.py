"""The writes of one dispatch, in their crash-safe order: slot, job record, dispatch, events.

A decision is two compare-and-sets, runner slot first, then job record, so a job is dispatched
once and a runner never exceeds its capacity however many dispatchers run. A crash between them
leaves an orphan slot that the supervisor frees (docs/architecture.md). Only after both are
stored is the runner told (core NATS) and the decision announced (``job.dispatched``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import (
    Dispatch,
    JobDispatched,
    JobRecord,
    JobSloBreach,
    JobState,
    JobTargetAtRisk,
    RunnerRecord,
    typed_event,
)
from valkyrie.bus.codec import EVENT_DECODER, JOB_DECODER, RUNNER_DECODER, encode
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher
from valkyrie.bus.kv import Versioned, cas_update, get_versioned, kv_create, kv_write
from valkyrie.bus.outbox import Outbox
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.lifecycle import assign_slot, dispatch_job, finish_job
from valkyrie.domain.scheduling.priority import tenant_of
from valkyrie.domain.scheduling.queue import (
    Commit,
    HeldJob,
    dispatch_decision,
    predicted_finish_at_ms,
    target_at_risk,
)
from valkyrie.runtime.jobops import JobOps
from valkyrie.runtime.views import RunnerView

__all__ = ["Dispatched", "Dispatching"]

log = logging.getLogger("valkyrie.dispatcher")

#: compare-and-set retries of the job record against concurrent writers before giving up the slot
RECORD_TRIES = 10


@dataclass(frozen=True, slots=True)
class Dispatched:
    """A dispatch that was stored, sent and announced."""

    record: JobRecord
    tenant: str


class Dispatching:
    """Claims slots and records dispatches for one dispatcher process."""

    def __init__(
        self,
        bus: Bus,
        events: EventPublisher,
        ops: JobOps,
        view: RunnerView,
        jobs: KeyValue,
        runners: KeyValue,
    ) -> None:
        self._bus = bus
        self._events = events
        self._ops = ops
        self._view = view
        self._jobs = jobs
        self._runners = runners
        self._locks: dict[str, anyio.Lock] = {}
        #: dispatched, not yet accepted: job id -> (runner, attempt, accept-by instant)
        self._awaiting: dict[str, tuple[str, int, int]] = {}

    async def dispatch(
        self,
        commit: Commit,
        *,
        fresh: bool,
        config: ValkyrieConfig,
        avg_duration_ms: float | None,
        now_ms: Callable[[], int],
    ) -> Dispatched | bool:
        """Carry out ``commit``: slot, job record, dispatch message, events, in that order.

        Returns the :class:`Dispatched` outcome; ``False`` when the runner filled up or went away
        meanwhile (place the job again); ``True`` when the job moved on (someone else dispatched,
        cancelled or expired it): stop holding it. ``fresh``: the record is not stored yet
        (intake's hand-over): it is created dispatched and its ``job.queued`` announced first.
        """
        job, rid = commit.job, commit.runner_id
        assert job.record is not None
        queued = job.record
        queued_at = job.queued_at_ms()
        attempt = job.attempt + 1
        secret_env: dict[str, str] = {}
        if queued.spec.secret_env:  # only jobs with secrets pay for reading them
            found = await self._ops.secrets.read(job.job_id)
            if found is None:
                # intake stores them before the record: gone means expired (or the job ended)
                return False if fresh else await self.secrets_gone(job, now_ms=now_ms())
            secret_env = found
        runner, claimed = await self.claim_slot(rid, job.job_id, attempt)
        if runner is None:
            return False
        now = now_ms()
        # Only a slot this call took goes back: one that was already there may be the slot of
        # whoever did dispatch this attempt here (or ours from before a crash, which the
        # supervisor frees if nobody holds it).
        try:
            dispatched = await self.record(job, rid, now_ms=now, fresh=fresh)
        except Exception:
            if claimed:  # say, the jobs bucket is full: the slot must not wait for the supervisor
                await self._ops.release(rid, job.job_id, attempt)
            raise
        if dispatched is None:
            if claimed:
                await self._ops.release(rid, job.job_id, attempt)
            return True
        accept_by = now + config.dispatch.accept_timeout_ms
        self._awaiting[job.job_id] = (rid, attempt, accept_by)
        await self.send(
            dispatched,
            now_ms=now,
            accept_by_at_ms=accept_by,
            secret_env=secret_env,
            log_max_bytes=config.limits.job_log_max_bytes,
        )
        tenant = tenant_of(dispatched.spec, config.scheduling.tenant_key)
        decision = dispatch_decision(
            job,
            commit.placement,
            runner,
            queued_ms=now - queued_at,
            tenant=tenant,
            mode=config.mode.value,
            predicted_finish_at_ms=predicted_finish_at_ms(now, avg_duration_ms),
        )
        await self.announce(decision, dispatched, queued=queued if fresh else None, now_ms=now)
        return Dispatched(dispatched, tenant)

    def answered(self, job_id: str) -> None:
        """The runner answered ``job_id``'s dispatch (or the job left it): no acceptance timer."""
        self._awaiting.pop(job_id, None)

    async def take_back_late(self, *, now_ms: int, accept_timeout_ms: int) -> None:
        """Take back every dispatch made here that its runner did not accept in time."""
        for job_id, (rid, attempt, accept_by) in list(self._awaiting.items()):
            if accept_by > now_ms:
                continue
            self._awaiting.pop(job_id, None)
            try:
                await self.take_back_unaccepted(
                    job_id, runner_id=rid, attempt=attempt, accept_timeout_ms=accept_timeout_ms
                )
            except Exception:
                log.exception("taking back unaccepted %s failed", job_id)

    async def claim_slot(
        self, runner_id: str, job_id: str, attempt: int
    ) -> tuple[RunnerRecord | None, bool]:
        """Take a slot on ``runner_id`` for ``job_id`` at ``attempt``.

        Returns the runner record holding that slot (``None`` when the runner filled up or went
        away) and whether this call took it (``False``: it was held already, e.g. before a crash).
        """
        # one claim per runner at a time in this process: concurrent claims would only make each
        # other's compare-and-set fail
        lock = self._locks.setdefault(runner_id, anyio.Lock())
        async with lock:
            latest, claimed = await cas_update(
                self._runners,
                runner_id,
                RUNNER_DECODER,
                lambda r: (
                    None
                    if r.assigned_jobs.get(job_id) == attempt
                    else assign_slot(r, job_id, attempt)
                ),
                known=self._view.records.get(runner_id),
            )
            if latest is not None:
                self._view.offer(runner_id, latest)
        if latest is None or latest.value.assigned_jobs.get(job_id) != attempt:
            return None, False
        return latest.value, claimed

    async def record(
        self, job: HeldJob, runner_id: str, *, now_ms: int, fresh: bool
    ) -> JobRecord | None:
        """Move the job record to dispatched on ``runner_id`` (attempt + 1); ``None`` if it moved on.

        ``fresh``: the record is not stored yet (intake's hand-over): it is created dispatched.
        ``job.record``/``job.revision`` follow what was read and written (``None`` when a fresh
        record turned out to exist already).
        """
        for _ in range(RECORD_TRIES):
            if job.record is None or not job.is_current():
                return None
            new = dispatch_job(job.record, runner_id, now_ms=now_ms)
            try:
                if fresh:
                    written = await kv_create(self._jobs, job.job_id, encode(new))
                else:
                    written = await kv_write(
                        self._jobs, job.job_id, encode(new), last=job.revision or 0, ttl=None
                    )
            except nats.js.errors.KeyWrongLastSequenceError:
                if fresh:
                    job.record = job.revision = None
                    return None
                latest = await get_versioned(self._jobs, job.job_id, JOB_DECODER)
                job.record, job.revision = (
                    (latest.value, latest.revision) if latest else (None, None)
                )
                continue
            job.record, job.revision = new, int(written)
            return new
        return None

    async def send(
        self,
        record: JobRecord,
        *,
        now_ms: int,
        accept_by_at_ms: int,
        secret_env: dict[str, str],
        log_max_bytes: int,
    ) -> None:
        """Tell the runner (core NATS: the acceptance timer covers a lost message).

        ``secret_env`` (the job's secret values) goes to this runner only: its dispatch subject
        is the one subject they travel on.
        """
        assert record.runner_id is not None
        message = Dispatch(
            job_id=record.id,
            attempt=record.attempt,
            runner_id=record.runner_id,
            spec=record.spec,
            dispatched_at_ms=now_ms,
            accept_by_at_ms=accept_by_at_ms,
            secret_env=secret_env,
            log_max_bytes=log_max_bytes,
        )
        await self._bus.nc.publish(self._bus.names.dispatch(record.runner_id), encode(message))

    async def take_back_unaccepted(
        self, job_id: str, *, runner_id: str, attempt: int, accept_timeout_ms: int
    ) -> None:
        """Take back a dispatch its runner did not accept in time (if it is still unaccepted)."""
        current = await get_versioned(self._jobs, job_id, JOB_DECODER)
        if current is None:
            return
        rec = current.value
        if (
            rec.state == JobState.DISPATCHED
            and rec.attempt == attempt
            and rec.runner_id == runner_id
        ):
            await self._ops.take_back(
                job_id,
                attempt=attempt,
                runner_id=runner_id,
                known=current,
                reason=f"runner {runner_id} did not accept within {accept_timeout_ms} ms",
                outcome="not_accepted",
            )

    async def announce(
        self, decision: JobDispatched, record: JobRecord, *, queued: JobRecord | None, now_ms: int
    ) -> None:
        """Store the decision's events, confirmed together.

        ``job.queued`` first for a job placed as it was queued (``queued``), then
        ``job.dispatched``, then ``job.target_at_risk`` if it is predicted to finish late.
        """
        outbox = Outbox(self._bus)
        if queued is not None:
            await self._ops.announce_queued(
                queued,
                at_ms=queued.submitted_at_ms,
                placed_attempt=decision.attempt,
                outbox=outbox,
            )
        await self._events.emit(decision, at_ms=now_ms, outbox=outbox)
        finish = decision.predicted_finish_at_ms
        targets = record.spec.performance_targets
        if (
            finish is not None
            and targets is not None
            and targets.target_completion_time_s is not None
            and target_at_risk(record, finish)
        ):
            await self._events.emit(
                JobTargetAtRisk(
                    subject_id=record.id,
                    attempt=decision.attempt,
                    target_completion_time_s=targets.target_completion_time_s,
                    predicted_finish_at_ms=finish,
                ),
                outbox=outbox,
            )
        await outbox.confirm()

    async def breach(self, job: HeldJob, waited_ms: int) -> None:
        """Record that ``job`` waited past its ``max_dispatch_latency_ms`` (it is boosted now)."""
        assert job.record is not None
        targets = job.record.spec.performance_targets
        assert targets is not None
        try:
            await self._events.emit(
                JobSloBreach(
                    subject_id=job.job_id,
                    attempt=job.attempt,
                    target="max_dispatch_latency_ms",
                    limit_ms=targets.max_dispatch_latency_ms,
                    waited_ms=waited_ms,
                    action="boosted ahead of unboosted jobs",
                )
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            log.warning("could not record SLO breach of %s: %r", job.job_id, e)

    async def expire(self, job: HeldJob, *, now_ms: int) -> JobRecord | None:
        """End ``job`` ``expired`` (its deadline passed while queued); the record if this did it."""
        assert job.record is not None
        reason = f"deadline {job.record.spec.deadline_at_ms} passed before the job could start"
        return await self._end_queued(job, JobState.EXPIRED, reason, now_ms=now_ms)

    async def secrets_gone(self, job: HeldJob, *, now_ms: int) -> bool:
        """End ``job`` ``failed``: its secret values are no longer stored. ``True`` (it moved on)."""
        reason = (
            "its secret values are no longer stored (kept at most limits.job_retention_s after "
            "submission): submit it again"
        )
        await self._end_queued(job, JobState.FAILED, reason, now_ms=now_ms)
        return True

    async def _end_queued(
        self, job: HeldJob, state: JobState, reason: str, *, now_ms: int
    ) -> JobRecord | None:
        """End the queued ``job`` in ``state``; its record if this call ended it."""
        assert job.record is not None

        def decide(record: JobRecord) -> JobRecord | None:
            if record.state != JobState.QUEUED or record.attempt != job.attempt:
                return None
            return finish_job(record, state, now_ms=now_ms, reason=reason)

        latest, _ = await cas_update(
            self._jobs,
            job.job_id,
            JOB_DECODER,
            decide,
            known=Versioned(job.record, job.revision or 0),
            ttl_for=self._ops.job_ttl(),
        )
        if latest is None or latest.value.state != state:
            return None
        await self._ops.announce_outcome(latest.value, from_runner=None)
        return latest.value

    async def decision_of(self, job_id: str) -> JobDispatched | None:
        """The latest ``job.dispatched`` event of ``job_id`` (what ``explain`` shows)."""
        try:
            raw = await self._bus.js.get_last_msg(
                self._bus.names.stream("events"),
                self._bus.names.event("job", job_id, "dispatched"),
            )
            event = typed_event(EVENT_DECODER.decode(raw.data or b""))
        except (nats.js.errors.NotFoundError, msgspec.DecodeError):
            return None
        return event if isinstance(event, JobDispatched) else None

    async def read(self, job_id: str) -> Versioned[JobRecord] | None:
        """The job record and its revision."""
        return await get_versioned(self._jobs, job_id, JOB_DECODER)

    async def read_patiently(self, job_id: str) -> Versioned[JobRecord] | None:
        """The job record and its revision, read again every half second until a read succeeds."""
        while True:
            try:
                return await self.read(job_id)
            except (nats.errors.Error, nats.js.errors.Error) as e:
                log.warning("could not read job %s (%r); will retry", job_id, e)
                await anyio.sleep(0.5)
