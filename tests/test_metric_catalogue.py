"""The metrics catalogue: one definition per metric, the docs table, and what a control plane exports."""

from __future__ import annotations

import re

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from schemas import (
    OTHER,
    FallbackActivated,
    FallbackRecovered,
    JobRequeued,
    JobSloBreach,
    JobStaleUpdate,
    JobTargetMissed,
    RunnerLost,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from schemas.runners import RunnerLocation
from tests._gateway_helpers import asgi_transport
from tests._helpers import config_for_test, wait_until
from tests._metrics_helpers import parse, plane_with_registry, scrape, total, value
from tests._sched_helpers import submit
from valkyrie import Client, Settings
from valkyrie.bus.kv import Versioned
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import create_app
from valkyrie.runtime import BoundedLabel, HandlerMetrics, QueueCollector, RunnerGauges
from valkyrie.runtime.metric_catalogue import (
    CATALOGUE,
    DOC_PATH,
    render_doc,
    render_table,
)
from valkyrie.testing import SimulatedRunner

_NAME = re.compile(r"^valkyrie_[a-z][a-z0-9_]*[a-z0-9]$")


def test_names_follow_the_convention() -> None:
    names = [s.name for s in CATALOGUE]
    assert len(names) == len(set(names)), "a metric is defined twice"
    for s in CATALOGUE:
        assert _NAME.fullmatch(s.name), s.name
        assert not s.name.endswith("_total"), f"{s.name}: the client adds _total to counters"
        if {"latency", "duration", "age"} & set(s.name.split("_")):
            assert s.name.endswith("_seconds"), f"{s.name}: times are in seconds"
        if s.kind == "histogram":
            assert s.buckets, s.name
        assert s.help.endswith("."), s.name


def test_the_docs_table_is_generated_from_the_catalogue() -> None:
    text = DOC_PATH.read_text()
    assert render_doc(text) == text, "run: python -m valkyrie.runtime.metric_catalogue --write"
    for s in CATALOGUE:
        assert f"`{s.exposed}`" in render_table()


def test_a_bounded_label_keeps_its_first_values() -> None:
    bound = BoundedLabel(2)
    assert [bound(v) for v in ["a", "b", "c", "a", "d", "b"]] == ["a", "b", OTHER, "a", OTHER, "b"]


def test_events_are_counted_by_kind() -> None:
    registry = CollectorRegistry()
    metrics = HandlerMetrics.create(registry)
    requeued = JobRequeued(
        subject_id="j1", attempt=1, reason="x", from_runner="r1", not_before_at_ms=None
    )
    metrics.observe_event("supervisor", requeued)
    metrics.observe_event("results", requeued)
    metrics.observe_event(
        "supervisor", RunnerLost(subject_id="r1", last_heartbeat_at_ms=1, silent_ms=5, jobs=[])
    )
    metrics.observe_event(
        "results",
        JobStaleUpdate(subject_id="j1", attempt=1, runner_id="r1", update="started", reason="x"),
    )
    metrics.observe_event(
        "dispatcher",
        JobSloBreach(
            subject_id="j1", attempt=1, target="t", limit_ms=1.0, waited_ms=5, action="boost"
        ),
    )
    metrics.observe_event(
        "results",
        JobTargetMissed(subject_id="j1", attempt=1, target_completion_time_s=1.0, took_ms=5000),
    )
    metrics.observe_event(
        "monitor",
        FallbackActivated(previous_mode="full", config_revision=2, reason="x", reasons=[]),
    )
    metrics.observe_event("monitor", FallbackRecovered(mode="full", config_revision=3, reason="y"))
    _, samples = scrape(registry)
    assert value(samples, "valkyrie_job_retries_total", handler="supervisor") == 1
    assert value(samples, "valkyrie_job_retries_total", handler="results") == 1
    assert value(samples, "valkyrie_runners_lost_total") == 1
    assert value(samples, "valkyrie_stale_updates_total") == 1
    assert value(samples, "valkyrie_slo_breaches_total", slo="dispatch_latency") == 1
    assert value(samples, "valkyrie_slo_breaches_total", slo="completion_time") == 1
    assert value(samples, "valkyrie_fallbacks_total", action="activated") == 1
    assert value(samples, "valkyrie_fallbacks_total", action="recovered") == 1


def _runner(
    runner_id: str, state: RunnerState, region: str | None, jobs: int, cap: int
) -> Versioned[RunnerRecord]:
    record = RunnerRecord(
        registration=RunnerRegistration(
            runner_id=runner_id,
            max_concurrent_jobs=cap,
            location=RunnerLocation(region=region),
        ),
        state=state,
        registered_at_ms=1,
        last_heartbeat_at_ms=1,
        assigned_jobs={f"{runner_id}-j{i}": 1 for i in range(jobs)},
    )
    return Versioned(record, 1)


def test_runner_gauges_move_with_each_change() -> None:
    registry = CollectorRegistry()
    gauges = RunnerGauges(registry)
    gauges.hear("a", _runner("a", RunnerState.ACTIVE, "eu", 0, 2))
    gauges.hear("b", _runner("b", RunnerState.BUSY, "eu", 3, 3))
    gauges.hear("c", _runner("c", RunnerState.OFFLINE, None, 1, 4))
    _, samples = scrape(registry)
    assert value(samples, "valkyrie_runners", state="active", pool="eu") == 1
    assert value(samples, "valkyrie_runners", state="busy", pool="eu") == 1
    assert value(samples, "valkyrie_runners", state="offline", pool="-") == 1
    assert value(samples, "valkyrie_runners", state="draining", pool="eu") == 0
    assert value(samples, "valkyrie_runner_slots_used", pool="eu") == 3
    assert value(samples, "valkyrie_runner_slots_capacity", pool="eu") == 5
    # an offline runner's slots are not capacity, but its held slots are still used
    assert value(samples, "valkyrie_runner_slots_capacity", pool="-") == 0
    assert value(samples, "valkyrie_runner_slots_used", pool="-") == 1
    # b finishes its jobs, a goes offline, c leaves
    gauges.hear("b", _runner("b", RunnerState.ACTIVE, "eu", 0, 3))
    gauges.hear("a", _runner("a", RunnerState.OFFLINE, "eu", 0, 2))
    gauges.hear("c", None)
    _, samples = scrape(registry)
    assert value(samples, "valkyrie_runners", state="active", pool="eu") == 1
    assert value(samples, "valkyrie_runners", state="busy", pool="eu") == 0
    assert value(samples, "valkyrie_runners", state="offline", pool="eu") == 1
    assert value(samples, "valkyrie_runners", state="offline", pool="-") == 0
    assert value(samples, "valkyrie_runner_slots_used", pool="eu") == 0
    assert value(samples, "valkyrie_runner_slots_capacity", pool="eu") == 3
    assert value(samples, "valkyrie_runner_slots_used", pool="-") == 0


def test_the_queue_collector_ages_the_oldest_job_at_scrape_time() -> None:
    from schemas import QueueGroup, QueueSnapshot

    snapshot = QueueSnapshot(
        instance="d1",
        at_ms=10_000,
        held=3,
        waiting=3,
        oldest_queued_at_ms=4_000,
        groups=[
            QueueGroup(
                job_type="gpu", region="eu", labels="gpu=a100", count=2, oldest_queued_at_ms=4_000
            ),
            QueueGroup(job_type="shell", region="-", labels="", count=1, oldest_queued_at_ms=9_000),
        ],
        tenants={"acme": 3},
    )
    now = [10.0]
    latest: list[QueueSnapshot | None] = [snapshot]
    registry = CollectorRegistry()
    registry.register(QueueCollector(lambda: latest[0], clock=lambda: now[0]))
    _, samples = scrape(registry)
    gpu = {"job_type": "gpu", "region": "eu", "labels": "gpu=a100"}
    assert value(samples, "valkyrie_queue_depth_jobs", **gpu) == 2
    assert value(samples, "valkyrie_queue_oldest_age_seconds", **gpu) == 6.0
    assert value(samples, "valkyrie_queue_tenant_jobs", tenant="acme") == 3
    now[0] = 15.0
    _, samples = scrape(registry)
    assert value(samples, "valkyrie_queue_oldest_age_seconds", **gpu) == 11.0
    latest[0] = None  # the dispatcher stopped: it exports nothing
    families, samples = scrape(registry)
    assert "valkyrie_queue_depth_jobs" in families
    assert total(samples, "valkyrie_queue_depth_jobs") == 0


IMPOSSIBLE = {"os": "plan9"}
IMPOSSIBLE_GROUP = {"job_type": "shell", "region": "-", "labels": "os=plan9"}


@pytest.mark.nats
async def test_a_running_control_plane_exports_every_metric_of_the_catalogue(
    settings: Settings,
) -> None:
    async with (
        plane_with_registry(settings) as (bus, handler_registry),
        anyio.create_task_group() as tg,
    ):
        gateway_registry = CollectorRegistry()
        app = create_app(bus, LiveConfig(config_for_test(settings)), gateway_registry)
        stop = anyio.Event()
        runner = SimulatedRunner(bus, "m1", capacity=2, work_s=0.05)
        await tg.start(runner.run, stop)
        client = Client(bus)
        done = await submit(client, payload={"command": ["true"]})
        await client.wait_for_job(done, timeout_s=15)
        await submit(client, labels=IMPOSSIBLE)

        async def held() -> bool:
            _, samples = scrape(handler_registry)
            return value(samples, "valkyrie_queue_depth_jobs", **IMPOSSIBLE_GROUP) == 1

        await wait_until(held, timeout_s=10)
        families, samples = scrape(handler_registry)
        first_age = value(samples, "valkyrie_queue_oldest_age_seconds", **IMPOSSIBLE_GROUP)
        assert first_age is not None
        await anyio.sleep(1.2)
        _, later = scrape(handler_registry)
        later_age = value(later, "valkyrie_queue_oldest_age_seconds", **IMPOSSIBLE_GROUP)
        assert later_age is not None
        assert later_age >= first_age + 1.0
        async with httpx.AsyncClient(
            transport=asgi_transport(app), base_url="http://gateway"
        ) as http:
            response = await http.get("/metrics")
        assert response.status_code == 200
        gateway_families, _ = parse(response.text)
        exported = families | gateway_families
        missing = [s.name for s in CATALOGUE if s.name not in exported]
        assert not missing, f"declared but not exported by a running control plane: {missing}"
        # and the figures are the ones the state says
        assert value(samples, "valkyrie_runners", state="active", pool="-") == 1
        assert value(samples, "valkyrie_runner_slots_capacity", pool="-") == 2
        assert total(samples, "valkyrie_job_dispatch_latency_seconds_count") >= 1
        assert total(samples, "valkyrie_job_start_latency_seconds_count") >= 1
        assert total(samples, "valkyrie_handler_messages_total", handler="dispatcher") >= 1
        assert value(samples, "valkyrie_config_revision") == 0
        assert value(samples, "valkyrie_mode", mode="full") == 1
        stop.set()
        tg.cancel_scope.cancel()


@pytest.mark.nats
async def test_two_dispatchers_together_count_each_queued_job_once(settings: Settings) -> None:
    async with (
        plane_with_registry(settings, ["intake", "dispatcher", "registry", "results"]) as (bus, a),
        plane_with_registry(settings, ["dispatcher"]) as (_, b),
    ):
        client = Client(bus)
        for n in range(8):
            await submit(client, labels=IMPOSSIBLE, metadata={"n": str(n)})

        def depth(registry: CollectorRegistry) -> float:
            _, samples = scrape(registry)
            return total(samples, "valkyrie_queue_depth_jobs", **IMPOSSIBLE_GROUP)

        async def all_held() -> bool:
            return depth(a) + depth(b) == 8

        await wait_until(all_held, timeout_s=15)
        # and it stays so: no job is counted by both (each is held by one dispatcher)
        for _ in range(5):
            await anyio.sleep(0.3)
            assert depth(a) + depth(b) == 8
