from __future__ import annotations

import anyio
import pytest

from schemas import JobState, RunnerState
from tests._helpers import running
from valkyrie import Client, Settings
from valkyrie.bus.codec import RUNNER_DECODER
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


async def test_job_is_dispatched_and_completes(settings: Settings) -> None:
    async with running(settings) as bus:
        stop = anyio.Event()
        runner = SimulatedRunner(bus, "r1", capacity=2)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            client = Client(bus)
            verdict = await client.submit({"job_type": "shell", "payload": {"command": ["true"]}})
            assert verdict is not None
            assert verdict.job_id
            record = await client.wait_for_job(verdict.job_id, timeout_s=10)
            assert record.state == JobState.SUCCEEDED
            assert record.runner_id == "r1"
            assert record.attempt == 1
            kv = await bus.kv("runners")
            with anyio.fail_after(5):
                while True:
                    rr = RUNNER_DECODER.decode((await kv.get("r1")).value or b"")
                    if not rr.assigned_jobs:
                        break
                    await anyio.sleep(0.02)
            assert rr.state == RunnerState.ACTIVE
            assert rr.stats.jobs_completed == 1
            stop.set()


async def test_job_waits_for_a_runner_then_runs(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        verdict = await client.submit({"job_type": "build"})
        assert verdict is not None
        assert verdict.job_id
        await anyio.sleep(0.3)
        assert (await client.get_job(verdict.job_id)).state == JobState.QUEUED
        stop = anyio.Event()
        runner = SimulatedRunner(bus, "late", job_types=["build"])
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            record = await client.wait_for_job(verdict.job_id, timeout_s=10)
            assert record.state == JobState.SUCCEEDED
            assert record.runner_id == "late"
            stop.set()
