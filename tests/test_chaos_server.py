"""A single nats-server restarted (SIGTERM, then SIGKILL) under load, on the same store and port.

Publishers retry with the same ``Nats-Msg-Id``: every job is recorded exactly once and succeeds.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import anyio
import anyio.to_thread
import nats.js.errors
import pytest

from schemas import JobState
from tests._helpers import (
    events_of,
    overlaps,
    read_journals,
    running,
    settings_for,
    spawn_runner,
    stop_process,
    wait_all_succeeded,
    wait_until,
)
from valkyrie import Bus, BusError, Client, NatsServer

pytestmark = [
    pytest.mark.nats,
    pytest.mark.chaos,
    pytest.mark.slow,
    pytest.mark.xdist_group("chaos"),
]

TOTAL = 400
PER_S = 25.0
DOWN_S = 4.0


async def submit_with_retry(client: Client, n: int, attempts: list[int]) -> None:
    """Submit job ``n``; on failure publish again with the same Nats-Msg-Id until it is stored."""
    body = {"job_type": "shell", "metadata": {"n": str(n)}, "payload": {"sim": {"work_s": 0.2}}}
    with anyio.fail_after(120):
        while True:
            attempts[n] += 1
            try:
                await client.submit(body, msg_id=f"job-{n}", wait_verdict=False, timeout_s=2)
                return
            except BusError:
                await anyio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_server_restarts_lose_and_double_nothing(prefix: str, tmp_path: Path) -> None:
    server = NatsServer(
        store_dir=tmp_path / "nats", name="restarted", max_mem="256M", max_file="2G"
    )
    await server.astart()
    runners: dict[str, subprocess.Popen[bytes]] = {}
    try:
        settings = settings_for(server.url, prefix, connect_timeout_s=30.0)
        async with running(settings) as bus:
            client = Client(bus)
            for i in range(4):
                rid = f"r{i}"
                runners[rid] = spawn_runner(rid, settings, tmp_path, capacity=4)
            await wait_until(lambda: _registered(bus, len(runners)), timeout_s=60, interval_s=0.2)
            attempts = [0] * TOTAL
            outages: list[tuple[str, float]] = []

            async def publish_all() -> None:
                async with anyio.create_task_group() as pubs:
                    started = time.monotonic()
                    for n in range(TOTAL):
                        delay = started + n / PER_S - time.monotonic()
                        if delay > 0:
                            await anyio.sleep(delay)
                        pubs.start_soon(submit_with_retry, client, n, attempts)

            async with anyio.create_task_group() as load:
                load.start_soon(publish_all)
                port = server.port
                for how in ("stop", "kill"):
                    await anyio.sleep(4)
                    began = time.monotonic()
                    if how == "stop":
                        await server.astop()  # SIGTERM: a clean shutdown
                    else:
                        await anyio.to_thread.run_sync(server.kill)  # SIGKILL
                    # down longer than runner_lost_after_ms: every runner falls silent
                    await anyio.sleep(DOWN_S)
                    await server.astart()
                    assert server.port == port
                    outages.append((how, time.monotonic() - began))
            await wait_all_succeeded(client, TOTAL, timeout_s=120)
            await anyio.sleep(1.0)  # late duplicates, if any, would show up now
            records = {r.id: r for r in await client.list_jobs()}
            lost = await events_of(bus, "runner.*.lost")
    finally:
        for proc in runners.values():
            await anyio.to_thread.run_sync(stop_process, proc)
        await server.astop()

    retried = sum(1 for a in attempts if a > 1)
    print(
        f"\nserver restarts {outages}: {retried} submissions were published again; "
        f"runners declared lost: {[e.subject_id for e in lost]}"
    )
    assert retried > 0, "the restarts must land while jobs are being submitted"
    numbers = Counter(int(r.spec.metadata["n"]) for r in records.values())
    assert sorted(numbers) == list(range(TOTAL)), "a submission was lost"
    assert max(numbers.values()) == 1, "a submission was recorded twice"
    assert {r.state for r in records.values()} == {JobState.SUCCEEDED}
    journal = read_journals(tmp_path)
    runs = Counter((line.job_id, line.outcome) for line in journal)
    for record in records.values():
        assert runs[(record.id, "succeeded")] == 1, (record, runs)
    spans: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for line in journal:
        spans[line.job_id].append(
            (line.started_ns, line.ended_ns, f"{line.runner_id}#{line.attempt}:{line.outcome}")
        )
    assert overlaps(spans) == []
    # the server was down, not the runners: none of them may be taken for lost
    assert lost == []


async def _registered(bus: Bus, n: int) -> bool:
    kv = await bus.kv("runners")
    try:
        return len(await kv.keys()) >= n
    except nats.js.errors.NoKeysError:
        return False
