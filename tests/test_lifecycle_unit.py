"""Pure tests of the job lifecycle, the retry policy, slot accounting and placement (no NATS)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    TERMINAL_STATES,
    JobAccepted,
    JobFinished,
    JobRecord,
    JobResult,
    JobStarted,
    JobState,
    JobSubmission,
    JobUpdate,
    RetryPolicy,
    RoutingHints,
    RunnerCapabilities,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from valkyrie.domain.lifecycle import (
    INFRA_OUTCOMES,
    JOB_OUTCOMES,
    MAX_REFUSALS,
    UpdateOutcome,
    apply_update,
    assign_slot,
    backoff_ms,
    dispatch_job,
    finish_job,
    is_on,
    release_slot,
    requeue_job,
    retry_after_failure,
    runner_state,
)
from valkyrie.domain.scheduling.placement import ScoreWeights, check_runner, place, score_runner

NOW = 1_700_000_000_000
RANK = {JobState.QUEUED: 0, JobState.DISPATCHED: 1, JobState.ACCEPTED: 2, JobState.RUNNING: 3}
OUTCOMES = ["succeeded", "failed", "timed_out", "cancelled", "error", "rejected"]


def rank(state: JobState) -> int:
    return 10 if state in TERMINAL_STATES else RANK[state]


def queued(job_id: str = "j1", policy: RetryPolicy | None = None, **spec: object) -> JobRecord:
    submission = msgspec.convert({"job_type": "shell", **spec}, JobSubmission)
    submission = msgspec.structs.replace(submission, retry_policy=policy)
    return JobRecord(
        id=job_id, state=JobState.QUEUED, spec=submission, submitted_at_ms=NOW, updated_at_ms=NOW
    )


def runner(
    rid: str = "r1",
    *,
    capacity: int = 2,
    job_types: tuple[str, ...] = ("shell",),
    assigned: dict[str, int] | None = None,
    drain: bool = False,
    offline: bool = False,
    heartbeat_at_ms: int = NOW,
    labels: dict[str, str] | None = None,
    success_rate: float = 1.0,
) -> RunnerRecord:
    record = RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(job_types=list(job_types)),
            max_concurrent_jobs=capacity,
            labels=dict(labels or {}),
        ),
        state=RunnerState.ACTIVE,
        registered_at_ms=NOW - 10_000,
        last_heartbeat_at_ms=heartbeat_at_ms,
        assigned_jobs=dict(assigned or {}),
        drain_requested=drain,
    )
    record = msgspec.structs.replace(
        record, stats=msgspec.structs.replace(record.stats, success_rate=success_rate)
    )
    state = RunnerState.OFFLINE if offline else runner_state(record)
    return msgspec.structs.replace(record, state=state)


def finished(
    record: JobRecord, outcome: str = "succeeded", *, attempt: int | None = None, rid: str = ""
) -> JobFinished:
    return JobFinished(
        job_id=record.id,
        attempt=attempt if attempt is not None else record.attempt,
        runner_id=rid or record.runner_id or "r1",
        at_ms=NOW,
        outcome=outcome,  # type: ignore[arg-type]
        result=JobResult(exit_code=0 if outcome == "succeeded" else 1),
    )


# -- slot accounting ------------------------------------------------------------------------------

slot_ops = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), st.integers(0, 7), st.integers(1, 3)),
        st.tuples(st.just("release"), st.integers(0, 7), st.one_of(st.none(), st.integers(1, 3))),
        st.tuples(st.just("drain"), st.booleans(), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 5), ops=slot_ops)
def test_assign_slot_never_exceeds_capacity(
    capacity: int, ops: list[tuple[str, object, object]]
) -> None:
    rec = runner(capacity=capacity)
    for op, a, b in ops:
        if op == "assign":
            assert isinstance(a, int)
            assert isinstance(b, int)
            job_id, before = f"j{a}", rec
            new = assign_slot(rec, job_id, b)
            if new is None:
                held = before.assigned_jobs.get(job_id)
                assert (
                    (held is not None and held != b)
                    or before.drain_requested
                    or len(before.assigned_jobs) >= capacity
                )
            else:
                assert new.assigned_jobs[job_id] == b
                if job_id not in before.assigned_jobs:
                    assert not before.drain_requested
                    assert len(before.assigned_jobs) < capacity
                rec = new
        elif op == "release":
            assert isinstance(a, int)
            attempt = b if isinstance(b, int) else None
            held = rec.assigned_jobs.get(f"j{a}")
            new = release_slot(rec, f"j{a}", attempt)
            if held is None or (attempt is not None and held != attempt):
                assert new is None
            else:
                assert new is not None
                assert f"j{a}" not in new.assigned_jobs
                rec = new
        else:
            rec = msgspec.structs.replace(rec, drain_requested=bool(a))
            rec = msgspec.structs.replace(rec, state=runner_state(rec))
        assert len(rec.assigned_jobs) <= capacity
        assert rec.state == runner_state(rec)


def test_assign_slot_refuses_offline_and_draining_runners() -> None:
    assert assign_slot(runner(offline=True), "j1", 1) is None
    assert assign_slot(runner(drain=True), "j1", 1) is None
    full = runner(capacity=1, assigned={"j0": 1})
    assert full.state == RunnerState.BUSY
    assert assign_slot(full, "j1", 1) is None
    # the same reservation again is a no-op, another attempt of the same job is not
    assert assign_slot(full, "j0", 1) == full
    assert assign_slot(full, "j0", 2) is None


def test_release_slot_counts_the_outcome_once_and_only_for_its_attempt() -> None:
    rec = runner(capacity=2, assigned={"j1": 2})
    assert release_slot(rec, "j1", 1, succeeded=True) is None  # an older attempt holds nothing
    freed = release_slot(rec, "j1", 2, succeeded=False, accept_latency_ms=40.0)
    assert freed is not None
    assert freed.assigned_jobs == {}
    assert freed.stats.jobs_failed == 1
    assert freed.stats.recent_failures == 1
    assert freed.stats.accept_latency_ms == 40.0
    assert release_slot(freed, "j1", 2, succeeded=False) is None


def test_runner_state_offline_after_silence() -> None:
    rec = runner(heartbeat_at_ms=NOW - 5000)
    assert runner_state(rec) == RunnerState.ACTIVE
    assert runner_state(rec, now_ms=NOW, lost_after_ms=3000) == RunnerState.OFFLINE
    assert runner_state(rec, now_ms=NOW, lost_after_ms=6000) == RunnerState.ACTIVE


# -- applying runners' updates --------------------------------------------------------------------

updates = st.lists(
    st.tuples(
        st.sampled_from(["accepted", "started", "finished"]),
        st.sampled_from(OUTCOMES),
        st.integers(-1, 1),  # attempt relative to the record's
        st.sampled_from(["r1", "r2"]),
    ),
    max_size=40,
)


def _make(record: JobRecord, kind: str, outcome: str, delta: int, rid: str) -> JobUpdate:
    attempt = max(1, record.attempt + delta)
    if kind == "accepted":
        return JobAccepted(job_id=record.id, attempt=attempt, runner_id=rid, at_ms=NOW)
    if kind == "started":
        return JobStarted(job_id=record.id, attempt=attempt, runner_id=rid, at_ms=NOW)
    return finished(record, outcome, attempt=attempt, rid=rid)


@settings(max_examples=400, deadline=None)
@given(
    steps=updates,
    retry_on_exit_code=st.booleans(),
    max_attempts=st.integers(1, 4),
)
def test_apply_update_never_moves_a_state_backwards(
    steps: list[tuple[str, str, int, str]], retry_on_exit_code: bool, max_attempts: int
) -> None:
    policy = RetryPolicy(
        max_attempts=max_attempts, retry_on_exit_code=retry_on_exit_code, initial_backoff_ms=0
    )
    record = dispatch_job(queued(policy=policy), "r1", now_ms=NOW)
    for n, (kind, outcome, delta, rid) in enumerate(steps):
        update = _make(record, kind, outcome, delta, rid)
        result = apply_update(record, update, now_ms=NOW + n, jitter=lambda: 0.0)
        current = update.attempt == record.attempt and update.runner_id == record.runner_id
        if result.outcome in (UpdateOutcome.STALE, UpdateOutcome.ALREADY):
            assert result.record is None
            if not current:
                assert result.outcome == UpdateOutcome.STALE
            continue
        assert current, "an update of another attempt or runner must never be applied"
        assert record.state not in TERMINAL_STATES, "a terminal job never changes again"
        new = result.record
        assert new is not None
        assert new.attempt == record.attempt
        assert len(new.attempts) == len(record.attempts)
        if result.outcome == UpdateOutcome.REQUEUE:
            assert new.state == JobState.QUEUED
            assert new.runner_id is None
            assert new.attempts[-1].ended_at_ms is not None
            # place it again on some runner: a new attempt begins
            record = dispatch_job(new, rid, now_ms=NOW + n)
            assert record.attempt == new.attempt + 1
        else:
            assert rank(new.state) >= rank(record.state)
            record = new


def test_late_update_of_a_taken_back_attempt_is_stale() -> None:
    first = dispatch_job(queued(), "r1", now_ms=NOW)
    running = apply_update(
        first, JobStarted(job_id="j1", attempt=1, runner_id="r1", at_ms=NOW), now_ms=NOW
    ).record
    assert running is not None
    assert running.state == JobState.RUNNING
    taken = requeue_job(running, now_ms=NOW + 1, reason="lost", outcome="runner_lost")
    # while queued, the old runner's result is refused
    late = apply_update(taken, finished(running), now_ms=NOW + 2)
    assert late.outcome == UpdateOutcome.STALE
    second = dispatch_job(taken, "r2", now_ms=NOW + 3)
    done = apply_update(second, finished(second), now_ms=NOW + 4).record
    assert done is not None
    assert done.state == JobState.SUCCEEDED
    # after the newer attempt's result, the old one is still refused and changes nothing
    for old in (finished(running), finished(running, "failed")):
        verdict = apply_update(done, old, now_ms=NOW + 5)
        assert verdict.outcome == UpdateOutcome.STALE
        assert verdict.record is None
    # the current attempt's result, delivered again, is recognised as a redelivery
    assert apply_update(done, finished(second), now_ms=NOW + 6).outcome == UpdateOutcome.ALREADY


def test_redelivered_result_that_requeued_the_job_is_not_stale() -> None:
    """A crash after a failed attempt was re-queued, before it was announced, must be repaired by
    the redelivery of that same update (otherwise the job stays queued and nobody places it)."""
    policy = RetryPolicy(max_attempts=3, retry_on_exit_code=True, initial_backoff_ms=10)
    record = dispatch_job(queued(policy=policy), "r1", now_ms=NOW)
    failed = finished(record, "failed")
    first = apply_update(record, failed, now_ms=NOW + 1)
    assert first.outcome == UpdateOutcome.REQUEUE
    assert first.record is not None
    again = apply_update(first.record, failed, now_ms=NOW + 2)
    assert again.outcome == UpdateOutcome.ALREADY
    # but another runner's (or another outcome's) update for that attempt is still refused
    assert apply_update(first.record, finished(record, "failed", rid="r2"), now_ms=NOW).outcome == (
        UpdateOutcome.STALE
    )
    assert (
        apply_update(first.record, finished(record, "succeeded"), now_ms=NOW).outcome
        == UpdateOutcome.STALE
    )


# -- retry policy ---------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    max_attempts=st.integers(1, 5),
    retry_on_exit_code=st.booleans(),
    outcomes=st.lists(
        st.sampled_from(sorted(INFRA_OUTCOMES | JOB_OUTCOMES | {"rejected"})),
        min_size=1,
        max_size=30,
    ),
)
def test_retry_after_failure_never_exceeds_max_attempts(
    max_attempts: int, retry_on_exit_code: bool, outcomes: list[str]
) -> None:
    policy = RetryPolicy(
        max_attempts=max_attempts, retry_on_exit_code=retry_on_exit_code, initial_backoff_ms=100
    )
    counted_outcomes = INFRA_OUTCOMES | (JOB_OUTCOMES if retry_on_exit_code else frozenset())
    record = queued(policy=policy)
    for n, outcome in enumerate(outcomes):
        record = dispatch_job(record, "r1", now_ms=NOW + n)
        record = retry_after_failure(
            record, outcome, now_ms=NOW + n, reason=outcome, jitter=lambda: 1.0
        )
        counted = sum(1 for a in record.attempts if a.outcome in counted_outcomes)
        refusals = sum(1 for a in record.attempts if a.outcome == "rejected")
        assert counted <= max_attempts
        assert refusals <= MAX_REFUSALS
        assert all(a.ended_at_ms is not None for a in record.attempts)
        if record.state in TERMINAL_STATES:
            assert record.finished_at_ms == NOW + n
            if outcome in JOB_OUTCOMES and not retry_on_exit_code:
                assert counted <= max_attempts  # the job's own failure ends it at once
            elif outcome != "rejected":
                assert counted == max_attempts
                assert record.reason is not None
                assert "retries exhausted" in record.reason
            break
        assert record.state == JobState.QUEUED
        assert record.runner_id is None
        if outcome == "runner_lost" or outcome == "rejected":
            assert record.not_before_at_ms is None  # at once
        else:
            assert record.not_before_at_ms is not None
            assert record.not_before_at_ms > NOW + n


def test_default_policy_does_not_retry_a_failed_exit() -> None:
    record = dispatch_job(queued(), "r1", now_ms=NOW)
    done = retry_after_failure(record, "failed", now_ms=NOW, reason="exit code 1")
    assert done.state == JobState.FAILED
    assert len(done.attempts) == 1


def test_cancel_requested_is_never_retried() -> None:
    record = msgspec.structs.replace(
        dispatch_job(queued(), "r1", now_ms=NOW), cancel_requested=True
    )
    done = retry_after_failure(record, "runner_lost", now_ms=NOW, reason="lost")
    assert done.state == JobState.CANCELLED
    assert done.reason == "cancelled by request"


def test_a_cancel_keeps_the_reason_it_was_asked_with() -> None:
    running = dispatch_job(queued(), "r1", now_ms=NOW)
    asked = msgspec.structs.replace(running, cancel_requested=True, reason="wrong branch")
    for outcome, error in (("cancelled", "told to stop"), ("runner_lost", "lost")):
        assert (
            retry_after_failure(asked, outcome, now_ms=NOW, reason=error).reason == "wrong branch"
        )
    # without a kept reason, the runner's account of the cancel
    told = msgspec.structs.replace(running, cancel_requested=True)
    done = retry_after_failure(told, "cancelled", now_ms=NOW, reason="told to stop")
    assert (done.state, done.reason) == (JobState.CANCELLED, "told to stop")


def test_refusals_do_not_use_up_retries_but_are_bounded() -> None:
    record = queued(policy=RetryPolicy(max_attempts=1))
    for n in range(MAX_REFUSALS):
        record = dispatch_job(record, f"r{n}", now_ms=NOW)
        record = retry_after_failure(record, "rejected", now_ms=NOW, reason="full")
    assert record.state == JobState.FAILED
    assert record.reason is not None
    assert "refused by runners" in record.reason
    assert len(record.attempts) == MAX_REFUSALS


@settings(max_examples=300, deadline=None)
@given(
    initial=st.integers(0, 10_000),
    multiplier=st.floats(1, 10),
    cap=st.integers(0, 100_000),
    failures=st.integers(0, 40),
    jitter=st.floats(0, 1),
)
def test_backoff_is_capped_and_jittered(
    initial: int, multiplier: float, cap: int, failures: int, jitter: float
) -> None:
    policy = RetryPolicy(
        initial_backoff_ms=initial, backoff_multiplier=multiplier, max_backoff_ms=cap
    )
    delay = backoff_ms(policy, failures, jitter=lambda: jitter)
    base = min(cap, initial * multiplier ** max(0, failures - 1))
    assert 0 <= delay <= cap
    assert base / 2 - 1 <= delay <= base


def test_finish_job_closes_the_open_attempt_once() -> None:
    record = dispatch_job(queued(), "r1", now_ms=NOW)
    done = finish_job(record, JobState.CANCELLED, now_ms=NOW + 5, reason="by request")
    assert done.attempts[-1].ended_at_ms == NOW + 5
    assert done.attempts[-1].outcome == "cancelled"
    again = finish_job(done, JobState.CANCELLED, now_ms=NOW + 9, reason="by request")
    assert again.attempts[-1].ended_at_ms == NOW + 5


# -- placement ------------------------------------------------------------------------------------

runner_specs = st.lists(
    st.fixed_dictionaries(
        {
            "capacity": st.integers(1, 4),
            "used": st.integers(0, 4),
            "drain": st.booleans(),
            "offline": st.booleans(),
            "silent_ms": st.sampled_from([0, 500, 5000]),
            "types": st.sampled_from([("shell",), ("build",), ("shell", "build")]),
            "zone": st.sampled_from(["a", "b"]),
            "success": st.floats(0, 1),
        }
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(
    specs=runner_specs,
    job_type=st.sampled_from(["shell", "build"]),
    zone=st.one_of(st.none(), st.sampled_from(["a", "b"])),
    excluded=st.lists(st.integers(0, 7), max_size=3),
)
def test_place_only_picks_a_feasible_runner_with_a_free_slot(
    specs: list[dict[str, object]], job_type: str, zone: str | None, excluded: list[int]
) -> None:
    runners = []
    for i, s in enumerate(specs):
        capacity = int(s["capacity"])  # type: ignore[call-overload]
        used = min(capacity, int(s["used"]))  # type: ignore[call-overload]
        runners.append(
            runner(
                f"r{i}",
                capacity=capacity,
                job_types=s["types"],  # type: ignore[arg-type]
                assigned={f"x{i}-{k}": 1 for k in range(used)},
                drain=bool(s["drain"]),
                offline=bool(s["offline"]),
                heartbeat_at_ms=NOW - int(s["silent_ms"]),  # type: ignore[call-overload]
                labels={"zone": str(s["zone"])},
                success_rate=float(s["success"]),  # type: ignore[arg-type]
            )
        )
    spec = msgspec.convert(
        {"job_type": job_type, "labels": {"zone": zone} if zone else {}}, JobSubmission
    )
    spec = msgspec.structs.replace(
        spec, routing_hints=RoutingHints(excluded_runners=[f"r{i}" for i in excluded])
    )
    placement = place(spec, runners, now_ms=NOW, lost_after_ms=3000)
    feasible = [r for r in runners if check_runner(spec, r, now_ms=NOW, lost_after_ms=3000) is None]
    if not feasible:
        assert placement.runner_id is None
    else:
        best = max(score_runner(spec, r, ScoreWeights()) for r in feasible)
        chosen = next(r for r in runners if r.registration.runner_id == placement.runner_id)
        assert chosen in feasible
        assert len(chosen.assigned_jobs) < chosen.registration.max_concurrent_jobs
        assert not chosen.drain_requested
        assert chosen.state != RunnerState.OFFLINE
        assert chosen.registration.runner_id not in {f"r{i}" for i in excluded}
        assert score_runner(spec, chosen, ScoreWeights()) == pytest.approx(best)
    assert sum(len(v) for v in placement.rejected.values()) + len(placement.ranked) == len(runners)


def test_is_on_names_the_runner_and_attempt_a_job_is_on() -> None:
    on = dispatch_job(queued(), "r1", now_ms=NOW)
    assert is_on(on, "r1", 1)
    assert not is_on(on, "r2", 1)  # went to another runner
    assert not is_on(on, "r1", 2)  # another attempt
    assert not is_on(None, "r1", 1)  # no record
    assert not is_on(queued(), "r1", 0)  # not on any runner
    ended = finish_job(on, JobState.SUCCEEDED, now_ms=NOW + 1, reason=None)
    assert not is_on(ended, "r1", 1)
