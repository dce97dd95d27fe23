"""What every handler holds: its name, context, connection, event publisher, job operations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from valkyrie.bus.events import EventPublisher
from valkyrie.runtime.consumer import Redact, StreamConsumer
from valkyrie.runtime.context import HandlerContext
from valkyrie.runtime.jobops import JobOps

__all__ = ["HandlerBase"]


class HandlerBase:
    """Base class of the handler workers (subclasses add ``run``)."""

    def __init__(self, ctx: HandlerContext) -> None:
        self.name = ctx.name
        self._ctx = ctx
        self._bus = ctx.bus
        self._events = EventPublisher(
            ctx.bus, ctx.name, observe=lambda event: ctx.metrics.observe_event(ctx.name, event)
        )
        self._ops = JobOps(ctx.bus, self._events, lambda: ctx.config.current.limits.job_retention_s)

    async def consume(
        self,
        stop: anyio.Event,
        *,
        stream: str,
        filter_subject: str | Sequence[str],
        handle: Callable[[Msg], Awaitable[None]],
        concurrency: int | None = None,
        redact: Redact | None = None,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume ``stream`` through this handler's durable consumer until ``stop`` is set.

        Sizes come from the ``performance`` config section (read at start: not live);
        ``concurrency`` overrides ``handler_concurrency`` for handlers that must go one by one;
        ``redact`` decides what a dead letter keeps of a message body.
        """
        consumer = StreamConsumer(
            name=self.name,
            bus=self._bus,
            stream=self._bus.names.stream(stream),
            filter_subject=filter_subject,
            handle=handle,
            metrics=self._ctx.metrics,
            performance=self._ctx.config.current.performance,
            concurrency=concurrency,
            redact=redact,
        )
        await consumer.run(stop, task_status=task_status)
