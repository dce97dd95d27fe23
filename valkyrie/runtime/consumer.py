"""The consume loop every stream handler shares: fetch, process concurrently, settle each message.

A handler's ``handle`` coroutine decides a message's fate: returning acks it (only after the handler
made its state durable), :class:`RetryLater` naks it with a delay, :class:`GiveUp` dead-letters and
terminates it. Any other exception is retried with backoff until ``max_deliver`` deliveries, then
dead-lettered, so one poison message cannot stall a handler.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import FieldError
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher
from valkyrie.bus.pullfeed import PullFeed, ensure_consumer, filters
from valkyrie.config.model import PerformanceConfig
from valkyrie.errors import GiveUp, RetryLater
from valkyrie.runtime.metrics import HandlerMetrics

__all__ = ["StreamConsumer", "delivery_count", "headers_of"]

log = logging.getLogger("valkyrie.worker")

Handle = Callable[[Msg], Awaitable[None]]
#: a message body -> what a dead letter may keep of it, and a note on what was removed
Redact = Callable[[bytes], tuple[bytes, str | None]]
#: errors that say the bus is unavailable for now (a leader election, a reconnect), not that the
#: message is bad: the handler is tried again in place, without using up a delivery
UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
OUTAGE_PATIENCE_S = 120.0  # how long one message waits out an outage before it counts as failed


def delivery_count(msg: Msg) -> int:
    """How many times JetStream has delivered ``msg`` (1 on first delivery)."""
    try:
        return int(msg.metadata.num_delivered)
    except (nats.errors.Error, AttributeError, TypeError, ValueError):
        return 1


def headers_of(msg: Msg) -> dict[str, str]:
    """The message's headers as a plain dict."""
    return dict(msg.headers or {})


@dataclass
class StreamConsumer:
    """Consume one durable pull consumer with bounded concurrency.

    Attributes:
        name: handler name (durable consumer name, metrics label, dead-letter source).
        bus: the connection.
        stream: stream to consume.
        filter_subject: subject filter of the consumer (or several: legacy and identity subjects).
        handle: the handler's per-message coroutine.
        metrics: collectors to count on.
        performance: the ``performance`` config section: concurrency, fetch batch, deliveries
            before dead-lettering, ack wait (the model's defaults when not given).
        concurrency: messages processed at once; ``None`` = ``performance.handler_concurrency``.
        fetch_timeout_s: how long one pull waits for messages.
        redact: what a dead letter keeps of a message body (say, without secret values); the
            note it returns is added to the dead letter's reason.
    """

    name: str
    bus: Bus
    stream: str
    filter_subject: str | Sequence[str]
    handle: Handle
    metrics: HandlerMetrics
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    concurrency: int | None = None
    fetch_timeout_s: float = 0.5
    redact: Redact | None = None

    def __post_init__(self) -> None:
        self._events = EventPublisher(self.bus, self.name)
        perf = self.performance
        self._concurrency = self.concurrency or perf.handler_concurrency
        self._max_deliver = perf.max_deliver
        self._stop: anyio.Event | None = None
        # label lookups are not free: resolve this handler's children once
        m = self.metrics
        self._in_flight = m.in_flight.labels(self.name)
        self._duration = m.duration.labels(self.name)
        self._outcomes: dict[str, Any] = {}

    def consumer_config(self) -> ConsumerConfig:
        """The durable consumer's configuration."""
        return ConsumerConfig(
            durable_name=self.name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.performance.ack_wait_s,
            # Poison messages are dead-lettered by us (with a reason), so the server must keep
            # delivering until we do; the +1 bounds it if our dead-lettering itself keeps failing.
            max_deliver=self._max_deliver + 1,
            max_ack_pending=max(self._concurrency * 4, 256),
            **filters(self.filter_subject),
        )

    async def run(
        self,
        stop: anyio.Event,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until ``stop`` is set, then finish the messages in flight and return."""
        await ensure_consumer(self.bus, self.stream, self.consumer_config())
        self._stop = stop
        self._active = 0
        async with anyio.create_task_group() as tg:

            async def deliver(msg: Msg) -> None:
                self._active += 1
                tg.start_soon(self._process, msg)

            self._feed = PullFeed(
                self.bus,
                stream=self.stream,
                durable=self.name,
                room=lambda: self._concurrency - self._active,
                deliver=deliver,
                expires_s=self.fetch_timeout_s,
                min_batch=max(1, self._concurrency // 4),
                max_batch=self.performance.fetch_batch,
            )
            await tg.start(self._feed.run, stop)
            task_status.started()

    async def _process(self, msg: Msg) -> None:
        started = time.perf_counter()
        self._in_flight.inc()
        try:
            outcome = await self._settle(msg)
            counter = self._outcomes.get(outcome)
            if counter is None:
                counter = self._outcomes[outcome] = self.metrics.messages.labels(self.name, outcome)
            counter.inc()
        finally:
            self._in_flight.dec()
            self._duration.observe(time.perf_counter() - started)
            self._active -= 1
            self._feed.wake()

    async def _settle(self, msg: Msg) -> str:
        deliveries = delivery_count(msg)
        try:
            await self._handle_through_outages(msg)
        except RetryLater as r:
            if deliveries >= self._max_deliver:
                await self._dead(msg, f"gave up after {deliveries} deliveries: {r.reason}", [])
                return "dead"
            await self._nak(msg, r.delay_s)  # the handler's own timing (e.g. a durable timer)
            return "retry"
        except GiveUp as g:
            await self._dead(msg, g.reason, g.errors)
            return "dead"
        except Exception as e:  # a handler bug must not kill the worker: retry, then dead-letter
            log.exception(
                "%s: handler failed on %s (delivery %d)", self.name, msg.subject, deliveries
            )
            if deliveries >= self._max_deliver:
                await self._dead(msg, f"handler error after {deliveries} deliveries: {e!r}", [])
                return "dead"
            await self._nak(msg, self._backoff(min(0.1 * 2**deliveries, 5.0)))
            return "error"
        try:
            await msg.ack()
        except (nats.errors.Error, OSError) as e:
            # The state is durable; a lost ack only means a redelivery the handler absorbs.
            log.warning("%s: ack failed (%r); message will be redelivered", self.name, e)
        return "ack"

    async def _handle_through_outages(self, msg: Msg) -> None:
        """Run the handler; while the bus is unavailable, run it again in place.

        An outage is no fault of the message: naking would use up its deliveries within seconds
        and dead-letter a good message (or strand it, when the dead-letter stream is out too). The
        delivery is kept alive with ``in_progress`` meanwhile. On stop, or after
        ``OUTAGE_PATIENCE_S``, the error takes the usual way.
        """
        delay, give_up = 0.1, time.monotonic() + OUTAGE_PATIENCE_S
        for tries in itertools.count():
            try:
                await self.handle(msg)
                return
            except UNAVAILABLE as e:
                stopping = self._stop is not None and self._stop.is_set()
                if stopping or time.monotonic() >= give_up:
                    raise
                if tries == 0:
                    log.warning("%s: bus unavailable (%r); retrying %s", self.name, e, msg.subject)
            try:
                await msg.in_progress()
            except (nats.errors.Error, OSError):
                pass  # then it comes back after ack_wait, which handlers absorb
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _backoff(self, delay_s: float) -> float:
        # While stopping, hand the message back at once: another process retries it now rather
        # than after a delay during which it still counts as unacknowledged.
        return 0.0 if self._stop is not None and self._stop.is_set() else delay_s

    async def _nak(self, msg: Msg, delay_s: float) -> None:
        try:
            await msg.nak(delay=delay_s)
        except (nats.errors.Error, OSError) as e:
            log.warning("%s: nak failed (%r); redelivery after ack_wait", self.name, e)

    async def _dead(self, msg: Msg, reason: str, errors: list[FieldError]) -> None:
        field_errors = list(errors)
        try:
            seq = int(msg.metadata.sequence.stream)
        except (nats.errors.Error, AttributeError, TypeError, ValueError):
            seq = None
        payload, note = self.redact(msg.data) if self.redact is not None else (msg.data, None)
        if note:
            reason = f"{reason} ({note})"
        try:
            await self._events.dead_letter(
                subject=msg.subject,
                payload=payload,
                reason=reason,
                errors=field_errors,
                deliveries=delivery_count(msg),
                stream_seq=seq,
                headers=headers_of(msg),
            )
        except (nats.errors.Error, OSError) as e:
            # Not stored: leave the message for redelivery rather than lose it.
            log.warning("%s: dead-lettering failed (%r)", self.name, e)
            await self._nak(msg, 1.0)
            return
        self.metrics.dead_letters.labels(self.name).inc()
        try:
            await msg.term()
        except (nats.errors.Error, OSError) as e:
            log.warning("%s: term failed (%r)", self.name, e)
