"""Reading a whole KV bucket or a window of a stream: exact, bounded, no state kept afterwards."""

from __future__ import annotations

import datetime as dt
from typing import TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import Event, SafeDecoder
from valkyrie.bus.codec import EVENT_DECODER
from valkyrie.bus.connection import Bus
from valkyrie.errors import BusError

__all__ = ["bucket_values", "stream_events"]

T = TypeVar("T")


async def _drain(
    bus: Bus, stream: str, subject: str, config: ConsumerConfig, limit: int
) -> tuple[list[tuple[int, bytes, dict[str, str]]], bool]:
    """Every message an ephemeral pull consumer has pending when created (at most ``limit``).

    The pending count taken before anything is delivered says exactly how many to wait for, so the
    read ends as soon as it has them (a watcher's end marker can arrive before the entries).
    """
    out: list[tuple[int, bytes, dict[str, str]]] = []
    truncated = False
    try:
        psub = await bus.js.pull_subscribe(subject, stream=stream, config=config)
        consumer: str | None = None
        try:
            info = await psub.consumer_info()
            consumer = info.name
            remaining = info.num_pending or 0
            if remaining > limit:
                remaining, truncated = limit, True
            while remaining > 0:
                msgs = await psub.fetch(batch=min(remaining, 512), timeout=10.0)
                remaining -= len(msgs)
                for msg in msgs:
                    out.append(
                        (int(msg.metadata.sequence.stream), msg.data, dict(msg.headers or {}))
                    )
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await psub.unsubscribe()
                if consumer is not None:
                    await bus.js.delete_consumer(stream, consumer)
    except (nats.errors.Error, nats.js.errors.Error) as e:
        raise BusError(f"reading {stream} failed: {e!r}") from e
    return out, truncated


async def bucket_values(bus: Bus, bucket: str, decoder: SafeDecoder[T]) -> list[T]:
    """The current value of every key of KV bucket ``bucket`` (``runners``, ``jobs`` …)."""
    await bus.kv(bucket)  # a clear error when the bucket does not exist
    name = bus.names.bucket(bucket)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    raw, _ = await _drain(bus, f"KV_{name}", f"$KV.{name}.>", config, limit=1_000_000)
    values: list[T] = []
    for _seq, data, headers in raw:
        if headers.get("KV-Operation") in ("DEL", "PURGE") or not data:
            continue
        try:
            values.append(decoder.decode(data))
        except msgspec.DecodeError:
            continue
    return values


async def stream_events(
    bus: Bus, pattern: str, *, since: dt.datetime, limit: int
) -> tuple[list[tuple[int, Event]], bool]:
    """Events on ``<prefix>.events.<pattern>`` stored since ``since`` (at most ``limit``).

    Returns the ``(seq, event)`` pairs, oldest first, and whether ``limit`` cut the window short.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=since,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    raw, truncated = await _drain(
        bus, bus.names.stream("events"), bus.names.events(pattern), config, limit
    )
    events: list[tuple[int, Event]] = []
    for seq, data, _headers in raw:
        try:
            events.append((seq, EVENT_DECODER.decode(data)))
        except msgspec.DecodeError:
            continue
    return events, truncated
