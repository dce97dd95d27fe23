"""What every handler holds: its name, context, connection, event publisher, job operations."""

from __future__ import annotations

from valkyrie._events import EventPublisher
from valkyrie._handlers import HandlerContext
from valkyrie._jobops import JobOps

__all__ = ["HandlerBase"]


class HandlerBase:
    """Base class of the handler workers (subclasses add ``run``)."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        self._ctx = ctx
        self._bus = ctx.bus
        self._events = EventPublisher(ctx.bus, ctx.name)
        self._ops = JobOps(ctx.bus, self._events, lambda: ctx.config.current.limits.job_retention_s)
