"""Helpers for the config and integration-mode tests (never import from conftest)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from schemas import ConfigVerdict, Event
from tests._helpers import config_for_test, events_of, wait_until
from valkyrie import Bus, Settings, open_bus, run_workers
from valkyrie.client.config import ConfigClient
from valkyrie.config.live import LiveConfig

#: the line LiveConfig logs when a process runs a new revision
APPLIED = re.compile(r"config revision (\d+) applied")


@asynccontextmanager
async def control_plane(
    settings: Settings, handlers: Sequence[str]
) -> AsyncIterator[tuple[Bus, LiveConfig]]:
    """Run ``handlers`` in this process with a LiveConfig the test can watch."""
    registry = CollectorRegistry()
    live = LiveConfig(config_for_test(settings))
    async with open_bus(settings, embed=False, config=live.current) as (bus, _):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(partial(run_workers, config=live), bus, registry, stop, list(handlers))
            try:
                yield bus, live
            finally:
                stop.set()


async def wait_revision(live: LiveConfig, revision: int, *, timeout_s: float = 10.0) -> None:
    """Wait until ``live`` runs ``revision`` (or a later one)."""

    async def check() -> bool:
        return live.revision >= revision

    await wait_until(check, timeout_s=timeout_s, interval_s=0.01)


async def change(
    bus: Bus,
    live: LiveConfig | None = None,
    *,
    actor: str = "test",
    reason: str | None = None,
    **values: Any,
) -> ConfigVerdict:
    """Set dotted keys (``__`` in an argument name stands for ``.``), expect acceptance, and wait
    until ``live`` runs the new revision."""
    dotted = {k.replace("__", "."): v for k, v in values.items()}
    verdict = await ConfigClient(bus, actor=actor).change(set_values=dotted, reason=reason)
    assert verdict.accepted, verdict.errors
    assert verdict.revision is not None
    if live is not None:
        await wait_revision(live, verdict.revision)
    return verdict


async def wait_event(bus: Bus, pattern: str, *, timeout_s: float = 10.0) -> Event:
    """The first stored event matching ``pattern`` (relative to ``<prefix>.events.``)."""
    found: list[Event] = []

    async def check() -> bool:
        found[:] = await events_of(bus, pattern)
        return bool(found)

    await wait_until(check, timeout_s=timeout_s, interval_s=0.05)
    return found[0]


async def dispatched_to(bus: Bus, job_id: str, *, timeout_s: float = 15.0) -> str:
    """The runner the job's first dispatch went to (from ``job.<id>.dispatched``)."""
    event = await wait_event(bus, f"job.{job_id}.dispatched", timeout_s=timeout_s)
    return str(event.data["runner_id"])


def applied_revisions(log: Path) -> list[int]:
    """The revisions a worker process logged as applied, in order."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [int(m.group(1)) for m in APPLIED.finditer(text)]


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def wait_log(
    log: Path, needle: str, proc: subprocess.Popen[bytes], *, timeout_s: float = 60.0
) -> None:
    """Wait until ``log`` contains ``needle``; fail at once if the process died."""

    async def check() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{_tail(log)}")
        return needle in _tail(log, chars=10**9)

    try:
        await wait_until(check, timeout_s=timeout_s, interval_s=0.05)
    except TimeoutError as e:
        raise AssertionError(f"{needle!r} not in {log} after {timeout_s}s:\n{_tail(log)}") from e
