"""The continuous pull feed against a real nats-server: bounded in flight, clean stop."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.abc
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from tests._helpers import wait_until
from valkyrie import Bus
from valkyrie.bus.pullfeed import PullFeed, ensure_consumer

pytestmark = pytest.mark.nats


async def _stream(bus: Bus, name: str) -> tuple[str, str]:
    stream, subject = f"{bus.names.prefix.upper()}_{name}", f"{bus.names.prefix}.{name}.work"
    await bus.js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    await ensure_consumer(
        bus,
        stream,
        ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0),
    )
    return stream, subject


class Owner:
    """Takes messages up to ``room`` at once, settles each after a short while."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.active = 0
        self.most_active = 0
        self.seen: list[bytes] = []
        self.feed: PullFeed | None = None
        self.tg: anyio.abc.TaskGroup | None = None

    async def start(
        self, tg: anyio.abc.TaskGroup, bus: Bus, stream: str, stop: anyio.Event, **feed: Any
    ) -> None:
        """Run a feed on ``stream``'s consumer ``w`` into this owner, in ``tg``, until ``stop``."""
        self.tg = tg
        self.feed = PullFeed(
            bus, stream=stream, durable="w", room=self.free, deliver=self.deliver, **feed
        )
        await tg.start(self.feed.run, stop)

    def free(self) -> int:
        return self.room - self.active

    async def has(self, count: int) -> bool:
        return len(self.seen) >= count

    async def saw(self, data: bytes) -> bool:
        return data in self.seen

    async def deliver(self, msg: Msg) -> None:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.seen.append(msg.data)
        assert self.tg is not None
        self.tg.start_soon(self._work, msg)

    async def _work(self, msg: Msg) -> None:
        await anyio.sleep(0.002)
        await msg.ack()
        self.active -= 1
        assert self.feed is not None
        self.feed.wake()


async def test_feed_delivers_everything_once_within_the_owners_room(bus: Bus) -> None:
    stream, subject = await _stream(bus, "room")
    total = 400
    for i in range(total):
        await bus.js.publish(subject, str(i).encode())
    owner = Owner(room=8)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await owner.start(tg, bus, stream, stop, min_batch=2)
        await wait_until(lambda: owner.has(total), timeout_s=20)
        stop.set()
    assert sorted(owner.seen, key=int) == [str(i).encode() for i in range(total)]
    assert owner.most_active <= 8
    info = await bus.js.consumer_info(stream, "w")
    assert info.num_ack_pending == 0
    assert info.num_pending == 0


async def test_a_stopping_feed_leaves_nothing_for_the_ack_wait(bus: Bus) -> None:
    stream, subject = await _stream(bus, "stop")
    owner = Owner(room=32)
    stop = anyio.Event()
    published = 0

    async def publish_steadily() -> None:
        nonlocal published
        while published < 300:
            await bus.js.publish(subject, str(published).encode())
            published += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        await owner.start(tg, bus, stream, stop)
        tg.start_soon(publish_steadily)
        await anyio.sleep(0.1)
        stop.set()  # while messages keep arriving: the open requests still deliver some
    # everything the stopped feed was given was settled; nothing waits out the 60 s ack wait
    info = await bus.js.consumer_info(stream, "w")
    assert info.num_ack_pending == 0
    assert len(owner.seen) == len(set(owner.seen))
    # and its requests are gone: what was published after the stop is still there for others
    await wait_until(
        lambda: _no_waiting_requests(bus, stream),
        timeout_s=5,
    )
    after = await bus.js.consumer_info(stream, "w")
    assert after.num_pending + len(owner.seen) == published


async def _no_waiting_requests(bus: Bus, stream: str) -> bool:
    info = await bus.js.consumer_info(stream, "w")
    return not info.num_waiting


async def test_feed_resumes_after_its_consumer_is_recreated(bus: Bus) -> None:
    stream, subject = await _stream(bus, "recreate")
    owner = Owner(room=4)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        await owner.start(tg, bus, stream, stop, expires_s=0.3)
        await bus.js.publish(subject, b"before")
        await wait_until(lambda: owner.saw(b"before"), timeout_s=5)
        await bus.js.delete_consumer(stream, "w")  # the server drops our open requests (409)
        await ensure_consumer(
            bus,
            stream,
            ConsumerConfig(
                durable_name="w",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=60.0,
                deliver_policy=DeliverPolicy.NEW,
            ),
        )
        await bus.js.publish(subject, b"after")
        await wait_until(lambda: owner.saw(b"after"), timeout_s=10)
        stop.set()


async def test_ensure_consumer_brings_an_existing_consumer_up_to_date(bus: Bus) -> None:
    """A restart with a new ack wait (or max deliver) updates the durable consumer in place."""
    stream, _ = await _stream(bus, "tune")
    before = await bus.js.consumer_info(stream, "w")
    assert before.config.ack_wait == pytest.approx(60.0)

    # the same settings again: left as it is (no update request, same creation time)
    await ensure_consumer(
        bus, stream, ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0)
    )
    same = await bus.js.consumer_info(stream, "w")
    assert same.config.ack_wait == pytest.approx(60.0)
    assert same.created == before.created

    await ensure_consumer(
        bus,
        stream,
        ConsumerConfig(
            durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=2.5, max_deliver=7
        ),
    )
    after = await bus.js.consumer_info(stream, "w")
    assert after.config.ack_wait == pytest.approx(2.5)
    assert after.config.max_deliver == 7
    assert after.created == before.created  # updated, not recreated: its position is kept
