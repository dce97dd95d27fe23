"""Automatic fallback without NATS: when to switch, whose fallback it is, what to restore."""

from __future__ import annotations

from schemas import ConfigRevision, FallbackRecord, HealthStatus, HealthSummary
from valkyrie.config.model import HealthConfig
from valkyrie.domain.fallback import (
    AUTO_ACTOR,
    FallbackAction,
    RecordFate,
    Streak,
    decide_fallback,
    fallback_reason,
    fallback_record,
    is_automatic_fallback,
    last_mode_change,
    may_fall_back_from,
    needs_mode_history,
    reconcile_record,
    recovery_reason,
    restore_target,
)

H = HealthConfig(failure_threshold=3, recovery_threshold=2)
NOW = 1_000_000


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


# -- what the monitor records ----------------------------------------------------------------------


def test_only_full_and_hybrid_fall_back() -> None:
    assert may_fall_back_from("full")
    assert may_fall_back_from("hybrid")
    for mode in ("fallback", "compatibility", "disabled"):
        assert not may_fall_back_from(mode)


def test_the_history_is_read_only_to_judge_a_fallback() -> None:
    assert needs_mode_history("fallback", None)
    assert needs_mode_history("full", record())  # a record of a fallback an operator undid
    assert not needs_mode_history("full", None)
    assert not needs_mode_history("hybrid", record(state="overridden"))


def test_fallback_record_remembers_how_to_restore_the_mode() -> None:
    pinned = fallback_record("hybrid", {"mode": "hybrid"}, 7, NOW, "why", "m1")
    assert pinned == FallbackRecord(
        previous_mode="hybrid",
        previous_override=True,
        config_revision=7,
        at_ms=NOW,
        reason="why",
        monitor="m1",
    )
    assert restore_target(pinned, None, "full") == ("hybrid", "hybrid")
    own = fallback_record("full", {"dispatch.max_queue_scan": 10}, 7, NOW, "why", "m1")
    assert not own.previous_override
    assert restore_target(own, None, "full") == (None, "full")


def test_reasons_name_the_status_the_count_and_the_causes() -> None:
    summary = HealthSummary(status="degraded", at_ms=NOW, mode="full", reasons=["a", "b", "c", "d"])
    assert fallback_reason(summary, Streak(failing=3)) == (
        "automatic fallback: overall degraded for 3 consecutive evaluations: a; b; c"
    )
    bare = HealthSummary(status="unhealthy", at_ms=NOW, mode="full")
    assert fallback_reason(bare, Streak(failing=4)).endswith("4 consecutive evaluations: unhealthy")
    assert recovery_reason(Streak(healthy=2), "hybrid") == (
        "automatic recovery: healthy for 2 consecutive evaluations; back to hybrid"
    )
