"""How workers are found and run: handlers register under the ``valkyrie.handlers`` entry-point group.

A handler module exposes ``create(ctx: HandlerContext) -> Worker``; packaging metadata names it, so a
new handler is a new module plus one entry point, never an edit to the core.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Protocol

import anyio
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from valkyrie.bus.connection import Bus
from valkyrie.config.live import LiveConfig
from valkyrie.errors import ConfigError
from valkyrie.runtime.health import HealthReporter
from valkyrie.runtime.metrics import HandlerMetrics
from valkyrie.runtime.views import SharedViews, watch_config

__all__ = [
    "ENTRY_POINT_GROUP",
    "HandlerContext",
    "HandlerFactory",
    "Worker",
    "discover_handlers",
    "run_workers",
]

ENTRY_POINT_GROUP = "valkyrie.handlers"
log = logging.getLogger("valkyrie.handlers")


@dataclass(frozen=True)
class HandlerContext:
    """What a handler factory receives: the connection, metrics, its name and the live config."""

    bus: Bus
    registry: CollectorRegistry
    metrics: HandlerMetrics
    name: str
    config: LiveConfig
    views: SharedViews


class Worker(Protocol):
    """A long-running handler."""

    name: str

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Work until ``stop`` is set, finish what is in flight, then return."""


HandlerFactory = Callable[[HandlerContext], Worker]


def discover_handlers() -> dict[str, HandlerFactory]:
    """Every registered handler factory, by name."""
    found: dict[str, HandlerFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load()
    return dict(sorted(found.items()))


async def run_workers(
    bus: Bus,
    registry: CollectorRegistry,
    stop: anyio.Event,
    names: list[str] | None = None,
    *,
    config: LiveConfig,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the named handlers (all registered ones by default) until ``stop`` is set.

    ``config`` is the process's live config (built once at start from its loaded config); it is
    kept current from the config bucket here while the handlers run.
    """
    available = discover_handlers()
    wanted = names or list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(
            f"unknown handler(s) {', '.join(unknown)}; registered: {', '.join(available) or 'none'}"
        )
    metrics = HandlerMetrics.create(registry)
    reporter = HealthReporter(bus, config, wanted, stop)
    async with anyio.create_task_group() as tg:
        views = SharedViews(bus, tg)
        workers = [
            available[n](
                HandlerContext(
                    bus=bus, registry=registry, metrics=metrics, name=n, config=config, views=views
                )
            )
            for n in wanted
        ]
        await tg.start(watch_config, bus, config)
        await tg.start(reporter.run)
        async with anyio.create_task_group() as running:
            for name, worker in zip(wanted, workers, strict=True):
                await running.start(reporter.track(name, worker.run), stop)
            reporter.started()
            log.info(
                "handlers running: %s (config revision %d)", ", ".join(wanted), config.revision
            )
            task_status.started(wanted)
        # a deliberate stop is not a stall: tell the monitor before going quiet
        await reporter.goodbye()
        tg.cancel_scope.cancel()
