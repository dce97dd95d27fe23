"""Live events as server-sent events: resumable by stream sequence, kept alive by heartbeats."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import msgspec
import nats.errors
from litestar import get
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas import FieldError
from valkyrie.bus.codec import EVENT_DECODER
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._context import GatewayDep
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses

__all__ = ["ROUTES", "valid_filter"]

_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")
#: how often a stream checks that the server is not shutting down
_POLL_S = 0.5


def valid_filter(pattern: str) -> bool:
    """Whether ``pattern`` is a subject filter (tokens, ``*``, a final ``>``)."""
    parts = pattern.split(".")
    for index, part in enumerate(parts):
        if part == ">":
            return index == len(parts) - 1
        if part != "*" and not _TOKEN.fullmatch(part):
            return False
    return True


def _resume_after(header: str | None, query: int | None) -> int | None:
    if header is None:
        return query
    try:
        seq = int(header.strip())
    except ValueError:
        seq = -1
    if seq < 0:
        raise ProblemError(
            422,
            "Last-Event-ID must be an event id this stream sent (a stream sequence)",
            slug="invalid-parameters",
            errors=[FieldError(path="header.Last-Event-ID", reason="not a stream sequence")],
        )
    return seq


@get(
    "/api/v2/events",
    opt=route_opt("jobs:read"),
    summary="Live events (server-sent events)",
    description=(
        "Streams the event stream: `id` is the stream sequence, `event` the event type, `data` "
        "the event JSON. `filter` is the subject pattern after `<prefix>.events.` (`job.>`, "
        "`job.*.dispatched`, `runner.>`). Reconnect with `Last-Event-ID` (or `last_event_id`) "
        "to resume after that event; without it the stream starts with new events. Comment "
        "lines (`: heartbeat`) keep idle connections alive."
    ),
    responses=problem_responses(422, *COMMON),
    tags=["events"],
)
async def events(
    gateway: GatewayDep,
    subject_filter: Annotated[
        str, QueryParameter(name="filter", min_length=1, max_length=256)
    ] = ">",
    last_event_id: Annotated[
        str | None, HeaderParameter(name="Last-Event-ID", required=False, max_length=32)
    ] = None,
    resume_after: Annotated[
        int | None, QueryParameter(name="last_event_id", ge=0, required=False)
    ] = None,
    heartbeat_s: Annotated[float, QueryParameter(ge=0.5, le=300)] = 15.0,
) -> ServerSentEvent:
    """Follow events matching ``filter``."""
    if not valid_filter(subject_filter):
        raise ProblemError(
            422,
            "filter must be a subject pattern such as job.> or job.*.dispatched",
            slug="invalid-parameters",
            errors=[FieldError(path="query.filter", reason=f"{subject_filter!r} is not a pattern")],
        )
    after = _resume_after(last_event_id, resume_after)
    if after is not None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
        )
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    bus = gateway.bus
    stream_name = bus.names.stream("events")
    # Checked before the response starts, so an unreachable bus is a 503, not a broken stream.
    with anyio.fail_after(gateway.timeout_s):
        await bus.js.stream_info(stream_name)

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        # Subscribed here, not above: a generator that never starts would leak the subscription.
        with anyio.fail_after(gateway.timeout_s):
            sub = await bus.js.subscribe(
                bus.names.events(subject_filter),
                ordered_consumer=True,
                config=config,
                stream=stream_name,
            )
        try:
            yield ServerSentEventMessage(data=None, comment=f"events {subject_filter}", retry=2000)
            quiet_since = time.monotonic()
            while not gateway.closing:
                try:
                    msg = await sub.next_msg(timeout=min(_POLL_S, heartbeat_s))
                except nats.errors.TimeoutError:
                    if time.monotonic() - quiet_since >= heartbeat_s:
                        yield ServerSentEventMessage(data=None, comment="heartbeat")
                        quiet_since = time.monotonic()
                    continue
                try:
                    event = EVENT_DECODER.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                yield ServerSentEventMessage(
                    id=int(msg.metadata.sequence.stream),
                    event=event.type,
                    data=msg.data.decode(),
                )
                quiet_since = time.monotonic()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()

    return ServerSentEvent(
        stream(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


ROUTES = [events]
