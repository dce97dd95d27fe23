"""The config a process runs, kept current from the config KV bucket without a restart."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus

from schemas import ConfigRevision, FieldError
from valkyrie.config.load import LEGACY_ENV, LoadedConfig, load_config
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.settings import Settings
from valkyrie.config.validate import validate_dotted

__all__ = ["CONFIG_KEY", "LiveConfig", "config_for", "settings_with_config"]

log = logging.getLogger("valkyrie.config")
CONFIG_KEY = "current"
_REVISION = msgspec.json.Decoder(ConfigRevision)
Listener = Callable[[ValkyrieConfig, ValkyrieConfig], None]


def config_for(settings: Settings, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """The process's base config: profile, file and environment from ``settings``.

    Flat settings that are also config keys (``ack_wait_s`` …) count as the ``env`` layer when they
    differ from their defaults, so ``Settings(...)`` overrides keep working.
    """
    defaults = Settings()
    extra: dict[str, Any] = {}
    for name, key in LEGACY_ENV.items():
        value = getattr(settings, name)
        if value != getattr(defaults, name):
            extra[key] = value
    return load_config(
        profile=settings.profile,
        file=Path(settings.config_file) if settings.config_file else None,
        environ=environ,
        extra_env=extra,
    )


def _set_log_level(level: str) -> None:
    """Apply ``observability.log_level`` to Valkyrie's own loggers (it is a live key)."""
    for name in ("valkyrie", "handlers"):
        logging.getLogger(name).setLevel(level.upper())


def settings_with_config(settings: Settings, config: ValkyrieConfig) -> Settings:
    """``settings`` with its flat fields that are also config keys taken from ``config``.

    Code that reads those fields from the process settings then sees the layered config's values
    (profile, file, environment) too.
    """
    from valkyrie.config.model import flatten

    values = flatten(config)
    changes = {name: values[key] for name, key in LEGACY_ENV.items() if key in values}
    return msgspec.structs.replace(settings, **changes)


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

    async def watch(
        self, bus: Any, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the config bucket; apply every revision (started once the current one is in)."""
        kv = await bus.kv("config")
        watcher = await kv.watch(CONFIG_KEY)
        started = False
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5.0)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    entry = None
                except nats.errors.Error as e:
                    log.warning("config watch interrupted (%r); retrying", e)
                    await anyio.sleep(0.5)
                    continue
                if entry is not None and entry.value:
                    try:
                        self.apply(_REVISION.decode(entry.value))
                    except msgspec.DecodeError as e:
                        log.error("unreadable config revision: %s", e)
                if not started and (entry is None or entry.value):
                    started = True
                    task_status.started()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await watcher.stop()
