"""Pure tests of runner-record transitions and the liveness judgement (no NATS)."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    JobRecord,
    JobState,
    JobSubmission,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from valkyrie.domain.lifecycle import (
    DEREGISTER_RETRY_MS,
    HEARTBEAT_PERSIST_MS,
    Judgement,
    LivenessFacts,
    Refusal,
    assign_slot,
    deregistration_refusal,
    dispatch_job,
    from_other_session,
    heartbeat_needs_write,
    holding_refusal,
    judge_liveness,
    last_seen,
    mark_lost,
    new_runner,
    not_held,
    pass_on_time,
    release_slot,
    reregister,
    runner_state,
    set_drain,
    should_forget,
    touch,
)

NOW = 1_700_000_000_000


def registration(
    rid: str = "r1", session: str | None = "s1", capacity: int = 2
) -> RunnerRegistration:
    return RunnerRegistration(runner_id=rid, session_id=session, max_concurrent_jobs=capacity)


def record(
    rid: str = "r1",
    *,
    session: str | None = "s1",
    capacity: int = 2,
    assigned: dict[str, int] | None = None,
    heard_at_ms: int = NOW,
    state: RunnerState | None = None,
    drain: bool = False,
) -> RunnerRecord:
    rec = msgspec.structs.replace(
        new_runner(registration(rid, session, capacity), now_ms=NOW - 60_000),
        last_heartbeat_at_ms=heard_at_ms,
        assigned_jobs=dict(assigned or {}),
        drain_requested=drain,
    )
    return msgspec.structs.replace(rec, state=state or runner_state(rec))


def beat(
    rid: str = "r1",
    *,
    session: str | None = "s1",
    load: float = 0.5,
    running: list[str] | None = None,
) -> RunnerHeartbeat:
    return RunnerHeartbeat(
        runner_id=rid, sent_at_ms=NOW, load=load, running_jobs=running or [], session_id=session
    )


def job_on(rid: str, job_id: str = "j1") -> JobRecord:
    queued = JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=msgspec.convert({"job_type": "shell"}, JobSubmission),
        submitted_at_ms=NOW,
        updated_at_ms=NOW,
    )
    return dispatch_job(queued, rid, now_ms=NOW)


# -- registration ---------------------------------------------------------------------------------


def test_a_new_runner_is_active_and_heard_now() -> None:
    rec = new_runner(registration(), now_ms=NOW)
    assert (rec.state, rec.registered_at_ms, rec.last_heartbeat_at_ms) == (
        RunnerState.ACTIVE,
        NOW,
        NOW,
    )
    assert rec.assigned_jobs == {}


def test_reregistering_the_same_session_keeps_its_jobs() -> None:
    old = record(assigned={"j1": 1, "j2": 3}, heard_at_ms=NOW - 9000, state=RunnerState.OFFLINE)
    again = reregister(old, registration(capacity=2), now_ms=NOW)
    assert again.abandon == {}
    assert again.record.assigned_jobs == {"j1": 1, "j2": 3}
    assert again.record.last_heartbeat_at_ms == NOW
    assert again.record.state == RunnerState.BUSY  # back, and full


def test_a_new_session_is_a_restart_that_abandons_everything_held() -> None:
    old = record(assigned={"j1": 1, "j2": 3}, drain=True)
    restarted = reregister(old, registration(session="s2", capacity=4), now_ms=NOW)
    assert restarted.abandon == {"j1": 1, "j2": 3}
    # the slots go one by one with each take-back, not all at once here
    assert restarted.record.assigned_jobs == {"j1": 1, "j2": 3}
    assert restarted.record.registration.session_id == "s2"
    assert restarted.record.state == RunnerState.DRAINING  # a drain request outlives a restart
    # a runner without session ids cannot tell a restart from a refresh: count it as one
    assert reregister(
        record(session=None, assigned={"j1": 1}), registration(session=None), now_ms=NOW
    ).abandon == {"j1": 1}


# -- heartbeats ------------------------------------------------------------------------------------


def test_heartbeats_of_another_session_are_ignored() -> None:
    rec = record(session="s1")
    assert from_other_session(rec, "s0")
    assert not from_other_session(rec, "s1")
    assert not from_other_session(rec, None)  # an SDK without sessions
    assert not from_other_session(record(session=None), "s9")
    assert touch(rec, beat(session="s0"), now_ms=NOW) is None


def test_a_heartbeat_is_written_only_when_it_changes_something_or_now_and_then() -> None:
    assert not heartbeat_needs_write(record(heard_at_ms=NOW - HEARTBEAT_PERSIST_MS + 1), now_ms=NOW)
    assert heartbeat_needs_write(record(heard_at_ms=NOW - HEARTBEAT_PERSIST_MS), now_ms=NOW)
    assert heartbeat_needs_write(record(state=RunnerState.OFFLINE), now_ms=NOW)


def test_touch_refreshes_the_record_and_brings_a_lost_runner_back() -> None:
    rec = record(heard_at_ms=NOW - 7000, assigned={"j1": 1})
    touched = touch(rec, beat(load=0.75), now_ms=NOW)
    assert touched is not None
    assert not touched.back_online
    assert (touched.record.last_heartbeat_at_ms, touched.record.load) == (NOW, 0.75)
    assert touched.record.state == RunnerState.ACTIVE

    lost = record(state=RunnerState.OFFLINE, assigned={"j1": 1, "j2": 1})
    back = touch(lost, beat(), now_ms=NOW)
    assert back is not None
    assert back.back_online
    assert back.record.state == RunnerState.BUSY
    # the shown time never goes backwards (clocks of registry processes differ a little)
    later = record(heard_at_ms=NOW + 50)
    again = touch(later, beat(), now_ms=NOW)
    assert again is not None
    assert again.record.last_heartbeat_at_ms == NOW + 50


def test_jobs_a_runner_runs_but_no_longer_holds_are_to_abandon() -> None:
    rec = record(assigned={"j1": 1})
    assert not_held(beat(running=["j1", "j2", "j3"]), rec) == ["j2", "j3"]
    assert not_held(beat(running=["j1"]), rec) == []


# -- drain, loss, leaving ----------------------------------------------------------------------------


def test_drain_and_undrain() -> None:
    rec = record(assigned={"j1": 1, "j2": 1})
    drained = set_drain(rec, True)
    assert drained is not None
    assert drained.state == RunnerState.DRAINING
    assert set_drain(drained, True) is None
    undrained = set_drain(drained, False)
    assert undrained is not None
    assert undrained.state == RunnerState.BUSY
    assert assign_slot(drained, "j3", 1) is None


def test_mark_lost_only_a_runner_still_silent() -> None:
    rec = record(heard_at_ms=NOW - 9000, assigned={"j1": 1})
    lost = mark_lost(rec, last_seen_ms=NOW - 9000)
    assert lost is not None
    assert lost.state == RunnerState.OFFLINE
    assert lost.assigned_jobs == {"j1": 1}  # taken back job by job afterwards
    assert mark_lost(lost, last_seen_ms=NOW) is None
    # a heartbeat recorded after the judgement: not silent after all
    assert mark_lost(record(heard_at_ms=NOW - 100), last_seen_ms=NOW - 9000) is None


def test_an_offline_runner_is_forgotten_once_empty_and_gone_long_enough() -> None:
    gone = record(state=RunnerState.OFFLINE)
    assert should_forget(gone, last_seen_ms=NOW - 1001, now_ms=NOW, retention_ms=1000)
    assert not should_forget(gone, last_seen_ms=NOW - 1000, now_ms=NOW, retention_ms=1000)
    holding = record(state=RunnerState.OFFLINE, assigned={"j1": 1})
    assert not should_forget(holding, last_seen_ms=0, now_ms=NOW, retention_ms=1000)
    assert not should_forget(record(), last_seen_ms=0, now_ms=NOW, retention_ms=1000)


def test_only_the_latest_session_may_deregister() -> None:
    assert deregistration_refusal(None, "r1", "s1") == Refusal("no runner 'r1'")
    newer = Refusal("a newer session of this runner is registered")
    assert deregistration_refusal(record(session="s2"), "r1", "s1") == newer
    assert deregistration_refusal(record(session="s1"), "r1", "s1") is None
    assert deregistration_refusal(record(session=None), "r1", "anything") is None


def test_a_runner_holding_jobs_may_not_leave_yet() -> None:
    slots = {"j1": 1, "j2": 1, "j3": 1}
    elsewhere = dispatch_job(job_on("r1", "j2"), "r2", now_ms=NOW)  # attempt 2, on r2
    jobs = {"j1": job_on("r1", "j1"), "j2": elsewhere, "j3": None}
    assert holding_refusal(slots, "r1", jobs) == Refusal(
        "it still holds 1 job(s)", DEREGISTER_RETRY_MS
    )
    # orphans and releases on their way go with the record
    assert holding_refusal({"j2": 1, "j3": 1}, "r1", jobs) is None
    # a slot whose job was not read counts as held
    assert holding_refusal({"j9": 1}, "r1", {}) is not None


# -- runner records under any sequence of transitions --------------------------------------------

transitions = st.lists(
    st.one_of(
        st.tuples(st.just("beat"), st.sampled_from(["s1", "s2", None]), st.integers(-3000, 3000)),
        st.tuples(st.just("drain"), st.booleans(), st.just(0)),
        st.tuples(st.just("lose"), st.integers(-9000, 0), st.just(0)),
        st.tuples(st.just("assign"), st.integers(0, 5), st.integers(1, 2)),
        st.tuples(st.just("release"), st.integers(0, 5), st.integers(1, 2)),
        st.tuples(st.just("register"), st.sampled_from(["s1", "s2"]), st.just(0)),
    ),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(ops=transitions)
def test_runner_records_stay_consistent(ops: list[tuple[str, object, int]]) -> None:
    rec = record(capacity=3)
    for op, arg, n in ops:
        before = rec
        new: RunnerRecord | None
        if op == "beat":
            touched = touch(
                rec, beat(session=arg if isinstance(arg, str) else None), now_ms=NOW + n
            )
            if touched is not None:
                assert touched.back_online == (before.state == RunnerState.OFFLINE)
            new = touched.record if touched is not None else None
        elif op == "drain":
            new = set_drain(rec, bool(arg))
        elif op == "lose":
            assert isinstance(arg, int)
            new = mark_lost(rec, last_seen_ms=NOW + arg)
        elif op == "assign":
            new = assign_slot(rec, f"j{arg}", n)
        elif op == "release":
            new = release_slot(rec, f"j{arg}", n)
        else:
            again = reregister(rec, registration(session=str(arg), capacity=3), now_ms=NOW)
            if before.registration.session_id == arg:
                assert again.abandon == {}
            else:
                assert again.abandon == before.assigned_jobs
            new = again.record
        rec = new if new is not None else rec
        # offline is set only by a loss, and only a heartbeat or a registration clears it
        if rec.state == RunnerState.OFFLINE and before.state != RunnerState.OFFLINE:
            assert op == "lose"
        if before.state == RunnerState.OFFLINE and rec.state != RunnerState.OFFLINE:
            assert op in ("beat", "register")
        if rec.state != RunnerState.OFFLINE:
            assert rec.state == runner_state(rec)
        assert len(rec.assigned_jobs) <= rec.registration.max_concurrent_jobs
        if op == "beat":
            assert rec.last_heartbeat_at_ms >= before.last_heartbeat_at_ms


# -- the liveness judgement ---------------------------------------------------------------------------


def facts(**kw: object) -> LivenessFacts:
    fields: dict[str, object] = {
        "now_ms": NOW,
        "lost_after_ms": 3000,
        "listening_since_ms": NOW - 60_000,
    }
    fields.update(kw)
    return LivenessFacts(**fields)  # type: ignore[arg-type]


def test_last_seen_is_the_latest_sign_of_life() -> None:
    rec = record(heard_at_ms=NOW - 5000)
    assert last_seen(rec, heard_ms=None, listening_since_ms=0) == NOW - 5000
    assert last_seen(rec, heard_ms=NOW - 10, listening_since_ms=0) == NOW - 10
    # a judge that just started (or reconnected) counts from then: a grace period
    assert last_seen(rec, heard_ms=None, listening_since_ms=NOW - 1) == NOW - 1


@pytest.mark.parametrize(
    ("since_s", "interval_ms", "on_time"),
    [(0.1, 100, True), (0.7, 100, True), (0.71, 100, False), (2.5, 1000, True), (2.6, 1000, False)],
)
def test_a_late_pass_is_a_starved_one(since_s: float, interval_ms: int, on_time: bool) -> None:
    assert pass_on_time(since_s, interval_ms) is on_time


def test_judging_the_silent_runners() -> None:
    records = {
        "quiet": record("quiet", heard_at_ms=NOW - 3001),
        "fresh": record("fresh", heard_at_ms=NOW - 3000),
        "gone": record("gone", heard_at_ms=NOW - 99_000, state=RunnerState.OFFLINE),
        "heard": record("heard", heard_at_ms=NOW - 9000),
    }
    heard = {"heard": NOW - 200}
    # someone looks silent: read the heartbeats waiting first
    assert judge_liveness(records, facts(heard=heard)) == Judgement(catch_up=True)
    assert judge_liveness(records, facts(heard=heard, caught_up=True)) == Judgement(
        lost={"quiet": NOW - 3001}
    )
    # could not catch up (the server did not answer): judge nobody this pass
    assert judge_liveness(records, facts(heard=heard, caught_up=False)) == Judgement()
    # a late pass judges nobody and does not even ask to catch up
    assert judge_liveness(records, facts(heard=heard, on_time=False)) == Judgement()
    # the judge's own grace period
    assert judge_liveness(records, facts(heard=heard, listening_since_ms=NOW - 1000)) == Judgement()
    # nobody silent: nothing to catch up with
    assert judge_liveness({"fresh": records["fresh"]}, facts()) == Judgement()


states = st.sampled_from(list(RunnerState))


@settings(max_examples=300, deadline=None)
@given(
    runners=st.dictionaries(
        st.sampled_from([f"r{n}" for n in range(8)]),
        st.tuples(states, st.integers(-20_000, 0), st.one_of(st.none(), st.integers(-20_000, 0))),
        max_size=8,
    ),
    lost_after=st.integers(100, 10_000),
    since=st.integers(-30_000, 0),
    later=st.integers(0, 10_000),
)
def test_liveness_judgement_properties(
    runners: dict[str, tuple[RunnerState, int, int | None]], lost_after: int, since: int, later: int
) -> None:
    records = {
        rid: record(rid, heard_at_ms=NOW + at, state=state)
        for rid, (state, at, _) in runners.items()
    }
    heard = {rid: NOW + h for rid, (_, _, h) in runners.items() if h is not None}
    base = facts(lost_after_ms=lost_after, listening_since_ms=NOW + since, heard=heard)
    silent = {
        rid
        for rid, rec in records.items()
        if rec.state != RunnerState.OFFLINE
        and NOW - last_seen(rec, heard_ms=heard.get(rid), listening_since_ms=NOW + since)
        > lost_after
    }
    first = judge_liveness(records, base)
    assert first.lost == {}
    assert first.catch_up == bool(silent)
    verdict = judge_liveness(records, replace(base, caught_up=True))
    assert set(verdict.lost) == silent
    for rid, seen in verdict.lost.items():
        assert records[rid].state != RunnerState.OFFLINE
        assert NOW - seen > lost_after
    # silence only grows: whoever is lost now is lost later too
    later_verdict = judge_liveness(records, replace(base, now_ms=NOW + later, caught_up=True))
    assert set(verdict.lost) <= set(later_verdict.lost)
    # a late pass judges nobody, whatever it knows
    assert judge_liveness(records, replace(base, caught_up=True, on_time=False)) == Judgement()
