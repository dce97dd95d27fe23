"""Property tests of placement, queue order and the runner index (pure logic, no server).

Constraints are checked against an oracle written here from the documented rules
(docs/scheduling.md), not against ``failing_constraints`` itself.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from schemas import (
    AffinityRule,
    JobSubmission,
    QosRequirements,
    Requirements,
    RoutingHints,
    RunnerCapabilities,
    RunnerLocation,
    RunnerRecord,
    RunnerRegistration,
    RunnerResources,
    RunnerState,
    RunnerStats,
)
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.placement import (
    MIN_SAMPLES,
    ScoreWeights,
    place,
    runner_labels,
    score_runner,
)
from valkyrie.domain.scheduling.priority import FairShare, effective_priority

pytestmark = pytest.mark.timeout(120)

NOW = 1_700_000_000_000
IDS = [f"r{i}" for i in range(8)]
TYPES = ["build", "test"]
KEYS = ["os", "disk", "arch"]
VALUES = ["a", "b", "c"]
REGIONS = ["eu", "us"]
ZONES = ["z1", "z2"]
SLA = {"platinum": 0, "gold": 1, "silver": 2, "bronze": 3, "best_effort": 4}

PROPS = hypothesis.settings(max_examples=150, deadline=None)


# -- strategies ------------------------------------------------------------------------------------
@st.composite
def runner_records(draw: st.DrawFn, runner_id: str | None = None) -> RunnerRecord:
    rid = runner_id or draw(st.sampled_from(IDS))
    capacity = draw(st.integers(1, 4))
    used = draw(st.integers(0, capacity))
    completed = draw(st.integers(0, 12))
    failed = draw(st.integers(0, 12))
    region = draw(st.none() | st.sampled_from(REGIONS))
    return RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(
                job_types=draw(st.lists(st.sampled_from(TYPES), min_size=1, unique=True)),
                languages=draw(st.lists(st.sampled_from(["py", "go"]), unique=True)),
            ),
            resources=RunnerResources(
                cpu_cores=draw(st.sampled_from([1.0, 2.0, 8.0])),
                memory_mb=draw(st.sampled_from([512, 4096])),
                gpu_count=draw(st.integers(0, 1)),
            ),
            max_concurrent_jobs=capacity,
            location=RunnerLocation(
                region=region, zone=draw(st.sampled_from(ZONES)) if region else None
            ),
            labels=draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES))),
        ),
        state=draw(st.sampled_from(list(RunnerState))),
        registered_at_ms=NOW - 60_000,
        last_heartbeat_at_ms=NOW - draw(st.sampled_from([0, 500, 10_000])),
        assigned_jobs={f"{rid}-busy-{i}": 1 for i in range(used)},
        drain_requested=draw(st.booleans()),
        stats=RunnerStats(
            jobs_completed=completed,
            jobs_failed=failed,
            success_rate=draw(st.sampled_from([0.3, 0.8, 0.95, 1.0])),
            accept_latency_ms=draw(st.sampled_from([5.0, 80.0, 400.0])),
            recent_failures=draw(st.integers(0, 6)),
        ),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[RunnerRecord]:
    ids = draw(st.lists(st.sampled_from(IDS), min_size=0, max_size=len(IDS), unique=True))
    return [draw(runner_records(rid)) for rid in ids]


affinity_rules = st.builds(
    AffinityRule,
    rule_type=st.sampled_from(["required", "preferred", "anti_affinity"]),
    key=st.sampled_from(KEYS),
    values=st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True),
    weight=st.none() | st.sampled_from([0.5, 2.0]),
)


@st.composite
def jobs(draw: st.DrawFn, *, wait: bool = True) -> JobSubmission:
    hints = None
    if draw(st.booleans()):
        preferred = draw(st.lists(st.sampled_from(IDS), max_size=2, unique=True))
        hints = RoutingHints(
            preferred_runners=preferred,
            excluded_runners=draw(
                st.lists(st.sampled_from([i for i in IDS if i not in preferred]), max_size=2)
            ),
            geographic_preference=draw(st.none() | st.sampled_from(["eu", "us", "eu/z1", "us/z2"])),
            affinity_rules=draw(st.lists(affinity_rules, max_size=3)),
            preferred_wait_s=draw(st.sampled_from([0.0, 5.0])) if wait else 0.0,
        )
    qos = None
    if draw(st.booleans()):
        qos = QosRequirements(
            max_latency_ms=draw(st.none() | st.sampled_from([50.0, 200.0])),
            reliability_threshold=draw(st.none() | st.sampled_from([0.5, 0.9])),
        )
    return JobSubmission(
        job_type=draw(st.sampled_from(TYPES)),
        priority=draw(st.integers(0, 4)),
        requirements=Requirements(
            cpu_cores=draw(st.sampled_from([0.0, 2.0, 4.0])),
            memory_mb=draw(st.sampled_from([0, 1024])),
            gpu_count=draw(st.integers(0, 1)),
            required_capabilities=draw(st.lists(st.sampled_from(["py", "go"]), max_size=1)),
            preferred_regions=draw(st.lists(st.sampled_from(REGIONS), max_size=2, unique=True)),
        ),
        labels=draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1)),
        routing_hints=hints,
        qos_requirements=qos,
    )


# -- the oracle ------------------------------------------------------------------------------------
def _labels(r: RunnerRecord) -> dict[str, str]:
    reg = r.registration
    out = {**reg.metadata, **reg.labels}
    if reg.location.region:
        out.setdefault("region", reg.location.region)
    if reg.location.zone:
        out.setdefault("zone", reg.location.zone)
    return out


def violations(
    job: JobSubmission, r: RunnerRecord, *, lost_after_ms: int | None = None
) -> set[str]:
    """Every documented hard rule ``r`` breaks for ``job`` (advanced placement)."""
    reg, req, res = r.registration, job.requirements, r.registration.resources
    out: set[str] = set()
    if r.state == RunnerState.OFFLINE or (
        lost_after_ms is not None and NOW - r.last_heartbeat_at_ms > lost_after_ms
    ):
        out.add("offline")
    if r.state == RunnerState.DRAINING or r.drain_requested:
        out.add("draining")
    hints = job.routing_hints
    if hints and reg.runner_id in hints.excluded_runners:
        out.add("excluded")
    if job.job_type not in reg.capabilities.job_types:
        out.add("job_type")
    caps = set(reg.capabilities.languages) | set(reg.capabilities.job_types)
    if not set(req.required_capabilities) <= caps:
        out.add("capabilities")
    if req.cpu_cores > res.cpu_cores or req.memory_mb > res.memory_mb:
        out.add("resources")
    if req.gpu_count > res.gpu_count:
        out.add("resources")
    labels = _labels(r)
    if any(labels.get(k) != v for k, v in job.labels.items()):
        out.add("labels")
    for rule in hints.affinity_rules if hints else []:
        have = labels.get(rule.key)
        if rule.rule_type == "required" and have not in rule.values:
            out.add("affinity")
        if rule.rule_type == "anti_affinity" and rule.weight is None and have in rule.values:
            out.add("anti_affinity")
    qos = job.qos_requirements
    measured = r.stats.jobs_completed + r.stats.jobs_failed >= MIN_SAMPLES
    if qos and measured:
        if qos.max_latency_ms is not None and r.stats.accept_latency_ms > qos.max_latency_ms:
            out.add("qos_latency")
        if (
            qos.reliability_threshold is not None
            and r.stats.success_rate < qos.reliability_threshold
        ):
            out.add("qos_reliability")
    if len(r.assigned_jobs) >= reg.max_concurrent_jobs:
        out.add("capacity")
    return out


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


def _runner(rid: str, *, capacity: int = 1, used: int = 0, **labels: str) -> RunnerRecord:
    return RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(job_types=["build"]),
            max_concurrent_jobs=capacity,
            labels=labels,
        ),
        state=RunnerState.ACTIVE,
        registered_at_ms=NOW,
        last_heartbeat_at_ms=NOW,
        assigned_jobs={f"{rid}-{i}": 1 for i in range(used)},
    )


def test_a_nearly_full_preferred_runner_beats_an_idle_one_unless_its_weight_is_zero() -> None:
    # regression: the preferred bonus (0.3) lost to the free-capacity term (0.4 x 0.75)
    runners = [_runner("idle", capacity=4), _runner("pref", capacity=4, used=3)]
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
    runners = [_runner("a", spot="yes"), _runner("b")]
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


# -- queue order -----------------------------------------------------------------------------------
@PROPS
@hypothesis.given(
    priority=st.integers(0, 4),
    klass=st.none() | st.sampled_from(list(SLA)),
    waited_ms=st.integers(-120_000, 10_000_000),
    later_ms=st.integers(0, 1_000_000),
    step_s=st.sampled_from([0.5, 1.0, 30.0]),
    max_boost=st.integers(0, 8),
)
def test_aging_only_raises_priority_and_is_bounded(
    priority: int,
    klass: str | None,
    waited_ms: int,
    later_ms: int,
    step_s: float,
    max_boost: int,
) -> None:
    qos = QosRequirements(priority_class=klass) if klass else None  # type: ignore[arg-type]
    spec = JobSubmission(job_type="build", priority=priority, qos_requirements=qos)
    base = min(priority, SLA[klass]) if klass else priority

    def eff(ms: int) -> int:
        return effective_priority(
            spec, waited_ms=ms, aging_step_s=step_s, max_aging_boost=max_boost, sla_classes=SLA
        )

    assert base - max_boost <= eff(waited_ms) <= base
    assert eff(waited_ms + later_ms) <= eff(waited_ms)  # waiting longer never hurts
    assert eff(0) == base


@PROPS
@hypothesis.given(
    old=st.integers(0, 4),
    new=st.integers(0, 4),
    step_s=st.sampled_from([1.0, 30.0]),
    max_boost=st.integers(0, 8),
    extra_steps=st.integers(0, 20),
)
def test_a_job_that_waited_long_enough_outranks_newer_higher_priority_ones(
    old: int, new: int, step_s: float, max_boost: int, extra_steps: int
) -> None:
    hypothesis.assume(new < old)
    gap = old - new
    waited_ms = int((gap + 1 + extra_steps) * step_s * 1000)

    def eff(priority: int, ms: int) -> int:
        return effective_priority(
            JobSubmission(job_type="build", priority=priority),
            waited_ms=ms,
            aging_step_s=step_s,
            max_aging_boost=max_boost,
            sla_classes=SLA,
        )

    if max_boost > gap:
        assert eff(old, waited_ms) < eff(new, 0)
    else:  # bounded: however long it waits, it never passes a job max_aging_boost levels up
        assert eff(old, waited_ms * 1000) >= eff(new, 0)
    # without aging the newer higher-priority job always goes first
    spec = JobSubmission(job_type="build", priority=old)
    assert effective_priority(
        spec,
        waited_ms=waited_ms,
        aging_step_s=step_s,
        max_aging_boost=max_boost,
        sla_classes=SLA,
        aging=False,
    ) > eff(new, 0)


@PROPS
@hypothesis.given(
    boosted=st.tuples(st.integers(0, 4), st.integers(0, 10**7)),
    plain=st.tuples(st.integers(0, 4), st.integers(0, 10**7)),
    max_boost=st.integers(0, 8),
    step_s=st.sampled_from([0.1, 1.0, 30.0]),
)
def test_an_slo_boost_puts_a_job_ahead_of_every_unboosted_one(
    boosted: tuple[int, int], plain: tuple[int, int], max_boost: int, step_s: float
) -> None:
    def eff(priority: int, waited: int, boost: bool) -> int:
        return effective_priority(
            JobSubmission(job_type="build", priority=priority),
            waited_ms=waited,
            aging_step_s=step_s,
            max_aging_boost=max_boost,
            sla_classes=SLA,
            boosted=boost,
        )

    assert eff(*boosted, True) < eff(*plain, False)


def test_boost_and_aging_regressions() -> None:
    def eff(priority: int, waited_ms: int, *, boosted: bool = False) -> int:
        return effective_priority(
            JobSubmission(job_type="build", priority=priority),
            waited_ms=waited_ms,
            aging_step_s=30,
            max_aging_boost=2,
            sla_classes=SLA,
            boosted=boosted,
        )

    # a boosted background job goes before a critical job aged to the maximum (it did not)
    assert eff(4, 0, boosted=True) < eff(0, 3_600_000)
    # a queued time in the future (clock skew between hosts) does not lower the priority
    assert eff(2, -60_000) == 2


def test_sla_class_maps_to_a_priority_and_only_raises_it() -> None:
    for klass, level in SLA.items():
        for priority in range(5):
            spec = JobSubmission(
                job_type="build",
                priority=priority,
                qos_requirements=QosRequirements(priority_class=klass),  # type: ignore[arg-type]
            )
            got = effective_priority(
                spec, waited_ms=0, aging_step_s=30, max_aging_boost=2, sla_classes=SLA
            )
            assert got == min(priority, level)
            # with QoS routing off the dispatcher passes no classes: the class is ignored
            assert (
                effective_priority(
                    spec, waited_ms=0, aging_step_s=30, max_aging_boost=2, sla_classes={}
                )
                == priority
            )


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    weights=st.lists(st.sampled_from([1.0, 2.0, 3.0, 5.0]), min_size=2, max_size=4),
    priority=st.integers(0, 4),
    half_life_s=st.sampled_from([30.0, 60.0]),
)
def test_fair_shares_converge_to_the_weights_under_contention(
    weights: list[float], priority: int, half_life_s: float
) -> None:
    """Every tenant has an endless backlog; the head of the dispatcher's order runs each step."""
    tenants = [f"t{i}" for i in range(len(weights))]
    fair = FairShare(half_life_s=half_life_s, weights=dict(zip(tenants, weights, strict=True)))
    arrival = {t: i for i, t in enumerate(tenants)}  # the head of each tenant's backlog
    next_arrival = len(tenants)
    spec = JobSubmission(job_type="build", priority=priority)
    dispatched: Counter[str] = Counter()
    dt = 0.05  # one dispatch every 50 ms: many per half-life
    steps = 4000
    for step in range(steps):
        now_s = step * dt

        def key(t: str, now_s: float = now_s) -> tuple[int, float, int]:
            eff = effective_priority(
                spec,
                waited_ms=0,
                aging_step_s=30,
                max_aging_boost=2,
                sla_classes=SLA,
            )
            return (eff, fair.share_key(t, now_s), arrival[t])

        head = min(tenants, key=key)
        fair.charge(head, now_s)
        arrival[head] = next_arrival
        next_arrival += 1
        if step >= steps // 2:  # measure once the decayed usage has settled
            dispatched[head] += 1
    total = sum(dispatched.values())
    for t, w in zip(tenants, weights, strict=True):
        assert dispatched[t] / total == pytest.approx(w / sum(weights), abs=0.02)


def test_fair_share_puts_a_quiet_tenant_ahead_of_a_busy_one() -> None:
    fair = FairShare(half_life_s=60)
    for i in range(30):
        fair.charge("A", i * 0.1)
    assert fair.share_key("B", 3.0) < fair.share_key("A", 3.0)
    # usage decays: after one half-life it is halved
    assert fair.usage(63.0)["A"] == pytest.approx(fair.usage(3.0)["A"] / 2)


# -- the runner index ------------------------------------------------------------------------------
operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), runner_records()),
        st.tuples(st.just("remove"), st.sampled_from(IDS)),
        st.tuples(st.just("reserve"), st.sampled_from(IDS), st.integers(0, 5)),
        st.tuples(st.just("unreserve"), st.sampled_from(IDS), st.integers(0, 5)),
        st.tuples(st.just("commit"), st.sampled_from(IDS), st.integers(0, 5)),
    ),
    max_size=40,
)


def _free(record: RunnerRecord, reserved: set[str]) -> bool:
    used = len(record.assigned_jobs) + len(reserved - set(record.assigned_jobs))
    return (
        record.state not in (RunnerState.OFFLINE, RunnerState.DRAINING)
        and not record.drain_requested
        and used < record.registration.max_concurrent_jobs
    )


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    ops=operations,
    probes=st.lists(jobs(wait=False), min_size=1, max_size=4),
    sample=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_runner_index_candidates_and_bookkeeping(
    ops: list[tuple[Any, ...]], probes: list[JobSubmission], sample: int, seed: int
) -> None:
    index = RunnerIndex(random.Random(seed))
    records: dict[str, RunnerRecord] = {}
    reserved: dict[str, set[str]] = {}

    def check() -> None:
        for job in probes:
            free = {
                rid
                for rid, r in records.items()
                if job.job_type in r.registration.capabilities.job_types
                and _free(r, reserved.get(rid, set()))
            }
            assert index.has_free(job.job_type) == bool(free)
            hints = job.routing_hints
            preferred = {p for p in (hints.preferred_runners if hints else []) if p in records}
            regions = set(job.requirements.preferred_regions)
            if hints and hints.geographic_preference:
                regions.add(hints.geographic_preference.partition("/")[0])
            in_region = {
                rid for rid in free if records[rid].registration.location.region in regions
            }
            got = index.candidates(job, sample)
            ids = [r.registration.runner_id for r in got]
            assert len(ids) == len(set(ids))
            chosen = set(ids)
            assert preferred | in_region <= chosen  # always considered
            assert chosen <= free | preferred  # nothing else: right type and a free slot
            assert len(chosen - preferred - in_region) <= sample  # the sample is bounded
            if len(free) <= sample:
                assert free <= chosen
            for view in got:  # views count the reservations as taken slots
                rid = view.registration.runner_id
                assert set(view.assigned_jobs) == set(records[rid].assigned_jobs) | reserved.get(
                    rid, set()
                )
        expected_free_slots = sum(
            r.registration.max_concurrent_jobs
            - len(r.assigned_jobs)
            - len(reserved.get(rid, set()) - set(r.assigned_jobs))
            for rid, r in records.items()
            if _free(r, reserved.get(rid, set()))
        )
        assert index.free_slots() == expected_free_slots

    for op in ops:
        match op:
            case ("upsert", record):
                rid = record.registration.runner_id
                records[rid] = record
                reserved.get(rid, set()).difference_update(record.assigned_jobs)
                index.upsert(record)
            case ("remove", rid):
                records.pop(rid, None)
                reserved.pop(rid, None)
                index.remove(rid)
            case ("reserve", rid, n):
                if rid not in records:
                    continue  # the dispatcher only reserves runners it placed on
                reserved.setdefault(rid, set()).add(f"job-{n}")
                index.reserve(rid, f"job-{n}")
            case ("unreserve", rid, n):
                reserved.get(rid, set()).discard(f"job-{n}")
                index.unreserve(rid, f"job-{n}")
            case ("commit", rid, n):
                # the slot is written to the runner's record, then the reservation is released
                if rid not in records or f"job-{n}" not in reserved.get(rid, set()):
                    continue
                record = records[rid]
                record = msgspec.structs.replace(
                    record, assigned_jobs={**record.assigned_jobs, f"job-{n}": 1}
                )
                records[rid] = record
                reserved[rid].discard(f"job-{n}")
                index.upsert(record)
                index.unreserve(rid, f"job-{n}")
        check()
    check()


def test_runner_index_sampling_is_bounded_with_many_runners() -> None:
    index = RunnerIndex(random.Random(7))
    for i in range(2000):
        index.upsert(
            RunnerRecord(
                registration=RunnerRegistration(
                    runner_id=f"r{i}",
                    capabilities=RunnerCapabilities(job_types=["build"]),
                    max_concurrent_jobs=2,
                ),
                state=RunnerState.ACTIVE,
                registered_at_ms=NOW,
                last_heartbeat_at_ms=NOW,
            )
        )
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(preferred_runners=["r1999"]))
    seen: set[str] = set()
    for _ in range(50):
        ids = {r.registration.runner_id for r in index.candidates(job, 16)}
        assert "r1999" in ids
        assert len(ids) <= 17
        seen |= ids
    assert len(seen) > 100  # a different random sample each time, not the same first 16
    assert index.candidates(JobSubmission(job_type="deploy"), 16) == []
