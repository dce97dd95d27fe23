"""Handler processes, paced submissions and exactly-once checks shared by the handler chaos tests.

Each handler runs in its own process (``valkyrie worker NAME``); simulated runner processes journal
every execution so that double and overlapping runs can be found afterwards.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import anyio
import anyio.to_thread
import nats.js.errors
import pytest

from schemas import JobRecord, JobState
from tests._helpers import overlaps, read_journals, spawn, spawn_runner, stop_process, wait_until
from valkyrie import Bus, Client, Settings
from valkyrie.config.load import LoadedConfig

__all__ = [
    "CONSUMERS",
    "FRONT",
    "HANDLERS",
    "Handlers",
    "ack_pending",
    "all_succeeded_by_n",
    "check_exactly_once",
    "consumer_exists",
    "registered",
    "start_plane",
    "submit_paced",
]

HANDLERS = ["intake", "dispatcher", "results", "registry", "supervisor"]
#: intake with a dispatcher in its process: new jobs are placed directly
FRONT = ["intake", "dispatcher"]
#: the durable consumer (stream) each stream-consuming handler reads
CONSUMERS = {"intake": "submit", "results": "updates", "dispatcher": "events"}


class Handlers:
    """One process per handler, killed and restarted by name."""

    def __init__(self, settings: Settings, tmp: Path, config: LoadedConfig) -> None:
        self.settings = settings
        self.config = config
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def start(self, name: str, *, runs: list[str] | None = None) -> None:
        """Start process ``name`` running the handler of that name, or those in ``runs``."""
        self.procs[name] = spawn(
            ["worker", *(runs or [name])], self.settings, self.log(name), self.config
        )

    async def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        return await anyio.to_thread.run_sync(
            lambda: stop_process(self.procs[name], sig=sig, timeout_s=20)
        )

    async def freeze_and_kill(self, name: str, *, frozen_s: float = 0.0) -> None:
        """SIGSTOP process ``name``, then SIGKILL it: it dies holding what it fetched, unsettled."""
        proc = self.procs[name]
        assert proc.poll() is None, self.tail(name)
        proc.send_signal(signal.SIGSTOP)
        await anyio.sleep(frozen_s)
        assert await self.stop(name, signal.SIGKILL) == -signal.SIGKILL

    async def stop_all(self, runners: dict[str, subprocess.Popen[bytes]]) -> dict[str, int]:
        """Stop every handler process (SIGTERM), then ``runners``; the handlers' exit codes."""
        codes = {name: await self.stop(name) for name in list(self.procs)}
        for proc in runners.values():
            await anyio.to_thread.run_sync(stop_process, proc)
        return codes

    def assert_stopped_cleanly(self, codes: dict[str, int]) -> None:
        for name, code in codes.items():
            assert code == 0, f"{name} did not stop cleanly{self.tail(name)}"

    def tail(self, name: str) -> str:
        path = self.log(name)
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"\n--- {name} log ---\n{text[-3000:]}"


async def registered(bus: Bus, n: int) -> bool:
    kv = await bus.kv("runners")
    try:
        return len(await kv.keys()) >= n
    except nats.js.errors.NoKeysError:
        return False


async def consumer_exists(bus: Bus, name: str) -> bool:
    try:
        await bus.js.consumer_info(bus.names.stream(CONSUMERS[name]), name)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def start_plane(
    bus: Bus,
    handlers: Handlers,
    runners: dict[str, subprocess.Popen[bytes]],
    *,
    count: int,
    capacity: int,
    processes: dict[str, list[str]] | None = None,
) -> None:
    """Start the handler processes (one per handler by default) and ``count`` runner processes;
    return once every runner is registered and every stream handler's consumer exists."""
    for name, runs in (processes or {n: [n] for n in HANDLERS}).items():
        handlers.start(name, runs=runs)
    for i in range(count):
        rid = f"r{i}"
        runners[rid] = spawn_runner(rid, handlers.settings, handlers.tmp, capacity=capacity)
    await wait_until(lambda: registered(bus, len(runners)), timeout_s=60, interval_s=0.2)
    for name in CONSUMERS:
        await wait_until(functools.partial(consumer_exists, bus, name), timeout_s=30)


async def ack_pending(bus: Bus, name: str) -> int:
    info = await bus.js.consumer_info(bus.names.stream(CONSUMERS[name]), name)
    return int(info.num_ack_pending)


def check_exactly_once(tmp: Path, records: dict[str, JobRecord]) -> None:
    """One successful execution per job (the recorded one), and no overlapping executions."""
    journal = read_journals(tmp)
    intervals: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    succeeded: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for line in journal:
        intervals[line.job_id].append(
            (line.started_ns, line.ended_ns, f"{line.runner_id}#{line.attempt}:{line.outcome}")
        )
        if line.outcome == "succeeded":
            succeeded[line.job_id].append((line.attempt, line.runner_id))
    assert overlaps(intervals) == []
    twice = {j: runs for j, runs in succeeded.items() if len(runs) > 1}
    assert twice == {}, "jobs that succeeded more than once"
    for record in records.values():
        assert succeeded[record.id] == [(record.attempt, record.runner_id)], record


async def submit_paced(
    client: Client,
    total: int,
    per_s: float,
    sent: list[int],
    work_s: float,
    *,
    long_every: int = 0,
    long_s: float = 0.0,
) -> None:
    started = time.monotonic()
    for n in range(total):
        delay = started + n / per_s - time.monotonic()
        if delay > 0:
            await anyio.sleep(delay)
        work = long_s if long_every and n % long_every == 0 else work_s
        # stored once the stream acknowledges it, whether or not an intake handler runs right now
        verdict = await client.submit(
            {"job_type": "shell", "metadata": {"n": str(n)}, "payload": {"sim": {"work_s": work}}},
            msg_id=f"load-{n}",
            wait_verdict=False,
        )
        assert verdict is None
        sent.append(n)


async def all_succeeded_by_n(client: Client, total: int, timeout_s: float) -> dict[str, JobRecord]:
    """Wait until ``total`` jobs (metadata ``n`` = 0..total-1) exist, each once, all succeeded."""

    async def current() -> dict[str, JobRecord]:
        return {r.id: r for r in await client.list_jobs() if "n" in r.spec.metadata}

    async def done() -> bool:
        records = await current()
        return len(records) >= total and all(
            r.state == JobState.SUCCEEDED for r in records.values()
        )

    try:
        await wait_until(done, timeout_s=timeout_s, interval_s=1.0)
    except TimeoutError:
        records = await current()
        states: dict[str, int] = defaultdict(int)
        for r in records.values():
            states[r.state.value] += 1
        stuck = [r for r in records.values() if r.state != JobState.SUCCEEDED][:3]
        pytest.fail(f"not every job succeeded: {dict(states)} of {len(records)}; e.g. {stuck}")
    records = await current()
    numbers = sorted(int(r.spec.metadata["n"]) for r in records.values())
    assert numbers == list(range(total)), "a submission was lost or recorded twice"
    return records
