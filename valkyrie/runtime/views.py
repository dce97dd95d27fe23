"""In-memory views kept current by KV watches.

The runners bucket (:class:`RunnerView`), and the config revision in force, applied to the
process's :class:`~valkyrie.config.live.LiveConfig` (:func:`watch_config`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from nats.js.kv import KeyValue

from schemas import RunnerRecord
from valkyrie.bus.codec import CONFIG_REVISION_DECODER, RUNNER_DECODER
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import Versioned, watch_kv
from valkyrie.config.live import CONFIG_KEY, LiveConfig
from valkyrie.runtime.placer import LocalPlacer
from valkyrie.runtime.queue_ledger import QueueLedger

__all__ = ["RunnerView", "SharedViews", "watch_config"]

log = logging.getLogger("valkyrie.runners")
_config_log = logging.getLogger("valkyrie.config")
Listener = Callable[[str, Versioned[RunnerRecord] | None], None]


class RunnerView:
    """Every runner record at its latest revision; ``listener`` hears each change."""

    def __init__(self, kv: KeyValue, listener: Listener | None = None) -> None:
        self.kv = kv
        self.records: dict[str, Versioned[RunnerRecord]] = {}
        self._listeners: list[Listener] = [listener] if listener is not None else []

    def add_listener(self, listener: Listener) -> None:
        """Hear every later change; the records held now are replayed to it first."""
        for runner_id, versioned in list(self.records.items()):
            listener(runner_id, versioned)
        self._listeners.append(listener)

    def _tell(self, runner_id: str, versioned: Versioned[RunnerRecord] | None) -> None:
        for listener in self._listeners:
            listener(runner_id, versioned)

    def offer(self, runner_id: str, versioned: Versioned[RunnerRecord]) -> bool:
        """Adopt a record we wrote ourselves if it is newer than what we hold."""
        known = self.records.get(runner_id)
        if known is not None and known.revision >= versioned.revision:
            return False
        self.records[runner_id] = versioned
        self._tell(runner_id, versioned)
        return True

    async def watch(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the bucket forever (started once the initial records are loaded)."""
        changes = watch_kv(self.kv, started=task_status.started)
        async with contextlib.aclosing(changes):
            async for change in changes:
                if change.value is None:
                    if self.records.pop(change.key, None) is not None:
                        self._tell(change.key, None)
                    continue
                try:
                    record = RUNNER_DECODER.decode(change.value)
                except msgspec.DecodeError:
                    log.warning("unreadable runner record %s", change.key)
                    continue
                self.offer(change.key, Versioned(record, change.revision))


class SharedViews:
    """What one process's handlers share: one watch of the runners bucket, not one each.

    Likewise one watch of the queue ledger (intake's per-tenant quota).

    Every runner-record write (two per job) reaches each watcher; with the dispatcher, registry,
    supervisor and monitor in one process that was four deliveries and four decodes per write.
    A dispatcher also offers itself here (``placer``) so intake can hand it new jobs directly.
    """

    def __init__(self, bus: Bus, task_group: TaskGroup) -> None:
        self._bus = bus
        self._tg = task_group
        self._runners: RunnerView | None = None
        self._ledger: QueueLedger | None = None
        self._lock = anyio.Lock()
        #: a dispatcher of this process that places new jobs at once (None: there is none)
        self.placer: LocalPlacer | None = None

    async def runners(self) -> RunnerView:
        """The process's runner view, loaded (started on first use)."""
        async with self._lock:
            if self._runners is None:
                view = RunnerView(await self._bus.kv("runners"))
                await self._tg.start(view.watch)
                self._runners = view
            return self._runners

    async def queue_ledger(self) -> QueueLedger:
        """The process's view of the queue ledger, loaded (started on first use)."""
        async with self._lock:
            if self._ledger is None:
                ledger = QueueLedger()
                await self._tg.start(ledger.follow, self._bus)
                self._ledger = ledger
            return self._ledger


async def watch_config(
    bus: Bus, live: LiveConfig, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Hand every revision of the config bucket to ``live`` (started once the one in force is in).

    Each process runs one of these per :class:`~valkyrie.config.live.LiveConfig` it owns.
    """
    changes = watch_kv(await bus.kv("config"), CONFIG_KEY, started=task_status.started)
    async with contextlib.aclosing(changes):
        async for change in changes:
            if change.value is None:
                continue
            try:
                live.apply(CONFIG_REVISION_DECODER.decode(change.value))
            except msgspec.DecodeError as e:
                _config_log.error("unreadable config revision: %s", e)
