"""Holding stream messages unacked while the work they carry waits, for any handler.

A handler that cannot finish a message now but must not lose it (the dispatcher holding a queued
job until a runner frees up) keeps the message unacked: if the process dies, JetStream hands the
message to another process after the consumer's ack wait. While it holds a message it tells the
server it is still working on it (``in_progress``) often enough that it is not redelivered, and
on a clean stop it hands every held message back at once (nak) instead of making others wait out
the ack wait.

:class:`HoldingConsumer` is the durable consumer with that policy: ``deliver`` decides per
message whether to hold it (under a key, e.g. the job id), settle it, or replace what it held.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from valkyrie.bus.connection import Bus
from valkyrie.bus.pullfeed import PullFeed, ensure_consumer

__all__ = ["KEEPALIVE_S", "HoldingConsumer", "same_message", "settle"]

log = logging.getLogger("valkyrie.holding")
#: held messages are kept alive at least this often (more often when the ack wait is short)
KEEPALIVE_S = 10.0
#: lifetime of one pull request (also how long a stopping consumer waits for the last ones)
FETCH_TIMEOUT_S = 0.5


def same_message(a: Msg, b: Msg) -> bool:
    """Two deliveries of one stream message (same stream sequence)."""
    try:
        return a.metadata.sequence.stream == b.metadata.sequence.stream
    except (AttributeError, ValueError, nats.errors.Error):
        return False


async def settle(msg: Msg | None, *, nak: bool = False) -> None:
    """Ack (or nak) ``msg``; a failure only means the message comes back and is settled then."""
    if msg is None:
        return
    try:
        if nak:
            await msg.nak()
        else:
            await msg.ack()
    except (nats.errors.Error, OSError) as e:
        log.debug("ack/nak failed (%r): the message will be redelivered and dropped", e)


class HoldingConsumer:
    """A durable consumer whose handler may hold messages (by key) for as long as it needs.

    Args:
        bus: the connection.
        stream: the stream.
        durable: the durable consumer's name (created or updated here).
        filter_subject: the subjects it takes.
        ack_wait_s: how long the server waits before it gives a held message to another process
            if this one goes silent (keep-alives go out every third of it, at most every
            :data:`KEEPALIVE_S`).
        batch: how many messages one pull asks for.
        deliver: called with each delivered message; it holds, replaces or settles it.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        ack_wait_s: float,
        batch: int,
        deliver: Callable[[Msg], Awaitable[None]],
    ) -> None:
        self._bus = bus
        self._stream = stream
        self._durable = durable
        self._filter = filter_subject
        self._ack_wait_s = ack_wait_s
        self._batch = batch
        self._deliver = deliver
        self._held: dict[str, Msg] = {}
        self._later: list[Msg] = []
        self.keepalive_s = min(KEEPALIVE_S, ack_wait_s / 3)
        self._consumed = anyio.Event()

    # -- what the handler holds ------------------------------------------------------------------
    def hold(self, key: str, msg: Msg) -> None:
        """Hold ``msg`` under ``key`` (replacing a delivery of the same message held there)."""
        self._held[key] = msg

    def held(self, key: str) -> Msg | None:
        """The message held under ``key``."""
        return self._held.get(key)

    def release(self, key: str) -> None:
        """The work under ``key`` is done (or no longer ours): ack its message soon."""
        msg = self._held.pop(key, None)
        if msg is not None:
            self._later.append(msg)

    async def done(self, key: str) -> None:
        """The work under ``key`` is done: ack its message now."""
        await settle(self._held.pop(key, None))

    async def flush_released(self) -> None:
        """Ack every released message."""
        later, self._later = self._later, []
        for msg in later:
            await settle(msg)

    # -- running ---------------------------------------------------------------------------------
    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until ``stop``; then deliver what the last pulls bring and return.

        Held messages are kept alive meanwhile; :meth:`hand_back` returns them on the way out.
        """
        await ensure_consumer(
            self._bus,
            self._stream,
            ConsumerConfig(
                durable_name=self._durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait_s,
                # held messages wait for runners, not for this process: no limit but memory
                max_ack_pending=1_000_000,
                filter_subject=self._filter,
            ),
        )
        feed = PullFeed(
            self._bus,
            stream=self._stream,
            durable=self._durable,
            room=lambda: self._batch,
            deliver=self._deliver,
            expires_s=FETCH_TIMEOUT_S,
            min_batch=max(1, self._batch // 4),
            max_batch=self._batch,
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keepalive_loop, stop)
            task_status.started()
            try:
                await feed.run(stop)
            finally:
                self._consumed.set()
                tg.cancel_scope.cancel()

    async def consumed(self) -> None:
        """Wait until the last pull requests ended (after ``stop``)."""
        await self._consumed.wait()

    async def hand_back(self, keep: Callable[[str], bool] = lambda _key: False) -> None:
        """Ack released messages and nak every held one (but those ``keep`` names) at once."""
        await self.flush_released()
        for key, msg in list(self._held.items()):
            if not keep(key):
                del self._held[key]
                await settle(msg, nak=True)

    async def _keepalive_loop(self, stop: anyio.Event) -> None:
        # a loop of its own: nothing the handler waits for may delay keep-alives past the ack wait
        while not stop.is_set():
            with anyio.move_on_after(self.keepalive_s):
                await stop.wait()
            for msg in list(self._held.values()):
                try:
                    await msg.in_progress()
                except (nats.errors.Error, OSError):
                    pass
