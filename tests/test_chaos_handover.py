"""Handler processes stopping with messages in hand: nothing lost, nothing run twice.

SIGTERM finishes what is in flight; results dying with unsettled updates does not rerun running
jobs; jobs a killed dispatcher held come back after the ack wait.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from schemas import JobState
from tests._chaos_helpers import (
    CONSUMERS,
    HANDLERS,
    Handlers,
    ack_pending,
    all_succeeded_by_n,
    check_exactly_once,
    consumer_exists,
    start_plane,
    submit_paced,
)
from tests._helpers import (
    config_for_test,
    dead_letters,
    running,
    settings_for,
    spawn_runner,
    wait_until,
)
from valkyrie import Bus, Client, HandlerMetrics, StreamConsumer, connect, open_bus
from valkyrie.testing import SimulatedRunner

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.slow]


@pytest.mark.timeout(180)
@pytest.mark.xdist_group("chaos")
async def test_sigterm_finishes_in_flight_messages_and_exits_zero(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    # a long ack wait: a message a stopped handler left unsettled would only come back after 60 s
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, performance__ack_wait_s=60.0)
    handlers = Handlers(settings, tmp_path, config)
    runners: dict[str, subprocess.Popen[bytes]] = {}
    total, per_s = 300, 30.0
    async with open_bus(settings, embed=False, config=config.config) as (bus, _):
        client = Client(bus)
        try:
            await start_plane(bus, handlers, runners, count=4, capacity=4)

            sent: list[int] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit_paced, client, total, per_s, sent, 0.2)
                await anyio.sleep(2)
                for name in ("intake", "results", "dispatcher"):
                    assert handlers.procs[name].poll() is None, handlers.tail(name)
                    code = await handlers.stop(name, signal.SIGTERM)
                    stopped = time.monotonic()
                    assert code == 0, f"{name} exited {code}{handlers.tail(name)}"
                    if name != "dispatcher":
                        # everything it had taken was processed and acked (or handed back): nothing
                        # is left for the 60 s ack wait to deliver again (10 s: a loaded CI
                        # machine may take a few seconds to settle the last acks)
                        await wait_until(
                            functools.partial(_no_ack_pending, bus, name), timeout_s=10
                        )
                    handlers.start(name)
                    await anyio.sleep(1.5)
            # The dispatcher hands the jobs it holds back (nak) when it stops: placed again at
            # once by its successor, long before its own ack wait could deliver anything it left
            # unsettled.
            limit = config.config.performance.ack_wait_s - 5 - (time.monotonic() - stopped)
            records = await all_succeeded_by_n(client, total, timeout_s=limit)
        finally:
            codes = await handlers.stop_all(runners)
        letters = [d for h in HANDLERS for d in await dead_letters(bus, h)]
    handlers.assert_stopped_cleanly(codes)
    assert letters == []
    check_exactly_once(tmp_path, records)


async def _no_ack_pending(bus: Bus, name: str) -> bool:
    return await ack_pending(bus, name) == 0


@pytest.mark.timeout(120)
async def test_results_dying_with_unsettled_updates_does_not_rerun_running_jobs(
    nats_url: str, prefix: str
) -> None:
    """A results process that fetched runners' updates and died before acking them.

    Those updates come back only after ack_wait_s (30 s by default); meanwhile the jobs look
    unaccepted. Taking them back then would start them on another runner while the first still
    runs them.
    """
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, performance__ack_wait_s=12.0)
    jobs = 3
    async with running(
        settings, ["intake", "dispatcher", "registry", "supervisor"], config=config
    ) as bus:
        # the results handler's durable consumer, configured as the real handler configures it
        doomed = await connect(settings, name="doomed-results")
        consumer = StreamConsumer(
            name="results",
            bus=doomed,
            stream=doomed.names.stream("updates"),
            filter_subject=doomed.names.updates("*"),
            handle=_never_called,
            metrics=HandlerMetrics.create(CollectorRegistry()),
            performance=config.config.performance,
        ).consumer_config()
        psub = await doomed.js.pull_subscribe(
            doomed.names.updates("*"),
            durable="results",
            stream=doomed.names.stream("updates"),
            config=consumer,
        )
        stop = anyio.Event()
        runners = [SimulatedRunner(bus, f"r{i}", capacity=jobs, work_s=8.0) for i in range(2)]
        client = Client(bus)
        async with anyio.create_task_group() as tg:
            for runner in runners:
                await tg.start(runner.run, stop)
            ids = []
            for _ in range(jobs):
                verdict = await client.submit({"job_type": "shell"})
                assert verdict is not None
                assert verdict.job_id
                ids.append(verdict.job_id)
            # it takes every accepted and started update, then dies without settling them
            held: list[Msg] = []
            with anyio.fail_after(20):
                while len(held) < 2 * jobs:
                    try:
                        held += await psub.fetch(batch=2 * jobs - len(held), timeout=1)
                    except TimeoutError:
                        continue
            await doomed.nc.close()
            async with running(settings, ["results"], config=config):
                records = [await client.wait_for_job(j, timeout_s=40) for j in ids]
                await anyio.sleep(1.0)
            stop.set()
    executions = sorted((e.job_id, e.attempt, e.outcome) for r in runners for e in r.executions)
    assert executions == sorted((j, 1, "succeeded") for j in ids), (
        "a job still running on its runner was started again elsewhere"
    )
    for record in records:
        assert record.state == JobState.SUCCEEDED, record
        assert [a.outcome for a in record.attempts] == ["succeeded"], record.attempts


async def _never_called(msg: Msg) -> None:
    raise AssertionError(f"not expected: {msg}")


async def _holding(bus: Bus, count: int) -> bool:
    info = await bus.js.consumer_info(bus.names.stream("events"), "dispatcher")
    return int(info.num_ack_pending) == count


@pytest.mark.timeout(150)
@pytest.mark.xdist_group("chaos")
async def test_jobs_a_killed_dispatcher_held_come_back_after_the_ack_wait(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    """A dispatcher SIGKILLed while it holds queued jobs (no runner yet) leaves them to the next
    dispatcher after ``performance.ack_wait_s``, which its consumer follows (it used to be a fixed
    30 s), and while it lives it keeps them from coming back early even with a short ack wait."""
    ack_wait, total = 3.0, 20
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, performance__ack_wait_s=ack_wait)
    handlers = Handlers(settings, tmp_path, config)
    runners: dict[str, subprocess.Popen[bytes]] = {}
    async with open_bus(settings, embed=False, config=config.config) as (bus, _):
        client = Client(bus)
        try:
            for name in HANDLERS:
                handlers.start(name)
            for name in CONSUMERS:
                await wait_until(functools.partial(consumer_exists, bus, name), timeout_s=30)
            events = bus.names.stream("events")
            info = await bus.js.consumer_info(events, "dispatcher")
            assert info.config.ack_wait == pytest.approx(ack_wait)

            sent: list[int] = []
            await submit_paced(client, total, 100.0, sent, 0.1)
            await wait_until(functools.partial(_holding, bus, total), timeout_s=30)
            # kept alive well past the ack wait: nothing was delivered a second time
            await anyio.sleep(ack_wait * 2.5)
            info = await bus.js.consumer_info(events, "dispatcher")
            assert (info.num_ack_pending, info.num_redelivered) == (total, 0)

            await handlers.freeze_and_kill("dispatcher")
            killed = time.monotonic()
            handlers.start("dispatcher")
            for i in range(2):
                rid = f"r{i}"
                runners[rid] = spawn_runner(rid, settings, tmp_path, capacity=10)
            records = await all_succeeded_by_n(client, total, timeout_s=60)
            elapsed = time.monotonic() - killed
        finally:
            codes = await handlers.stop_all(runners)
        letters = [d for h in HANDLERS for d in await dead_letters(bus, h)]

    handlers.assert_stopped_cleanly(codes)
    assert letters == []
    check_exactly_once(tmp_path, records)
    # back after the ack wait (plus runner start-up), far sooner than the old fixed 30 s, which
    # with its 10 s keepalive would have brought them back 20-30 s after the kill
    assert elapsed < ack_wait + 12, elapsed
