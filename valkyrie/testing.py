"""Test and benchmark helpers: a simulated runner that speaks the runner protocol directly.

It runs no commands: a job's ``payload.sim`` says how it behaves (``work_s``, ``exit_code``,
``outcome``, ``silent``, ``ignore_cancel``). It records what it ran (optionally to a journal file) so
tests can check that no job ran twice at the same time and capacity was never exceeded. Run it as a
process with ``python -m valkyrie.testing --id r1 --capacity 4 --journal FILE``.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.msg import Msg

from schemas import (
    JobAccepted,
    JobFinished,
    JobResult,
    JobStarted,
    RegistrationVerdict,
    RunnerCapabilities,
    RunnerCommand,
    RunnerHeartbeat,
    RunnerLocation,
    RunnerRegistration,
    SafeDecoder,
)
from valkyrie.bus.codec import DISPATCH_DECODER, encode, new_id, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.errors import BusError
from valkyrie.runner._protocol import deregister

__all__ = ["Execution", "SimulatedRunner", "main"]

_VERDICT = SafeDecoder(RegistrationVerdict)
_COMMAND = SafeDecoder(RunnerCommand)


@dataclass(frozen=True, slots=True)
class Execution:
    """One attempt as the runner saw it (monotonic-free wall times in ns for cross-process use)."""

    job_id: str
    attempt: int
    runner_id: str
    started_ns: int
    ended_ns: int
    outcome: str


@dataclass
class SimulatedRunner:
    """A protocol-complete runner with simulated work (for tests and benchmarks)."""

    bus: Bus
    runner_id: str
    capacity: int = 1
    job_types: list[str] = field(default_factory=lambda: ["shell"])
    labels: dict[str, str] = field(default_factory=dict)
    region: str | None = None
    work_s: float = 0.0
    heartbeat_ms: int = 1000
    journal: Path | None = None
    on_dispatch: Callable[[str, int], None] | None = None
    executions: list[Execution] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)
    max_running: int = 0
    dispatches: int = 0
    draining: bool = False

    def __post_init__(self) -> None:
        self._session = new_id()[:16]
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._abandoned: set[tuple[str, int]] = set()
        self._cancelled: set[tuple[str, int]] = set()
        self._tg: TaskGroup | None = None
        self._sims: dict[str, dict[str, Any]] = {}

    def registration(self) -> RunnerRegistration:
        """What this runner registers with."""
        return RunnerRegistration(
            runner_id=self.runner_id,
            capabilities=RunnerCapabilities(job_types=list(self.job_types)),
            max_concurrent_jobs=self.capacity,
            labels=dict(self.labels),
            location=RunnerLocation(region=self.region),
            heartbeat_interval_ms=self.heartbeat_ms,
            session_id=self._session,
        )

    async def register(self) -> None:
        """Register (request/reply) until accepted."""
        body = encode(self.registration())
        with anyio.fail_after(30):
            while True:
                try:
                    reply = await self.bus.nc.request(
                        self.bus.names.register_as(self.runner_id), body, timeout=2
                    )
                except nats.errors.Error:
                    await anyio.sleep(0.1)
                    continue
                verdict = _VERDICT.decode(reply.data)
                if not verdict.accepted:
                    raise BusError(f"registration refused: {verdict.errors}")
                for job_id in verdict.abandon_jobs:
                    self._abandon(job_id, None)
                return

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Register, heartbeat, and serve dispatches until ``stop``."""
        names = self.bus.names
        async with anyio.create_task_group() as tg:
            self._tg = tg
            subs = [
                await self.bus.nc.subscribe(names.dispatch(self.runner_id), cb=self._on_dispatch),
                await self.bus.nc.subscribe(names.control(self.runner_id), cb=self._on_control),
            ]
            await self.register()
            tg.start_soon(self._heartbeat, stop)
            task_status.started()
            await stop.wait()
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            for sub in subs:
                await sub.unsubscribe()

    async def deregister(self) -> bool:
        """Ask to be forgotten, as a runner leaving cleanly does.

        Stopping ``run`` alone is a crash: the control plane then declares the runner lost.
        """
        return await deregister(
            self.bus.nc,
            self.bus.names.deregister(self.runner_id),
            self.runner_id,
            self._session,
            request_timeout_s=2.0,
        )

    async def _heartbeat(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            beat = RunnerHeartbeat(
                runner_id=self.runner_id,
                sent_at_ms=now_ms(),
                load=min(1.0, len(self.running) / self.capacity),
                running_jobs=list(self.running),
                draining=self.draining,
                session_id=self._session,
            )
            try:
                await self.bus.nc.publish(self.bus.names.heartbeat(self.runner_id), encode(beat))
            except nats.errors.Error:
                pass
            with anyio.move_on_after(self.heartbeat_ms / 1000):
                await stop.wait()

    async def _on_control(self, msg: Msg) -> None:
        command = _COMMAND.decode(msg.data)
        if command.command == "drain":
            self.draining = True
        elif command.command == "undrain":
            self.draining = False
        elif command.job_id is not None:
            key = (command.job_id, command.attempt or self.running.get(command.job_id, 0))
            if command.command == "abandon":
                self._abandon(command.job_id, command.attempt)
            elif key[0] in self.running:
                self._cancelled.add(key)
                scope = self._scopes.get(command.job_id)
                sim = self._sims.get(command.job_id, {})
                if scope is not None and not sim.get("ignore_cancel"):
                    scope.cancel()

    def _abandon(self, job_id: str, attempt: int | None) -> None:
        held = self.running.get(job_id)
        if held is None or (attempt is not None and held != attempt):
            return
        self._abandoned.add((job_id, held))
        scope = self._scopes.get(job_id)
        if scope is not None:
            scope.cancel()

    async def _on_dispatch(self, msg: Msg) -> None:
        dispatch = DISPATCH_DECODER.decode(msg.data)
        self.dispatches += 1
        if self.running.get(dispatch.job_id) == dispatch.attempt:
            return  # a duplicate of what we already run
        payload = dispatch.spec.payload if isinstance(dispatch.spec.payload, dict) else {}
        sim = payload.get("sim", {}) if isinstance(payload.get("sim", {}), dict) else {}
        if self.draining or len(self.running) >= self.capacity:
            await self._publish(
                JobFinished(
                    job_id=dispatch.job_id,
                    attempt=dispatch.attempt,
                    runner_id=self.runner_id,
                    at_ms=now_ms(),
                    outcome="rejected",
                    result=JobResult(error="draining" if self.draining else "at capacity"),
                ),
                f"{dispatch.job_id}.{dispatch.attempt}.finished",
            )
            return
        self.running[dispatch.job_id] = dispatch.attempt
        self._sims[dispatch.job_id] = sim
        self.max_running = max(self.max_running, len(self.running))
        if self.on_dispatch is not None:
            self.on_dispatch(dispatch.job_id, dispatch.attempt)
        assert self._tg is not None
        self._tg.start_soon(self._execute, dispatch.job_id, dispatch.attempt, sim)

    async def _publish(self, update: JobAccepted | JobStarted | JobFinished, msg_id: str) -> None:
        body = encode(update)
        with anyio.move_on_after(60):
            while True:
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

    async def _execute(self, job_id: str, attempt: int, sim: dict[str, Any]) -> None:
        rid = self.runner_id
        started = time.time_ns()
        await self._publish(
            JobAccepted(job_id=job_id, attempt=attempt, runner_id=rid, at_ms=now_ms()),
            f"{job_id}.{attempt}.accepted",
        )
        work = float(sim.get("work_s", self.work_s))
        if work:
            await self._publish(
                JobStarted(job_id=job_id, attempt=attempt, runner_id=rid, at_ms=now_ms()),
                f"{job_id}.{attempt}.started",
            )
        outcome = str(sim.get("outcome", "succeeded"))
        exit_code = int(sim.get("exit_code", 0))
        if exit_code and outcome == "succeeded":
            outcome = "failed"
        with anyio.CancelScope() as scope:
            self._scopes[job_id] = scope
            await anyio.sleep(work if not sim.get("silent") else 10**6)
        self._scopes.pop(job_id, None)
        if scope.cancelled_caught:
            outcome, exit_code = "cancelled", -int(signal.SIGTERM)
        ended = time.time_ns()
        self.running.pop(job_id, None)
        self._sims.pop(job_id, None)
        execution = Execution(job_id, attempt, rid, started, ended, outcome)
        self.executions.append(execution)
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write(f"{job_id} {attempt} {rid} {started} {ended} {outcome}\n")
        if (job_id, attempt) in self._abandoned:
            return
        await self._publish(
            JobFinished(
                job_id=job_id,
                attempt=attempt,
                runner_id=rid,
                at_ms=now_ms(),
                outcome=outcome,  # type: ignore[arg-type]
                result=JobResult(
                    exit_code=exit_code if outcome != "error" else None,
                    duration_ms=(ended - started) // 1_000_000,
                    error=str(sim["error"]) if "error" in sim else None,
                ),
            ),
            f"{job_id}.{attempt}.finished",
        )


def main(argv: list[str] | None = None) -> None:
    """Run one simulated runner process until SIGTERM/SIGINT, then deregister.

    Journal lines are appended at once.
    """
    from valkyrie.bus.connection import connect
    from valkyrie.bus.tls import tls_context
    from valkyrie.config.load import config_for
    from valkyrie.config.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m valkyrie.testing")
    parser.add_argument("--id", required=True)
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--job-types", default="shell")
    parser.add_argument("--work-s", type=float, default=0.0)
    parser.add_argument("--heartbeat-ms", type=int, default=1000)
    parser.add_argument("--journal", type=Path)
    args = parser.parse_args(argv)

    async def run() -> None:
        settings = Settings.from_env()
        tls = tls_context(config_for(settings).config.security)
        bus = await connect(settings, name=f"sim-{args.id}", tls=tls)
        runner = SimulatedRunner(
            bus,
            args.id,
            capacity=args.capacity,
            job_types=args.job_types.split(","),
            work_s=args.work_s,
            heartbeat_ms=args.heartbeat_ms,
            journal=args.journal,
        )
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for _ in received:
                        stop.set()
                        return

            tg.start_soon(signals)
            await tg.start(runner.run, stop)
            await stop.wait()
            tg.cancel_scope.cancel()
        await runner.deregister()  # SIGTERM is a clean exit, not a crash
        await bus.close()

    anyio.run(run)


if __name__ == "__main__":
    main()
