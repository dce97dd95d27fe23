"""Health monitoring against a real nats-server: reports, the summary, and automatic fallback
and recovery for consumer lag and a stalled worker.

Operators' mode changes and ``valkyrie status``: test_health_operators.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from schemas import HealthReport
from tests._health_helpers import (
    HEALTH_ENV,
    REPORT_DECODER,
    component,
    eventually,
    fallback_gone,
    fallback_of,
    health_events,
    in_order,
    wait_mode,
    wait_summary,
)
from tests._helpers import events_of, running, spawn_with_env, stop_process
from valkyrie import Settings
from valkyrie.bus.codec import encode
from valkyrie.client.config import ConfigClient

pytestmark = pytest.mark.nats


# -- reports -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_every_process_reports_and_says_goodbye(
    settings: Settings, fast_health: None
) -> None:
    async with running(settings, []) as bus:
        reports: list[HealthReport] = []

        async def collect(msg: Msg) -> None:
            reports.append(REPORT_DECODER.decode(msg.data))

        sub = await bus.nc.subscribe(bus.names.health(">"), cb=collect)
        async with running(settings, ["config", "canceller"]):
            await eventually(lambda: _ready(len(reports) >= 3), timeout_s=20, what="three reports")
            config = ConfigClient(bus, actor="test")
            slow = await config.change(set_values={"health.report_interval_ms": 1400})
            assert slow.accepted, slow.errors
            await eventually(
                lambda: _ready(any(r.config_revision == slow.revision for r in reports)),
                timeout_s=3,
                what="a report carrying the slower interval's revision",
            )
            # the next scheduled report is 1.4 s away: one within 0.7 s was sent for the revision
            other = await config.change(
                set_values={"health.min_active_runners": 0, "mode": "hybrid"}
            )
            assert other.accepted, other.errors
            await eventually(
                lambda: _ready(any(r.config_revision == other.revision for r in reports)),
                timeout_s=0.7,
                what="a report sent at once for the new revision",
            )
        await eventually(
            lambda: _ready(reports[-1].stopping), timeout_s=5, what="the goodbye report"
        )
        await sub.unsubscribe()
    first = reports[0]
    assert first.component == "config+canceller"
    assert first.handlers == ["config", "canceller"]
    assert set(first.checks) == {"nats", "kv_latency_ms", "handlers", "config"}
    assert reports[1].checks["nats"].status == "healthy", reports[1]
    assert reports[1].checks["handlers"].status == "healthy", reports[1]
    assert reports[1].checks["kv_latency_ms"].value is not None
    assert {r.instance for r in reports} == {first.instance}
    assert reports[-1].stopping


async def _ready(condition: bool) -> bool | None:
    return True if condition else None


@pytest.mark.timeout(60)
async def test_the_whole_control_plane_is_healthy(settings: Settings, fast_health: None) -> None:
    """Every registered handler in one process, as `valkyrie up` runs them (monitor included)."""
    async with running(settings) as bus:
        summary = await wait_summary(
            bus, lambda s: bool(s.components), timeout_s=20, what="a first summary"
        )
        (only,) = summary.components
        assert set(only.component.split("+")) >= {"intake", "dispatcher", "monitor", "config"}
        assert summary.status == "healthy", summary.reasons
        assert summary.mode == "full"
        assert {c.durable for c in summary.consumers} == {
            "intake",
            "results",
            "canceller",
            "config",
            "dispatcher",
        }
        assert all(c.pending == 0 for c in summary.consumers), summary.consumers
        assert await health_events(bus) == []  # healthy from the start: no transition


# -- (a) degradation by consumer lag -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_consumer_lag_falls_back_then_recovers_by_itself(
    settings: Settings, fast_health: None
) -> None:
    async with running(settings, ["monitor", "config", "dispatcher"]) as bus:
        await wait_summary(
            bus,
            lambda s: s.status == "healthy" and bool(component(s, "monitor+config+dispatcher")),
            timeout_s=20,
            what="a healthy first summary",
        )
        verdict = await ConfigClient(bus, actor="test").change(
            set_values={"health.consumer_lag_degraded": 5}, reason="test: tiny lag threshold"
        )
        assert verdict.accepted, verdict.errors
        # no intake runs: the submissions wait in the submit stream
        for n in range(20):
            await bus.js.publish(
                bus.names.submit, encode({"job_type": "build", "metadata": {"n": str(n)}})
            )

        fallback = await wait_mode(bus, "fallback", timeout_s=30)
        assert fallback.changed_by == "monitor:auto"
        assert fallback.reason is not None
        assert "consumer intake degraded: 20 pending (>= 5)" in fallback.reason
        # written once the config handler has accepted the switch
        record = await eventually(
            lambda: fallback_of(bus), timeout_s=10, what="the automatic fallback record"
        )
        assert record.state == "active"
        assert record.previous_mode == "full"
        assert record.config_revision == fallback.revision
        lagging = await wait_summary(
            bus, lambda s: s.mode == "fallback", timeout_s=10, what="a summary in fallback mode"
        )
        assert lagging.status == "degraded"
        intake = next(c for c in lagging.consumers if c.durable == "intake")
        assert intake.pending == 20
        assert intake.status == "degraded"

        async with running(settings, ["intake"]):
            recovered = await wait_mode(bus, "full", timeout_s=30)
        assert recovered.changed_by == "monitor:auto"
        assert (recovered.reason or "").startswith("automatic recovery")
        assert "mode" not in recovered.values  # the override is gone, not pinned to "full"
        await eventually(lambda: fallback_gone(bus), timeout_s=10, what="the record deleted")

        async def all_announced() -> list[tuple[str, str]] | None:
            seen = await health_events(bus)
            return seen if ("fallback", "recovered") in seen else None

        seen = await eventually(all_announced, timeout_s=10, what="the recovery event")
        events = {(e.subject_id, e.type): e for e in await events_of(bus, "health.>")}
    assert in_order(
        seen,
        ("consumer-lag", "degraded"),
        ("overall", "degraded"),
        ("fallback", "activated"),
        ("consumer-lag", "healthy"),
        ("overall", "healthy"),
        ("fallback", "recovered"),
    ), seen
    # one event per transition: nothing is announced twice in a row
    assert seen.count(("overall", "degraded")) == 1, seen
    degraded = events[("overall", "health.degraded")]
    assert degraded.data["from"] == "healthy"
    assert any("consumer intake" in r for r in degraded.data["reasons"])


# -- (b) a stalled worker ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_stalled_worker_falls_back_and_recovers_when_it_resumes(
    settings: Settings, fast_health: None, tmp_path: Path
) -> None:
    log = tmp_path / "results.log"
    async with running(settings, ["monitor", "config"]) as bus:
        proc = spawn_with_env(["worker", "results"], settings, log, HEALTH_ENV)
        try:
            await wait_summary(
                bus,
                lambda s: component(s, "results") == ["healthy"] and s.status == "healthy",
                timeout_s=60,
                what="the results worker reporting healthy",
            )
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                fallback = await wait_mode(bus, "fallback", timeout_s=30)
                assert fallback.changed_by == "monitor:auto"
                assert "results" in (fallback.reason or "")
                assert "stalled" in (fallback.reason or "")
                stalled = await wait_summary(
                    bus,
                    lambda s: component(s, "results") == ["unhealthy"],
                    timeout_s=10,
                    what="results unhealthy",
                )
                entry = next(c for c in stalled.components if c.component == "results")
                assert entry.failing["liveness"].detail.startswith("stalled")
                assert entry.pid == proc.pid
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            recovered = await wait_mode(bus, "full", timeout_s=30)
            assert recovered.changed_by == "monitor:auto"
            healthy = await wait_summary(
                bus,
                lambda s: s.config_revision == recovered.revision,
                timeout_s=10,
                what="a summary at the recovered revision",
            )
            assert healthy.mode == "full"
            assert healthy.status == "healthy", healthy.reasons
            assert component(healthy, "results") == ["healthy"]
            assert healthy.fallback is None
        finally:
            os.kill(proc.pid, signal.SIGCONT)
            code = stop_process(proc)
        assert code == 0, log.read_text()[-3000:]
        seen = await health_events(bus)
    assert in_order(
        seen,
        ("results", "unhealthy"),
        ("overall", "unhealthy"),
        ("fallback", "activated"),
        ("results", "healthy"),
        ("overall", "healthy"),
        ("fallback", "recovered"),
    ), seen
