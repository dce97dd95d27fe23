"""Publishing events and dead letters (JetStream, acked, de-duplicated by id)."""

from __future__ import annotations

from collections.abc import Callable

from schemas import DeadLetter, Event, FieldError, TypedEvent
from valkyrie.bus.acked import acked_publisher
from valkyrie.bus.codec import encode, new_id, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.bus.outbox import Outbox

__all__ = ["EventPublisher"]


class EventPublisher:
    """Emits events on ``<prefix>.events.…`` and dead letters on ``<prefix>.dead.…``.

    Every event is a typed event (``schemas.event_catalog``). Those whose id is derived from what
    happened (``<job_id>.queued.<attempt>``) are de-duplicated by the stream, so a handler that
    redoes work after a crash does not emit them twice.

    ``observe`` hears every event as it is sent (the handlers' metrics count some kinds there).
    """

    def __init__(
        self, bus: Bus, source: str, *, observe: Callable[[TypedEvent], None] | None = None
    ) -> None:
        self._bus = bus
        self._source = source
        self._observe = observe

    async def emit(
        self, event: TypedEvent, *, at_ms: int | None = None, outbox: Outbox | None = None
    ) -> Event:
        """Publish one typed event and wait for the stream to store it.

        The subject, the envelope and the id (:meth:`TypedEvent.event_id`, else a random one) all
        come from ``event``. With an ``outbox`` the event is only sent; the caller confirms the
        outbox later.
        """
        envelope = event.envelope(
            event_id=event.event_id() or new_id(),
            at_ms=at_ms if at_ms is not None else now_ms(),
            source=self._source,
        )
        subject = self._bus.names.event(event.entity, event.subject_id, event.kind)
        headers = {"Nats-Msg-Id": envelope.id}
        if outbox is not None:
            await outbox.publish(subject, encode(envelope), headers)
        else:
            await acked_publisher(self._bus.nc).publish(subject, encode(envelope), headers)
        if self._observe is not None:
            self._observe(event)
        return envelope

    async def dead_letter(
        self,
        *,
        subject: str,
        payload: bytes,
        reason: str,
        errors: list[FieldError] | None = None,
        deliveries: int = 1,
        stream_seq: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> DeadLetter:
        """Store a copy of an unprocessable message with the reason."""
        letter = DeadLetter(
            id=f"{self._source}-{stream_seq}" if stream_seq is not None else new_id(),
            at_ms=now_ms(),
            handler=self._source,
            original_subject=subject,
            reason=reason,
            errors=errors or [],
            deliveries=deliveries,
            stream_seq=stream_seq,
            headers=headers or {},
            payload=payload,
        )
        await self._bus.js.publish(
            self._bus.names.dead(self._source),
            encode(letter),
            headers={"Nats-Msg-Id": f"dead-{letter.id}"},
            timeout=5.0,
        )
        return letter
