"""JetStream KV: typed compare-and-set, and following keys with a watch.

A compare-and-set reads, decides with a pure function, writes if unchanged, and retries.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import Header
from nats.js.kv import KeyValue

from schemas import SafeDecoder
from valkyrie.bus.acked import acked_publisher
from valkyrie.bus.codec import encode
from valkyrie.errors import BusError

__all__ = [
    "KvChange",
    "Versioned",
    "cas_update",
    "get_versioned",
    "kv_create",
    "kv_write",
    "put_new",
    "watch_kv",
]

log = logging.getLogger("valkyrie.bus")

_WRONG_LAST = (10071, 10164)  # wrong last sequence; the key exists (a create)

T = TypeVar("T", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """A decoded record and the KV revision it was read at."""

    value: T
    revision: int


async def get_versioned(kv: KeyValue, key: str, decoder: SafeDecoder[T]) -> Versioned[T] | None:
    """Read ``key``; ``None`` when it does not exist (or was deleted)."""
    try:
        entry = await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return None
    if not entry.value:
        return None
    return Versioned(decoder.decode(entry.value), int(entry.revision or 0))


async def kv_write(kv: KeyValue, key: str, data: bytes, *, last: int, ttl: float | None) -> int:
    """Write ``key`` if its revision is still ``last`` (0: it must not exist); the new revision.

    Goes through the connection's :class:`~valkyrie.bus.acked.AckedPublisher` (about 0.6-0.7 of
    the client CPU of ``KeyValue.update``: ``benchmarks/kv_write.py``), using the bucket's
    subject prefix nats-py keeps on the handle.

    Raises:
        nats.js.errors.KeyWrongLastSequenceError: the key moved on (or exists, for ``last=0``).
    """
    nc = getattr(getattr(kv, "_js", None), "_nc", None)
    prefix = getattr(kv, "_pre", None)
    if nc is None or not isinstance(prefix, str):  # a nats-py without them: its own path
        return int(await kv._update(key, data, last=last, msg_ttl=ttl))
    headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
    if ttl is not None:
        headers[Header.MSG_TTL.value] = str(int(ttl))
    try:
        ack = await acked_publisher(nc).publish(prefix + key, data, headers)
    except nats.js.errors.APIError as e:
        if e.err_code in _WRONG_LAST:
            raise nats.js.errors.KeyWrongLastSequenceError(description=e.description) from e
        raise
    return ack.seq


async def kv_create(kv: KeyValue, key: str, data: bytes) -> int:
    """Create ``key``; the new revision.

    Raises:
        nats.js.errors.KeyWrongLastSequenceError: the key exists.
    """
    try:
        return await kv_write(kv, key, data, last=0, ttl=None)
    except nats.js.errors.KeyWrongLastSequenceError:
        # a deleted key still has a revision: nats-py's create knows how to write over it
        return int(await kv.create(key, data))


async def put_new(kv: KeyValue, key: str, value: T) -> int | None:
    """Create ``key``; the new revision, or ``None`` if it already exists."""
    try:
        return await kv_create(kv, key, encode(value))
    except nats.js.errors.KeyWrongLastSequenceError:
        return None


async def cas_update(
    kv: KeyValue,
    key: str,
    decoder: SafeDecoder[T],
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
            revision = await kv_write(kv, key, encode(new), last=current.revision, ttl=ttl)
        except nats.js.errors.KeyWrongLastSequenceError:
            current = None
            continue
        return Versioned(new, int(revision)), True
    raise BusError(f"KV key {key!r} kept changing; gave up after {attempts} compare-and-set tries")


@dataclass(frozen=True, slots=True)
class KvChange:
    """A watched key's new state; ``value`` is ``None`` when the key was deleted or purged."""

    key: str
    value: bytes | None
    revision: int


async def watch_kv(
    kv: KeyValue,
    keys: str = ">",
    *,
    started: Callable[[], object] | None = None,
    poll_s: float = 5.0,
    retry_s: float = 0.5,
) -> AsyncGenerator[KvChange, None]:
    """Follow ``keys`` of ``kv`` (one key, or a pattern: ``>`` is every key) until closed.

    Yields each key's current value first, then every change. ``started()`` is called once, when
    the values held at the start have been yielded and handled (nats-py's end marker, or
    ``poll_s`` without an entry), so a task can report itself started (``task_status.started``)
    with its view loaded. A watch that a NATS error interrupts is set up again after ``retry_s``
    and yields every current value again: handle a change by its revision, so that a repeat is
    harmless. Every wait is bounded by ``poll_s``; the watcher is stopped shielded, within 2 s,
    when the iteration ends. Iterate inside :func:`contextlib.aclosing` so that an early exit
    stops the watcher at once.

    Raises:
        BusError: the connection is closed.
    """
    pending = started
    while True:
        try:
            watcher = await kv.watch(keys)
        except nats.errors.ConnectionClosedError as e:
            raise BusError(f"cannot watch KV keys {keys!r}: the connection is closed") from e
        except nats.errors.Error as e:  # JetStream API errors and timeouts too
            log.warning("watch of KV keys %r not set up (%r); retrying", keys, e)
            await anyio.sleep(retry_s)
            continue
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=poll_s)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    entry = None
                if entry is None:
                    if pending is not None:
                        pending()
                        pending = None
                    continue
                deleted = entry.operation in ("DEL", "PURGE") or not entry.value
                yield KvChange(
                    key=entry.key,
                    value=None if deleted else entry.value,
                    revision=int(entry.revision or 0),
                )
        except nats.errors.Error as e:
            log.warning("watch of KV keys %r interrupted (%r); restarting", keys, e)
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(2),
                contextlib.suppress(nats.errors.Error),
            ):
                await watcher.stop()
        await anyio.sleep(retry_s)
