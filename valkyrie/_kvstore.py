"""Typed compare-and-set over JetStream KV: read, decide (pure function), write if unchanged, retry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from valkyrie._codec import encode
from valkyrie._errors import BusError

__all__ = ["Versioned", "cas_update", "get_versioned", "put_new"]

T = TypeVar("T", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A decoded record and the KV revision it was read at."""

    value: T
    revision: int


async def get_versioned(
    kv: KeyValue, key: str, decoder: msgspec.json.Decoder[T]
) -> Versioned[T] | None:
    """Read ``key``; ``None`` when it does not exist (or was deleted)."""
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if not entry.value:
        return None
    return Versioned(decoder.decode(entry.value), int(entry.revision or 0))


async def put_new(kv: KeyValue, key: str, value: T) -> int | None:
    """Create ``key``; the new revision, or ``None`` if it already exists."""
    try:
        return int(await kv.create(key, encode(value)))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def cas_update(
    kv: KeyValue,
    key: str,
    decoder: msgspec.json.Decoder[T],
    decide: Callable[[T], T | None],
    *,
    known: Versioned[T] | None = None,
    attempts: int = 20,
    ttl_for: Callable[[T], float | None] | None = None,
) -> tuple[Versioned[T] | None, bool]:
    """Apply ``decide`` to the current record until the write wins a compare-and-set.

    ``decide`` returns the new record, or ``None`` to leave it unchanged. ``known`` (a recent read)
    saves the first get. ``ttl_for`` may give the new record a time to live (seconds; the server
    removes it then). Returns ``(latest, written)``; latest is ``None`` when the key is absent.

    Raises:
        BusError: when the record kept changing under us for ``attempts`` tries.
    """
    current = known
    for _ in range(attempts):
        if current is None:
            current = await get_versioned(kv, key, decoder)
            if current is None:
                return None, False
        new = decide(current.value)
        if new is None:
            if current is known:
                # No write means no compare-and-set to expose a stale ``known``: decide again on
                # the current record before the caller acts on "nothing to change".
                current = known = None
                continue
            return current, False
        ttl = ttl_for(new) if ttl_for is not None else None
        try:
            if ttl is None:
                revision = await kv.update(key, encode(new), last=current.revision)
            else:
                # the public update() does not take a TTL; _update is what it calls
                revision = await kv._update(key, encode(new), last=current.revision, msg_ttl=ttl)
        except nats.js.errors.KeyWrongLastSequenceError:
            current = None
            continue
        return Versioned(new, int(revision)), True
    raise BusError(f"KV key {key!r} kept changing; gave up after {attempts} compare-and-set tries")
