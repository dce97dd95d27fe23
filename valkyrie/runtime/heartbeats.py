"""What one process hears of the runners' heartbeats: the input of the liveness judgement."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from valkyrie.bus.codec import now_ms
from valkyrie.bus.connection import Bus

__all__ = ["HeardHeartbeats"]


class HeardHeartbeats:
    """When this process last heard each runner, from its own subscription (no queue group).

    Every listener hears every heartbeat, so the liveness judgement does not wait for the
    registry to write heartbeat times (it writes them only now and then) and several supervisors
    each judge on what they heard themselves.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        #: runner id -> when its latest heartbeat arrived here
        self.heard: dict[str, int] = {}
        #: since when this process has been listening without a break (the judgement's grace)
        self.since_ms = 0
        self._sub: Subscription | None = None

    async def _on_heartbeat(self, msg: Msg) -> None:
        self.heard[msg.subject.rsplit(".", 1)[-1]] = now_ms()

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[HeardHeartbeats]:
        """Hear heartbeats inside the block."""
        self.since_ms = now_ms()
        names = self._bus.names
        self._sub = await self._bus.nc.subscribe(names.heartbeat("*"), cb=self._on_heartbeat)
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await self._sub.unsubscribe()

    def deaf(self, now: int) -> None:
        """The connection is down: that silence is ours, not the runners'.

        Count from the reconnection on, as from a start (else a server restart "loses" every
        runner).
        """
        self.since_ms = now

    async def caught_up(self) -> bool:
        """Read every heartbeat the server already sent us before judging anyone silent.

        A flush is a round trip: its answer comes after every message the server sent before it,
        so once it returns and our subscription's buffer is empty, a runner still silent really
        sent nothing (and not merely: we had not read it yet, because this process was busy).
        """
        if self._sub is None:
            return False
        try:
            await self._bus.nc.flush(timeout=2)
        except (nats.errors.Error, TimeoutError):
            return False
        with anyio.move_on_after(1):
            while self._sub.pending_msgs:  # noqa: ASYNC110 - nats-py signals no emptied buffer
                await anyio.sleep(0.01)
            return True
        return False
