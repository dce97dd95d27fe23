"""Property tests of placement (pure logic, no server): hard constraints, preferences, geography.

Constraints are checked against the oracle in tests/_placement_strategies.py, written from the
documented rules (docs/scheduling.md), not against ``failing_constraints`` itself.
"""

from __future__ import annotations

from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from schemas import (
    AffinityRule,
    JobSubmission,
    RoutingHints,
    RunnerLocation,
    RunnerRecord,
    RunnerResources,
    RunnerState,
    RunnerStats,
)
from tests._placement_strategies import (
    KEYS,
    NOW,
    PROPS,
    VALUES,
    affinity_rules,
    fleets,
    jobs,
    runner_records,
    small_runner,
    violations,
)
from valkyrie.domain.scheduling.placement import ScoreWeights, place, runner_labels, score_runner

pytestmark = pytest.mark.timeout(120)


# -- placement -------------------------------------------------------------------------------------
@pytest.mark.slow
@PROPS
@hypothesis.given(job=jobs(), runners=fleets(), queued_for_ms=st.sampled_from([0, 10_000]))
def test_place_never_breaks_a_hard_constraint_or_capacity(
    job: JobSubmission, runners: list[RunnerRecord], queued_for_ms: int
) -> None:
    placement = place(job, runners, now_ms=NOW, lost_after_ms=5000, queued_for_ms=queued_for_ms)
    by_id = {r.registration.runner_id: r for r in runners}
    feasible = {rid for rid, r in by_id.items() if not violations(job, r, lost_after_ms=5000)}
    if placement.runner_id is not None:
        assert not violations(job, by_id[placement.runner_id], lost_after_ms=5000)
    # complete and sound: ranked = exactly the feasible runners, every rejection is a real one
    assert {s.runner_id for s in placement.ranked} == feasible
    for ids in placement.rejected.values():
        for rid in ids:
            assert violations(job, by_id[rid], lost_after_ms=5000)
    if feasible and placement.runner_id is None:
        assert placement.waiting_for_preferred  # the only reason to leave a feasible runner idle
    if not feasible:
        assert placement.runner_id is None


def make_feasible(
    job: JobSubmission, runner: RunnerRecord, *, affinity: bool = True, full: bool = False
) -> RunnerRecord:
    """``runner`` changed as little as needed to satisfy every hard rule of ``job``.

    Without ``affinity`` its labels are left alone; with ``full`` every slot is taken.
    """
    reg = runner.registration
    labels = dict(reg.labels)
    labels.update(job.labels)
    for rule in job.routing_hints.affinity_rules if job.routing_hints and affinity else []:
        if rule.rule_type == "required":
            labels[rule.key] = rule.values[0]
        elif (
            rule.rule_type == "anti_affinity"
            and rule.weight is None
            and labels.get(rule.key) in rule.values
        ):
            labels[rule.key] = next((v for v in VALUES if v not in rule.values), "other")
    caps = reg.capabilities
    registration = msgspec.structs.replace(
        reg,
        capabilities=msgspec.structs.replace(
            caps,
            job_types=sorted({*caps.job_types, job.job_type}),
            languages=sorted({*caps.languages, *job.requirements.required_capabilities}),
        ),
        resources=RunnerResources(cpu_cores=8.0, memory_mb=4096, gpu_count=1),
        labels=labels,
    )
    busy = dict(list(runner.assigned_jobs.items())[: reg.max_concurrent_jobs - 1])
    if full:
        busy = {f"{reg.runner_id}-busy-{i}": 1 for i in range(reg.max_concurrent_jobs)}
    stats = runner.stats
    if job.qos_requirements is not None:
        stats = RunnerStats(jobs_completed=stats.jobs_completed, success_rate=1.0)
    return msgspec.structs.replace(
        runner,
        registration=registration,
        state=RunnerState.ACTIVE,
        drain_requested=False,
        assigned_jobs=busy,
        stats=stats,
    )


@st.composite
def preferred_cases(draw: st.DrawFn) -> tuple[JobSubmission, list[RunnerRecord], set[str]]:
    """A job preferring one or two runners of the fleet, at least one of them feasible."""
    runners = draw(fleets().filter(bool))
    job = draw(jobs())
    ids = [r.registration.runner_id for r in runners]
    preferred = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2, unique=True))
    hints = job.routing_hints or RoutingHints()
    hints = msgspec.structs.replace(
        hints,
        preferred_runners=preferred,
        excluded_runners=[i for i in hints.excluded_runners if i not in preferred],
    )
    job = msgspec.structs.replace(job, routing_hints=hints)
    fixed = draw(st.sampled_from(preferred))
    runners = [make_feasible(job, r) if r.registration.runner_id == fixed else r for r in runners]
    return job, runners, set(preferred)


@pytest.mark.slow
@PROPS
@hypothesis.given(case=preferred_cases())
def test_a_feasible_preferred_runner_wins(
    case: tuple[JobSubmission, list[RunnerRecord], set[str]],
) -> None:
    job, runners, preferred = case
    feasible_preferred = {
        r.registration.runner_id
        for r in runners
        if r.registration.runner_id in preferred and not violations(job, r)
    }
    hypothesis.assume(feasible_preferred)  # a required and an anti-affinity rule may conflict
    placement = place(job, runners, now_ms=NOW, weights=ScoreWeights())
    assert placement.runner_id in feasible_preferred
    # the winner is reported first, so decisions and explanations show it as the best
    assert placement.ranked[0].runner_id == placement.runner_id


@st.composite
def busy_preferred_cases(draw: st.DrawFn) -> tuple[JobSubmission, list[RunnerRecord]]:
    """A job waiting up to 5 s for preferred runners that are all busy; others may be free."""
    runners = draw(fleets().filter(lambda rs: len(rs) >= 2))
    job = draw(jobs(wait=False))
    ids = [r.registration.runner_id for r in runners]
    preferred = draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2, unique=True))
    hints = msgspec.structs.replace(
        job.routing_hints or RoutingHints(),
        preferred_runners=preferred,
        excluded_runners=[],
        preferred_wait_s=5.0,
    )
    job = msgspec.structs.replace(job, routing_hints=hints)
    out = []
    for r in runners:
        if r.registration.runner_id in preferred:
            r = make_feasible(job, r, full=draw(st.booleans()) or r is runners[0])
        elif draw(st.booleans()):
            r = make_feasible(job, r)
        out.append(r)
    return job, out


def test_a_nearly_full_preferred_runner_beats_an_idle_one_unless_its_weight_is_zero() -> None:
    # regression: the preferred bonus (0.3) lost to the free-capacity term (0.4 x 0.75)
    runners = [small_runner("idle", capacity=4), small_runner("pref", capacity=4, used=3)]
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(preferred_runners=["pref"]))
    placement = place(job, runners, now_ms=NOW)
    assert placement.runner_id == "pref"
    assert [s.runner_id for s in placement.ranked] == ["pref", "idle"]
    assert place(job, runners, now_ms=NOW, weights=ScoreWeights(preferred_runner=0)).runner_id == (
        "idle"
    )
    # integration modes without advanced placement ignore the hint: least loaded wins
    assert place(job, runners, now_ms=NOW, advanced=False).runner_id == "idle"


def test_weighted_anti_affinity_without_values_penalises_runners_with_the_key() -> None:
    # regression: it was a no-op, while the hard rule without values excludes such runners
    runners = [small_runner("a", spot="yes"), small_runner("b")]
    rule = AffinityRule(rule_type="anti_affinity", key="spot", weight=5.0)
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(affinity_rules=[rule]))
    placement = place(job, runners, now_ms=NOW)
    assert placement.runner_id == "b"
    assert placement.ranked[1].runner_id == "a"
    assert placement.ranked[0].score - placement.ranked[1].score == pytest.approx(0.5)
    hard = AffinityRule(rule_type="anti_affinity", key="spot")
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(affinity_rules=[hard]))
    assert place(job, runners, now_ms=NOW).rejected == {"anti_affinity": ["a"]}


@PROPS
@hypothesis.given(case=busy_preferred_cases(), queued_for_s=st.floats(0, 20))
def test_busy_preferred_runner_means_wait_then_spill_over(
    case: tuple[JobSubmission, list[RunnerRecord]], queued_for_s: float
) -> None:
    job, runners = case
    assert job.routing_hints is not None
    preferred = set(job.routing_hints.preferred_runners)
    free_preferred = {
        r.registration.runner_id
        for r in runners
        if r.registration.runner_id in preferred and not violations(job, r)
    }
    busy = {
        r.registration.runner_id
        for r in runners
        if r.registration.runner_id in preferred and violations(job, r) == {"capacity"}
    }
    others = {
        r.registration.runner_id
        for r in runners
        if r.registration.runner_id not in preferred and not violations(job, r)
    }
    placement = place(job, runners, now_ms=NOW, queued_for_ms=int(queued_for_s * 1000))
    if free_preferred:
        assert placement.runner_id in free_preferred  # never wait while a preferred one is free
    elif busy and queued_for_s < 5.0:
        assert placement.runner_id is None
        assert placement.waiting_for_preferred
    else:  # the wait is over (or nothing to wait for): spill over to the best other runner
        assert not placement.waiting_for_preferred
        if others:
            assert placement.runner_id in others
            assert placement.runner_id == placement.ranked[0].runner_id
        else:
            assert placement.runner_id is None


@st.composite
def affinity_cases(draw: st.DrawFn) -> tuple[JobSubmission, list[RunnerRecord]]:
    """A job with affinity rules and a fleet that satisfies everything but (maybe) them."""
    job = draw(jobs())
    rules = draw(st.lists(affinity_rules, min_size=1, max_size=3))
    job = msgspec.structs.replace(
        job,
        routing_hints=msgspec.structs.replace(
            job.routing_hints or RoutingHints(), affinity_rules=rules, preferred_wait_s=0.0
        ),
    )
    runners = [make_feasible(job, r, affinity=False) for r in draw(fleets())]
    return job, runners


@pytest.mark.slow
@PROPS
@hypothesis.given(case=affinity_cases())
def test_hard_anti_affinity_and_required_affinity_hold(
    case: tuple[JobSubmission, list[RunnerRecord]],
) -> None:
    job, runners = case
    assert job.routing_hints is not None
    placement = place(job, runners, now_ms=NOW)
    allowed = {r.registration.runner_id for r in runners if not violations(job, r)}
    assert (placement.runner_id is None) == (not allowed)
    if placement.runner_id is None:
        return
    winner = next(r for r in runners if r.registration.runner_id == placement.runner_id)
    labels = runner_labels(winner)
    for rule in job.routing_hints.affinity_rules:
        if rule.rule_type == "required":
            assert labels.get(rule.key) in rule.values
        if rule.rule_type == "anti_affinity" and rule.weight is None:
            assert labels.get(rule.key) not in rule.values


@PROPS
@hypothesis.given(
    runner=runner_records(),
    key=st.sampled_from(KEYS),
    values=st.lists(st.sampled_from(VALUES), max_size=2, unique=True),
    weight=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_weighted_affinity_moves_the_score_of_matching_runners(
    runner: RunnerRecord, key: str, values: list[str], weight: float
) -> None:
    """Preferred rules add weight x weight_affinity; weighted anti-affinity subtracts it.

    An anti-affinity rule without values means "has the key at all", hard or weighted alike.
    """
    have = runner_labels(runner).get(key)
    base = score_runner(JobSubmission(job_type="build"), runner, ScoreWeights())

    def with_rule(rule_type: str) -> float:
        rule = AffinityRule(rule_type=rule_type, key=key, values=values, weight=weight)  # type: ignore[arg-type]
        job = JobSubmission(job_type="build", routing_hints=RoutingHints(affinity_rules=[rule]))
        return score_runner(job, runner, ScoreWeights())

    delta = weight * ScoreWeights().affinity
    anti_hit = have in values if values else have is not None
    assert with_rule("anti_affinity") == pytest.approx(base - delta if anti_hit else base)
    if values:
        assert with_rule("preferred") == pytest.approx(base + delta if have in values else base)


def _with(runner: RunnerRecord, **registration: Any) -> RunnerRecord:
    reg = msgspec.structs.replace(runner.registration, **registration)
    return msgspec.structs.replace(runner, registration=reg)


@PROPS
@hypothesis.given(runner=runner_records())
def test_geography_prefers_the_zone_then_the_region(runner: RunnerRecord) -> None:
    """``region/zone`` scores the zone above the rest of the region, the region above others."""
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(geographic_preference="eu/z1"))
    w = ScoreWeights()
    in_zone = score_runner(job, _with(runner, location=RunnerLocation(region="eu", zone="z1")), w)
    in_region = score_runner(job, _with(runner, location=RunnerLocation(region="eu", zone="z2")), w)
    elsewhere = score_runner(job, _with(runner, location=RunnerLocation(region="us", zone="z1")), w)
    assert in_zone > in_region > elsewhere
