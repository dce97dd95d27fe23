"""Operator actions over the bus: cancel jobs, drain runners, inspect and replay dead letters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from schemas import CancelJob, DeadLetter, DeadReplayed, RegistrationVerdict, SafeDecoder
from valkyrie.bus.codec import DEAD_DECODER, encode, new_id
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher
from valkyrie.errors import BusError, NotFoundError

__all__ = ["Admin", "StoredDeadLetter"]

_VERDICT = SafeDecoder(RegistrationVerdict)
#: headers not carried over on replay: a replay must not be dropped as a duplicate
_DROP_ON_REPLAY = {"Nats-Msg-Id", "Valkyrie-Reply-To", "Valkyrie-Requested-By"}


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter and its sequence in the dead-letter stream (its address for show/replay)."""

    seq: int
    letter: DeadLetter


class Admin:
    """Operator actions; every one is a message on the bus, so it works from anywhere."""

    def __init__(self, bus: Bus, *, actor: str = "cli") -> None:
        self.bus = bus
        self.actor = actor

    async def cancel_job(self, job_id: str, *, reason: str = "cancelled by request") -> None:
        """Request cancellation (durable: stored in the commands stream)."""
        request = CancelJob(job_id=job_id, reason=reason, requested_by=self.actor)
        try:
            await self.bus.js.publish(
                self.bus.names.cancel_as(self.bus.identity),
                encode(request),
                headers={"Nats-Msg-Id": f"cancel-{job_id}-{new_id()[:8]}"},
                timeout=5,
            )
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise BusError(f"cancel request not stored: {e!r}") from e

    async def set_drain(self, runner_id: str, *, drain: bool) -> RegistrationVerdict:
        """Drain (no new work; running jobs finish) or undrain a runner.

        Raises:
            NotFoundError: no such runner.
            BusError: no registry answered.
        """
        action = "drain" if drain else "undrain"
        try:
            reply = await self.bus.nc.request(
                self.bus.names.runner_admin(action),
                encode({"runner_id": runner_id, "requested_by": self.actor}),
                timeout=5,
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
            raise BusError(
                f"no registry answered the {action} request: is `valkyrie up` running?"
            ) from e
        verdict = _VERDICT.decode(reply.data)
        if not verdict.accepted:
            reason = "; ".join(f"{e.path}: {e.reason}" for e in verdict.errors)
            if "no runner" in reason:
                raise NotFoundError(reason)
            raise BusError(f"{action} refused: {reason}")
        return verdict

    async def dead_letters(self) -> AsyncIterator[StoredDeadLetter]:
        """Every dead letter kept, oldest first."""
        stream = self.bus.names.stream("dead")
        info = await self.bus.js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        if not info.state.messages:
            return
        for seq in range(first, last + 1):
            try:
                yield await self.dead_letter(seq)
            except NotFoundError:
                continue

    async def dead_letter(self, seq: int) -> StoredDeadLetter:
        """The dead letter at stream sequence ``seq``.

        Raises:
            NotFoundError: none there (never stored, replayed, or aged out).
        """
        try:
            raw = await self.bus.js.get_msg(self.bus.names.stream("dead"), seq=seq)
        except nats.js.errors.NotFoundError as e:
            raise NotFoundError(f"no dead letter #{seq}") from e
        return StoredDeadLetter(seq, DEAD_DECODER.decode(raw.data or b""))

    async def replay(self, seq: int) -> int:
        """Publish dead letter ``seq`` to its original subject again, then remove it.

        A submission, cancel or config change is sent again as this connection's identity (who
        replays it asks for it now: nobody may publish as another identity); a runner's update
        keeps its runner's subject. Returns the stream sequence the replayed message got.
        """
        stored = await self.dead_letter(seq)
        letter = stored.letter
        headers = {k: v for k, v in letter.headers.items() if k not in _DROP_ON_REPLAY}
        headers["Valkyrie-Replay-Of"] = str(seq)
        subject = self.bus.names.as_sender(letter.original_subject, self.bus.identity)
        try:
            ack = await self.bus.js.publish(subject, letter.payload, headers=headers, timeout=5)
            await self.bus.js.delete_msg(self.bus.names.stream("dead"), seq)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise BusError(f"replay of dead letter #{seq} failed: {e!r}") from e
        await EventPublisher(self.bus, self.actor).emit(
            DeadReplayed(
                subject_id=str(seq),
                handler=letter.handler,
                subject=subject,
                new_seq=ack.seq,
            )
        )
        return int(ack.seq)
