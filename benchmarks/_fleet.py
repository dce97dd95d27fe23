"""Simulated runners for benchmarks, and a recorder of dispatch receipt times.

:class:`LeanFleet` hosts many runners on one NATS connection. Each runner speaks the runner protocol
(registration request/reply, heartbeats, a subscription on ``<prefix>.dispatch.<runner_id>``,
``accepted`` and ``finished`` updates with ``Nats-Msg-Id``) and completes every dispatch at once.
It is leaner than :class:`valkyrie.testing.SimulatedRunner` in one respect: updates are core
publishes onto the updates subject (the updates stream captures them exactly as it captures acked
JetStream publishes) instead of one acked publish round trip each, so the benchmark process spends
its CPU on recording, not on waiting for acks, and runner capacity or round trips never throttle
the control plane being measured.

:class:`RawReceivers` is the raw-NATS baselines' counterpart: plain subscribers that record and, for
the lifecycle baseline, report each job done at once (one core publish with ``Nats-Msg-Id`` that a
work-queue stream captures, as :class:`LeanFleet` sends its updates).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import (
    Dispatch,
    JobAccepted,
    JobFinished,
    JobResult,
    RegistrationVerdict,
    RunnerCapabilities,
    RunnerHeartbeat,
    RunnerRegistration,
)
from valkyrie import Names

__all__ = ["LeanFleet", "RawReceivers", "Recorder", "runner_ids"]

_ENCODER = msgspec.json.Encoder()
_DISPATCH = msgspec.json.Decoder(Dispatch)
_VERDICT = msgspec.json.Decoder(RegistrationVerdict)


class _RawDispatch(msgspec.Struct):
    job_id: str
    revision: int = 0


class _RawDone(msgspec.Struct):
    job_id: str
    revision: int
    runner_id: str


_RAW_DISPATCH = msgspec.json.Decoder(_RawDispatch)


def runner_ids(count: int) -> list[str]:
    """The runner ids every scenario uses: ``r0000``, ``r0001``, ..."""
    return [f"r{i:04d}" for i in range(count)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Recorder:
    """Submit and first-receipt times per job id (``time.perf_counter_ns``, this process)."""

    submitted: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    milestones: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    submit_errors: int = 0
    _waiting: set[str] = field(default_factory=set)
    _done: anyio.Event = field(default_factory=anyio.Event)

    def expect(self, job_ids: Sequence[str]) -> None:
        """Start waiting for ``job_ids`` (call before publishing them)."""
        self._waiting = {j for j in job_ids if j not in self.received}
        self._done = anyio.Event()
        if not self._waiting:
            self._done.set()

    def forget(self, job_id: str) -> None:
        """Stop waiting for a job whose submission failed."""
        self._waiting.discard(job_id)
        if not self._waiting:
            self._done.set()

    def record(self, job_id: str, at_ns: int) -> bool:
        """Note a receipt; ``False`` (and a duplicate counted) if the job was already received."""
        if job_id in self.received:
            self.duplicates += 1
            return False
        self.received[job_id] = at_ns
        if job_id in self._waiting:
            self._waiting.discard(job_id)
            if not self._waiting:
                self._done.set()
        return True

    def mark(self, job_id: str, at_ns: int) -> None:
        """Note when an intermediate step of ``job_id`` was seen (first time only)."""
        self.milestones.setdefault(job_id, at_ns)

    @property
    def outstanding(self) -> int:
        """How many expected jobs have not been received."""
        return len(self._waiting)

    async def wait(
        self,
        *,
        timeout_s: float,
        idle_s: float,
        alive: Callable[[], str | None] = lambda: None,
    ) -> str | None:
        """Wait for every expected job; stop early after ``idle_s`` without progress.

        Returns ``None`` when all arrived, else why the wait ended (timeout, stall, dead process).
        """
        deadline = time.monotonic() + timeout_s
        last_left, last_progress = self.outstanding, time.monotonic()
        while not self._done.is_set():
            with anyio.move_on_after(0.25):
                await self._done.wait()
            if self._done.is_set():
                break
            now = time.monotonic()
            problem = alive()
            if problem:
                return problem
            if self.outstanding < last_left:
                last_left, last_progress = self.outstanding, now
            if now - last_progress > idle_s:
                return f"no dispatch for {idle_s:g}s with {self.outstanding} outstanding"
            if now > deadline:
                return f"timed out after {timeout_s:g}s with {self.outstanding} outstanding"
        return None


@dataclass
class LeanFleet:
    """``len(ids)`` simulated runners on one connection; they accept and complete at once."""

    nc: NatsClient
    names: Names
    ids: list[str]
    recorder: Recorder
    capacity: int = 50
    heartbeat_ms: int = 1000
    job_types: tuple[str, ...] = ("shell",)
    sessions: dict[str, str] = field(default_factory=dict)
    redispatches: int = 0
    updates_sent: int = 0
    update_errors: int = 0
    _seen: set[tuple[str, int]] = field(default_factory=set)
    _subs: list[Subscription] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sessions = {rid: uuid.uuid4().hex[:16] for rid in self.ids}

    def registration(self, runner_id: str) -> RunnerRegistration:
        """What runner ``runner_id`` registers with."""
        return RunnerRegistration(
            runner_id=runner_id,
            capabilities=RunnerCapabilities(job_types=list(self.job_types)),
            max_concurrent_jobs=self.capacity,
            heartbeat_interval_ms=self.heartbeat_ms,
            session_id=self.sessions[runner_id],
        )

    async def subscribe(self) -> None:
        """Subscribe every runner to its dispatch subject (before registering, as runners do)."""
        for rid in self.ids:
            self._subs.append(
                await self.nc.subscribe(self.names.dispatch(rid), cb=self._on_dispatch)
            )
        await self.nc.flush()

    async def register_all(
        self,
        *,
        timeout_s: float = 60.0,
        concurrency: int = 16,
        alive: Callable[[], str | None] = lambda: None,
    ) -> None:
        """Register every runner (request/reply, retried until the registry answers).

        ``alive`` returns why the control plane is gone (then this gives up at once), or ``None``.

        Raises:
            TimeoutError: not all registered within ``timeout_s``.
            RuntimeError: the registry refused a registration, or ``alive`` reported a problem.
        """
        limiter = anyio.Semaphore(concurrency)

        async def one(rid: str) -> None:
            body = _ENCODER.encode(self.registration(rid))
            async with limiter:
                while True:
                    try:
                        reply = await self.nc.request(self.names.register_as(rid), body, timeout=2)
                    except (nats.errors.Error, TimeoutError):
                        problem = alive()
                        if problem:
                            raise RuntimeError(problem) from None
                        await anyio.sleep(0.1)
                        continue
                    verdict = _VERDICT.decode(reply.data)
                    if verdict.accepted:
                        return
                    if any("registry error" in e.reason for e in verdict.errors):
                        await anyio.sleep(0.1)
                        continue
                    raise RuntimeError(f"registration of {rid} refused: {verdict.errors}")

        with anyio.fail_after(timeout_s):
            async with anyio.create_task_group() as tg:
                for rid in self.ids:
                    tg.start_soon(one, rid)

    async def heartbeats(self, stop: anyio.Event) -> None:
        """Send each runner's heartbeat every ``heartbeat_ms``, spread evenly, until ``stop``."""
        gap = self.heartbeat_ms / 1000 / max(1, len(self.ids))
        while not stop.is_set():
            for rid in self.ids:
                beat = RunnerHeartbeat(
                    runner_id=rid,
                    sent_at_ms=_now_ms(),
                    load=0.0,
                    running_jobs=[],
                    session_id=self.sessions[rid],
                )
                try:
                    await self.nc.publish(self.names.heartbeat(rid), _ENCODER.encode(beat))
                except nats.errors.Error:
                    pass
                with anyio.move_on_after(gap):
                    await stop.wait()
                if stop.is_set():
                    return

    async def _on_dispatch(self, msg: Msg) -> None:
        at = time.perf_counter_ns()
        dispatch = _DISPATCH.decode(msg.data)
        self.recorder.record(dispatch.job_id, at)
        key = (dispatch.job_id, dispatch.attempt)
        if key in self._seen:
            self.redispatches += 1
            return
        self._seen.add(key)
        subject = self.names.updates(dispatch.runner_id)
        job, attempt, rid = dispatch.job_id, dispatch.attempt, dispatch.runner_id
        now = _now_ms()
        try:
            await self.nc.publish(
                subject,
                _ENCODER.encode(JobAccepted(job_id=job, attempt=attempt, runner_id=rid, at_ms=now)),
                headers={"Nats-Msg-Id": f"{job}.{attempt}.accepted"},
            )
            await self.nc.publish(
                subject,
                _ENCODER.encode(
                    JobFinished(
                        job_id=job,
                        attempt=attempt,
                        runner_id=rid,
                        at_ms=now,
                        outcome="succeeded",
                        result=JobResult(exit_code=0, duration_ms=0),
                    )
                ),
                headers={"Nats-Msg-Id": f"{job}.{attempt}.finished"},
            )
            self.updates_sent += 2
        except nats.errors.Error:
            self.update_errors += 1

    async def close(self) -> None:
        """Unsubscribe every runner."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs.clear()


@dataclass
class RawReceivers:
    """One plain subscriber per runner id on ``<prefix>.dispatch.<runner_id>``; records receipts.

    With ``complete`` each receiver also reports the job done on ``<prefix>.done.<runner_id>``.
    """

    nc: NatsClient
    prefix: str
    ids: list[str]
    recorder: Recorder
    complete: bool = False
    completions_sent: int = 0
    completion_errors: int = 0
    _subs: list[Subscription] = field(default_factory=list)

    async def subscribe(self) -> None:
        """Subscribe every receiver."""
        for rid in self.ids:
            self._subs.append(
                await self.nc.subscribe(f"{self.prefix}.dispatch.{rid}", cb=self._on_dispatch)
            )
        await self.nc.flush()

    async def _on_dispatch(self, msg: Msg) -> None:
        at = time.perf_counter_ns()
        dispatch = _RAW_DISPATCH.decode(msg.data)
        if not self.recorder.record(dispatch.job_id, at) or not self.complete:
            return
        runner = msg.subject.rsplit(".", 1)[-1]
        try:
            await self.nc.publish(
                f"{self.prefix}.done.{runner}",
                _ENCODER.encode(
                    _RawDone(job_id=dispatch.job_id, revision=dispatch.revision, runner_id=runner)
                ),
                headers={"Nats-Msg-Id": f"{dispatch.job_id}.done"},
            )
            self.completions_sent += 1
        except nats.errors.Error:
            self.completion_errors += 1

    async def close(self) -> None:
        """Unsubscribe every receiver."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs.clear()
