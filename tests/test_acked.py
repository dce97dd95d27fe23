"""Acked publishes on a shared reply subscription, the KV writes built on them, and the outbox."""

from __future__ import annotations

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import StreamConfig

from valkyrie import Bus
from valkyrie.bus.acked import acked_publisher
from valkyrie.bus.kv import kv_create, kv_write
from valkyrie.bus.outbox import Outbox

pytestmark = pytest.mark.nats


async def test_publish_returns_the_stream_sequence_and_sees_duplicates(bus: Bus) -> None:
    stream, subject = f"{bus.names.prefix.upper()}_ACKED", f"{bus.names.prefix}.acked.x"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[subject], duplicate_window=60))
    publisher = acked_publisher(bus.nc)
    assert acked_publisher(bus.nc) is publisher  # one reply subscription per connection
    first = await publisher.publish(subject, b"1", {"Nats-Msg-Id": "a"})
    second = await publisher.publish(subject, b"2", {"Nats-Msg-Id": "b"})
    again = await publisher.publish(subject, b"1", {"Nats-Msg-Id": "a"})
    assert (first.stream, first.seq, second.seq) == (stream, 1, 2)
    assert again.duplicate
    assert again.seq == 1
    assert (await bus.js.stream_info(stream)).state.messages == 2


async def test_publish_without_a_stream_fails_clearly(bus: Bus) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await acked_publisher(bus.nc).publish(f"{bus.names.prefix}.nowhere", b"x")


async def test_kv_writes_are_compare_and_set(bus: Bus) -> None:
    kv = await bus.kv("jobs")
    rev = await kv_create(kv, "k1", b"one")
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv_create(kv, "k1", b"again")
    rev2 = await kv_write(kv, "k1", b"two", last=rev, ttl=None)
    assert rev2 > rev
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv_write(kv, "k1", b"stale", last=rev, ttl=None)
    assert (await kv.get("k1")).value == b"two"
    # a deleted key can be created again
    await kv.delete("k1")
    rev3 = await kv_create(kv, "k1", b"three")
    assert (await kv.get("k1")).value == b"three"
    assert rev3 > rev2


async def test_kv_write_with_a_ttl_expires(bus: Bus) -> None:
    kv = await bus.kv("jobs")
    rev = await kv_create(kv, "short", b"v")
    await kv_write(kv, "short", b"ended", last=rev, ttl=1.0)
    assert (await kv.get("short")).value == b"ended"
    with anyio.fail_after(10):
        while True:
            try:
                await kv.get("short")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                break
            await anyio.sleep(0.2)


async def test_outbox_confirms_every_message_or_raises(bus: Bus) -> None:
    stream, subject = f"{bus.names.prefix.upper()}_OUTBOX", f"{bus.names.prefix}.outbox.x"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    outbox = Outbox(bus)
    for i in range(20):
        await outbox.publish(subject, str(i).encode(), {})
    assert len(outbox) == 20
    await outbox.confirm()
    assert len(outbox) == 0
    assert (await bus.js.stream_info(stream)).state.messages == 20
    await outbox.publish(subject, b"ok", {})
    await outbox.publish(f"{bus.names.prefix}.nowhere", b"lost", {})
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await outbox.confirm()
    await outbox.confirm()  # nothing left: a no-op


async def test_outbox_times_out_as_a_nats_timeout(bus: Bus) -> None:
    # a subscriber that never answers stands in for a stream whose answer is lost
    silent = await bus.nc.subscribe(f"{bus.names.prefix}.silent")
    outbox = Outbox(bus)
    await outbox.publish(f"{bus.names.prefix}.silent", b"x", {})
    with pytest.raises(nats.errors.TimeoutError):
        await outbox.confirm(timeout_s=0.3)
    await silent.unsubscribe()
