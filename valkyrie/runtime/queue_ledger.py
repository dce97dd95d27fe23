"""The queue ledger: every dispatcher's :class:`~schemas.QueueSnapshot` in the stats bucket.

Writers: each dispatcher writes what it holds under ``queue.<instance>`` when it changed (at most
every ``WRITE_EVERY_S``) and at least every ``REFRESH_S``, so readers can tell a stopped
dispatcher (stale snapshot) from an idle one; it deletes its key on a clean stop. Readers
(:class:`QueueLedger`: intake's per-tenant quota, the gateway, ``valkyrie status``) watch the
keys and add up the fresh snapshots (:func:`~valkyrie.domain.scheduling.ledger.merge_snapshots`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus

from schemas import QueueSnapshot
from valkyrie.bus.codec import encode, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import watch_kv
from valkyrie.domain.scheduling.ledger import merge_snapshots

__all__ = ["FRESH_MS", "LEDGER_PREFIX", "QueueLedger", "publish_queue"]

log = logging.getLogger("valkyrie.queue")
LEDGER_PREFIX = "queue."
#: a changed queue is written at most this often
WRITE_EVERY_S = 1.0
#: an unchanged queue is written again this often (its freshness)
REFRESH_S = 5.0
#: a snapshot older than this belongs to a dispatcher that stopped
FRESH_MS = 15_000
_DECODER = msgspec.json.Decoder(QueueSnapshot)


def _same(a: QueueSnapshot | None, b: QueueSnapshot) -> bool:
    return a is not None and msgspec.structs.replace(a, at_ms=b.at_ms) == b


async def publish_queue(
    bus: Bus,
    snapshot: Callable[[], QueueSnapshot],
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Write ``snapshot()`` to the ledger until ``stop``; then delete this instance's entry."""
    stats = await bus.kv("stats")
    last: QueueSnapshot | None = None
    written_at = 0.0
    key = ""
    task_status.started()
    try:
        while not stop.is_set():
            current = snapshot()
            key = LEDGER_PREFIX + current.instance
            if not _same(last, current) or anyio.current_time() - written_at >= REFRESH_S:
                try:
                    await stats.put(key, encode(current))
                    last, written_at = current, anyio.current_time()
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    log.debug("queue ledger not written (%r); next round", e)
            with anyio.move_on_after(WRITE_EVERY_S):
                await stop.wait()
    finally:
        if key:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await stats.delete(key)
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    log.debug("queue ledger entry %s not deleted (%r)", key, e)


class QueueLedger:
    """The latest snapshot of every dispatcher, kept current by a watch of the stats bucket."""

    def __init__(self) -> None:
        self.snapshots: dict[str, QueueSnapshot] = {}

    async def follow(
        self, bus: Bus, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the ledger for ever (started once the current entries are in)."""
        stats = await bus.kv("stats")
        async with contextlib.aclosing(
            watch_kv(stats, f"{LEDGER_PREFIX}>", started=lambda: task_status.started())
        ) as changes:
            async for change in changes:
                instance = change.key[len(LEDGER_PREFIX) :]
                if change.value is None:
                    self.snapshots.pop(instance, None)
                    continue
                try:
                    self.snapshots[instance] = _DECODER.decode(change.value)
                except msgspec.DecodeError:
                    log.warning("unreadable queue snapshot %s", change.key)

    def queued_of(self, tenant: str, now: int | None = None) -> int:
        """Jobs ``tenant`` has queued, by the fresh snapshots (a few seconds stale at most).

        Each dispatcher names its largest tenants only (``MAX_TENANTS``); a tenant merged into
        ``(other)`` there counts nothing from that dispatcher.
        """
        at = now_ms() if now is None else now
        return sum(
            snap.tenants.get(tenant, 0)
            for snap in self.snapshots.values()
            if at - snap.at_ms <= FRESH_MS
        )

    def total(self, now: int | None = None) -> QueueSnapshot:
        """The installation's queue now: the sum of every fresh snapshot."""
        return merge_snapshots(
            self.snapshots.values(), now_ms=now_ms() if now is None else now, fresh_ms=FRESH_MS
        )

    @classmethod
    async def read(cls, bus: Bus, *, timeout_s: float = 5.0) -> QueueSnapshot:
        """The installation's queue, read once (for a command or a request)."""
        ledger = cls()
        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:
                await tg.start(ledger.follow, bus)
                tg.cancel_scope.cancel()
        return ledger.total()
