"""A 3-node cluster on loopback (R3 streams and buckets); the jobs bucket's leader is SIGKILLed.

Nothing is lost or recorded twice, and the pause before service resumes is measured: from the kill
to the first submission after it that the intake handler recorded as queued.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats.errors
import pytest

from schemas import JobState
from tests._helpers import (
    config_for_test,
    events_of,
    running,
    settings_for,
    wait_all_succeeded,
    wait_until,
)
from valkyrie import Bus, BusError, Client, NatsServer, Settings, open_bus
from valkyrie.testing import SimulatedRunner

pytestmark = [
    pytest.mark.nats,
    pytest.mark.chaos,
    pytest.mark.slow,
    pytest.mark.xdist_group("chaos"),
]

TOTAL = 300
PER_S = 20.0


@asynccontextmanager
async def cluster(tmp: Path) -> AsyncIterator[dict[str, NatsServer]]:
    """Three JetStream nodes n1..n3 routed to each other on loopback."""
    names = ("n1", "n2", "n3")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    nodes = {
        name: NatsServer(
            store_dir=tmp / name,
            name=name,
            cluster_name="valkyrie-test",
            cluster_port=ports[name],
            routes=[f"nats-route://127.0.0.1:{ports[o]}" for o in names if o != name],
            max_mem="256M",
            max_file="2G",
        )
        for name in names
    }
    try:
        async with anyio.create_task_group() as tg:
            for node in nodes.values():
                tg.start_soon(node.astart)
        yield nodes
    finally:
        for node in nodes.values():
            await node.astop()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on loopback (for the cluster routes, known before start)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


async def provisioned(settings: Settings) -> bool:
    """Whether the cluster has a JetStream leader and took every R3 stream and bucket."""
    try:
        async with open_bus(settings, embed=False, config=config_for_test(settings).config):
            return True
    except BusError:
        return False


async def submit_with_retry(client: Client, body: dict[str, Any], msg_id: str) -> str:
    """Submit until the intake handler's verdict says queued (same Nats-Msg-Id every time)."""
    while True:
        try:
            verdict = await client.submit(body, msg_id=msg_id, timeout_s=2)
        except BusError:
            await anyio.sleep(0.1)
            continue
        assert verdict is not None
        assert verdict.accepted, verdict
        assert verdict.job_id
        return verdict.job_id


async def leader_of(bus: Bus, stream: str) -> str:
    info = await bus.js.stream_info(stream)
    assert info.cluster is not None
    assert info.cluster.leader
    return str(info.cluster.leader)


@pytest.mark.timeout(300)
async def test_sigkill_of_the_leader_loses_nothing(prefix: str, tmp_path: Path) -> None:
    async with cluster(tmp_path) as nodes:
        url = ",".join(n.url for n in nodes.values())
        settings = settings_for(url, prefix, replicas=3, connect_timeout_s=30.0)
        await wait_until(lambda: provisioned(settings), timeout_s=60, interval_s=0.5)
        async with running(settings) as bus:
            client = Client(bus)
            stop = anyio.Event()
            runners = [SimulatedRunner(bus, f"r{i}", capacity=4) for i in range(4)]
            async with anyio.create_task_group() as tg:
                for runner in runners:
                    await tg.start(runner.run, stop)
                jobs_stream = f"KV_{bus.names.bucket('jobs')}"
                submit_stream = bus.names.stream("submit")
                victim = await leader_of(bus, jobs_stream)
                submit_leader = await leader_of(bus, submit_stream)
                sent: list[str] = []

                async def load() -> None:
                    async with anyio.create_task_group() as pubs:
                        started = time.monotonic()
                        for n in range(TOTAL):
                            delay = started + n / PER_S - time.monotonic()
                            if delay > 0:
                                await anyio.sleep(delay)
                            body = {
                                "job_type": "shell",
                                "metadata": {"n": str(n)},
                                "payload": {"sim": {"work_s": 0.2}},
                            }
                            pubs.start_soon(submit_with_retry, client, body, f"load-{n}")
                            sent.append(f"load-{n}")

                async with anyio.create_task_group() as traffic:
                    traffic.start_soon(load)
                    await anyio.sleep(4)
                    killed_at = time.monotonic()
                    await anyio.to_thread.run_sync(nodes[victim].kill)
                    # probe: the first submission after the kill recorded as queued
                    probe = {"job_type": "shell", "metadata": {"probe": "1"}}
                    with anyio.fail_after(60):
                        await submit_with_retry(client, probe, f"probe-{prefix}")
                    pause_s = time.monotonic() - killed_at
                    new_leader = await _leader_after(bus, jobs_stream, victim)
                await wait_all_succeeded(client, TOTAL + 1, timeout_s=120)
                await anyio.sleep(1.0)  # late duplicates, if any, would show up now
                records = await client.list_jobs()
                lost = await events_of(bus, "runner.*.lost")
                stop.set()

    figures = {
        "killed": victim,
        "jobs_leader_after": new_leader,
        "submit_leader_before": submit_leader,
        "pause_kill_to_first_queued_s": round(pause_s, 3),
    }
    out = tmp_path / "failover.json"
    out.write_text(json.dumps(figures, indent=2))
    print(f"\ncluster failover: {json.dumps(figures)}\nfigures written to {out}")
    assert len(sent) == TOTAL
    numbers = Counter(int(r.spec.metadata["n"]) for r in records if "n" in r.spec.metadata)
    assert sorted(numbers) == list(range(TOTAL)), "a submission was lost"
    assert max(numbers.values()) == 1, "a submission was recorded twice"
    assert {r.state for r in records} == {JobState.SUCCEEDED}
    runs = Counter((e.job_id, e.outcome) for runner in runners for e in runner.executions)
    for record in records:
        assert runs[(record.id, "succeeded")] == 1, record
    assert lost == []
    assert new_leader != victim
    assert pause_s < 30


async def _leader_after(bus: Bus, stream: str, old: str) -> str:
    with anyio.fail_after(30):
        while True:
            try:
                leader = await leader_of(bus, stream)
            except (nats.errors.Error, TimeoutError, AssertionError):
                # no leader yet: the API times out or answers an error, or the info names none
                leader = old
            if leader != old:
                return leader
            await anyio.sleep(0.2)
