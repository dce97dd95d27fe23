"""Two dispatcher processes, 1,000 jobs, 20 runners of capacity 2."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest

from schemas import JobState
from tests._helpers import running, spawn, stop_process
from valkyrie import Client, Settings
from valkyrie.testing import SimulatedRunner

pytestmark = [pytest.mark.nats, pytest.mark.slow]

JOBS = 1000
RUNNERS = 20
CAPACITY = 2


@pytest.mark.timeout(240)
async def test_two_dispatchers_never_double_dispatch_or_overfill(
    settings: Settings, tmp_path: Path
) -> None:
    async with running(settings, ["intake", "registry", "results"]) as bus:
        dispatchers = [
            spawn(["worker", "dispatcher"], settings, tmp_path / f"dispatcher{i}.log")
            for i in range(2)
        ]
        try:
            stop = anyio.Event()
            runners = [
                SimulatedRunner(bus, f"r{i:02d}", capacity=CAPACITY, work_s=0.005)
                for i in range(RUNNERS)
            ]
            async with anyio.create_task_group() as tg:
                for runner in runners:
                    await tg.start(runner.run, stop)
                client = Client(bus)
                ids = []
                for i in range(JOBS):
                    verdict = await client.submit({"job_type": "shell", "metadata": {"n": str(i)}})
                    assert verdict is not None
                    assert verdict.accepted
                    assert verdict.job_id
                    ids.append(verdict.job_id)
                with anyio.fail_after(150):
                    for job_id in ids:
                        record = await client.wait_for_job(job_id, timeout_s=150)
                        assert record.state == JobState.SUCCEEDED, record
                stop.set()
        finally:
            for proc in dispatchers:
                assert stop_process(proc) == 0, (tmp_path / "dispatcher0.log").read_text()[-3000:]

        dispatched: Counter[str] = Counter()
        by_runner: Counter[str] = Counter()
        async for _seq, event in client.events(
            "job.*.dispatched", deliver_all=True, idle_timeout_s=2
        ):
            assert event.subject_id is not None
            dispatched[event.subject_id] += 1
            by_runner[event.data["runner_id"]] += 1
            assert event.data["slots_used"] <= event.data["capacity"] == CAPACITY
        assert len(dispatched) == JOBS
        assert max(dispatched.values()) == 1, "a job was dispatched twice"
        assert len(by_runner) == RUNNERS  # every runner got work
        for runner in runners:
            assert runner.max_running <= CAPACITY
            seen = Counter((e.job_id, e.attempt) for e in runner.executions)
            assert max(seen.values()) == 1
        assert sum(len(r.executions) for r in runners) == JOBS
