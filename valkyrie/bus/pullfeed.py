"""A continuous pull from a durable JetStream consumer.

``PullSubscription.fetch`` costs a round trip per call: a no-wait probe, then a waiting request,
and one timed wait per message. A worker that fetches again after every message pays that for
every message, and so does the server. A feed instead keeps pull requests open for as many
messages as its owner has room for and tops them up as room frees, so a steady stream costs one
request per many messages (the way the newer NATS clients' ``consume`` works).

Requests expire after ``expires_s``; the server answers an expired one with a 408 status. There is
no cancelling a request, so a stopping feed asks for nothing more and waits for its open requests
to expire; what they deliver meanwhile still goes to the owner, which settles it before it exits.
Naking it instead would have the server hand it straight back to the same open request.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from valkyrie.bus.connection import Bus

__all__ = ["PullFeed", "ensure_consumer"]

log = logging.getLogger("valkyrie.pull")

#: a request whose expiry answer never came (a reconnect) is forgotten this long after its expiry
LOST_AFTER_S = 1.0
#: margin past the last request's expiry that a stopping feed waits for the server's last answers
STRAGGLER_WAIT_S = 0.1
_STATUS = "Status"
_PENDING = "Nats-Pending-Messages"
_REQUEST = msgspec.json.Encoder()


#: consumer settings a (re)starting handler brings an existing durable consumer up to date with
_TUNABLE = ("ack_wait", "max_deliver", "max_ack_pending", "filter_subject", "filter_subjects")


def filters(subjects: str | Sequence[str]) -> dict[str, Any]:
    """A consumer's subject filter keyword: ``filter_subject`` for one, ``filter_subjects`` else.

    A handler takes both an open installation's legacy subject (``jobs.cancel``) and the ones
    that carry their sender's identity (``jobs.cancel.<identity>``): no single wildcard covers
    both.
    """
    if isinstance(subjects, str):
        return {"filter_subject": subjects}
    if len(subjects) == 1:
        return {"filter_subject": subjects[0]}
    return {"filter_subjects": list(subjects)}


async def ensure_consumer(bus: Bus, stream: str, config: ConsumerConfig) -> None:
    """Create the durable consumer, or update an existing one whose tunable settings differ.

    Operators change ``performance.ack_wait_s`` and friends and restart the handler; a durable
    consumer created by an earlier run would otherwise keep its old ack wait for ever. Only
    ack wait, max deliver, max ack pending and the subject filters are compared: the server can
    update those in place (create-or-update), and an update it refuses leaves the old consumer
    running, with a warning. (The filters changed when subjects began to carry identities.)
    """
    assert config.durable_name is not None
    config.name = config.durable_name
    try:
        info = await bus.js.consumer_info(stream, config.durable_name)
    except nats.js.errors.NotFoundError:
        await bus.js.add_consumer(stream, config=config)
        return
    current = info.config
    stale = [
        name
        for name in _TUNABLE
        if (getattr(config, name) is not None or name.startswith("filter_"))
        and not _same(getattr(current, name), getattr(config, name))
    ]
    if not stale:
        return
    try:
        await bus.js.add_consumer(stream, config=config)
    except nats.js.errors.Error as e:
        log.warning(
            "consumer %s on %s keeps its settings (%s): update refused: %r",
            config.durable_name,
            stream,
            ", ".join(stale),
            e,
        )
        return
    log.info(
        "consumer %s on %s updated: %s",
        config.durable_name,
        stream,
        ", ".join(f"{n} {getattr(current, n)} -> {getattr(config, n)}" for n in stale),
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):  # ack wait: s from ns
        return abs(a - b) < 1e-3
    return (a or None) == (b or None)  # no filter: None, "" or []


class PullFeed:
    """Keeps pull requests open on ``stream``/``durable`` for up to ``room()`` messages.

    Args:
        bus: the connection.
        stream: the stream.
        durable: the durable consumer (see :func:`ensure_consumer`).
        room: how many more messages the owner can take now (in addition to those requested).
        deliver: called with each delivered message, in order; it must not block for long.
        expires_s: lifetime of one pull request.
        min_batch: smallest top-up worth a request while others are still open.
        max_batch: largest single request.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        durable: str,
        room: Callable[[], int],
        deliver: Callable[[Msg], Awaitable[None]],
        expires_s: float = 0.5,
        min_batch: int = 1,
        max_batch: int = 256,
    ) -> None:
        self._bus = bus
        prefix = getattr(bus.js, "_prefix", "$JS.API")
        self._next_subject = f"{prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._room = room
        self._deliver = deliver
        self._expires_s = expires_s
        self._max_batch = max(1, max_batch)
        self._min_batch = min(max(1, min_batch), self._max_batch)
        # expiry (monotonic) of each open request, oldest first. The server spreads deliveries
        # over the open requests, so only the total still due is known (``outstanding``); each
        # expiry answer corrects it with what that request had left.
        self._expiries: deque[float] = deque()
        self._outstanding = 0
        self._wake = anyio.Event()
        self._pause_until = 0.0

    @property
    def outstanding(self) -> int:
        """Messages requested and not yet delivered."""
        return self._outstanding

    def wake(self) -> None:
        """Tell the feed the owner has more room (a message was settled).

        The feed only stirs when that room is worth a request: one settled message of many
        requested is not.
        """
        if not self._expiries or self._room() - self._outstanding >= self._min_batch:
            self._wake.set()

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Pull until ``stop`` is set; then pass on what the open requests still deliver."""
        nc = self._bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=self._on_reply)
        task_status.started()
        try:
            while not stop.is_set():
                now = time.monotonic()
                self._forget_lost(now)
                want = self._room() - self._outstanding
                if (
                    want > 0
                    and now >= self._pause_until
                    and (want >= self._min_batch or not self._expiries)
                ):
                    await self._request(inbox, min(want, self._max_batch), now)
                with anyio.move_on_after(self._expires_s / 2):
                    await self._wake.wait()
                self._wake = anyio.Event()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._expires_s + 3):
                if self._expiries:
                    last = max(self._expiries)
                    await anyio.sleep(max(0.0, last - time.monotonic()) + STRAGGLER_WAIT_S)
                try:
                    await nc.flush(timeout=2)  # whatever the server sent before is now read
                except (nats.errors.Error, TimeoutError):
                    pass
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                # drain, not unsubscribe: messages already read but not yet through the callback
                # would be dropped unsettled
                await sub.drain()

    async def _request(self, inbox: str, batch: int, now: float) -> None:
        body = {"batch": batch, "expires": int(self._expires_s * 1e9)}
        try:
            await self._bus.nc.publish(self._next_subject, _REQUEST.encode(body), reply=inbox)
        except nats.errors.Error as e:
            log.warning("pull request on %s failed (%r)", self._next_subject, e)
            self._pause_until = now + 0.25
            return
        self._expiries.append(now + self._expires_s)
        self._outstanding += batch

    def _forget_lost(self, now: float) -> None:
        while self._expiries and self._expiries[0] + LOST_AFTER_S < now:
            self._expiries.popleft()
        if not self._expiries:
            self._outstanding = 0

    async def _on_reply(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is None:
            self._outstanding = max(0, self._outstanding - 1)
            await self._deliver(msg)
            return
        if status == "408":  # the oldest request expired; the header says what it had left
            if self._expiries:
                self._expiries.popleft()
            try:
                left = int((headers or {}).get(_PENDING, "0"))
            except ValueError:
                left = 0
            self._outstanding = max(0, self._outstanding - left) if self._expiries else 0
        elif status == "409":
            # leadership change, consumer deleted or changed, too many waiting requests: the
            # server dropped our requests; ask again shortly
            log.warning(
                "pull on %s interrupted: %s", self._next_subject, (headers or {}).get("Description")
            )
            self._expiries.clear()
            self._outstanding = 0
            self._pause_until = time.monotonic() + 0.25
        # 100 (idle heartbeat) and 404 (no messages for a no-wait request) need nothing
        self._wake.set()
