"""Test and benchmark helpers: a simulated runner that speaks the runner protocol directly.

It accepts every dispatch and completes it at once (or after ``work_s``), and records what it ran so
tests can check that no job ran twice at the same time and capacity was never exceeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    JobAccepted,
    JobFinished,
    JobResult,
    RegistrationVerdict,
    RunnerCapabilities,
    RunnerHeartbeat,
    RunnerRegistration,
)
from valkyrie._bus import Bus
from valkyrie._codec import DISPATCH_DECODER, encode, new_id, now_ms
from valkyrie._errors import BusError

__all__ = ["Execution", "SimulatedRunner"]


@dataclass(frozen=True, slots=True)
class Execution:
    """One attempt as the runner saw it."""

    job_id: str
    attempt: int
    runner_id: str
    received_at_ns: int
    started_mono: float
    ended_mono: float


@dataclass
class SimulatedRunner:
    """A protocol-complete runner with no real work (for tests and benchmarks)."""

    bus: Bus
    runner_id: str
    capacity: int = 1
    job_types: list[str] = field(default_factory=lambda: ["shell"])
    labels: dict[str, str] = field(default_factory=dict)
    work_s: float = 0.0
    heartbeat_ms: int = 1000
    on_dispatch: Callable[[str, int], None] | None = None
    executions: list[Execution] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)
    max_running: int = 0

    def registration(self) -> RunnerRegistration:
        """What this runner registers with."""
        return RunnerRegistration(
            runner_id=self.runner_id,
            capabilities=RunnerCapabilities(job_types=list(self.job_types)),
            max_concurrent_jobs=self.capacity,
            labels=dict(self.labels),
            heartbeat_interval_ms=self.heartbeat_ms,
            session_id=self._session,
        )

    def __post_init__(self) -> None:
        self._session = new_id()[:16]

    async def register(self) -> None:
        """Register (request/reply) until accepted."""
        body = encode(self.registration())
        with anyio.fail_after(30):
            while True:
                try:
                    reply = await self.bus.nc.request(self.bus.names.register, body, timeout=2)
                except nats.errors.Error:
                    await anyio.sleep(0.1)
                    continue
                import msgspec

                verdict = msgspec.json.decode(reply.data, type=RegistrationVerdict)
                if not verdict.accepted:
                    raise BusError(f"registration refused: {verdict.errors}")
                return

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Register, heartbeat, and serve dispatches until ``stop``."""
        sub = await self.bus.nc.subscribe(
            self.bus.names.dispatch(self.runner_id), cb=self._on_dispatch_msg
        )
        await self.register()
        task_status.started()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._heartbeat, stop)
            await stop.wait()
            tg.cancel_scope.cancel()
        await sub.unsubscribe()

    async def _heartbeat(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            beat = RunnerHeartbeat(
                runner_id=self.runner_id,
                sent_at_ms=now_ms(),
                load=min(1.0, len(self.running) / self.capacity),
                running_jobs=list(self.running),
                session_id=self._session,
            )
            try:
                await self.bus.nc.publish(self.bus.names.heartbeat(self.runner_id), encode(beat))
            except nats.errors.Error:
                pass
            with anyio.move_on_after(self.heartbeat_ms / 1000):
                await stop.wait()

    async def _on_dispatch_msg(self, msg: Msg) -> None:
        dispatch = DISPATCH_DECODER.decode(msg.data)
        if self.running.get(dispatch.job_id) == dispatch.attempt:
            return
        self.running[dispatch.job_id] = dispatch.attempt
        self.max_running = max(self.max_running, len(self.running))
        if self.on_dispatch is not None:
            self.on_dispatch(dispatch.job_id, dispatch.attempt)
        self._tg.start_soon(self._execute, dispatch.job_id, dispatch.attempt, time.time_ns())

    async def _publish(self, body: bytes, msg_id: str) -> None:
        for _ in range(50):
            try:
                await self.bus.js.publish(
                    self.bus.names.updates(self.runner_id),
                    body,
                    headers={"Nats-Msg-Id": msg_id},
                    timeout=5,
                )
                return
            except nats.errors.Error:
                await anyio.sleep(0.1)

    async def _execute(self, job_id: str, attempt: int, received_ns: int) -> None:
        start = time.monotonic()
        rid = self.runner_id
        await self._publish(
            encode(JobAccepted(job_id=job_id, attempt=attempt, runner_id=rid, at_ms=now_ms())),
            f"{job_id}.{attempt}.accepted",
        )
        if self.work_s:
            await anyio.sleep(self.work_s)
        end = time.monotonic()
        self.executions.append(Execution(job_id, attempt, rid, received_ns, start, end))
        self.running.pop(job_id, None)
        await self._publish(
            encode(
                JobFinished(
                    job_id=job_id,
                    attempt=attempt,
                    runner_id=rid,
                    at_ms=now_ms(),
                    outcome="succeeded",
                    result=JobResult(exit_code=0, duration_ms=int((end - start) * 1000)),
                )
            ),
            f"{job_id}.{attempt}.finished",
        )
