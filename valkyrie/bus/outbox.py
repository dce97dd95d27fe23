"""JetStream publishes sent without waiting for each one, then confirmed together.

A handler that emits several events for one message would otherwise pay one round trip per event,
one after the other. With an outbox it sends them all, goes on (publishing a dispatch, answering a
verdict), and confirms them before it acks the message that caused them: acks still come only
after everything is stored. Messages from one connection reach a stream in the order they were
sent, so events keep their order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import nats.errors

from valkyrie.bus.acked import acked_publisher
from valkyrie.bus.connection import Bus

__all__ = ["Outbox"]

CONFIRM_TIMEOUT_S = 5.0


class Outbox:
    """Collects unconfirmed JetStream publishes of one unit of work."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._pending: list[asyncio.Future[Any]] = []

    def __len__(self) -> int:
        return len(self._pending)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """Send one message to its stream; :meth:`confirm` waits for the stream's answer."""
        future = await acked_publisher(self._bus.nc).send(subject, payload, headers)
        self._pending.append(future)

    async def confirm(self, timeout_s: float = CONFIRM_TIMEOUT_S) -> None:
        """Wait until every message sent is stored; raise the first failure.

        Raises:
            nats.errors.TimeoutError: not every answer came within ``timeout_s`` (the caller
                leaves its message unacked, so the work is redone and de-duplicated).
            nats.js.errors.Error: the stream refused a message.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            with anyio.fail_after(timeout_s):
                for future in pending:
                    await future
        except TimeoutError as e:
            raise nats.errors.TimeoutError from e
        finally:
            for future in pending:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: asyncio must not log it as forgotten
