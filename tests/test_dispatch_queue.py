"""The dispatcher's queue as pure logic (no server): holding, order, placement rounds.

Queue order is checked against an oracle written here from docs/scheduling.md; hard constraints
against the placement oracle of tests/_placement_strategies.py.
"""

from __future__ import annotations

from collections import Counter

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from schemas import (
    JobRecord,
    JobState,
    JobSubmission,
    PerformanceTargets,
    QosRequirements,
    RunnerRecord,
    RunnerState,
)
from tests._placement_strategies import NOW, SLA, fleets, jobs, small_runner, violations
from valkyrie.config.model import IntegrationMode, ValkyrieConfig
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.queue import (
    Breach,
    Commit,
    DispatchQueue,
    DurationEstimates,
    Expire,
    Offer,
    target_at_risk,
)

pytestmark = pytest.mark.timeout(120)

PROPS = hypothesis.settings(max_examples=100, deadline=None)


def _config(**sections: object) -> ValkyrieConfig:
    return msgspec.convert(sections, ValkyrieConfig)


def _record(job_id: str, spec: JobSubmission, *, submitted: int = NOW - 1000) -> JobRecord:
    return JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=spec,
        submitted_at_ms=submitted,
        updated_at_ms=submitted,
    )


def _hold(queue: DispatchQueue, record: JobRecord) -> None:
    offer, _ = queue.offer(record.id, record.attempt)
    assert offer is Offer.HELD
    job = queue.get(record.id)
    assert job is not None
    assert queue.known(job, record, 1)


def _index(runners: list[RunnerRecord]) -> RunnerIndex:
    index = RunnerIndex()
    for r in runners:
        index.upsert(r)
    return index


# -- holding ---------------------------------------------------------------------------------------
def test_a_newer_attempt_replaces_the_held_one_and_older_ones_are_stale() -> None:
    queue = DispatchQueue()
    assert queue.offer("j", 1) == (Offer.HELD, None)
    first = queue.get("j")
    assert queue.offer("j", 1) == (Offer.STALE, None)
    assert queue.offer("j", 0) == (Offer.STALE, None)
    offer, replaced = queue.offer("j", 2)
    assert offer is Offer.HELD
    assert replaced is first
    second = queue.get("j")
    assert second is not None
    second.committing = True
    assert queue.offer("j", 3) == (Offer.STALE, None)  # a commit is under way


def test_a_record_that_moved_on_is_dropped() -> None:
    queue = DispatchQueue()
    queue.offer("j", 0)
    job = queue.get("j")
    assert job is not None
    record = _record("j", JobSubmission(job_type="t"))
    moved = msgspec.structs.replace(record, state=JobState.CANCELLED)
    assert not queue.known(job, moved, 3)
    assert queue.get("j") is None
    queue.offer("k", 1)
    other = queue.get("k")
    assert other is not None
    assert not queue.known(other, _record("k", JobSubmission(job_type="t")), 1)  # attempt 0 != 1
    assert not queue.known(other, None, None) or queue.get("k") is None


# -- order -----------------------------------------------------------------------------------------
def _oracle_effective(spec: JobSubmission, waited_ms: int, *, step_s: float, cap: int) -> int:
    base = spec.priority
    if spec.qos_requirements and spec.qos_requirements.priority_class:
        base = min(base, SLA[spec.qos_requirements.priority_class])
    return base - min(cap, max(0, waited_ms) // int(step_s * 1000))


@PROPS
@hypothesis.given(
    entries=st.lists(
        st.tuples(
            st.integers(0, 4),  # priority
            st.none() | st.sampled_from(sorted(SLA)),  # SLA class
            st.integers(0, 200_000),  # waited ms
            st.sampled_from(["a", "b", "-"]),  # tenant
        ),
        min_size=1,
        max_size=12,
    ),
    fair=st.booleans(),
)
def test_queue_order_follows_effective_priority_then_fair_share_then_submission(
    entries: list[tuple[int, str | None, int, str]], fair: bool
) -> None:
    config = _config(
        features={"fair_share": fair},
        scheduling={"aging_step_s": 30.0, "max_aging_boost": 2},
    )
    queue = DispatchQueue()
    queue.fair.charge("a", NOW / 1000, 3.0)  # tenant a has had more recently
    records = {}
    for i, (priority, sla, waited, tenant) in enumerate(entries):
        spec = JobSubmission(
            job_type="t",
            priority=priority,
            qos_requirements=msgspec.convert({"priority_class": sla}, QosRequirements)
            if sla
            else None,
            metadata={"project_id": tenant} if tenant != "-" else {},
        )
        records[f"j{i}"] = _record(f"j{i}", spec, submitted=NOW - waited)
        _hold(queue, records[f"j{i}"])
    ordered = [j.job_id for j in queue.ordered(NOW, config)]
    usage = {"a": 3.0}

    def key(job_id: str) -> tuple[int, float, int, int]:
        rec = records[job_id]
        eff = _oracle_effective(rec.spec, NOW - rec.submitted_at_ms, step_s=30.0, cap=2)
        tenant = rec.spec.metadata.get("project_id", "-")
        return (eff, usage.get(tenant, 0.0) if fair else 0.0, rec.submitted_at_ms, int(job_id[1:]))

    assert ordered == sorted(records, key=key)


# -- placement rounds ------------------------------------------------------------------------------
@PROPS
@hypothesis.given(
    specs=st.lists(jobs(wait=False), min_size=1, max_size=10),
    runners=fleets(),
)
def test_a_round_never_overfills_a_runner_nor_breaks_a_hard_constraint(
    specs: list[JobSubmission], runners: list[RunnerRecord]
) -> None:
    config = _config()
    queue = DispatchQueue()
    for i, spec in enumerate(specs):
        _hold(queue, _record(f"j{i}", spec))
    actions = queue.plan(NOW, config, _index(runners))
    commits = [a for a in actions if isinstance(a, Commit)]
    by_id = {r.registration.runner_id: r for r in runners}
    per_runner = Counter(c.runner_id for c in commits)
    for rid, n in per_runner.items():
        r = by_id[rid]
        assert n <= r.registration.max_concurrent_jobs - len(r.assigned_jobs)
    for c in commits:
        assert c.job.record is not None
        assert c.job.committing
        assert violations(c.job.record.spec, by_id[c.runner_id]) - {"capacity"} == set()
    # a job is committed at most once, and jobs in commits are the held ones
    assert len({c.job.job_id for c in commits}) == len(commits)


def test_the_first_in_line_gets_the_only_slot() -> None:
    config = _config()
    queue = DispatchQueue()
    low = _record("low", JobSubmission(job_type="build", priority=4), submitted=NOW - 5000)
    high = _record("high", JobSubmission(job_type="build", priority=0), submitted=NOW - 10)
    for r in (low, high):
        _hold(queue, r)
    index = _index([small_runner("r1")])
    actions = queue.plan(NOW, config, index)
    assert [(type(a), a.job.job_id) for a in actions] == [(Commit, "high")]
    # the reservation holds until the commit settles: the next round places nothing
    assert queue.plan(NOW, config, index) == []


def test_expired_delayed_and_paused_jobs_are_never_committed() -> None:
    queue = DispatchQueue()
    expired = _record("old", JobSubmission(job_type="build", deadline_at_ms=NOW - 1))
    delayed = msgspec.structs.replace(
        _record("later", JobSubmission(job_type="build")), not_before_at_ms=NOW + 60_000
    )
    ready = _record("ready", JobSubmission(job_type="build"))
    for r in (expired, delayed, ready):
        _hold(queue, r)
    index = _index([small_runner("r1", capacity=4)])
    paused = queue.plan(NOW, _config(mode=IntegrationMode.DISABLED.value), index)
    assert [(type(a), a.job.job_id) for a in paused] == [(Expire, "old")]
    actions = queue.plan(NOW, _config(), index)
    assert [(type(a), a.job.job_id) for a in actions] == [(Commit, "ready")]


def test_an_slo_breach_is_reported_once_and_boosts_the_job() -> None:
    config = _config(mode=IntegrationMode.DISABLED.value)
    queue = DispatchQueue()
    spec = JobSubmission(
        job_type="build",
        priority=4,
        performance_targets=PerformanceTargets(max_dispatch_latency_ms=100),
    )
    _hold(queue, _record("slow", spec, submitted=NOW - 500))
    _hold(queue, _record("other", JobSubmission(job_type="build", priority=0)))
    first = queue.plan(NOW, config, RunnerIndex())
    assert [(type(a), a.job.job_id) for a in first] == [(Breach, "slow")]
    assert isinstance(first[0], Breach)
    assert first[0].waited_ms == 500
    assert queue.plan(NOW + 10, config, RunnerIndex()) == []
    assert [j.job_id for j in queue.ordered(NOW, config)] == ["slow", "other"]


def test_settled_jobs_are_tried_again() -> None:
    queue = DispatchQueue()
    _hold(queue, _record("j", JobSubmission(job_type="build")))
    index = _index([small_runner("r1")])
    (commit,) = queue.plan(NOW, _config(), index)
    assert isinstance(commit, Commit)
    queue.settled(commit.job, index=index, runner_id=commit.runner_id)
    (again,) = queue.plan(NOW, _config(), index)
    assert isinstance(again, Commit)
    assert again.job is commit.job


# -- direct placement ------------------------------------------------------------------------------
def test_a_new_job_is_placed_at_once_only_when_nothing_waits_ahead() -> None:
    config = _config()
    queue = DispatchQueue()
    index = _index([small_runner("r1", capacity=2)])
    new = _record("new", JobSubmission(job_type="build"))
    commit = queue.place_new(new, now_ms=NOW, monotonic_s=0.0, config=config, index=index)
    assert commit is not None
    assert commit.runner_id == "r1"
    assert commit.job.committing
    # a job on its way through its queued event holds the next one back until it arrives
    queue.decline("earlier", until=10.0)
    assert queue.place_new(new, now_ms=NOW, monotonic_s=5.0, config=config, index=index) is None
    queue.offer("earlier", 0)  # it arrived: no longer declined, but now it waits here
    assert queue.place_new(new, now_ms=NOW, monotonic_s=5.0, config=config, index=index) is None
    # an expired declination no longer holds anything back
    queue2 = DispatchQueue()
    queue2.decline("gone", until=1.0)
    assert queue2.place_new(new, now_ms=NOW, monotonic_s=2.0, config=config, index=index)


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "disabled"},
        {"not_before": NOW + 1},
        {"deadline": NOW},
        {"attempt": 1},
        {"job_type": "none"},
    ],
)
def test_a_new_job_is_not_placed_at_once_when_it_must_wait(change: dict[str, object]) -> None:
    config = _config(mode=str(change.get("mode", "full")))
    spec = JobSubmission(
        job_type=str(change.get("job_type", "build")),
        deadline_at_ms=change.get("deadline"),  # type: ignore[arg-type]
    )
    record = msgspec.structs.replace(
        _record("j", spec),
        not_before_at_ms=change.get("not_before"),
        attempt=int(change.get("attempt", 0)),  # type: ignore[call-overload]
    )
    index = _index([small_runner("r1")])
    assert (
        DispatchQueue().place_new(record, now_ms=NOW, monotonic_s=0.0, config=config, index=index)
        is None
    )


def test_an_offline_runner_gets_nothing() -> None:
    offline = msgspec.structs.replace(small_runner("r1"), state=RunnerState.OFFLINE)
    queue = DispatchQueue()
    _hold(queue, _record("j", JobSubmission(job_type="build")))
    assert queue.plan(NOW, _config(), _index([offline])) == []


# -- estimates -------------------------------------------------------------------------------------
def test_duration_estimates_and_targets_at_risk() -> None:
    est = DurationEstimates()
    assert est.get("t") is None
    est.observe("t", 1000)
    est.observe("t", 2000)
    assert est.get("t") == pytest.approx(1100)
    spec = JobSubmission(
        job_type="t", performance_targets=PerformanceTargets(target_completion_time_s=2)
    )
    record = _record("j", spec, submitted=NOW)
    assert not target_at_risk(record, None)
    assert not target_at_risk(record, NOW + 2000)
    assert target_at_risk(record, NOW + 2001)
