"""A stand-in control plane for runner tests, written with plain nats-py.

It answers registrations, records heartbeats, publishes dispatches and commands, and reads what the
runner reports from the updates and logs streams, so the runner side is tested against the protocol
rather than against the real handlers.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg

from schemas import (
    Dispatch,
    JobFinished,
    JobLog,
    JobSubmission,
    JobUpdate,
    RegistrationVerdict,
    Requirements,
    RunnerCommand,
    RunnerHeartbeat,
    RunnerRegistration,
)
from valkyrie import Bus
from valkyrie.bus.codec import (
    HEARTBEAT_DECODER,
    LOG_DECODER,
    REGISTRATION_DECODER,
    UPDATE_DECODER,
    encode,
    now_ms,
)
from valkyrie.runner import JobHandler, Runner

Verdict = Callable[[RunnerRegistration], RegistrationVerdict]


def accept(registration: RunnerRegistration) -> RegistrationVerdict:
    return RegistrationVerdict(accepted=True, runner_id=registration.runner_id)


def new_runner_id() -> str:
    return "r-" + uuid.uuid4().hex[:8]


def registration(
    runner_id: str, *, capacity: int = 1, heartbeat_ms: int = 100
) -> RunnerRegistration:
    return RunnerRegistration(
        runner_id=runner_id, max_concurrent_jobs=capacity, heartbeat_interval_ms=heartbeat_ms
    )


class FakeControlPlane:
    """Plays the registry, dispatcher and results handlers for one runner."""

    def __init__(self, bus: Bus, runner_id: str, tg: TaskGroup) -> None:
        self.bus = bus
        self.runner_id = runner_id
        self.verdict: Verdict = accept
        self.registrations: list[RunnerRegistration] = []
        self.heartbeats: list[RunnerHeartbeat] = []
        self.updates: list[tuple[dict[str, str], JobUpdate]] = []
        self._tg = tg
        self._changed = anyio.Event()
        self._subs: list[Subscription] = []
        self._updates_sub: Any = None

    async def _start(self) -> None:
        names = self.bus.names
        hb = await self.bus.nc.subscribe(names.heartbeat(self.runner_id))
        self._subs.append(hb)
        self._tg.start_soon(self._collect_heartbeats, hb)
        self._updates_sub = await self.bus.js.pull_subscribe(
            names.updates(self.runner_id),
            durable="fake-" + self.runner_id,
            stream=names.stream("updates"),
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=30
            ),
        )
        self._tg.start_soon(self._collect_updates)

    async def answer_registrations(self) -> None:
        """Start answering registration requests with :attr:`verdict`."""
        sub = await self.bus.nc.subscribe(self.bus.names.register_as(self.runner_id))
        self._subs.append(sub)
        self._tg.start_soon(self._answer, sub)

    async def _answer(self, sub: Subscription) -> None:
        async for msg in sub.messages:
            reg = REGISTRATION_DECODER.decode(msg.data)
            if reg.runner_id != self.runner_id:
                continue
            self.registrations.append(reg)
            await msg.respond(encode(self.verdict(reg)))
            self._notify()

    async def _collect_heartbeats(self, sub: Subscription) -> None:
        async for msg in sub.messages:
            self.heartbeats.append(HEARTBEAT_DECODER.decode(msg.data))
            self._notify()

    async def _collect_updates(self) -> None:
        while True:
            try:
                msgs: list[Msg] = await self._updates_sub.fetch(10, timeout=0.2)
            except TimeoutError:  # nats-py raises its own subclass, or asyncio's
                continue
            for msg in msgs:
                self.updates.append((dict(msg.headers or {}), UPDATE_DECODER.decode(msg.data)))
                await msg.ack()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, check: Callable[[], Any], *, timeout_s: float = 10.0) -> Any:
        """Wait until ``check()`` returns something truthy, and return it."""
        with anyio.fail_after(timeout_s):
            while True:
                found = check()
                if found:
                    return found
                with anyio.move_on_after(0.2):
                    await self._changed.wait()

    async def registered(self, *, count: int = 1, timeout_s: float = 10.0) -> RunnerRegistration:
        await self.wait_for(lambda: len(self.registrations) >= count, timeout_s=timeout_s)
        return self.registrations[count - 1]

    async def heartbeat(
        self, check: Callable[[RunnerHeartbeat], bool] = lambda _: True, *, timeout_s: float = 10.0
    ) -> RunnerHeartbeat:
        start = len(self.heartbeats)

        def found() -> RunnerHeartbeat | None:
            return next((h for h in self.heartbeats[start:] if check(h)), None)

        result: RunnerHeartbeat = await self.wait_for(found, timeout_s=timeout_s)
        return result

    def updates_of(self, job_id: str, attempt: int = 1) -> list[JobUpdate]:
        return [u for _h, u in self.updates if u.job_id == job_id and u.attempt == attempt]

    def headers_of(self, job_id: str) -> list[dict[str, str]]:
        return [h for h, u in self.updates if u.job_id == job_id]

    async def finished(
        self, job_id: str, attempt: int = 1, *, timeout_s: float = 15.0
    ) -> JobFinished:
        def found() -> JobFinished | None:
            return next(
                (u for u in self.updates_of(job_id, attempt) if isinstance(u, JobFinished)), None
            )

        result: JobFinished = await self.wait_for(found, timeout_s=timeout_s)
        return result

    async def started(self, job_id: str, attempt: int = 1, *, timeout_s: float = 10.0) -> None:
        await self.wait_for(
            lambda: any(
                u.__struct_config__.tag == "started" for u in self.updates_of(job_id, attempt)
            ),
            timeout_s=timeout_s,
        )

    def make_dispatch(
        self,
        job_id: str,
        payload: Any,
        *,
        attempt: int = 1,
        max_execution_time_s: int = 60,
        job_type: str = "shell",
    ) -> Dispatch:
        now = now_ms()
        return Dispatch(
            job_id=job_id,
            attempt=attempt,
            runner_id=self.runner_id,
            spec=JobSubmission(
                job_type=job_type,
                payload=payload,
                requirements=Requirements(max_execution_time_s=max_execution_time_s),
            ),
            dispatched_at_ms=now,
            accept_by_at_ms=now + 10_000,
        )

    async def dispatch(self, job_id: str, payload: Any, **kwargs: Any) -> Dispatch:
        dispatch = self.make_dispatch(job_id, payload, **kwargs)
        await self.send_dispatch(dispatch)
        return dispatch

    async def send_dispatch(self, dispatch: Dispatch) -> None:
        await self.bus.nc.publish(self.bus.names.dispatch(self.runner_id), encode(dispatch))
        await self.bus.nc.flush()

    async def command(self, command: RunnerCommand) -> None:
        await self.bus.nc.publish(self.bus.names.control(self.runner_id), encode(command))
        await self.bus.nc.flush()

    async def logs_raw(self, job_id: str) -> list[RawStreamMsg]:
        """Every log message stored for ``job_id``, as stored, in stream order."""
        stream, subject = self.bus.names.stream("logs"), self.bus.names.logs(self.runner_id, job_id)
        found: list[RawStreamMsg] = []
        seq = 1
        while True:
            try:
                msg = await self.bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return found
            found.append(msg)
            assert msg.seq is not None
            seq = msg.seq + 1

    async def logs(self, job_id: str) -> list[JobLog]:
        """Every log batch stored for ``job_id``, in stream order."""
        return [LOG_DECODER.decode(msg.data or b"") for msg in await self.logs_raw(job_id)]

    async def log_lines(self, job_id: str, stream: str | None = None) -> list[str]:
        return [
            line
            for batch in await self.logs(job_id)
            if stream is None or batch.stream == stream
            for line in batch.lines
        ]

    async def _stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        if self._updates_sub is not None:
            try:
                await self._updates_sub.unsubscribe()
            except nats.errors.Error:
                pass


@asynccontextmanager
async def fake_control_plane(
    bus: Bus, runner_id: str, *, answer: bool = True
) -> AsyncIterator[FakeControlPlane]:
    async with anyio.create_task_group() as tg:
        cp = FakeControlPlane(bus, runner_id, tg)
        await cp._start()
        if answer:
            await cp.answer_registrations()
        try:
            yield cp
        finally:
            tg.cancel_scope.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await cp._stop()


@asynccontextmanager
async def started(
    bus: Bus, reg: RunnerRegistration, handler: JobHandler, **options: Any
) -> AsyncIterator[Runner]:
    """A registered runner; drained (and required to finish) on exit."""
    options.setdefault("drain_timeout_s", 5.0)
    runner = Runner(bus, reg, handler, **options)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            await tg.start(runner.run)
        try:
            yield runner
        finally:
            runner.drain()
            tg.cancel_scope.deadline = anyio.current_time() + 30
    assert not tg.cancel_scope.cancelled_caught, "the runner did not drain in time"
