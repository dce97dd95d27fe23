"""Reading a test prefix's whole events stream back through the typed event catalogue, strictly.

tests/conftest.py runs :func:`catalogue_problems` after every test that used a ``prefix`` on the
session's server: each stored event must decode as its typed Struct with no unknown or missing
``data`` key, sit on the subject its Struct names, carry the id its Struct derives, and encode
back to the very bytes that were stored.
"""

from __future__ import annotations

import threading

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import typed_event
from valkyrie import Names
from valkyrie.bus.codec import EVENT_DECODER, encode

__all__ = ["catalogue_problems", "check_event", "check_stream"]

_READ_TIMEOUT_S = 20.0


def check_event(names: Names, msg: Msg) -> str | None:
    """What is wrong with one stored event (``None``: nothing)."""
    where = f"#{msg.metadata.sequence.stream} {msg.subject}"
    try:
        envelope = EVENT_DECODER.decode(msg.data)
        event = typed_event(envelope, strict=True)
    except msgspec.DecodeError as e:
        return f"{where}: {e}"
    assert event is not None  # strict: an unknown type raised
    subject = names.event(event.entity, event.subject_id, event.kind)
    derived = event.event_id()
    again = encode(
        event.envelope(event_id=envelope.id, at_ms=envelope.at_ms, source=envelope.source)
    )
    if msg.subject != subject:
        return f"{where}: its Struct {type(event).__name__} puts it on {subject}"
    if derived is not None and derived != envelope.id:
        return f"{where}: id {envelope.id!r}, but {type(event).__name__} derives {derived!r}"
    if (msg.headers or {}).get("Nats-Msg-Id") != envelope.id:
        return f"{where}: Nats-Msg-Id {(msg.headers or {}).get('Nats-Msg-Id')!r} is not its id"
    if again != msg.data:
        return f"{where}: encodes back as {again!r}, stored as {msg.data!r}"
    return None


async def check_stream(url: str, prefix: str) -> list[str]:
    """Every problem with the events (and audit events) stored under ``prefix``."""
    names = Names(prefix)
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    problems: list[str] = []
    try:
        js = nc.jetstream(timeout=5)
        for stream, subjects in (
            (names.stream("events"), names.events(">")),
            (names.stream("audit"), names.audit(">")),
        ):
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                continue
            if not info.state.messages:
                continue
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=10.0
            )
            psub = await js.pull_subscribe(subjects, stream=stream, config=config)
            remaining = (await psub.consumer_info()).num_pending or 0
            while remaining > 0:
                msgs = await psub.fetch(batch=min(remaining, 512), timeout=10.0)
                remaining -= len(msgs)
                problems += [p for p in (check_event(names, m) for m in msgs) if p is not None]
        return problems
    finally:
        await nc.close()


def catalogue_problems(url: str, prefix: str) -> list[str]:
    """:func:`check_stream`, run on a thread of its own (the test's event loop is not running)."""
    found: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            found.extend(anyio.run(check_stream, url, prefix, backend="asyncio"))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            failure.append(e)

    thread = threading.Thread(target=run, name=f"event-catalogue-{prefix}", daemon=True)
    thread.start()
    thread.join(_READ_TIMEOUT_S)
    if thread.is_alive():
        return [f"reading the events of {prefix} took longer than {_READ_TIMEOUT_S}s"]
    if failure:
        error = failure[0]
        if isinstance(error, nats.errors.NoServersError | ConnectionRefusedError | OSError):
            return []  # the test stopped the session's server, or never reached it
        raise error
    return found
