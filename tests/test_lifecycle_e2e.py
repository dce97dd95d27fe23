"""The job lifecycle end to end, against real handlers and simulated runners on a real server.

Cancel (queued, running, ignored), drain/undrain, retries, lost runners, deadlines, execution
timeouts, stale attempts, dead-letter replay, and the operator CLI commands.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import click
import pytest
from click.testing import CliRunner, Result

from schemas import (
    TERMINAL_STATES,
    CancelJob,
    JobRecord,
    JobState,
    RunnerHeartbeat,
    RunnerState,
)
from tests._helpers import config_for_test, env_for, events_of, running, settings_for, wait_until
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import RUNNER_DECODER, encode, now_ms
from valkyrie.client.admin import Admin
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


@dataclass
class PausableRunner(SimulatedRunner):
    """A simulated runner whose heartbeats can be paused (a runner cut off, but still working)."""

    paused: bool = False

    async def _heartbeat(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            if not self.paused:
                beat = RunnerHeartbeat(
                    runner_id=self.runner_id,
                    sent_at_ms=now_ms(),
                    load=min(1.0, len(self.running) / self.capacity),
                    running_jobs=list(self.running),
                    draining=self.draining,
                    session_id=self._session,
                )
                await self.bus.nc.publish(self.bus.names.heartbeat(self.runner_id), encode(beat))
            with anyio.move_on_after(0.2 if self.paused else self.heartbeat_ms / 1000):
                await stop.wait()


@dataclass
class Fleet:
    """Simulated runners started (and stopped) within one test."""

    bus: Bus
    tg: anyio.abc.TaskGroup
    stops: dict[str, anyio.Event]

    async def start(self, runner: SimulatedRunner) -> SimulatedRunner:
        stop = anyio.Event()
        self.stops[runner.runner_id] = stop
        await self.tg.start(runner.run, stop)
        return runner

    def crash(self, runner_id: str) -> None:
        """Stop a runner without a word: its jobs stop, it sends no more updates or heartbeats."""
        self.stops[runner_id].set()


@asynccontextmanager
async def fleet(bus: Bus) -> AsyncIterator[Fleet]:
    async with anyio.create_task_group() as tg:
        f = Fleet(bus, tg, {})
        try:
            yield f
        finally:
            for stop in f.stops.values():
                stop.set()


async def submit(client: Client, body: dict[str, Any]) -> str:
    verdict = await client.submit({"job_type": "shell", **body})
    assert verdict is not None
    assert verdict.accepted, verdict
    assert verdict.job_id
    return verdict.job_id


async def wait_state(
    client: Client, job_id: str, *states: JobState, timeout_s: float = 15
) -> JobRecord:
    wanted = frozenset(states) if states else TERMINAL_STATES
    return await client.wait_for_job(job_id, states=wanted, timeout_s=timeout_s)


async def runner_record(bus: Bus, runner_id: str) -> Any:
    kv = await bus.kv("runners")
    return RUNNER_DECODER.decode((await kv.get(runner_id)).value or b"")


async def slots_free(bus: Bus, runner_id: str) -> bool:
    return not (await runner_record(bus, runner_id)).assigned_jobs


async def wait_for(predicate: Callable[[], bool], *, timeout_s: float) -> None:
    async def check() -> bool:
        return predicate()

    await wait_until(check, timeout_s=timeout_s)


def sim(**behaviour: Any) -> dict[str, Any]:
    return {"payload": {"sim": behaviour}}


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


# -- dead letters -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_dead_lettered_cancel_replayed_once_the_job_exists(settings: Settings) -> None:
    async with running(settings) as bus:
        client, admin = Client(bus), Admin(bus, actor="test")
        job_id = f"early-{prefix_of(bus)}"
        await bus.js.publish(bus.names.cancel, encode(CancelJob(job_id=job_id)))

        async def dead_letter_kept() -> bool:
            return bool([d async for d in admin.dead_letters()])

        await wait_until(dead_letter_kept, timeout_s=10)
        (stored,) = [d async for d in admin.dead_letters()]
        assert stored.letter.handler == "canceller"
        assert stored.letter.original_subject == bus.names.cancel
        assert "no job" in stored.letter.reason

        assert await submit(client, {"job_type": "nobody-runs-this", "job_id": job_id}) == job_id
        await anyio.sleep(0.3)
        assert (await client.get_job(job_id)).state == JobState.QUEUED
        await admin.replay(stored.seq)
        record = await wait_state(client, job_id, timeout_s=10)
        assert record.state == JobState.CANCELLED
        assert [d async for d in admin.dead_letters()] == []


def prefix_of(bus: Bus) -> str:
    return bus.names.prefix


# -- operator CLI -----------------------------------------------------------------------------------


def _resolve(path: Sequence[str], fallback: click.Command) -> tuple[click.Command, list[str]]:
    """The top-level CLI and ``path`` if it has that command; else the command object itself.

    (``jobs cancel``, ``runners drain|undrain`` and ``dead`` are defined in ``valkyrie.cli._admin``
    and may not be wired into the top-level group yet.)
    """
    from valkyrie.cli import cli

    node: click.Command = cli
    for name in path:
        if not isinstance(node, click.Group) or name not in node.commands:
            return fallback, []
        node = node.commands[name]
    return cli, list(path)


async def invoke(settings: Settings, path: Sequence[str], *args: str) -> Result:
    """Run a CLI command in a thread (it runs its own event loop) against ``settings``."""
    from valkyrie.cli import _admin

    fallbacks: dict[tuple[str, ...], click.Command] = {
        ("jobs", "cancel"): _admin.cancel,
        ("runners", "drain"): _admin.drain,
        ("runners", "undrain"): _admin.undrain,
        ("dead",): _admin.dead,
    }
    command, head = _resolve(path, fallbacks[tuple(path)])
    env = {k: v for k, v in env_for(settings).items() if k.startswith("VALKYRIE_")}
    call = functools.partial(
        CliRunner().invoke, command, [*head, *args], env=env, catch_exceptions=False
    )
    with anyio.fail_after(60):
        return await anyio.to_thread.run_sync(call)


@pytest.mark.timeout(60)
async def test_cli_cancel_drain_undrain(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(work_s=30))
        await wait_state(client, job_id, JobState.RUNNING)
        result = await invoke(settings, ["jobs", "cancel"], job_id, "--timeout", "20")
        assert result.exit_code == 0, result.output
        assert f"{job_id}: cancelled" in result.output
        assert (await client.get_job(job_id)).state == JobState.CANCELLED

        again = await invoke(settings, ["jobs", "cancel"], job_id)
        assert again.exit_code == 0
        assert "already ended" in again.output

        missing = await invoke(settings, ["jobs", "cancel"], "no-such-job")
        assert missing.exit_code == 4, missing.output

        result = await invoke(settings, ["runners", "drain"], "r1")
        assert result.exit_code == 0, result.output
        assert "r1: draining" in result.output
        assert (await runner_record(bus, "r1")).drain_requested
        queued = await submit(client, sim(work_s=0.1))
        await anyio.sleep(1.0)
        assert (await client.get_job(queued)).state == JobState.QUEUED

        result = await invoke(settings, ["runners", "undrain"], "r1")
        assert result.exit_code == 0, result.output
        assert "r1: active" in result.output
        assert (await wait_state(client, queued)).state == JobState.SUCCEEDED
        assert not r1.draining

        unknown = await invoke(settings, ["runners", "drain"], "no-such-runner")
        assert unknown.exit_code == 4, unknown.output


@pytest.mark.timeout(60)
async def test_cli_dead_ls_show_replay(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        job_id = f"cli-{prefix_of(bus)}"
        await bus.js.publish(bus.names.cancel, encode(CancelJob(job_id=job_id)))
        invalid = await client.submit(b'{"job_type": 7}')
        assert invalid is not None
        assert not invalid.accepted

        async def two_letters() -> bool:
            return len([d async for d in Admin(bus).dead_letters()]) == 2

        await wait_until(two_letters, timeout_s=10)
        listed = await invoke(settings, ["dead"], "ls")
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        assert lines[0].split()[:3] == ["SEQ", "AT", "HANDLER"]
        assert len(lines) == 4
        as_json = await invoke(settings, ["dead"], "ls", "--json")
        assert as_json.exit_code == 0, as_json.output
        letters = [json.loads(line) for line in as_json.output.splitlines()]
        by_handler = {d["letter"]["handler"]: d["seq"] for d in letters}
        assert set(by_handler) == {"canceller", "intake"}

        shown = await invoke(settings, ["dead"], "show", str(by_handler["canceller"]))
        assert shown.exit_code == 0, shown.output
        assert "handler:     canceller" in shown.output
        assert f"no job '{job_id}'" in shown.output
        assert job_id in shown.output  # the payload

        missing = await invoke(settings, ["dead"], "show", "99999")
        assert missing.exit_code == 4, missing.output

        await submit(client, {"job_type": "nobody-runs-this", "job_id": job_id})
        replayed = await invoke(settings, ["dead"], "replay", str(by_handler["canceller"]))
        assert replayed.exit_code == 0, replayed.output
        assert f"replayed #{by_handler['canceller']} as #" in replayed.output
        assert (await wait_state(client, job_id, timeout_s=10)).state == JobState.CANCELLED
        remaining = [d.letter.handler async for d in Admin(bus).dead_letters()]
        assert remaining == ["intake"]

        usage = await invoke(settings, ["dead"], "replay")
        assert usage.exit_code == 2
