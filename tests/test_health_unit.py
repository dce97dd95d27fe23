"""Health evaluation without NATS: thresholds, the summary, transitions, fallback decisions."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    HEALTH_STATUSES,
    CheckResult,
    ConfigRevision,
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
    AUTO_ACTOR,
    CONSUMER_LAG_COMPONENT,
    FORGET_AFTER_STALE,
    RUNNER_POOL_COMPONENT,
    FallbackAction,
    RecordFate,
    Seen,
    Streak,
    component_statuses,
    decide_fallback,
    evaluate_consumer,
    instance_health,
    is_automatic_fallback,
    kv_latency_check,
    last_mode_change,
    reconcile_record,
    restore_target,
    runner_pool,
    should_forget,
    summarize,
    threshold_status,
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


def revision(number: int, by: str, diff: dict[str, object]) -> ConfigRevision:
    return ConfigRevision(revision=number, at_ms=NOW, changed_by=by, values={}, diff=diff)


def fallback_change(number: int = 5, by: str = AUTO_ACTOR, old: str = "full") -> ConfigRevision:
    return revision(number, by, {"mode": {"old": old, "new": "fallback"}})


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


def test_runner_pool_counts_everything_not_offline() -> None:
    pool = runner_pool(["active", "busy", "draining", "offline", "offline"], 2)
    assert pool == RunnerPool(
        total=5, available=3, active=1, busy=1, draining=1, offline=2, min_active=2
    )
    assert runner_pool(["active", "offline"], 2).status == "degraded"
    assert runner_pool([], 0).status == "healthy"


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
    assert few_runners.reasons == ["runner pool degraded: 1 available, minimum 2"]

    stalled = summary_of(seen={"i9": Seen(report("results", "i9"), NOW - 5000)})
    assert stalled.status == "unhealthy"
    assert stalled.reasons[0].startswith("results (i9) unhealthy: liveness: stalled")


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
        RUNNER_POOL_COMPONENT: "degraded",
    }
    assert summary.status == "unhealthy"


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


# -- the fallback state machine -----------------------------------------------------------------


def test_streak_counts_consecutive_evaluations() -> None:
    s = Streak()
    failing: list[HealthStatus] = ["degraded", "unhealthy", "degraded"]
    for status in failing:
        s = s.observe(status)
    assert s == Streak(failing=3, healthy=0)
    s = s.observe("healthy")
    assert s == Streak(failing=0, healthy=1)
    assert s.observe("degraded") == Streak(failing=1, healthy=0)


def _decide(
    streak: Streak,
    mode: str = "full",
    *,
    auto: bool = True,
    automatic: bool = False,
    held: bool = False,
) -> FallbackAction:
    return decide_fallback(
        streak, mode=mode, auto_fallback=auto, automatic=automatic, held=held, health=H
    )


def test_falls_back_after_failure_threshold_from_full_or_hybrid() -> None:
    assert _decide(Streak(failing=2)) is FallbackAction.NONE
    assert _decide(Streak(failing=3)) is FallbackAction.FALLBACK
    assert _decide(Streak(failing=7), "hybrid") is FallbackAction.FALLBACK
    for mode in ("fallback", "compatibility", "disabled"):
        assert _decide(Streak(failing=9), mode) is FallbackAction.NONE


def test_never_acts_with_auto_fallback_off_or_while_held() -> None:
    assert _decide(Streak(failing=9), auto=False) is FallbackAction.NONE
    assert _decide(Streak(failing=9), held=True) is FallbackAction.NONE
    assert _decide(Streak(healthy=9), "fallback", auto=False, automatic=True) is (
        FallbackAction.NONE
    )


def test_recovers_only_its_own_fallback_after_recovery_threshold() -> None:
    assert _decide(Streak(healthy=1), "fallback", automatic=True) is FallbackAction.NONE
    assert _decide(Streak(healthy=2), "fallback", automatic=True) is FallbackAction.RECOVER
    assert _decide(Streak(healthy=9), "fallback", automatic=False) is FallbackAction.NONE
    assert _decide(Streak(healthy=9), "full", automatic=True) is FallbackAction.NONE


def test_state_machine_run() -> None:
    """Degraded x3 -> fallback; healthy x2 -> recover; the streak restarts after each switch."""
    streak, mode, automatic = Streak(), "full", False
    actions = []
    degraded: HealthStatus = "degraded"
    healthy: HealthStatus = "healthy"
    statuses = [degraded] * 4 + [healthy, degraded] + [healthy] * 3
    for status in statuses:
        streak = streak.observe(status)
        action = _decide(streak, mode, automatic=automatic)
        actions.append(action)
        if action is FallbackAction.FALLBACK:
            mode, automatic, streak = "fallback", True, Streak()
        elif action is FallbackAction.RECOVER:
            mode, automatic, streak = "full", False, Streak()
    assert [a.value for a in actions] == [
        "none",
        "none",
        "fallback",
        "none",
        "none",
        "none",
        "none",
        "recover",
        "none",
    ]
    assert mode == "full"


# -- who set the mode ----------------------------------------------------------------------------


def test_last_mode_change_skips_revisions_that_left_the_mode_alone() -> None:
    history = [
        revision(1, "ops", {"dispatch.accept_timeout_ms": {"old": 5000, "new": 2000}}),
        fallback_change(2),
        revision(3, "ops", {"health.min_active_runners": {"old": 0, "new": 1}}),
    ]
    found = last_mode_change(history)
    assert found is not None
    assert found.revision == 2
    assert last_mode_change(history[:1]) is None
    assert last_mode_change([]) is None


def test_is_automatic_fallback() -> None:
    assert is_automatic_fallback("fallback", None, fallback_change())
    assert not is_automatic_fallback("full", record(), fallback_change())
    assert not is_automatic_fallback("fallback", record(), fallback_change(by="cli:alice"))
    # the fallback revision is older than the kept history: only an active record vouches for it
    assert is_automatic_fallback("fallback", record(), None)
    assert not is_automatic_fallback("fallback", record(state="overridden"), None)
    assert not is_automatic_fallback("fallback", None, None)


def test_reconcile_record() -> None:
    assert reconcile_record(None, mode="full", change=None, config_revision=3) is RecordFate.KEEP
    ours = record(config_revision=5)
    assert (
        reconcile_record(ours, mode="fallback", change=fallback_change(5), config_revision=5)
        is RecordFate.KEEP
    )
    # written by a monitor ahead of this one: this process has not applied revision 5 yet
    assert reconcile_record(ours, mode="full", change=None, config_revision=4) is RecordFate.KEEP
    operator = revision(6, "cli:alice", {"mode": {"old": "fallback", "new": "full"}})
    assert (
        reconcile_record(ours, mode="full", change=operator, config_revision=6)
        is RecordFate.OVERRIDDEN
    )
    by_hand = fallback_change(6, by="cli:alice")
    assert (
        reconcile_record(ours, mode="fallback", change=by_hand, config_revision=6)
        is RecordFate.OVERRIDDEN
    )
    recovered = revision(6, AUTO_ACTOR, {"mode": {"old": "fallback", "new": "full"}})
    assert (
        reconcile_record(ours, mode="full", change=recovered, config_revision=6)
        is RecordFate.FORGET
    )
    held = record(state="overridden")
    assert reconcile_record(held, mode="full", change=operator, config_revision=6) is (
        RecordFate.KEEP
    )


def test_restore_target() -> None:
    assert restore_target(record(previous_mode="hybrid", previous_override=True), None, "full") == (
        "hybrid",
        "hybrid",
    )
    # the mode came from the processes' own config: remove the override instead of pinning it
    assert restore_target(record(previous_mode="full"), None, "full") == (None, "full")
    assert restore_target(None, fallback_change(old="hybrid"), "full") == ("hybrid", "hybrid")
    assert restore_target(None, None, "full") == (None, "full")


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
