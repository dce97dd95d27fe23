"""Helpers for the scheduling and explain tests (never import from conftest)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from prometheus_client import CollectorRegistry

from schemas import (
    Event,
    JobExplanation,
    JobRecord,
    RunnerCapabilities,
    RunnerLocation,
    RunnerRecord,
    RunnerRegistration,
    RunnerResources,
    RunnerStats,
)
from tests._helpers import config_for_test, events_of, settings_for
from valkyrie import Bus, Client, Settings, open_bus, run_workers
from valkyrie.bus.codec import RUNNER_DECODER
from valkyrie.bus.kv import cas_update
from valkyrie.client.config import ConfigClient
from valkyrie.config.live import LiveConfig
from valkyrie.testing import SimulatedRunner

#: measured stats of a runner that qualifies, but poorly (explain names them)
MEASURED_BAD = RunnerStats(jobs_completed=10, success_rate=0.5, accept_latency_ms=900)

#: every handler a scheduling test needs
HANDLERS = ("intake", "registry", "dispatcher", "results", "supervisor", "canceller", "config")


def settings_with(nats_url: str, prefix: str, tmp: Path, toml: str = "") -> Settings:
    """Test settings whose base config layers ``toml`` (``[scheduling]`` tables …)."""
    if not toml:
        return settings_for(nats_url, prefix)
    path = tmp / "valkyrie.toml"
    path.write_text(toml)
    return settings_for(nats_url, prefix, config_file=str(path))


@asynccontextmanager
async def plane(
    settings: Settings, handlers: Sequence[str] = HANDLERS
) -> AsyncIterator[tuple[Bus, LiveConfig]]:
    """Run ``handlers`` in this process with a LiveConfig the test can watch."""
    live = LiveConfig(config_for_test(settings))
    async with open_bus(settings, embed=False, config=live.current) as (bus, _):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            workers = functools.partial(run_workers, config=live)
            await tg.start(workers, bus, CollectorRegistry(), stop, list(handlers))
            try:
                yield bus, live
            finally:
                stop.set()


@dataclass
class SimRunner(SimulatedRunner):
    """A simulated runner that also declares a zone, resources, capabilities and metadata."""

    zone: str | None = None
    resources: RunnerResources = field(default_factory=RunnerResources)
    languages: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def registration(self) -> RunnerRegistration:
        """The base registration plus the extra fields."""
        return msgspec.structs.replace(
            super().registration(),
            location=RunnerLocation(region=self.region, zone=self.zone),
            resources=self.resources,
            capabilities=RunnerCapabilities(
                job_types=list(self.job_types), languages=list(self.languages)
            ),
            metadata=dict(self.metadata),
        )


@asynccontextmanager
async def fleet(bus: Bus, runners: Sequence[SimulatedRunner]) -> AsyncIterator[Client]:
    """Run ``runners`` (registered once this is entered); stop them on exit."""
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for runner in runners:
            await tg.start(runner.run, stop)
        try:
            yield Client(bus)
        finally:
            stop.set()


def sim(work_s: float = 0.0, **extra: Any) -> dict[str, Any]:
    """A job payload telling the simulated runner how to behave."""
    return {"sim": {"work_s": work_s, **extra}}


async def submit(client: Client, **spec: Any) -> str:
    """Submit a job (``job_type`` defaults to ``shell``); return its id."""
    spec.setdefault("job_type", "shell")
    verdict = await client.submit(spec)
    assert verdict is not None, "no verdict"
    assert verdict.accepted, verdict.errors
    assert verdict.job_id is not None
    return verdict.job_id


async def events(bus: Bus, pattern: str) -> list[Event]:
    """Every event stored now matching ``pattern`` (relative to ``<prefix>.events.``), oldest first."""
    with anyio.fail_after(30):
        return await events_of(bus, pattern)


async def wait_event(bus: Bus, pattern: str, *, timeout_s: float = 15.0) -> Event:
    """The first stored event matching ``pattern``, waiting up to ``timeout_s`` for it."""
    with anyio.fail_after(timeout_s):
        async for _, event in Client(bus).events(pattern, deliver_all=True):
            return event
    raise AssertionError("unreachable")  # pragma: no cover


async def decision(bus: Bus, job_id: str, *, timeout_s: float = 15.0) -> dict[str, Any]:
    """The placement decision recorded in ``job.<id>.dispatched`` (waiting for it)."""
    return (await wait_event(bus, f"job.{job_id}.dispatched", timeout_s=timeout_s)).data


async def finished(client: Client, job_id: str, *, timeout_s: float = 15.0) -> JobRecord:
    """The job's record once it has ended."""
    return await client.wait_for_job(job_id, timeout_s=timeout_s)


async def explained(
    client: Client,
    job_id: str,
    check: Callable[[JobExplanation], bool],
    *,
    timeout_s: float = 10.0,
) -> JobExplanation:
    """Ask for the explanation until ``check`` accepts it (the dispatcher's view may lag)."""
    last: list[JobExplanation] = []
    try:
        with anyio.fail_after(timeout_s):
            while True:
                last[:] = [await client.explain(job_id)]
                if check(last[0]):
                    return last[0]
                await anyio.sleep(0.05)
    except TimeoutError as e:
        raise AssertionError(f"explanation never matched; last: {last}") from e


def rejected(explanation: JobExplanation) -> dict[str, set[str]]:
    """Constraint code -> the runners it rejected (as far as the explanation lists them)."""
    return {g.constraint: set(g.runners) for g in explanation.rejected}


async def dispatcher_knows(client: Client, runner_ids: set[str]) -> str:
    """Wait until the dispatcher's index holds exactly ``runner_ids``; return the probe job.

    The probe is a queued job of a type no runner takes, so its explanation lists every runner
    the dispatcher knows (it is never placed).
    """
    probe = await submit(client, job_type="probe-no-runner-takes-this")
    await explained(client, probe, lambda e: rejected(e).get("job_type") == runner_ids)
    return probe


async def write_stats(bus: Bus, runner_id: str, stats: RunnerStats) -> None:
    """Set a runner's measured statistics in its record (as if it had run those jobs)."""
    kv = await bus.kv("runners")

    def update(record: RunnerRecord) -> RunnerRecord:
        return msgspec.structs.replace(record, stats=stats)

    latest, _ = await cas_update(kv, runner_id, RUNNER_DECODER, update)
    assert latest is not None
    assert latest.value.stats == stats


async def set_mode(bus: Bus, live: LiveConfig, mode: str) -> None:
    """Switch the integration mode through the config handler and wait until it applies here."""
    verdict = await ConfigClient(bus, actor="test").change(set_values={"mode": mode})
    assert verdict.accepted, verdict.errors
    assert verdict.revision is not None
    revision = verdict.revision
    with anyio.fail_after(10):
        while live.revision < revision:
            await live.changed()
    assert live.current.mode.value == mode
