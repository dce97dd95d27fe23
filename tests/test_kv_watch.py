"""Following KV keys with ``watch_kv``: current values, then changes, deletes, restarts, closing."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import nats.errors
import pytest
from nats.js.kv import KeyValue

from tests._helpers import wait_until
from valkyrie import Bus, BusError, Settings, connect
from valkyrie.bus.kv import KvChange, watch_kv

pytestmark = pytest.mark.nats


async def _next(changes: Any, timeout_s: float = 5.0) -> KvChange:
    with anyio.fail_after(timeout_s):
        change: KvChange = await changes.__anext__()
        return change


def _holds(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


async def test_current_values_first_then_started_then_changes_and_deletes(bus: Bus) -> None:
    kv = await bus.kv("stats")
    await kv.put("a", b"1")
    await kv.put("b", b"2")
    await kv.delete("b")
    received: list[KvChange] = []
    started_at: list[int] = []

    changes = watch_kv(kv, started=lambda: started_at.append(len(received)))
    async with contextlib.aclosing(changes), anyio.create_task_group() as tg:

        async def consume() -> None:
            async for change in changes:
                received.append(change)

        tg.start_soon(consume)
        await wait_until(_holds(lambda: bool(started_at)), timeout_s=5)
        # started once the stored values (a deleted key as None) were all handled
        assert started_at == [2]
        assert sorted((c.key, c.value) for c in received) == [("a", b"1"), ("b", None)]
        assert all(c.revision > 0 for c in received)

        revision = await kv.put("c", b"3")
        await kv.purge("a")
        await wait_until(_holds(lambda: len(received) == 4), timeout_s=5)
        assert [(c.key, c.value) for c in received[2:]] == [("c", b"3"), ("a", None)]
        assert received[2].revision == revision
        tg.cancel_scope.cancel()
    assert started_at == [2]  # once


async def test_started_without_any_stored_value(bus: Bus) -> None:
    kv = await bus.kv("stats")
    started = anyio.Event()
    changes = watch_kv(kv, "nothing-here", started=started.set)
    async with contextlib.aclosing(changes), anyio.create_task_group() as tg:

        async def consume() -> None:
            async for change in changes:
                raise AssertionError(f"no change expected: {change}")

        tg.start_soon(consume)
        with anyio.fail_after(5):
            await started.wait()
        tg.cancel_scope.cancel()


async def test_a_watch_that_cannot_be_set_up_is_tried_again(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await bus.kv("stats")
    await kv.put("k", b"v")
    real = KeyValue.watch
    calls: list[str] = []

    async def failing_once(self: KeyValue, keys: str, **kwargs: Any) -> Any:
        calls.append(keys)
        if len(calls) == 1:
            raise nats.errors.TimeoutError
        return await real(self, keys, **kwargs)

    monkeypatch.setattr(KeyValue, "watch", failing_once)
    changes = watch_kv(kv, "k", retry_s=0.05)
    async with contextlib.aclosing(changes):
        change = await _next(changes)
    assert (change.key, change.value) == ("k", b"v")
    assert calls == ["k", "k"]


async def test_leaving_early_stops_the_watcher(bus: Bus) -> None:
    kv = await bus.kv("stats")
    await kv.put("k", b"v")
    stream = f"KV_{bus.names.bucket('stats')}"

    async def listened() -> list[bool]:
        return [bool(c.push_bound) for c in await bus.js.consumers_info(stream)]

    changes = watch_kv(kv, "k")
    async with contextlib.aclosing(changes):
        assert (await _next(changes)).value == b"v"
        assert await listened() == [True]

    async def nobody_listens() -> bool:
        return not any(await listened())

    await wait_until(nobody_listens, timeout_s=5)


async def test_a_closed_connection_is_a_bus_error(bus: Bus, settings: Settings) -> None:
    own = await connect(settings)
    kv = await own.kv("stats")
    await own.close()
    changes = watch_kv(kv, "k")
    async with contextlib.aclosing(changes):
        with pytest.raises(BusError, match="connection is closed"):
            await _next(changes)
