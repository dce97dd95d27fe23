"""Simulated runners and waits shared by the end-to-end lifecycle tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from schemas import TERMINAL_STATES, JobRecord, JobState, RunnerHeartbeat
from tests._helpers import wait_until
from valkyrie import Bus, Client
from valkyrie.bus.codec import RUNNER_DECODER, encode, now_ms
from valkyrie.testing import SimulatedRunner

__all__ = [
    "Fleet",
    "PausableRunner",
    "fleet",
    "runner_record",
    "sim",
    "slots_free",
    "submit",
    "wait_for",
    "wait_state",
]


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
