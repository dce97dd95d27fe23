"""Registry: runner registration, heartbeats, drain/undrain, and liveness.

Registration and admin are request/reply; heartbeats are core messages. Every change to a runner's
record is a compare-and-set, so several registry processes can run at once.

A runner's registration, heartbeats and deregistration carry its id in the subject (NATS
permissions let a runner publish only its own); one whose body names another runner is refused.
The legacy registration subject without an id is for open installations (with auth on, nobody
may publish it), and ``runners.admin.deregister`` is the operator's.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    RegistrationVerdict,
    RunnerBackOnline,
    RunnerCommand,
    RunnerDeregistered,
    RunnerDraining,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistered,
    RunnerRegistration,
    RunnerUndrained,
    convert_or_errors,
)
from valkyrie import BusError, HandlerContext
from valkyrie.bus import ANY_DECODER, HEARTBEAT_DECODER, encode, now_ms
from valkyrie.domain.identity import runner_mismatch
from valkyrie.domain.lifecycle import (
    from_other_session,
    heartbeat_needs_write,
    not_held,
    refused,
)
from valkyrie.runtime import HandlerBase, RunnerRecords

__all__ = ["RegistryWorker", "create"]

log = logging.getLogger("valkyrie.registry")


class RegistryWorker(HandlerBase):
    """Keeps the runners bucket current."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until ``stop`` is set."""
        bus = self._bus
        self._records = RunnerRecords(await bus.kv("runners"), await bus.kv("jobs"), self._ops)
        self._view = await self._ctx.views.runners()
        queue = f"{bus.names.prefix}-registry"
        async with anyio.create_task_group() as tg:
            names = bus.names
            subs = [
                await bus.nc.subscribe(names.register, queue=queue, cb=self._on_register),
                await bus.nc.subscribe(names.register_as("*"), queue=queue, cb=self._on_register),
                await bus.nc.subscribe(names.heartbeat("*"), queue=queue, cb=self._on_heartbeat),
                await bus.nc.subscribe(names.deregister("*"), queue=queue, cb=self._on_deregister),
                await bus.nc.subscribe(names.runner_admin("*"), queue=queue, cb=self._on_admin),
            ]
            try:
                task_status.started()
                await stop.wait()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    for sub in subs:
                        await sub.drain()
            tg.cancel_scope.cancel()

    async def _reply(self, msg: Msg, verdict: RegistrationVerdict) -> None:
        if msg.reply:
            try:
                await msg.respond(encode(verdict))
            except nats.errors.Error as e:
                log.warning("could not answer %s: %r", msg.subject, e)

    async def _on_register(self, msg: Msg) -> None:
        try:
            raw = ANY_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            await self._reply(msg, refused(f"invalid JSON: {e}"))
            return
        registration, errors = convert_or_errors(RunnerRegistration, raw)
        if registration is None:
            await self._reply(msg, RegistrationVerdict(accepted=False, errors=errors))
            return
        sender = self._bus.names.sender(msg.subject, self._bus.names.register)
        mismatch = runner_mismatch(sender, registration.runner_id)
        if mismatch is not None:
            log.warning("registration refused on %s: %s", msg.subject, mismatch)
            await self._reply(msg, refused(mismatch, path="$.runner_id"))
            return
        rid = registration.runner_id
        try:
            registered = await self._records.register(registration, now_ms=now_ms())
            await self._events.emit(
                RunnerRegistered(
                    subject_id=rid,
                    capacity=registration.max_concurrent_jobs,
                    job_types=list(registration.capabilities.job_types),
                    region=registration.location.region,
                    session_id=registration.session_id,
                )
            )
        except Exception:
            # No answer: the runner's request times out and it retries; an answer with errors
            # would tell it the registration is invalid, which it is not.
            log.exception("registration of %s failed; the runner will retry", rid)
            return
        await self._reply(
            msg,
            RegistrationVerdict(
                accepted=True,
                runner_id=rid,
                state=registered.state,
                abandon_jobs=sorted(registered.abandon),
                lost_after_ms=self._ctx.config.current.dispatch.runner_lost_after_ms,
            ),
        )

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = HEARTBEAT_DECODER.decode(msg.data)
        except msgspec.DecodeError:
            return
        mismatch = runner_mismatch(msg.subject.rsplit(".", 1)[-1], beat.runner_id)
        if mismatch is not None:
            log.warning("heartbeat ignored on %s: %s", msg.subject, mismatch)
            return
        now = now_ms()
        known = self._view.records.get(beat.runner_id)
        if known is not None:
            if from_other_session(known.value, beat.session_id):
                return
            if not heartbeat_needs_write(known.value, now_ms=now):
                await self._check_running(beat, known.value)
                return
        try:
            touched = await self._records.touch(beat, now_ms=now, known=known)
        except (nats.errors.Error, BusError, OSError, TimeoutError) as e:
            # the next heartbeat tries again
            log.warning("heartbeat of %s not recorded: %r", beat.runner_id, e)
            return
        latest = touched.latest
        if latest is None:
            return
        if touched.written:
            self._view.offer(beat.runner_id, latest)
        await self._check_running(beat, latest.value)
        if touched.came_back:
            await self._events.emit(RunnerBackOnline(subject_id=beat.runner_id))

    async def _check_running(self, beat: RunnerHeartbeat, rec: RunnerRecord) -> None:
        """Tell a runner to abandon jobs it runs but no longer holds (taken back meanwhile)."""
        if not not_held(beat, rec):
            return
        # Our view may lag a fresh dispatch: confirm against the bucket before acting.
        fresh = await self._records.current(beat.runner_id)
        if fresh is None:
            return
        for job_id in not_held(beat, fresh.value):
            await self._bus.nc.publish(
                self._bus.names.control(beat.runner_id),
                encode(
                    RunnerCommand(
                        command="abandon",
                        job_id=job_id,
                        reason="this job was given to another runner",
                    )
                ),
            )

    async def _runner_body(self, msg: Msg) -> tuple[dict[str, Any], str] | None:
        """The body and the ``runner_id`` it names; ``None`` when refused (answered already)."""
        try:
            body = ANY_DECODER.decode(msg.data) if msg.data else {}
            return body, str(body["runner_id"])
        except (msgspec.DecodeError, KeyError, TypeError) as e:
            await self._reply(msg, refused(f"required ({e!r})", path="$.runner_id"))
            return None

    async def _on_deregister(self, msg: Msg) -> None:
        """A runner leaving, on its own subject: only itself, never another runner."""
        named = await self._runner_body(msg)
        if named is None:
            return
        body, rid = named
        mismatch = runner_mismatch(msg.subject.rsplit(".", 1)[-1], rid)
        if mismatch is not None:
            await self._reply(msg, refused(mismatch, path="$.runner_id"))
            return
        await self._deregister(msg, rid, body.get("session_id"))

    async def _on_admin(self, msg: Msg) -> None:
        action = msg.subject.rsplit(".", 1)[-1]
        named = await self._runner_body(msg)
        if named is None:
            return
        body, rid = named
        if action == "deregister":
            await self._deregister(msg, rid, body.get("session_id"))
            return
        if action not in ("drain", "undrain"):
            await self._reply(msg, refused(f"unknown action {action!r}", runner_id=rid))
            return
        draining = action == "drain"
        latest, changed = await self._records.set_drain(rid, draining)
        if latest is None:
            await self._reply(msg, refused(f"no runner {rid!r}", path="$.runner_id", runner_id=rid))
            return
        await self._bus.nc.publish(
            self._bus.names.control(rid),
            encode(RunnerCommand(command="drain" if draining else "undrain")),
        )
        if changed:
            await self._events.emit(
                (RunnerDraining if draining else RunnerUndrained)(subject_id=rid)
            )
        await self._reply(
            msg, RegistrationVerdict(accepted=True, runner_id=rid, state=latest.value.state)
        )

    async def _deregister(self, msg: Msg, rid: str, session_id: object) -> None:
        """A runner leaving cleanly: forget it (only its own session, only with no jobs held)."""
        verdict = await self._records.deregister(rid, session_id)
        if verdict.accepted:
            await self._events.emit(
                RunnerDeregistered(
                    subject_id=rid, session_id=session_id if isinstance(session_id, str) else None
                )
            )
        await self._reply(msg, verdict)


def create(ctx: HandlerContext) -> RegistryWorker:
    """Entry point: build the registry worker."""
    return RegistryWorker(ctx)
