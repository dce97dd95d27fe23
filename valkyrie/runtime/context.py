"""What a handler is: a factory ``create(ctx: HandlerContext) -> Worker`` found by entry point.

A handler module exposes ``create``; packaging metadata names it under the ``valkyrie.handlers``
entry-point group, so a new handler is a new module plus one entry point, never an edit to the
core. :func:`valkyrie.runtime.app.run_workers` runs them.
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
from valkyrie.runtime.metrics import HandlerMetrics
from valkyrie.runtime.views import SharedViews

__all__ = ["ENTRY_POINT_GROUP", "HandlerContext", "HandlerFactory", "Worker", "discover_handlers"]

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
