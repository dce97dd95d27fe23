"""The job lifecycle end to end, against real handlers and simulated runners on a real server.

Cancel (queued, running, ignored), drain/undrain, retries, lost runners, deadlines, execution
timeouts and stale attempts. Dead-letter replay and the operator CLI: test_lifecycle_ops_e2e.py.
"""

from __future__ import annotations

import time

import anyio
import anyio.to_thread
import pytest

from schemas import JobState, RunnerState
from tests._helpers import config_for_test, events_of, running, settings_for, wait_until
from tests._lifecycle_helpers import (
    PausableRunner,
    fleet,
    runner_record,
    sim,
    slots_free,
    submit,
    wait_for,
    wait_state,
)
from valkyrie import Client, Settings
from valkyrie.bus.codec import now_ms
from valkyrie.client.admin import Admin
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


# -- cancel -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_cancel_queued_job_ends_at_once_and_never_runs(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        client = Client(bus)
        job_id = await submit(client, {"job_type": "later"})
        await anyio.sleep(0.3)
        assert (await client.get_job(job_id)).state == JobState.QUEUED
        started = time.monotonic()
        await Admin(bus).cancel_job(job_id, reason="not needed")
        record = await wait_state(client, job_id, timeout_s=5)
        assert record.state == JobState.CANCELLED
        assert time.monotonic() - started < 3.0
        assert record.reason is not None
        assert "not needed" in record.reason
        assert record.attempts == []
        # a runner for its type turning up later does not run it
        late = await runners.start(SimulatedRunner(bus, "late", job_types=["later"]))
        await anyio.sleep(1.0)
        assert late.dispatches == 0
        assert late.executions == []
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.>")]
        assert "job.cancelled" in kinds
        assert "job.dispatched" not in kinds


@pytest.mark.timeout(60)
async def test_cancel_running_job_the_runner_stops_it(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(work_s=30))
        await wait_state(client, job_id, JobState.RUNNING)
        started = time.monotonic()
        await Admin(bus, actor="cli:alice").cancel_job(job_id, reason="superseded by #7")
        record = await wait_state(client, job_id, timeout_s=10)
        assert record.state == JobState.CANCELLED, record
        assert record.reason == "superseded by #7 (by cli:alice)"  # the reason asked with, kept
        assert time.monotonic() - started < 8.0, "the runner's confirmation ends it, no grace wait"
        assert [(e.job_id, e.outcome) for e in r1.executions] == [(job_id, "cancelled")]
        await wait_until(lambda: slots_free(bus, "r1"), timeout_s=5)


@pytest.mark.timeout(60)
async def test_cancel_ignored_by_the_runner_ends_after_the_grace_period(
    nats_url: str, prefix: str
) -> None:
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, dispatch__cancel_grace_s=1.0)
    async with running(settings, config=config) as bus, fleet(bus) as runners:
        await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(work_s=30, ignore_cancel=True))
        await wait_state(client, job_id, JobState.RUNNING)
        started = time.monotonic()
        await Admin(bus).cancel_job(job_id)
        await anyio.sleep(1.0)
        assert (await client.get_job(job_id)).cancel_requested
        record = await wait_state(client, job_id, timeout_s=20)
        elapsed = time.monotonic() - started
        assert record.state == JobState.CANCELLED, record
        assert record.reason is not None
        assert "did not confirm" in record.reason
        # cancel_grace_s (1) + 5 s, and not much more
        assert 5.5 <= elapsed < 15, elapsed
        await wait_until(lambda: slots_free(bus, "r1"), timeout_s=5)


@pytest.mark.timeout(60)
async def test_cancel_of_a_job_whose_runner_is_lost_does_not_run_it_elsewhere(
    nats_url: str, prefix: str
) -> None:
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, dispatch__cancel_grace_s=5.0)
    async with running(settings, config=config) as bus, fleet(bus) as runners:
        await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(work_s=30))
        await wait_state(client, job_id, JobState.RUNNING)
        runners.crash("r1")
        await Admin(bus).cancel_job(job_id)
        r2 = await runners.start(SimulatedRunner(bus, "r2", work_s=30))
        # r1 is declared lost after 3 s; the cancel was requested: the job ends there, cancelled
        record = await wait_state(client, job_id, timeout_s=9)
        assert record.state == JobState.CANCELLED, record
        assert record.reason is not None
        assert record.reason.startswith("cancelled by request")
        assert [a.runner_id for a in record.attempts] == ["r1"]
        assert r2.dispatches == 0, "a job whose cancel was requested was dispatched again"


# -- drain ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_drained_runner_gets_no_new_work_until_undrained(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1", capacity=2))
        client, admin = Client(bus), Admin(bus)
        first = await submit(client, sim(work_s=2))
        await wait_state(client, first, JobState.RUNNING)
        verdict = await admin.set_drain("r1", drain=True)
        assert verdict.accepted
        assert verdict.state == RunnerState.DRAINING
        await wait_for(lambda: r1.draining, timeout_s=5)
        second = await submit(client, sim(work_s=0.1))
        done = await wait_state(client, first, timeout_s=10)
        assert done.state == JobState.SUCCEEDED
        assert done.runner_id == "r1"
        await anyio.sleep(1.0)
        assert (await client.get_job(second)).state == JobState.QUEUED
        assert [e.job_id for e in r1.executions] == [first]
        assert (await runner_record(bus, "r1")).state == RunnerState.DRAINING

        verdict = await admin.set_drain("r1", drain=False)
        assert verdict.accepted
        assert verdict.state == RunnerState.ACTIVE
        record = await wait_state(client, second, timeout_s=10)
        assert record.state == JobState.SUCCEEDED
        assert record.runner_id == "r1"
        assert not r1.draining
        kinds = [e.type for e in await events_of(bus, "runner.r1.>")]
        assert "runner.draining" in kinds
        assert "runner.undrained" in kinds


# -- retries ----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_retry_exhaustion_ends_failed_after_max_attempts(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(
            client,
            {
                "retry_policy": {
                    "max_attempts": 2,
                    "retry_on_exit_code": True,
                    "initial_backoff_ms": 50,
                },
                **sim(exit_code=1),
            },
        )
        record = await wait_state(client, job_id)
        assert record.state == JobState.FAILED, record
        assert record.reason is not None
        assert "retries exhausted" in record.reason
        assert record.attempt == 2
        assert len(record.attempts) == 2
        assert [a.outcome for a in record.attempts] == ["failed", "failed"]
        assert [(e.attempt, e.outcome) for e in r1.executions] == [(1, "failed"), (2, "failed")]


@pytest.mark.timeout(60)
async def test_default_policy_does_not_retry_a_non_zero_exit(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(exit_code=1))
        record = await wait_state(client, job_id)
        assert record.state == JobState.FAILED, record
        assert record.attempt == 1
        assert len(record.attempts) == 1
        assert record.result is not None
        assert record.result.exit_code == 1
        await anyio.sleep(0.5)
        assert len(r1.executions) == 1


@pytest.mark.timeout(60)
async def test_lost_runners_job_is_retried_on_another_runner(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        await runners.start(SimulatedRunner(bus, "r1", work_s=30))
        client = Client(bus)
        job_id = await submit(client, {})
        await wait_state(client, job_id, JobState.RUNNING)
        r2 = await runners.start(SimulatedRunner(bus, "r2", work_s=0.1))
        runners.crash("r1")
        record = await wait_state(client, job_id, timeout_s=15)
        assert record.state == JobState.SUCCEEDED, record
        assert record.attempt == 2
        assert record.runner_id == "r2"
        assert [(a.runner_id, a.outcome) for a in record.attempts] == [
            ("r1", "runner_lost"),
            ("r2", "succeeded"),
        ]
        assert [(e.job_id, e.attempt) for e in r2.executions] == [(job_id, 2)]
        lost = await events_of(bus, "runner.r1.lost")
        assert len(lost) == 1
        assert lost[0].data["jobs"] == [job_id]
        assert (await runner_record(bus, "r1")).state == RunnerState.OFFLINE


@pytest.mark.timeout(60)
async def test_lost_runner_counts_against_the_retry_budget(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        await runners.start(SimulatedRunner(bus, "r1", work_s=30))
        client = Client(bus)
        job_id = await submit(client, {"retry_policy": {"max_attempts": 1}})
        await wait_state(client, job_id, JobState.RUNNING)
        r2 = await runners.start(SimulatedRunner(bus, "r2", work_s=0.1))
        runners.crash("r1")
        record = await wait_state(client, job_id, timeout_s=15)
        assert record.state == JobState.FAILED, record
        assert record.reason is not None
        assert "retries exhausted" in record.reason
        assert [a.outcome for a in record.attempts] == ["runner_lost"]
        await anyio.sleep(0.5)
        assert r2.dispatches == 0


# -- deadlines and execution time ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_deadline_passes_without_a_runner_job_expires(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        job_id = await submit(
            client, {"job_type": "nobody-runs-this", "deadline_at_ms": now_ms() + 500}
        )
        record = await wait_state(client, job_id, timeout_s=5)
        assert record.state == JobState.EXPIRED, record
        assert record.reason is not None
        assert "deadline" in record.reason
        assert record.finished_at_ms is not None
        assert record.spec.deadline_at_ms is not None
        assert record.finished_at_ms - record.spec.deadline_at_ms < 3000
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.>")]
        assert kinds[-1] == "job.expired"


@pytest.mark.timeout(60)
async def test_silent_job_times_out_by_the_control_plane(nats_url: str, prefix: str) -> None:
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, dispatch__execution_grace_ms=500)
    async with running(settings, config=config) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(
            client, {"requirements": {"max_execution_time_s": 1}, **sim(silent=True)}
        )
        # a silent job is accepted and then never heard of again (no start, no result)
        accepted = await wait_state(client, job_id, JobState.ACCEPTED)
        record = await wait_state(client, job_id, timeout_s=10)
        assert record.state == JobState.TIMED_OUT, record
        assert record.reason is not None
        assert "max_execution_time_s=1" in record.reason
        assert accepted.accepted_at_ms is not None
        assert record.finished_at_ms is not None
        took = record.finished_at_ms - accepted.accepted_at_ms
        assert 1500 <= took < 6000, took
        # the runner was told to stop it, and its slot is free again
        await wait_until(lambda: slots_free(bus, "r1"), timeout_s=5)
        await wait_for(lambda: bool(r1.executions), timeout_s=5)
        assert r1.executions[0].outcome == "cancelled"
        assert (await client.get_job(job_id)).state == JobState.TIMED_OUT


# -- stale attempts ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_runner_back_after_being_lost_has_its_stale_result_refused(
    settings: Settings,
) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        a = PausableRunner(bus, "ra", work_s=7.0)
        await runners.start(a)
        client = Client(bus)
        job_id = await submit(client, {})
        await wait_state(client, job_id, JobState.RUNNING)
        a.paused = True  # cut off: no heartbeats, but it goes on working
        b = await runners.start(SimulatedRunner(bus, "rb", work_s=0.1))
        record = await wait_state(client, job_id, timeout_s=10)
        assert record.state == JobState.SUCCEEDED
        assert record.runner_id == "rb"
        assert record.attempt == 2

        async def stale_seen() -> bool:
            return bool(await events_of(bus, f"job.{job_id}.stale_update"))

        await wait_until(stale_seen, timeout_s=10)
        (stale,) = await events_of(bus, f"job.{job_id}.stale_update")
        assert stale.attempt == 1
        assert stale.data["runner_id"] == "ra"
        assert stale.data["update"] == "finished"
        assert [(e.attempt, e.outcome) for e in a.executions] == [(1, "succeeded")]
        # the newer attempt's result stands
        final = await client.get_job(job_id)
        assert final.state == JobState.SUCCEEDED
        assert final.runner_id == "rb"
        assert final.attempt == 2
        assert final.result == record.result
        assert [e.attempt for e in b.executions] == [2]

        a.paused = False  # it comes back and is usable again

        async def back() -> bool:
            return bool(await events_of(bus, "runner.ra.back_online"))

        await wait_until(back, timeout_s=5)
        assert (await runner_record(bus, "ra")).state == RunnerState.ACTIVE
