"""Reading a whole KV bucket or a window of a stream: exact, bounded, no state kept afterwards."""

from __future__ import annotations

import datetime as dt
from typing import TypeVar

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas import Event, SafeDecoder
from valkyrie.bus.codec import EVENT_DECODER
from valkyrie.bus.connection import Bus
from valkyrie.bus.snapshot import read_stored

__all__ = ["bucket_values", "stream_events"]


T = TypeVar("T")


async def bucket_values(bus: Bus, bucket: str, decoder: SafeDecoder[T]) -> list[T]:
    """The current value of every key of KV bucket ``bucket`` (``runners``, ``jobs`` …)."""
    await bus.kv(bucket)  # a clear error when the bucket does not exist
    name = bus.names.bucket(bucket)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    raw, _ = await read_stored(bus, f"KV_{name}", f"$KV.{name}.>", config, limit=1_000_000)
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
    )
    raw, truncated = await read_stored(
        bus, bus.names.stream("events"), bus.names.events(pattern), config, limit=limit
    )
    events: list[tuple[int, Event]] = []
    for seq, data, _headers in raw:
        try:
            events.append((seq, EVENT_DECODER.decode(data)))
        except msgspec.DecodeError:
            continue
    return events, truncated
