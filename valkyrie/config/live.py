"""The config a process runs, kept current from the config KV bucket without a restart.

This module does no I/O: whoever holds the bus follows the bucket and hands each revision to
:meth:`LiveConfig.apply` (``valkyrie.runtime.views.watch_config``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from schemas import ConfigRevision, FieldError
from valkyrie.config.load import LoadedConfig
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.validate import validate_dotted

__all__ = ["CONFIG_KEY", "LiveConfig"]

log = logging.getLogger("valkyrie.config")
#: the key of the revision in force in the config bucket
CONFIG_KEY = "current"
Listener = Callable[[ValkyrieConfig, ValkyrieConfig], None]


def _set_log_level(level: str) -> None:
    """Apply ``observability.log_level`` to Valkyrie's own loggers (it is a live key)."""
    for name in ("valkyrie", "handlers"):
        logging.getLogger(name).setLevel(level.upper())


class LiveConfig:
    """The effective config of this process and the runtime revision it runs.

    ``current`` is swapped atomically when a new revision arrives; readers just read it.
    """

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.current: ValkyrieConfig = loaded.config
        self.revision = 0
        self.runtime: dict[str, Any] = {}
        self.applied_at = time.time()
        self.last_error: list[FieldError] = []
        self._listeners: list[Listener] = []
        self._changed = anyio.Event()

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after each applied revision."""
        self._listeners.append(listener)

    async def changed(self) -> None:
        """Wait for the next applied revision."""
        await self._changed.wait()

    def apply(self, revision: ConfigRevision) -> list[FieldError]:
        """Run ``revision`` if it is newer and valid here; return the problems otherwise."""
        if revision.revision <= self.revision:
            return []
        result = validate_dotted(self.loaded.with_runtime(revision.values))
        if result.config is None:
            self.last_error = result.errors
            log.error("config revision %d refused here: %s", revision.revision, result.errors)
            return result.errors
        old, self.current = self.current, result.config
        self.revision = revision.revision
        self.runtime = dict(revision.values)
        self.applied_at = time.time()
        self.last_error = []
        if old.observability.log_level != result.config.observability.log_level:
            _set_log_level(result.config.observability.log_level)
        log.info(
            "config revision %d applied (%s); epoch_ms=%.3f",
            revision.revision,
            ", ".join(sorted(revision.diff)) or "no change here",
            self.applied_at * 1000,
        )
        for listener in self._listeners:
            try:
                listener(old, result.config)
            except Exception:
                log.exception("config listener failed")
        event, self._changed = self._changed, anyio.Event()
        event.set()
        return []

    def sources(self) -> dict[str, str]:
        """Where each effective value came from (runtime wins over the process's layers)."""
        out = dict(self.loaded.sources)
        for key in self.runtime:
            out[key] = "runtime"
        return out
