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
from valkyrie.config.live import LiveConfig, config_for
from valkyrie.errors import ConfigError
from valkyrie.runtime.health import HealthReporter
from valkyrie.runtime.metrics import HandlerMetrics
from valkyrie.runtime.views import SharedViews

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
    config: LiveConfig | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the named handlers (all registered ones by default) until ``stop`` is set."""
    available = discover_handlers()
    wanted = names or list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(
            f"unknown handler(s) {', '.join(unknown)}; registered: {', '.join(available) or 'none'}"
        )
    metrics = HandlerMetrics.create(registry)
    live = config if config is not None else LiveConfig(config_for(bus.settings))
    reporter = HealthReporter(bus, live, wanted, stop)
    async with anyio.create_task_group() as tg:
        views = SharedViews(bus, tg)
        workers = [
            available[n](
                HandlerContext(
                    bus=bus, registry=registry, metrics=metrics, name=n, config=live, views=views
                )
            )
            for n in wanted
        ]
        await tg.start(live.watch, bus)
        await tg.start(reporter.run)
        async with anyio.create_task_group() as running:
            for name, worker in zip(wanted, workers, strict=True):
                await running.start(reporter.track(name, worker.run), stop)
            reporter.started()
            log.info("handlers running: %s (config revision %d)", ", ".join(wanted), live.revision)
            task_status.started(wanted)
        # a deliberate stop is not a stall: tell the monitor before going quiet
        await reporter.goodbye()
        tg.cancel_scope.cancel()
