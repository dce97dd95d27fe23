"""Acknowledged JetStream publishes over one shared reply subscription.

nats-py's ``JetStreamContext.publish`` (which KV writes use too) makes a request per message: a
random reply token, a timer, a JSON parse of the answer into a dataclass. A publish whose answer
comes back on a shared wildcard subscription and is decoded by msgspec costs 0.6-0.7 of that
client CPU per KV write (``benchmarks/kv_write.py``, 64 writes in flight, on the project's 2-vCPU
machine). Handlers make several such writes per job, so the hot paths use this module.

Errors keep nats-py's types: a stream's refusal raises ``nats.js.errors.APIError`` (or its
subclass), a lost answer ``nats.errors.TimeoutError``, a missing stream
``nats.js.errors.NoStreamResponseError``.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

__all__ = ["AckedPublisher", "PubAck", "acked_publisher"]

DEFAULT_TIMEOUT_S = 5.0
_NO_RESPONDERS = "503"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class PubAck(msgspec.Struct):
    """The stream's answer to a publish."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_DECODER = msgspec.json.Decoder(PubAck)


class AckedPublisher:
    """Publishes to streams and resolves each publish's future when the stream answers."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[PubAck]] = {}
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        async with self._lock:
            if not self._prefix:
                prefix = self._nc.new_inbox() + "."
                await self._nc.subscribe(prefix + "*", cb=self._on_answer)
                self._prefix = prefix

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[PubAck]:
        """Publish; the returned future resolves to the ack (or fails with the stream's error).

        The caller bounds the wait (:meth:`publish` does, with a timeout).
        """
        if not self._prefix:
            await self._start()
        token = str(next(self._tokens))
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f: self._waiting.pop(token, None))
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> PubAck:
        """Publish and wait for the stream to store the message."""
        future = await self.send(subject, payload, headers)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError as e:
            raise nats.errors.TimeoutError from e

    async def _on_answer(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) :])
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            ack = _DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            future.set_exception(nats.js.errors.Error(f"unreadable publish ack: {e}"))
            return
        if ack.error is not None:
            error: dict[str, Any] = msgspec.structs.asdict(ack.error)
            try:
                nats.js.errors.APIError.from_error(error)  # raises the matching subclass
            except nats.js.errors.APIError as e:
                future.set_exception(e)
            return
        future.set_result(ack)


_BY_CLIENT: weakref.WeakKeyDictionary[NatsClient, AckedPublisher] = weakref.WeakKeyDictionary()


def acked_publisher(nc: NatsClient) -> AckedPublisher:
    """The connection's publisher (one reply subscription per connection)."""
    publisher = _BY_CLIENT.get(nc)
    if publisher is None:
        publisher = _BY_CLIENT[nc] = AckedPublisher(nc)
    return publisher
