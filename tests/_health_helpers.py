"""Thresholds, reads and waits shared by the health tests against a real nats-server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import msgspec
import nats.js.errors
import pytest

from schemas import ConfigRevision, FallbackRecord, HealthReport, HealthSummary
from tests._helpers import events_of
from valkyrie import Bus
from valkyrie.client.config import ConfigClient

__all__ = [
    "HEALTH_ENV",
    "RECORD_DECODER",
    "REPORT_DECODER",
    "SUMMARY_DECODER",
    "component",
    "eventually",
    "fallback_gone",
    "fallback_of",
    "health_events",
    "held_fallback",
    "in_order",
    "mode_of",
    "stats_value",
    "summary_of",
    "wait_mode",
    "wait_summary",
]

#: small thresholds: a report every 200 ms, stalled after 1.5 s, switch after 2 evaluations
HEALTH_ENV = {
    "VALKYRIE_HEALTH__REPORT_INTERVAL_MS": "200",
    "VALKYRIE_HEALTH__STALE_AFTER_MS": "1500",
    "VALKYRIE_HEALTH__FAILURE_THRESHOLD": "2",
    "VALKYRIE_HEALTH__RECOVERY_THRESHOLD": "2",
    # a loaded test machine must not look degraded: these tests are about other causes
    "VALKYRIE_HEALTH__KV_LATENCY_DEGRADED_MS": "2000",
    "VALKYRIE_HEALTH__KV_LATENCY_UNHEALTHY_MS": "5000",
}
SUMMARY_DECODER = msgspec.json.Decoder(HealthSummary)
RECORD_DECODER = msgspec.json.Decoder(FallbackRecord)
REPORT_DECODER = msgspec.json.Decoder(HealthReport)
T = TypeVar("T")


async def stats_value(bus: Bus, key: str) -> bytes | None:
    kv = await bus.kv("stats")
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # also raised for a deleted key
        return None
    return entry.value or None


async def summary_of(bus: Bus) -> HealthSummary | None:
    raw = await stats_value(bus, "health")
    return SUMMARY_DECODER.decode(raw) if raw else None


async def mode_of(bus: Bus) -> tuple[str, ConfigRevision | None]:
    current = await ConfigClient(bus).current()
    return str((current.values if current else {}).get("mode", "full")), current


async def eventually(probe: Callable[[], Awaitable[T | None]], *, timeout_s: float, what: str) -> T:
    """Poll ``probe`` until it returns something; fail naming ``what`` after ``timeout_s``."""
    try:
        with anyio.fail_after(timeout_s):
            while True:
                found = await probe()
                if found is not None:
                    return found
                await anyio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")


async def wait_summary(
    bus: Bus, check: Callable[[HealthSummary], bool], *, timeout_s: float, what: str
) -> HealthSummary:
    last: list[HealthSummary | None] = [None]

    async def probe() -> HealthSummary | None:
        last[0] = await summary_of(bus)
        return last[0] if last[0] is not None and check(last[0]) else None

    try:
        return await eventually(probe, timeout_s=timeout_s, what=what)
    except pytest.fail.Exception:
        pytest.fail(f"timed out waiting for {what}; last summary: {last[0]}")


async def wait_mode(bus: Bus, mode: str, *, timeout_s: float) -> ConfigRevision:
    async def probe() -> ConfigRevision | None:
        now, current = await mode_of(bus)
        return current if now == mode and current is not None else None

    return await eventually(probe, timeout_s=timeout_s, what=f"mode {mode}")


def component(summary: HealthSummary, name: str) -> list[str]:
    return [c.status for c in summary.components if c.component == name]


async def health_events(bus: Bus) -> list[tuple[str, str]]:
    """``(component, status)`` of every health event, oldest first."""
    return [
        (e.subject_id or "", e.type.removeprefix("health."))
        for e in await events_of(bus, "health.>")
    ]


def in_order(seen: list[tuple[str, str]], *wanted: tuple[str, str]) -> bool:
    it = iter(seen)
    return all(w in it for w in wanted)


async def fallback_of(bus: Bus) -> FallbackRecord | None:
    raw = await stats_value(bus, "fallback")
    return RECORD_DECODER.decode(raw) if raw else None


async def fallback_gone(bus: Bus) -> bool | None:
    return True if await stats_value(bus, "fallback") is None else None


async def held_fallback(bus: Bus) -> FallbackRecord | None:
    record = await fallback_of(bus)
    return record if record is not None and record.state == "overridden" else None
