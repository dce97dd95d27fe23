"""Health evaluation without NATS: thresholds, the runner pool, the summary, transitions.

(The automatic-fallback rules are tested in test_fallback_unit.py.)
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    HEALTH_STATUSES,
    CheckResult,
    ConsumerLag,
    FallbackRecord,
    HealthReport,
    HealthStatus,
    HealthSummary,
    RunnerPool,
)
from valkyrie.cli._status import Gathered, render
from valkyrie.config.model import HealthConfig
from valkyrie.domain.health import (
    CONSUMER_LAG_COMPONENT,
    FORGET_AFTER_STALE,
    RUNNER_POOL_COMPONENT,
    Seen,
    component_statuses,
    config_handler_alive,
    evaluate_consumer,
    health_changes,
    instance_health,
    kv_latency_check,
    note_report,
    pool_status,
    runner_pool,
    runner_pool_detail,
    should_forget,
    summarize,
    threshold_status,
    transition_details,
    transitions,
    worst,
)
from valkyrie.runtime.health import component_name

H = HealthConfig(
    report_interval_ms=100,
    stale_after_ms=1000,
    consumer_lag_degraded=10,
    consumer_lag_unhealthy=100,
    kv_latency_degraded_ms=50,
    kv_latency_unhealthy_ms=500,
    min_active_runners=2,
    failure_threshold=3,
    recovery_threshold=2,
)
NOW = 1_000_000
OK = CheckResult(status="healthy")


def report(
    component: str = "intake",
    instance: str = "i1",
    *,
    status: HealthStatus = "healthy",
    revision: int = 0,
    checks: dict[str, CheckResult] | None = None,
    stopping: bool = False,
) -> HealthReport:
    return HealthReport(
        component=component,
        instance=instance,
        at_ms=NOW,
        status=status,
        config_revision=revision,
        checks=checks if checks is not None else {"nats": OK},
        stopping=stopping,
    )


def record(**overrides: object) -> FallbackRecord:
    fields: dict[str, object] = {
        "previous_mode": "full",
        "config_revision": 5,
        "at_ms": NOW,
    }
    fields.update(overrides)
    return FallbackRecord(**fields)  # type: ignore[arg-type]


# -- thresholds and worst-of --------------------------------------------------------------------


def test_worst_orders_statuses_and_defaults_to_healthy() -> None:
    assert worst([]) == "healthy"
    assert worst(["healthy", "degraded"]) == "degraded"
    assert worst(["degraded", "unhealthy", "healthy"]) == "unhealthy"


@given(st.lists(st.sampled_from(HEALTH_STATUSES)))
def test_worst_is_the_maximum_in_any_order(statuses: list[HealthStatus]) -> None:
    expected = max(statuses, key=HEALTH_STATUSES.index, default="healthy")
    assert worst(statuses) == expected
    assert worst(reversed(statuses)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, "healthy"), (9.99, "healthy"), (10, "degraded"), (99, "degraded"), (100, "unhealthy")],
)
def test_threshold_status_is_inclusive(value: float, expected: HealthStatus) -> None:
    assert threshold_status(value, 10, 100) == expected


def test_kv_latency_check() -> None:
    assert kv_latency_check(3.21234, H) == CheckResult(status="healthy", value=3.212)
    slow = kv_latency_check(60, H)
    assert slow.status == "degraded"
    assert ">= 50 ms" in slow.detail
    assert kv_latency_check(900, H).status == "unhealthy"
    failed = kv_latency_check(None, H, "config KV read failed: boom")
    assert failed == CheckResult(status="unhealthy", detail="config KV read failed: boom")


def test_consumer_lag_statuses() -> None:
    lag = ConsumerLag(durable="intake", stream="S", pending=20)
    degraded = evaluate_consumer(lag, H)
    assert degraded.status == "degraded"
    assert degraded.detail == "20 pending (>= 10)"
    assert evaluate_consumer(ConsumerLag(durable="x", stream="S", pending=100), H).status == (
        "unhealthy"
    )
    assert evaluate_consumer(ConsumerLag(durable="x", stream="S", pending=0), H).status == "healthy"
    unmeasured = ConsumerLag(durable="dispatcher", stream="S", detail="no consumer yet")
    assert evaluate_consumer(unmeasured, H).status == "healthy"
    waiting = ConsumerLag(durable="intake", stream="S", pending=10, detail="no consumer yet")
    assert evaluate_consumer(waiting, H).detail == "10 pending (>= 10); no consumer yet"


def test_runner_pool_counts_active_and_busy_runners_as_available() -> None:
    pool = runner_pool(["active", "busy", "draining", "offline", "offline"], 2)
    assert pool == RunnerPool(
        total=5, available=2, active=1, busy=1, draining=1, offline=2, min_active=2
    )
    assert runner_pool_detail(pool) == "2 available of 5 (1 draining, 2 offline), minimum 2"
    # draining runners are leaving and take no work: they do not count
    assert runner_pool(["active", "draining", "draining"], 2).status == "degraded"
    assert runner_pool(["draining", "offline"], 1).status == "unhealthy"
    assert runner_pool_detail(runner_pool(["busy"], 3)) == "1 available of 1, minimum 3"
    # a fully loaded pool is alive and working: the queue shows the load, not the pool
    assert runner_pool(["busy", "busy"], 2).status == "healthy"
    # a minimum of 0 switches the check off
    assert runner_pool([], 0).status == "healthy"
    assert runner_pool(["offline", "draining"], 0).status == "healthy"


_STATES = st.sampled_from(["active", "busy", "draining", "offline"])


@given(st.lists(_STATES, max_size=30), st.integers(min_value=0, max_value=10), _STATES)
def test_runner_pool_rule_properties(states: list[str], minimum: int, extra: str) -> None:
    pool = runner_pool(states, minimum)
    available = states.count("active") + states.count("busy")
    assert pool.available == available
    assert pool.total == len(states) == pool.active + pool.busy + pool.draining + pool.offline
    assert pool.status == pool_status(available, minimum)
    assert (pool.status == "healthy") == (available >= minimum)
    assert (pool.status == "unhealthy") == (available == 0 < minimum)
    # one more runner never makes the pool worse, and only an available one makes it better
    more = runner_pool([*states, extra], minimum)
    assert worst([more.status, pool.status]) == pool.status
    if extra in ("draining", "offline"):
        assert more.status == pool.status


# -- instances ----------------------------------------------------------------------------------


def test_instance_takes_the_worst_of_its_checks() -> None:
    slow = CheckResult(status="degraded", value=70, detail="slow")
    seen = Seen(report(checks={"nats": OK, "kv_latency_ms": slow}), NOW - 100)
    verdict = instance_health(seen, NOW, H, config_revision=0, revision_settled=True)
    assert verdict.status == "degraded"
    assert verdict.failing == {"kv_latency_ms": slow}
    assert verdict.age_ms == 100
    assert verdict.last_report_at_ms == NOW - 100


def test_silent_instance_is_stalled() -> None:
    fresh = Seen(report(), NOW - H.stale_after_ms)
    assert instance_health(fresh, NOW, H, config_revision=0, revision_settled=True).status == (
        "healthy"
    )
    silent = Seen(report(), NOW - H.stale_after_ms - 1)
    verdict = instance_health(silent, NOW, H, config_revision=0, revision_settled=True)
    assert verdict.status == "unhealthy"
    assert verdict.failing["liveness"].detail.startswith("stalled: no report for 1.0s")


def test_old_config_revision_counts_only_once_settled() -> None:
    seen = Seen(report(revision=2), NOW)
    assert instance_health(seen, NOW, H, config_revision=3, revision_settled=False).status == (
        "healthy"
    )
    behind = instance_health(seen, NOW, H, config_revision=3, revision_settled=True)
    assert behind.status == "degraded"
    assert behind.failing["config_revision"].detail == "runs config revision 2, current is 3"


def test_forgetting() -> None:
    assert should_forget(Seen(report(stopping=True), NOW), NOW, H)
    limit = FORGET_AFTER_STALE * H.stale_after_ms
    assert not should_forget(Seen(report(), NOW - limit), NOW, H)
    assert should_forget(Seen(report(), NOW - limit - 1), NOW, H)


def test_reports_fold_into_the_latest_per_instance() -> None:
    seen: dict[str, Seen] = {}
    note_report(seen, report(instance="a"), NOW)
    newer = msgspec.structs.replace(report(instance="a", status="degraded"), at_ms=NOW + 10)
    note_report(seen, newer, NOW + 20)
    assert seen == {"a": Seen(newer, NOW + 20)}
    # reports can overtake each other: an older one arriving late changes nothing
    note_report(seen, report(instance="a"), NOW + 30)
    assert seen == {"a": Seen(newer, NOW + 20)}
    note_report(seen, report(instance="b"), NOW + 30)
    note_report(seen, report(instance="a", stopping=True), NOW + 40)
    assert list(seen) == ["b"]


def test_a_config_handler_is_alive_while_it_reports() -> None:
    config = msgspec.structs.replace(report("config", "c"), handlers=["config", "intake"])
    assert config_handler_alive({"c": Seen(config, NOW - H.stale_after_ms)}, NOW, H)
    assert not config_handler_alive({"c": Seen(config, NOW - H.stale_after_ms - 1)}, NOW, H)
    assert not config_handler_alive({"i": Seen(report(), NOW)}, NOW, H)


def test_component_name_is_one_subject_token() -> None:
    assert component_name(["monitor", "config"]) == "monitor+config"
    assert component_name(["a.b", "c d"]) == "a_b+c_d"
    assert component_name([]) == "none"


# -- the summary and its transitions ------------------------------------------------------------


def summary_of(
    *,
    seen: dict[str, Seen] | None = None,
    lags: list[ConsumerLag] | None = None,
    states: list[str] | None = None,
) -> HealthSummary:
    return summarize(
        seen or {"i1": Seen(report(), NOW)},
        now_ms=NOW,
        health=H,
        mode="full",
        config_revision=0,
        revision_settled=True,
        consumers=lags or [],
        pool=runner_pool(states if states is not None else ["active", "active"], 2),
    )


def test_summary_is_the_worst_of_components_consumers_and_pool() -> None:
    healthy = summarize(
        {"i1": Seen(report(), NOW)},
        now_ms=NOW,
        health=H,
        mode="full",
        config_revision=0,
        revision_settled=True,
        consumers=[ConsumerLag(durable="intake", stream="S", pending=0)],
        pool=runner_pool(["active", "busy"], 2),
    )
    assert healthy.status == "healthy"
    assert healthy.reasons == []
    assert healthy.report_interval_ms == 100
    assert healthy.stale_after_ms == 1000

    lagging = summary_of(lags=[ConsumerLag(durable="intake", stream="S", pending=20)])
    assert lagging.status == "degraded"
    assert lagging.reasons == ["consumer intake degraded: 20 pending (>= 10)"]

    few_runners = summary_of(states=["active"])
    assert few_runners.status == "degraded"
    assert few_runners.reasons == ["runner pool degraded: 1 available of 1, minimum 2"]

    stalled = summary_of(seen={"i9": Seen(report("results", "i9"), NOW - 5000)})
    assert stalled.status == "unhealthy"
    assert stalled.reasons[0].startswith("results (i9) unhealthy: liveness: stalled")


def test_health_changes_announce_components_then_overall_with_the_summary_revision() -> None:
    first = summary_of()
    assert health_changes(first, first, summary_revision=7) == []
    lagging = summary_of(lags=[ConsumerLag(durable="intake", stream="S", pending=20)])
    component, overall = health_changes(first, lagging, summary_revision=7)
    assert (component.event_type, component.subject_id) == (
        "health.degraded",
        CONSUMER_LAG_COMPONENT,
    )
    assert (component.from_, component.to, component.summary_revision) == ("healthy", "degraded", 7)
    assert component.details == ["intake: 20 pending (>= 10)"]
    assert (overall.subject_id, overall.to, overall.reasons) == (
        "overall",
        "degraded",
        lagging.reasons,
    )
    # without an earlier summary every component counts as coming from healthy
    assert health_changes(None, first, summary_revision=8) == []
    (fresh,) = [
        e for e in health_changes(None, lagging, summary_revision=9) if e.subject_id != "overall"
    ]
    assert (fresh.from_, fresh.to) == ("healthy", "degraded")


def test_component_statuses_take_the_worst_instance() -> None:
    summary = summary_of(
        seen={
            "a": Seen(report("dispatcher", "a"), NOW),
            "b": Seen(report("dispatcher", "b", status="degraded"), NOW),
            "c": Seen(report("intake", "c"), NOW),
        },
        lags=[ConsumerLag(durable="intake", stream="S", pending=500)],
        states=[],
    )
    assert component_statuses(summary) == {
        "dispatcher": "degraded",
        "intake": "healthy",
        CONSUMER_LAG_COMPONENT: "unhealthy",
        RUNNER_POOL_COMPONENT: "unhealthy",  # no runner at all, minimum 2
    }
    assert summary.status == "unhealthy"


def test_transition_details_say_what_is_not_healthy() -> None:
    failing = {"nats": CheckResult(status="unhealthy", detail="reconnecting")}
    summary = summary_of(
        seen={"a": Seen(report("results", "a", checks=failing), NOW)},
        lags=[ConsumerLag(durable="intake", stream="S", pending=20)],
        states=["draining"],
    )
    assert transition_details(summary, "results") == ["a nats: reconnecting"]
    assert transition_details(summary, CONSUMER_LAG_COMPONENT) == ["intake: 20 pending (>= 10)"]
    assert transition_details(summary, RUNNER_POOL_COMPONENT) == [
        "0 available of 1 (1 draining), minimum 2"
    ]


def test_transitions() -> None:
    before: dict[str, HealthStatus] = {"intake": "healthy", "results": "unhealthy"}
    after: dict[str, HealthStatus] = {
        "intake": "degraded",
        "results": "unhealthy",
        "new": "healthy",
    }
    assert transitions(before, after) == [("intake", "healthy", "degraded")]
    assert transitions({}, {"x": "unhealthy", "y": "healthy"}) == [("x", "healthy", "unhealthy")]
    # a component that went away has no transition of its own
    assert transitions({"gone": "unhealthy"}, {}) == []


# -- rendering -------------------------------------------------------------------------------------


def test_render_names_mode_fallback_and_reasons() -> None:
    summary = summary_of(lags=[ConsumerLag(durable="intake", stream="S", pending=20)])
    summary = msgspec.structs.replace(
        summary, mode="fallback", monitor="m1", fallback=record(previous_mode="hybrid")
    )
    lines = render(Gathered(summary=summary, source="monitor"), NOW + 1500)
    assert lines[0] == "status:   degraded"
    assert lines[1].startswith("mode:     fallback (automatic since ")
    assert lines[1].endswith("previous mode hybrid)")
    assert lines[3] == "checked:  1.5s ago by monitor m1"
    assert lines[-1] == "  - consumer intake degraded: 20 pending (>= 10)"
    local = render(Gathered(summary=summary, source="local", reports=2), NOW)
    assert "from 2 live report(s): no monitor is running" in local[3]
