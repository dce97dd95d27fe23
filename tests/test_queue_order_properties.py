"""Property tests of queue order (pure logic, no server): aging, SLO boosts, SLA classes, fair share."""

from __future__ import annotations

from collections import Counter

import hypothesis
import pytest
from hypothesis import strategies as st

from schemas import JobSubmission, QosRequirements
from tests._placement_strategies import PROPS, SLA
from valkyrie.domain.scheduling.priority import FairShare, effective_priority

pytestmark = pytest.mark.timeout(120)


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
