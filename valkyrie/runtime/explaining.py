"""Answering a dispatcher's requests: ``jobs.explain`` and ``jobs.queue``.

``<prefix>.jobs.explain``: why a job waits, or why it went where it went; ``<prefix>.jobs.queue``:
a page of the queued jobs this dispatcher holds, with short reasons.

The answers are assembled from what the dispatcher knows (its queue and runner index) and what is
stored (the job record, the ``job.dispatched`` decision); the explanations and the listing are
pure logic (:mod:`valkyrie.domain.explain`, :mod:`valkyrie.domain.scheduling.listing`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from schemas import (
    ExplainRequest,
    JobDispatched,
    JobExplanation,
    JobRecord,
    JobState,
    QueueListing,
    QueueListRequest,
    SafeDecoder,
)
from valkyrie.bus.codec import encode
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import Versioned
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.explain import explain_dispatched, explain_queued
from valkyrie.domain.scheduling.index import RunnerIndex
from valkyrie.domain.scheduling.listing import list_queue
from valkyrie.domain.scheduling.queue import DispatchQueue

__all__ = ["Explainer"]

log = logging.getLogger("valkyrie.dispatcher")
_REQUEST = SafeDecoder(ExplainRequest)
_LIST_REQUEST = SafeDecoder(QueueListRequest)


class Explainer:
    """Explains jobs from one dispatcher's point of view."""

    def __init__(
        self,
        *,
        queue: DispatchQueue,
        index: RunnerIndex,
        config: Callable[[], ValkyrieConfig],
        read: Callable[[str], Awaitable[Versioned[JobRecord] | None]],
        decision_of: Callable[[str], Awaitable[JobDispatched | None]],
        now_ms: Callable[[], int],
        instance: str = "",
    ) -> None:
        self._instance = instance
        self._queue = queue
        self._index = index
        self._config = config
        self._read = read
        self._decision_of = decision_of
        self._now_ms = now_ms

    async def subscribe(self, bus: Bus) -> list[Subscription]:
        """Answer ``jobs.explain`` and ``jobs.queue`` requests (unsubscribe when done).

        Every dispatcher answers (no queue group): only the one holding a queued job knows its
        place in line, and the client waits a moment for that answer; likewise each dispatcher
        lists the jobs it holds.
        """
        return [
            await bus.nc.subscribe(bus.names.explain, cb=self.answer),
            await bus.nc.subscribe(bus.names.queue_list, cb=self.answer_queue),
        ]

    async def explain(self, job_id: str) -> JobExplanation:
        """Why ``job_id`` is pending, or why it went where it went."""
        current = await self._read(job_id)
        if current is None:
            return JobExplanation(
                job_id=job_id, state="unknown", summary="", error=f"no job {job_id!r}"
            )
        record = current.value
        if record.state != JobState.QUEUED:
            decision = await self._decision_of(job_id) if record.attempt else None
            return explain_dispatched(record, decision)
        now = self._now_ms()
        facts = self._queue.facts(record, now_ms=now, config=self._config())
        explanation = explain_queued(record, self._index.all_views(), facts, now_ms=now)
        return msgspec.structs.replace(explanation, held=self._queue.get(job_id) is not None)

    async def answer(self, msg: Msg) -> None:
        """Answer one explain request (every failure becomes an answer with ``error`` set)."""
        job_id = ""
        try:
            job_id = _REQUEST.decode(msg.data).job_id
            if not self._config().features.explain:
                error = "explain is switched off (features.explain = false)"
                answer = JobExplanation(job_id=job_id, state="", summary="", error=error)
            else:
                answer = await self.explain(job_id)
        except msgspec.DecodeError as e:
            answer = JobExplanation(job_id="", state="", summary="", error=f"bad request: {e}")
        except Exception as e:
            log.exception("explain %s failed", job_id)
            answer = JobExplanation(job_id=job_id, state="", summary="", error=repr(e))
        if msg.reply:
            try:
                await msg.respond(encode(answer))
            except nats.errors.Error as e:
                log.warning("could not answer explain: %r", e)

    async def answer_queue(self, msg: Msg) -> None:
        """Answer one queue listing request with this dispatcher's page (errors in ``error``)."""
        try:
            request = _LIST_REQUEST.decode(msg.data)
            answer = list_queue(
                self._queue,
                request,
                instance=self._instance,
                now_ms=self._now_ms(),
                config=self._config(),
                has_free=self._index.has_free,
            )
        except msgspec.DecodeError as e:
            answer = QueueListing(instance=self._instance, error=f"bad request: {e}")
        except Exception as e:
            log.exception("queue listing failed")
            answer = QueueListing(instance=self._instance, error=repr(e))
        if msg.reply:
            try:
                await msg.respond(encode(answer))
            except nats.errors.Error as e:
                log.warning("could not answer a queue listing: %r", e)
