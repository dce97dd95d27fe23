"""SIGKILL of the intake worker in the middle of a stream of submissions loses and doubles nothing."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread
import nats.js.errors
import pytest

from schemas import JobState
from tests._helpers import (
    config_for_test,
    dead_letters,
    events_of,
    job_count,
    settings_for,
    spawn,
    stop_process,
    wait_until,
)
from valkyrie import Bus, Client, open_bus

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.slow]

TOTAL = 1000
KILL_AFTER = 250


def _log_tail(log: Path) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n--- worker log ---\n" + text[-4000:]


async def _consumer_ready(bus: Bus) -> bool:
    try:
        await bus.js.consumer_info(bus.names.stream("submit"), "intake")
    except nats.js.errors.NotFoundError:
        return False
    return True


async def _stop(proc: subprocess.Popen[bytes], sig: int) -> int:
    return await anyio.to_thread.run_sync(lambda: stop_process(proc, sig=sig))


@pytest.mark.timeout(240)
async def test_sigkill_mid_stream_loses_nothing_and_records_nothing_twice(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, performance__ack_wait_s=2.0)
    log = tmp_path / "worker.log"
    async with open_bus(settings, embed=False, config=config.config) as (bus, _):
        client = Client(bus)

        async def recorded(at_least: int) -> bool:
            return await job_count(bus) >= at_least

        first = spawn(["worker", "intake"], settings, log, config)
        try:
            await wait_until(lambda: _consumer_ready(bus), timeout_s=30)
            published = 0

            async def publish_all() -> None:
                nonlocal published
                for n in range(TOTAL):
                    verdict = await client.submit(
                        {"job_type": "build", "metadata": {"n": str(n)}}, wait_verdict=False
                    )
                    assert verdict is None
                    published += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(publish_all)
                await wait_until(lambda: recorded(KILL_AFTER), timeout_s=60, interval_s=0.005)
                assert first.poll() is None, _log_tail(log)
                await _stop(first, signal.SIGKILL)
                at_kill = await job_count(bus)
        finally:
            await _stop(first, signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        assert published == TOTAL
        assert KILL_AFTER <= at_kill < TOTAL, "the kill must land in the middle of the stream"
        # the killed worker held deliveries it never acked: they must come back, exactly once each
        in_flight = await bus.js.consumer_info(bus.names.stream("submit"), "intake")
        assert in_flight.num_ack_pending > 0

        second = spawn(["worker", "intake"], settings, log, config)
        try:
            try:
                await wait_until(lambda: recorded(TOTAL), timeout_s=120, interval_s=0.1)

                async def settled() -> bool:  # every submission acked, redeliveries included
                    info = await bus.js.consumer_info(bus.names.stream("submit"), "intake")
                    return bool(info.num_pending == 0 and info.num_ack_pending == 0)

                await wait_until(settled, timeout_s=60, interval_s=0.1)
            except TimeoutError:
                pytest.fail(f"only {await job_count(bus)} of {TOTAL} recorded{_log_tail(log)}")
        finally:
            code = await _stop(second, signal.SIGTERM)
        assert code == 0, f"the worker did not stop cleanly{_log_tail(log)}"

        records = await client.list_jobs()
        queued = await events_of(bus, "job.*.queued")
        letters = await dead_letters(bus)
        submit_info = await bus.js.stream_info(bus.names.stream("submit"))

    assert len(records) == TOTAL
    assert len({r.id for r in records}) == TOTAL
    assert sorted(int(r.spec.metadata["n"]) for r in records) == list(range(TOTAL))
    assert {r.state for r in records} == {JobState.QUEUED}
    assert len(queued) == TOTAL
    assert sorted(e.subject_id or "" for e in queued) == sorted(r.id for r in records)
    assert letters == []
    assert submit_info.state.messages == 0
