"""The runner: register, heartbeat, take dispatches, run jobs through a handler, report."""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription

from schemas import RegistrationVerdict, RunnerCommand, RunnerHeartbeat, RunnerRegistration
from valkyrie.bus.codec import encode, new_id, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.bus.names import Names
from valkyrie.runner._attempts import Attempts, Timing
from valkyrie.runner._context import JobHandler, StopReason
from valkyrie.runner._errors import RegistrationRejected
from valkyrie.runner._protocol import COMMAND_DECODER, deregister, register

__all__ = ["Runner"]

FENCE_CHECK_S = 0.2
#: while draining, how often the runner says which jobs it still waits for
DRAIN_PROGRESS_S = 5.0
log = logging.getLogger("valkyrie.runner")


class Runner:
    """Takes jobs from the control plane and runs each through ``handler``.

    ``run()`` registers (retrying until the registry accepts), then heartbeats, accepts dispatches
    up to ``registration.max_concurrent_jobs`` at once, obeys cancel/abandon/drain commands, and
    reports every attempt's updates and logs. It returns after :meth:`drain` (or ``stop``): new
    dispatches are then rejected, running jobs get ``drain_timeout_s`` to finish, the rest are
    stopped, and a last heartbeat with ``draining=true`` is sent.

    Args:
        bus_or_nc: a connected :class:`~valkyrie.Bus`, or a plain nats-py client.
        registration: what the runner offers; a fresh ``session_id`` is added unless set.
        handler: runs one job (see :data:`JobHandler`).
        names: subject names; defaults to the bus's (or the default prefix for a plain client).
        drain_timeout_s: how long a drain waits for running jobs before stopping them.
        kill_grace_s: grace a job gets to stop on timeout or forced shutdown.
        stop_timeout_s: extra time after the grace before a handler that ignores a stop request is
            cancelled.
        request_timeout_s: how long one registration request waits for its answer.
        publish_retry_s: how long an update is retried before it is given up.
        log_flush_interval_s: the longest a log line waits to be published.
        log_batch_lines: most lines in one log message.
    """

    def __init__(
        self,
        bus_or_nc: Bus | NatsClient,
        registration: RunnerRegistration,
        handler: JobHandler,
        *,
        names: Names | None = None,
        drain_timeout_s: float = 300.0,
        kill_grace_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        request_timeout_s: float = 2.0,
        publish_retry_s: float = 60.0,
        log_flush_interval_s: float = 0.1,
        log_batch_lines: int = 100,
    ) -> None:
        if isinstance(bus_or_nc, Bus):
            self._nc = bus_or_nc.nc
            self._js = bus_or_nc.js
            self._names = names or bus_or_nc.names
        else:
            self._nc = bus_or_nc
            self._js = bus_or_nc.jetstream()
            self._names = names or Names()
        if registration.session_id is None:
            registration = msgspec.structs.replace(registration, session_id=new_id())
        self.registration = registration
        self._drain_timeout_s = drain_timeout_s
        self._kill_grace_s = kill_grace_s
        self._stop_timeout_s = stop_timeout_s
        self._request_timeout_s = request_timeout_s
        self._publish_retry_s = publish_retry_s
        self._attempts = Attempts(
            runner_id=registration.runner_id,
            capacity=registration.max_concurrent_jobs,
            handler=handler,
            js=self._js,
            names=self._names,
            timing=Timing(
                kill_grace_s=kill_grace_s,
                stop_timeout_s=stop_timeout_s,
                publish_retry_s=publish_retry_s,
                log_flush_interval_s=log_flush_interval_s,
                log_batch_lines=log_batch_lines,
            ),
            draining=lambda: self.draining,
            changed=lambda: self._beat_now.set(),
        )
        self._jobs = self._attempts.jobs
        self._paused = False
        self._shutdown = anyio.Event()
        self._reregister = anyio.Event()
        self._beat_now = anyio.Event()
        self._fatal: RegistrationRejected | None = None
        self._started = False
        self._fence_after_s: float | None = None
        self._last_contact = time.monotonic()

    # -- public state ---------------------------------------------------------------------------
    @property
    def runner_id(self) -> str:
        """The runner's id."""
        return self.registration.runner_id

    @property
    def session_id(self) -> str:
        """This runner's session id (new for every process start)."""
        assert self.registration.session_id is not None
        return self.registration.session_id

    @property
    def capacity(self) -> int:
        """How many jobs run at once at most."""
        return self.registration.max_concurrent_jobs

    @property
    def draining(self) -> bool:
        """Whether new dispatches are rejected (drain command, or shutting down)."""
        return self._paused or self._shutdown.is_set()

    @property
    def running_jobs(self) -> list[tuple[str, int]]:
        """``(job_id, attempt)`` of every attempt in progress, abandoned ones included."""
        return list(self._jobs)

    def drain(self) -> None:
        """Stop taking work and make :meth:`run` return once running jobs are done.

        Running jobs get ``drain_timeout_s`` to finish. Safe to call any number of times.
        """
        if not self._shutdown.is_set():
            log.info("runner %s: draining", self.runner_id)
        self._shutdown.set()
        self._beat_now.set()

    # -- the main loop ----------------------------------------------------------------------------
    async def run(
        self,
        stop: anyio.Event | None = None,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until drained (:meth:`drain`, or ``stop`` set); ``task_status`` reports registration.

        Raises:
            RegistrationRejected: the registry refused the registration.
        """
        if self._started:
            raise RuntimeError("Runner.run() can only be called once")
        self._started = True
        # Subscribe before registering: a dispatch sent right after the verdict must not be missed.
        dispatches = await self._nc.subscribe(self._names.dispatch(self.runner_id))
        commands = await self._nc.subscribe(self._names.control(self.runner_id))
        try:
            async with anyio.create_task_group() as tg:
                if stop is not None:
                    tg.start_soon(self._drain_when_set, stop)
                await self._serve(dispatches, commands, tg, task_status)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                for sub in (dispatches, commands):
                    try:
                        await sub.unsubscribe()
                    except (nats.errors.Error, OSError) as e:
                        log.debug("unsubscribe failed: %r", e)
        if self._fatal is not None:
            raise self._fatal

    async def _serve(
        self,
        dispatches: Subscription,
        commands: Subscription,
        tg: TaskGroup,
        task_status: TaskStatus[None],
    ) -> None:
        rid = self.runner_id
        try:
            verdict = await self._register()
        except RegistrationRejected as e:
            # Raised by run() itself, not wrapped in the task group's exception group.
            self._fatal = e
            return
        if verdict is None:
            log.info("runner %s: stopped before it was registered", rid)
            task_status.started()
            return
        log.info(
            "runner %s registered (session %s, capacity %d)", rid, self.session_id, self.capacity
        )
        self._attempts.abandon(verdict.abandon_jobs, "the registry no longer assigns it here")
        self._adopt_lost_after(verdict.lost_after_ms)
        async with anyio.create_task_group() as jobs:
            self._attempts.group = jobs
            tg.start_soon(self._heartbeats)
            tg.start_soon(self._fence)
            tg.start_soon(self._attempts.take_dispatches, dispatches, tg)
            tg.start_soon(self._take_commands, commands)
            tg.start_soon(self._register_again_on_reconnect)
            task_status.started()
            await self._shutdown.wait()
            await self._finish_jobs()
            jobs.cancel_scope.cancel()
        await self._heartbeat(flush=True)
        await self._deregister()
        log.info("runner %s: drained", rid)

    async def _deregister(self) -> None:
        await deregister(
            self._nc,
            self._names.deregister(self.runner_id),
            self.runner_id,
            self.session_id,
            request_timeout_s=self._request_timeout_s,
        )

    async def _drain_when_set(self, stop: anyio.Event) -> None:
        await stop.wait()
        self.drain()

    async def _finish_jobs(self) -> None:
        deadline = anyio.current_time() + self._drain_timeout_s
        # say what the drain waits for, every few seconds: a silent wait looks like a hang
        while self._jobs and (left := deadline - anyio.current_time()) > 0:
            running = ", ".join(job_id for job_id, _ in list(self._jobs)[:5])
            log.info(
                "runner %s: draining: waiting for %d running job(s) (%s) to finish; stopped in "
                "%.0fs at the latest (drain timeout %gs)",
                self.runner_id,
                len(self._jobs),
                running + (", ..." if len(self._jobs) > 5 else ""),
                left,
                self._drain_timeout_s,
            )
            with anyio.move_on_after(min(DRAIN_PROGRESS_S, left)):
                await self._attempts.wait_idle()
        if not self._jobs:
            return
        log.warning(
            "runner %s: drain timeout (%gs): stopping %d job(s)",
            self.runner_id,
            self._drain_timeout_s,
            len(self._jobs),
        )
        for job in list(self._jobs.values()):
            self._attempts.stop(
                job,
                "shutdown",
                self._kill_grace_s,
                "the runner shut down before the job finished "
                f"(drain timeout {self._drain_timeout_s:g}s)",
            )
        # Bounded by the handler's grace, the hard-stop margin, and the final update's retries.
        with anyio.move_on_after(self._kill_grace_s + self._stop_timeout_s + self._publish_retry_s):
            await self._attempts.wait_idle()

    # -- registration and heartbeats ------------------------------------------------------------
    async def _register(self) -> RegistrationVerdict | None:
        return await register(
            self._nc,
            self._names.register_as(self.runner_id),
            self.registration,
            stopping=self._shutdown,
            request_timeout_s=self._request_timeout_s,
        )

    async def _register_again_on_reconnect(self) -> None:
        while True:
            await self._reregister.wait()
            self._reregister = anyio.Event()
            log.info("runner %s: reconnected to NATS, registering again", self.runner_id)
            try:
                verdict = await self._register()
            except RegistrationRejected as e:
                log.error("runner %s: %s; draining", self.runner_id, e)
                self._fatal = e
                self.drain()
                return
            if verdict is not None:
                self._attempts.abandon(
                    verdict.abandon_jobs, "the registry no longer assigns it here"
                )

    async def _heartbeats(self) -> None:
        interval_s = self.registration.heartbeat_interval_ms / 1000
        reconnects = self._reconnects()
        while True:
            if self._nc.is_closed:
                # closed under us: the server refused our credentials (revoked) for good
                log.error("runner %s: the NATS connection is closed: stopping", self.runner_id)
                for job in list(self._jobs.values()):
                    self._attempts.stop(job, "abandon", 0.0, "the NATS connection is closed")
                self.drain()
                return
            await self._heartbeat()
            with anyio.move_on_after(interval_s):
                await self._beat_now.wait()
            self._beat_now = anyio.Event()
            # nats-py resubscribes by itself after a reconnect, but the registry may have lost us
            # (e.g. it restarted meanwhile), so a new connection means a new registration.
            now = self._reconnects()
            if now != reconnects:
                reconnects = now
                self._reregister.set()

    def _adopt_lost_after(self, lost_after_ms: int | None) -> None:
        if lost_after_ms:
            # Stop our jobs a safe margin before the control plane declares us lost and hands
            # them to another runner: never the same job on two runners at once.
            beat_s = self.registration.heartbeat_interval_ms / 1000
            self._fence_after_s = max(0.5 * lost_after_ms / 1000, lost_after_ms / 1000 - beat_s / 2)

    async def _fence(self) -> None:
        """Kill every job when NATS has been out of reach for ``fence_after``: self-fencing."""
        while True:
            await anyio.sleep(FENCE_CHECK_S)
            if self._fence_after_s is None or not self._jobs:
                continue
            silent = time.monotonic() - self._last_contact
            if silent <= self._fence_after_s:
                continue
            log.error(
                "runner %s: no contact with NATS for %.1fs: stopping %d job(s); the control plane "
                "re-dispatches them",
                self.runner_id,
                silent,
                len(self._jobs),
            )
            for job in list(self._jobs.values()):
                self._attempts.stop(
                    job, "abandon", 0.0, f"fenced: no contact with NATS for {silent:.1f}s"
                )

    def _reconnects(self) -> int:
        return int(self._nc.stats.get("reconnects", 0))

    async def _heartbeat(self, *, flush: bool = False) -> None:
        running = [
            k[0]
            for k, job in self._jobs.items()
            if job.ctx.stop_reason != "abandon" and not job.finishing
        ]
        beat = RunnerHeartbeat(
            runner_id=self.runner_id,
            sent_at_ms=now_ms(),
            load=min(1.0, self._attempts.busy() / self.capacity),
            running_jobs=running,
            draining=self.draining,
            session_id=self.session_id,
        )
        try:
            await self._nc.publish(self._names.heartbeat(self.runner_id), encode(beat))
            # a flush is a round trip: proof the heartbeat reached the server (fencing needs it)
            await self._nc.flush(
                timeout=2 if flush else max(1, self.registration.heartbeat_interval_ms // 1000)
            )
            self._last_contact = time.monotonic()
        except (nats.errors.Error, OSError) as e:
            log.debug("heartbeat not sent: %r", e)

    # -- commands -------------------------------------------------------------------------------
    async def _take_commands(self, sub: Subscription) -> None:
        async for msg in sub.messages:
            try:
                command = COMMAND_DECODER.decode(msg.data)
            except msgspec.DecodeError as e:
                log.warning("runner %s: ignoring unreadable command: %s", self.runner_id, e)
                continue
            self._obey(command)

    def _obey(self, command: RunnerCommand) -> None:
        if command.command in ("drain", "undrain"):
            self._paused = command.command == "drain"
            state = "paused (drain)" if self._paused else "undrained"
            log.info("runner %s: %s", self.runner_id, state)
            self._beat_now.set()
            return
        targets = self._attempts.of(command.job_id, command.attempt)
        if not targets:
            log.info(
                "runner %s: %s of %s (attempt %s): not running here",
                self.runner_id,
                command.command,
                command.job_id,
                command.attempt,
            )
            return
        reason: StopReason = "cancel" if command.command == "cancel" else "abandon"
        default = "cancelled by request" if reason == "cancel" else "abandoned by the control plane"
        for job in targets:
            self._attempts.stop(job, reason, command.grace_period_s, command.reason or default)
