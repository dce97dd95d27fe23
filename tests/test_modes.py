"""The five integration modes, each with a tested difference, switched live with jobs in flight."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats.js.errors
import pytest

from schemas import JobState, JobSubmission, RoutingHints
from tests._config_helpers import change, control_plane, dispatched_to
from tests._helpers import events_of, wait_until
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import RUNNER_DECODER
from valkyrie.config.live import LiveConfig
from valkyrie.config.model import IntegrationMode
from valkyrie.domain.modes import V2_ONLY_FIELDS, check_intake_mode, uses_advanced_placement
from valkyrie.testing import SimulatedRunner

HANDLERS = ["config", "intake", "registry", "dispatcher", "results"]
PLAIN = JobSubmission(job_type="shell")
HINTED = JobSubmission(job_type="shell", routing_hints=RoutingHints(preferred_runners=["b"]))

# -- the rules as pure functions --------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("mode", "plain", "hinted"),
    [
        (IntegrationMode.FULL, True, True),
        (IntegrationMode.HYBRID, False, True),
        (IntegrationMode.FALLBACK, False, False),
        (IntegrationMode.COMPATIBILITY, False, False),
        (IntegrationMode.DISABLED, False, False),
    ],
)
def test_which_jobs_get_advanced_placement(
    mode: IntegrationMode, plain: bool, hinted: bool
) -> None:
    assert uses_advanced_placement(PLAIN, mode) is plain
    assert uses_advanced_placement(HINTED, mode) is hinted


@pytest.mark.timeout(10)
@pytest.mark.parametrize("mode", [m for m in IntegrationMode if m != IntegrationMode.COMPATIBILITY])
def test_only_compatibility_refuses_v2_fields(mode: IntegrationMode) -> None:
    assert check_intake_mode(HINTED, "v2", mode=mode, legacy_v1_api=True) == []


@pytest.mark.timeout(10)
def test_compatibility_names_every_v2_only_field() -> None:
    spec = JobSubmission(
        job_type="shell",
        routing_hints=RoutingHints(),
        labels={"gpu": "a100"},
    )
    errors = check_intake_mode(spec, "v2", mode=IntegrationMode.COMPATIBILITY, legacy_v1_api=True)
    assert [e.path for e in errors] == ["$.routing_hints", "$.labels"]
    assert (
        check_intake_mode(PLAIN, "v2", mode=IntegrationMode.COMPATIBILITY, legacy_v1_api=True) == []
    )
    assert set(V2_ONLY_FIELDS) <= set(JobSubmission.__struct_fields__)


@pytest.mark.timeout(10)
def test_the_v1_api_can_be_switched_off() -> None:
    errors = check_intake_mode(PLAIN, "v1", mode=IntegrationMode.FULL, legacy_v1_api=False)
    assert [e.path for e in errors] == ["$.type"]


# -- over the bus -----------------------------------------------------------------------------------


@asynccontextmanager
async def plane(
    settings: Settings, *runners: SimulatedRunner | dict[str, Any]
) -> AsyncIterator[tuple[Bus, LiveConfig, list[SimulatedRunner]]]:
    """The control plane in process plus simulated runners (given as SimulatedRunner kwargs)."""
    async with control_plane(settings, HANDLERS) as (bus, live):
        stop = anyio.Event()
        sims = [r if isinstance(r, SimulatedRunner) else SimulatedRunner(bus, **r) for r in runners]
        async with anyio.create_task_group() as tg:
            for sim in sims:
                await tg.start(sim.run, stop)
            await _runners_known(bus, [s.runner_id for s in sims])
            try:
                yield bus, live, sims
            finally:
                stop.set()


async def _runners_known(bus: Bus, ids: list[str]) -> None:
    kv = await bus.kv("runners")

    async def check() -> bool:
        for rid in ids:
            try:
                entry = await kv.get(rid)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return False  # not registered yet
            if not entry.value or RUNNER_DECODER.decode(entry.value).registration.runner_id != rid:
                return False
        return True

    await wait_until(check, timeout_s=10)
    await anyio.sleep(0.3)  # the dispatcher's watch of the runners bucket catches up


async def submit(bus: Bus, body: dict[str, Any]) -> str:
    verdict = await Client(bus).submit(body)
    assert verdict is not None
    assert verdict.accepted, verdict.errors
    assert verdict.job_id is not None
    return verdict.job_id


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_disabled_records_jobs_and_full_dispatches_them_all(settings: Settings) -> None:
    async with plane(settings, {"runner_id": "r1", "capacity": 4}) as (bus, live, (runner,)):
        client = Client(bus)
        # jobs in flight when the mode changes finish normally
        running = [
            await submit(bus, {"job_type": "shell", "payload": {"sim": {"work_s": 1.5}}})
            for _ in range(2)
        ]

        async def both_running() -> bool:
            return len(runner.running) == 2

        await wait_until(both_running, timeout_s=10)
        await change(bus, live, mode="disabled")
        held = [await submit(bus, {"job_type": "shell"}) for _ in range(6)]
        for job_id in running:
            assert (await client.wait_for_job(job_id, timeout_s=15)).state == JobState.SUCCEEDED
        await anyio.sleep(1.0)
        for job_id in held:
            assert (await client.get_job(job_id)).state == JobState.QUEUED
        queued = {e.subject_id for e in await events_of(bus, "job.*.queued")}
        assert set(held) <= queued  # recorded, with their events
        dispatched = {e.subject_id for e in await events_of(bus, "job.*.dispatched")}
        assert dispatched == set(running)
        assert runner.dispatches == 2

        await change(bus, live, mode="full")
        for job_id in held:
            assert (await client.wait_for_job(job_id, timeout_s=20)).state == JobState.SUCCEEDED
        events = await events_of(bus, "job.*.dispatched")
        assert sorted(e.subject_id or "" for e in events) == sorted(running + held)  # once each
        assert runner.dispatches == 8


@pytest.mark.nats
@pytest.mark.timeout(90)
async def test_compatibility_refuses_v2_fields_and_keeps_v1(settings: Settings) -> None:
    async with plane(settings, {"runner_id": "r1", "capacity": 4}) as (bus, live, _):
        client = Client(bus)
        hinted = {"job_type": "shell", "routing_hints": {"preferred_runners": ["r1"]}}
        await change(bus, live, mode="compatibility")
        verdict = await client.submit(hinted)
        assert verdict is not None
        assert not verdict.accepted
        assert [e.path for e in verdict.errors] == ["$.routing_hints"]
        assert "compatibility mode" in verdict.errors[0].reason
        v1 = await client.submit({"type": "shell", "payload": {"command": "true"}, "priority": 1})
        assert v1 is not None
        assert v1.accepted
        assert v1.job_id
        plain = await submit(bus, {"job_type": "shell"})
        for job_id in (v1.job_id, plain):
            record = await client.wait_for_job(job_id, timeout_s=15)
            assert record.state == JobState.SUCCEEDED
        assert (await client.get_job(v1.job_id)).api_version == "v1"
        rejected = await events_of(bus, "intake.*.rejected")
        assert rejected[0].data["errors"][0]["path"] == "$.routing_hints"
        # live back to full: the same body is accepted
        await change(bus, live, mode="full")
        verdict = await client.submit(hinted)
        assert verdict is not None
        assert verdict.accepted


# Two pristine runners: "a" in us-east, "b" in eu-west. Ties in least-loaded placement go to the
# lexically smallest id ("a"); the full scorer adds preferences on top of the free capacity.
RUNNERS = (
    {"runner_id": "a", "capacity": 4, "region": "us-east"},
    {"runner_id": "b", "capacity": 4, "region": "eu-west"},
)


@pytest.mark.nats
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("mode", "expected"),
    [("full", "b"), ("hybrid", "a"), ("fallback", "a"), ("compatibility", "a")],
)
async def test_a_plain_job_is_scored_only_in_full_mode(
    settings: Settings, mode: str, expected: str
) -> None:
    # a plain job (no qos_requirements, no routing_hints) that prefers a region
    async with plane(settings, *RUNNERS) as (bus, live, _):
        await change(bus, live, mode=mode)
        job_id = await submit(
            bus, {"job_type": "shell", "requirements": {"preferred_regions": ["eu-west"]}}
        )
        assert await dispatched_to(bus, job_id) == expected


@pytest.mark.nats
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("mode", "expected"), [("full", "b"), ("hybrid", "b"), ("fallback", "a")])
async def test_a_hinted_job_is_scored_in_full_and_hybrid_but_not_fallback(
    settings: Settings, mode: str, expected: str
) -> None:
    async with plane(settings, *RUNNERS) as (bus, live, _):
        await change(bus, live, mode=mode)
        job_id = await submit(
            bus, {"job_type": "shell", "routing_hints": {"geographic_preference": "eu-west"}}
        )
        assert await dispatched_to(bus, job_id) == expected


@pytest.mark.nats
@pytest.mark.timeout(90)
async def test_fallback_ignores_the_preferred_runner_and_picks_the_least_loaded(
    settings: Settings,
) -> None:
    runners = ({"runner_id": "a", "capacity": 2}, {"runner_id": "b", "capacity": 2})
    async with plane(settings, *runners) as (bus, live, (a, _b)):
        client = Client(bus)
        # occupy one of a's two slots
        blocker = await submit(
            bus,
            {
                "job_type": "shell",
                "routing_hints": {"preferred_runners": ["a"]},
                "payload": {"sim": {"work_s": 60}},
            },
        )
        assert await dispatched_to(bus, blocker) == "a"

        async def a_busy() -> bool:
            return blocker in a.running

        await wait_until(a_busy, timeout_s=10)
        probe = {"job_type": "shell", "routing_hints": {"preferred_runners": ["a"]}}
        await change(bus, live, mode="fallback")
        first = await submit(bus, probe)  # intake still takes v2 fields
        assert await dispatched_to(bus, first) == "b"  # a is preferred but more loaded
        assert (await client.wait_for_job(first, timeout_s=15)).state == JobState.SUCCEEDED
        await change(bus, live, mode="full")
        second = await submit(bus, probe)
        assert await dispatched_to(bus, second) == "a"  # the preference outweighs the load
