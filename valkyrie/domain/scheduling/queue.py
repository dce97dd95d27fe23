"""The dispatcher's queue as pure logic: what it holds, in which order, and what to do next.

A dispatcher holds every queued job it was given until a runner can take it. Each placement round
(:meth:`DispatchQueue.plan`) walks the held jobs in queue order and says, per job, what the I/O
layer must do: ``Expire`` it (its deadline passed), record an SLO ``Breach`` (it waited longer
than ``max_dispatch_latency_ms``: it is boosted ahead of unboosted jobs), or ``Commit`` it to a
runner (the slot is reserved in the runner index until the commit settles). Nothing here reads a
clock or does I/O: the caller passes ``now_ms`` and a :class:`~.index.RunnerIndex`.

Queue order (docs/scheduling.md): effective priority (aging, SLA class, boost), then the tenant's
fair-share usage, then submission time, then arrival here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from schemas import JobDispatched, JobRecord, JobState, JobSubmission, RunnerRecord, RunnerUp
from valkyrie.config.model import IntegrationMode, ValkyrieConfig
from valkyrie.domain.explain import QueueFacts
from valkyrie.domain.modes import uses_advanced_placement
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.placement import Placement, ScoreWeights, place
from valkyrie.domain.scheduling.priority import FairShare, effective_priority, tenant_of

__all__ = [
    "FULL_SCAN_EVERY_MS",
    "Action",
    "Breach",
    "Commit",
    "DispatchQueue",
    "DurationEstimates",
    "Expire",
    "HeldJob",
    "Offer",
    "dispatch_decision",
    "predicted_finish_at_ms",
    "score_weights",
    "target_at_risk",
]

#: a job whose candidate sample found no runner looks at every free runner at most this often
FULL_SCAN_EVERY_MS = 1000


@dataclass
class HeldJob:
    """A queued job a dispatcher holds (its ``job.queued`` message unacked, or intake's hand-over).

    ``record`` is ``None`` until its job record is known (read, or carried by the event).
    ``committing``: an expiry or a commit for it is under way; it is skipped meanwhile.
    """

    job_id: str
    attempt: int
    order: int
    record: JobRecord | None = None
    revision: int | None = None
    committing: bool = False
    boosted: bool = False
    last: Placement | None = field(default=None, repr=False)
    effective: int = 2
    full_scan_at_ms: int = 0

    def queued_at_ms(self) -> int:
        """When this attempt started waiting."""
        assert self.record is not None
        rec = self.record
        return rec.submitted_at_ms if rec.attempt == 0 else rec.updated_at_ms

    def is_current(self) -> bool:
        """Whether the known record is still queued at the attempt this job was held for."""
        record = self.record
        return (
            record is not None
            and record.state == JobState.QUEUED
            and record.attempt == self.attempt
        )

    def was_dispatched(self) -> bool:
        """Whether the known record is this job dispatched as the next attempt."""
        record = self.record
        return (
            record is not None
            and record.state != JobState.QUEUED
            and record.attempt == self.attempt + 1
        )


class Offer(Enum):
    """What :meth:`DispatchQueue.offer` decided about a queued job delivered to this dispatcher."""

    HELD = "held"  # new here (or a newer attempt than the one held): hold it
    STALE = "stale"  # an older or equal attempt, or one being committed: settle the message


@dataclass(frozen=True, slots=True)
class Expire:
    """The job's deadline passed before it could start: end it ``expired``."""

    job: HeldJob


@dataclass(frozen=True, slots=True)
class Breach:
    """The job waited longer than its ``max_dispatch_latency_ms``: it is boosted from now on."""

    job: HeldJob
    waited_ms: int


@dataclass(frozen=True, slots=True)
class Commit:
    """Dispatch the job to ``runner_id`` (its slot is reserved in the index until settled)."""

    job: HeldJob
    runner_id: str
    placement: Placement


Action = Expire | Breach | Commit


class DurationEstimates:
    """A moving average of how long succeeded jobs of each type took (for predictions)."""

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self._avg: dict[str, float] = {}

    def observe(self, job_type: str, duration_ms: float) -> None:
        """Fold one succeeded job's duration in."""
        old = self._avg.get(job_type)
        self._avg[job_type] = (
            duration_ms if old is None else (1 - self._weight) * old + self._weight * duration_ms
        )

    def get(self, job_type: str) -> float | None:
        """The average duration of ``job_type`` in ms, if one finished here yet."""
        return self._avg.get(job_type)


def score_weights(config: ValkyrieConfig) -> ScoreWeights:
    """The placement score weights of ``config``."""
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


class DispatchQueue:
    """The queued jobs one dispatcher holds, their order, and the placement rounds over them."""

    def __init__(self) -> None:
        self.jobs: dict[str, HeldJob] = {}
        self.fair = FairShare()
        self.durations = DurationEstimates()
        self._order = 0
        # jobs this process's intake queued the usual way whose queued event has not arrived
        # yet (job id -> instant to stop waiting, on the caller's monotonic clock): a new job
        # placed at once would pass them
        self._declined: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.jobs)

    def get(self, job_id: str) -> HeldJob | None:
        """The held job ``job_id``, if held here."""
        return self.jobs.get(job_id)

    def _next(self, job_id: str, attempt: int, **kw: Any) -> HeldJob:
        self._order += 1
        return HeldJob(job_id=job_id, attempt=attempt, order=self._order, **kw)

    # -- holding ---------------------------------------------------------------------------------
    def offer(self, job_id: str, attempt: int) -> tuple[Offer, HeldJob | None]:
        """A ``job.queued`` for ``job_id`` at ``attempt`` arrived: hold it, or say it is stale.

        Returns ``(HELD, replaced)`` where ``replaced`` is an older attempt of the job that was
        held (its message must be settled), or ``(STALE, None)``.
        """
        self.arrived(job_id)
        old = self.jobs.get(job_id)
        if old is not None and (old.committing or old.attempt >= attempt):
            return Offer.STALE, None
        self.jobs[job_id] = self._next(job_id, attempt)
        return Offer.HELD, old

    def known(self, job: HeldJob, record: JobRecord | None, revision: int | None) -> bool:
        """Record what the job's record is; ``False`` (and dropped) when it is no longer queued."""
        job.record, job.revision = record, revision
        if not job.is_current():
            self.drop(job)
            return False
        return True

    def drop(self, job: HeldJob) -> bool:
        """Stop holding ``job`` (``True`` when it was the one held under its id)."""
        if self.jobs.get(job.job_id) is job:
            del self.jobs[job.job_id]
            return True
        return False

    def waiting(self) -> bool:
        """Whether any held job waits (not being committed)."""
        return any(not j.committing for j in self.jobs.values())

    # -- order -----------------------------------------------------------------------------------
    def ordered(self, now_ms: int, config: ValkyrieConfig) -> list[HeldJob]:
        """The held jobs that can be tried now, first to be served first."""
        s, features = config.scheduling, config.features
        self.fair.half_life_s = s.fair_share_half_life_s
        self.fair.weights = s.tenant_weights
        now_s = now_ms / 1000
        ready = []
        for job in self.jobs.values():
            if job.record is None or job.committing:
                continue
            job.effective = _effective(
                job.record.spec,
                config,
                waited_ms=now_ms - job.queued_at_ms(),
                boosted=job.boosted,
            )
            ready.append(job)

        def key(job: HeldJob) -> tuple[int, float, int, int]:
            assert job.record is not None
            share = (
                self.fair.share_key(tenant_of(job.record.spec, s.tenant_key), now_s)
                if features.fair_share
                else 0.0
            )
            # submission order, not arrival of this attempt's event: a job taken back from a lost
            # runner keeps its place in line instead of waiting behind the whole backlog again
            return (job.effective, share, job.record.submitted_at_ms, job.order)

        ready.sort(key=key)
        return ready

    def position(self, job_id: str, now_ms: int, config: ValkyrieConfig) -> tuple[int | None, int]:
        """``job_id``'s place in line (0 first; ``None`` if not waiting here) and the line's length."""
        ordered = self.ordered(now_ms, config)
        index = next((i for i, j in enumerate(ordered) if j.job_id == job_id), None)
        return index, len(ordered)

    def facts(self, record: JobRecord, *, now_ms: int, config: ValkyrieConfig) -> QueueFacts:
        """What this queue knows of queued ``record`` for ``explain``."""
        position, length = self.position(record.id, now_ms, config)
        job = self.jobs.get(record.id)
        return QueueFacts(
            mode=config.mode.value,
            advanced=uses_advanced_placement(record.spec, config.mode),
            effective_priority=job.effective if job else None,
            position=position,
            length=length,
            boosted=bool(job and job.boosted),
            waiting_for_preferred=bool(job and job.last and job.last.waiting_for_preferred),
            avg_duration_ms=self.durations.get(record.spec.job_type),
        )

    # -- placement -------------------------------------------------------------------------------
    def plan(self, now_ms: int, config: ValkyrieConfig, index: RunnerIndex) -> list[Action]:
        """One placement round over the first ``dispatch.max_queue_scan`` jobs in line.

        Marks expiring and committing jobs ``committing``, breached ones ``boosted``, and
        reserves each committed job's slot in ``index``; the caller carries the actions out and
        calls :meth:`settled` for each commit or expiry that did not end the job's stay here.
        """
        mode = config.mode
        weights = score_weights(config)
        sample = config.scheduling.candidate_sample
        actions: list[Action] = []
        for job in self.ordered(now_ms, config)[: config.dispatch.max_queue_scan]:
            assert job.record is not None
            record = job.record
            spec = record.spec
            if spec.deadline_at_ms is not None and spec.deadline_at_ms <= now_ms:
                job.committing = True
                actions.append(Expire(job))
                continue
            waited = now_ms - job.queued_at_ms()
            targets = spec.performance_targets
            if (
                targets is not None
                and targets.max_dispatch_latency_ms is not None
                and not job.boosted
                and waited > targets.max_dispatch_latency_ms
            ):
                job.boosted = True
                actions.append(Breach(job, waited))
            if record.not_before_at_ms is not None and record.not_before_at_ms > now_ms:
                continue
            if mode == IntegrationMode.DISABLED:
                continue  # still evaluate deadlines and SLOs of the rest
            if not index.has_free(spec.job_type) and not (
                spec.routing_hints and spec.routing_hints.preferred_runners
            ):
                continue
            advanced = uses_advanced_placement(spec, mode)
            placement = place(
                spec,
                index.candidates(spec, sample),
                now_ms=now_ms,
                weights=weights,
                advanced=advanced,
                queued_for_ms=waited,
            )
            if (
                placement.runner_id is None
                and not placement.waiting_for_preferred
                and index.free_count(spec.job_type) > sample
                and now_ms - job.full_scan_at_ms >= FULL_SCAN_EVERY_MS
            ):
                # The sample missed: few free runners may match (rare labels or resources).
                # Look at every free one of the job type, at most once a second per job.
                job.full_scan_at_ms = now_ms
                placement = place(
                    spec,
                    index.free_views(spec.job_type),
                    now_ms=now_ms,
                    weights=weights,
                    advanced=advanced,
                    queued_for_ms=waited,
                )
            job.last = placement
            if placement.runner_id is None:
                continue
            index.reserve(placement.runner_id, job.job_id)
            job.committing = True
            actions.append(Commit(job, placement.runner_id, placement))
        return actions

    def settled(self, job: HeldJob, *, index: RunnerIndex, runner_id: str | None) -> None:
        """A commit or expiry of ``job`` is over and the job is still held: try it again later."""
        if runner_id is not None:
            index.unreserve(runner_id, job.job_id)
        job.committing = False

    # -- direct placement ------------------------------------------------------------------------
    def decline(self, job_id: str, until: float) -> None:
        """Intake queued ``job_id`` the usual way: new jobs wait for it until ``until``."""
        self._declined[job_id] = until

    def arrived(self, job_id: str) -> None:
        """``job_id``'s queued event arrived here: new jobs no longer wait for it."""
        self._declined.pop(job_id, None)

    def is_declined(self, job_id: str) -> bool:
        """Whether new jobs wait for ``job_id``'s queued event."""
        return job_id in self._declined

    def place_new(
        self,
        record: JobRecord,
        *,
        now_ms: int,
        monotonic_s: float,
        config: ValkyrieConfig,
        index: RunnerIndex,
    ) -> Commit | None:
        """Place a just-accepted job at once, unless that could put it ahead of another job.

        Returns the commit to carry out (the job is held ``committing`` and its slot reserved), or
        ``None``: jobs wait here or are on their way, nothing is free, a delayed start, placement
        paused. ``record`` is not stored yet.
        """
        if record.attempt != 0:
            return None
        for job_id, until in list(self._declined.items()):
            if until <= monotonic_s:
                del self._declined[job_id]
        if self._declined or self.waiting():
            return None  # an earlier job waits here or is on its way: the new one goes behind
        spec = record.spec
        if (
            config.mode == IntegrationMode.DISABLED
            or record.state != JobState.QUEUED
            or (record.not_before_at_ms is not None and record.not_before_at_ms > now_ms)
            or (spec.deadline_at_ms is not None and spec.deadline_at_ms <= now_ms)
            or not index.has_free(spec.job_type)
        ):
            return None
        placement = place(
            spec,
            index.candidates(spec, config.scheduling.candidate_sample),
            now_ms=now_ms,
            weights=score_weights(config),
            advanced=uses_advanced_placement(spec, config.mode),
            queued_for_ms=0,
        )
        rid = placement.runner_id
        if rid is None:
            return None
        job = self._next(
            record.id,
            0,
            record=record,
            revision=0,  # not stored yet: the commit creates it
            committing=True,
            last=placement,
            effective=_effective(spec, config, waited_ms=0, boosted=False),
        )
        index.reserve(rid, record.id)
        return Commit(job, rid, placement)

    # -- after a dispatch ------------------------------------------------------------------------
    def dispatched(self, job: HeldJob, *, tenant: str, now_ms: int) -> None:
        """``job`` was dispatched: it leaves the queue and its tenant is charged."""
        self.fair.charge(tenant, now_ms / 1000)
        self.jobs.pop(job.job_id, None)


def dispatch_decision(
    job: HeldJob,
    placement: Placement,
    runner: RunnerRecord,
    *,
    queued_ms: int,
    tenant: str,
    mode: str,
    predicted_finish_at_ms: int | None,
) -> JobDispatched:
    """The ``job.dispatched`` event recording the decision (``valkyrie jobs explain`` shows it)."""
    assert job.record is not None
    spec = job.record.spec
    hints = spec.routing_hints
    rid = runner.registration.runner_id
    return JobDispatched(
        subject_id=job.job_id,
        attempt=job.attempt + 1,
        correlation_id=spec.correlation_id,
        runner_id=rid,
        score=round(placement.ranked[0].score, 4) if placement.ranked else None,
        runners_up=[
            RunnerUp(runner_id=s.runner_id, score=round(s.score, 4)) for s in placement.ranked[1:4]
        ],
        candidates=len(placement.ranked) + sum(len(v) for v in placement.rejected.values()),
        rejected=dict(placement.reasons()),
        slots_used=len(runner.assigned_jobs),
        capacity=runner.registration.max_concurrent_jobs,
        queued_ms=queued_ms,
        effective_priority=job.effective,
        boosted=job.boosted,
        tenant=tenant,
        mode=mode,
        preferred=hints is not None and rid in hints.preferred_runners,
        predicted_finish_at_ms=predicted_finish_at_ms,
    )


def predicted_finish_at_ms(now_ms: int, avg_duration_ms: float | None) -> int | None:
    """When a job dispatched now should finish, from its type's average duration."""
    return None if avg_duration_ms is None else now_ms + int(avg_duration_ms)


def target_at_risk(record: JobRecord, predicted_finish: int | None) -> bool:
    """Whether a job dispatched now is predicted to miss its ``target_completion_time_s``."""
    targets = record.spec.performance_targets
    return (
        targets is not None
        and targets.target_completion_time_s is not None
        and predicted_finish is not None
        and predicted_finish > record.submitted_at_ms + targets.target_completion_time_s * 1000
    )
