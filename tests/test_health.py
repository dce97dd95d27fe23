"""Health monitoring against a real nats-server: reports, the summary, automatic fallback and
recovery, transition events, and ``valkyrie status``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import anyio
import msgspec
import nats.js.errors
import pytest
from nats.aio.msg import Msg

from schemas import ConfigRevision, FallbackRecord, HealthReport, HealthSummary
from tests._helpers import (
    ROOT,
    env_for,
    events_of,
    running,
    spawn_with_env,
    stop_process,
)
from valkyrie import Bus, Settings
from valkyrie.bus.codec import encode
from valkyrie.client.config import ConfigClient

pytestmark = pytest.mark.nats

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
_SUMMARY = msgspec.json.Decoder(HealthSummary)
_RECORD = msgspec.json.Decoder(FallbackRecord)
_REPORT = msgspec.json.Decoder(HealthReport)
T = TypeVar("T")


@pytest.fixture
def fast_health(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handlers run in this process read their config layers from the environment."""
    for key, value in HEALTH_ENV.items():
        monkeypatch.setenv(key, value)


async def stats_value(bus: Bus, key: str) -> bytes | None:
    kv = await bus.kv("stats")
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # also raised for a deleted key
        return None
    return entry.value or None


async def summary_of(bus: Bus) -> HealthSummary | None:
    raw = await stats_value(bus, "health")
    return _SUMMARY.decode(raw) if raw else None


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


# -- reports -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_every_process_reports_and_says_goodbye(
    settings: Settings, fast_health: None
) -> None:
    async with running(settings, []) as bus:
        reports: list[HealthReport] = []

        async def collect(msg: Msg) -> None:
            reports.append(_REPORT.decode(msg.data))

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
            lambda: _record(bus), timeout_s=10, what="the automatic fallback record"
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
        await eventually(lambda: _record_gone(bus), timeout_s=10, what="the record deleted")

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


# -- operators win -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_mode_set_by_hand_is_never_overridden(
    settings: Settings, fast_health: None
) -> None:
    async with running(settings, ["monitor", "config"]) as bus:
        await wait_summary(bus, lambda s: s.status == "healthy", timeout_s=20, what="healthy")
        operator = ConfigClient(bus, actor="cli:operator")
        # unhealthy by construction: a runner is required and none exists
        verdict = await operator.change(set_values={"health.min_active_runners": 1})
        assert verdict.accepted, verdict.errors
        await wait_mode(bus, "fallback", timeout_s=30)

        # the operator takes the mode back while it is still unhealthy: it stays theirs
        verdict = await operator.change(set_values={"mode": "hybrid"}, reason="by hand")
        assert verdict.accepted, verdict.errors
        held = await eventually(
            lambda: _held_record(bus), timeout_s=10, what="the fallback marked overridden"
        )
        assert held.previous_mode == "full"
        await anyio.sleep(2.0)  # ten evaluations, all unhealthy
        mode, current = await mode_of(bus)
        assert mode == "hybrid"
        assert current is not None
        assert current.changed_by == "cli:operator"

        # fallback set by hand is not "recovered" by the monitor either
        verdict = await operator.change(
            set_values={"mode": "fallback", "health.min_active_runners": 0}
        )
        assert verdict.accepted, verdict.errors
        await wait_summary(bus, lambda s: s.status == "healthy", timeout_s=10, what="healthy")
        await anyio.sleep(2.0)
        mode, current = await mode_of(bus)
        assert mode == "fallback"
        assert current is not None
        assert current.changed_by == "cli:operator"
        # healthy again: the hold is over
        await eventually(lambda: _record_gone(bus), timeout_s=10, what="the hold released")
        seen = await health_events(bus)
    assert ("fallback", "overridden") in seen
    assert seen.count(("fallback", "activated")) == 1, seen
    assert ("fallback", "recovered") not in seen


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_monitors_switch_once_each_way(settings: Settings, fast_health: None) -> None:
    async with (
        running(settings, ["monitor", "config"]) as bus,
        running(settings, ["monitor"]),
    ):
        await wait_summary(
            bus, lambda s: len(s.components) == 2, timeout_s=20, what="both monitors reporting"
        )
        config = ConfigClient(bus, actor="test")
        verdict = await config.change(set_values={"health.min_active_runners": 1})
        assert verdict.accepted, verdict.errors
        await wait_mode(bus, "fallback", timeout_s=30)
        await anyio.sleep(1.0)  # let the other monitor try as well
        verdict = await config.change(set_values={"health.min_active_runners": 0})
        assert verdict.accepted, verdict.errors
        await wait_mode(bus, "full", timeout_s=30)
        await anyio.sleep(1.0)
        history = await config.history()

        async def announced() -> list[tuple[str, str]] | None:
            seen = await health_events(bus)
            return seen if ("fallback", "recovered") in seen else None

        seen = await eventually(announced, timeout_s=10, what="the recovery event")
    switches = [(r.changed_by, r.diff["mode"]["new"]) for r in history if "mode" in r.diff]
    assert switches == [("monitor:auto", "fallback"), ("monitor:auto", "full")], history
    assert seen.count(("fallback", "activated")) == 1, seen
    assert seen.count(("fallback", "recovered")) == 1, seen


async def _record(bus: Bus) -> FallbackRecord | None:
    raw = await stats_value(bus, "fallback")
    return _RECORD.decode(raw) if raw else None


async def _record_gone(bus: Bus) -> bool | None:
    return True if await stats_value(bus, "fallback") is None else None


async def _held_record(bus: Bus) -> FallbackRecord | None:
    record = await _record(bus)
    return record if record is not None and record.state == "overridden" else None


# -- (d) valkyrie status ---------------------------------------------------------------------------


async def valkyrie_status(
    settings: Settings, *args: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(timeout_s):
        return await anyio.run_process(
            [sys.executable, "-m", "valkyrie", *args],
            env={**env_for(settings), **HEALTH_ENV},
            cwd=ROOT,
            check=False,
        )


@pytest.mark.timeout(120)
async def test_status_reports_health_and_exit_codes(settings: Settings, fast_health: None) -> None:
    nothing = await valkyrie_status(settings, "status", "--wait", "0.5")
    assert nothing.returncode == 5, nothing.stderr.decode()
    assert "nothing answers" in nothing.stderr.decode()

    async with running(settings, ["monitor", "config"]) as bus:
        await wait_summary(bus, lambda s: s.status == "healthy", timeout_s=20, what="healthy")
        ok = await valkyrie_status(settings, "status")
        out = ok.stdout.decode()
        assert ok.returncode == 0, out + ok.stderr.decode()
        assert out.startswith("status:   healthy\nmode:     full\n"), out
        assert "by monitor " in out
        rows = [line.split() for line in out.splitlines()]
        assert ["COMPONENT", "INSTANCE", "STATUS", "REV", "AGE", "FAILING"] in rows
        assert any(r[:1] == ["monitor+config"] and r[2:3] == ["healthy"] for r in rows), out
        assert any(r[:1] == ["intake"] and r[2:4] == ["0", "healthy"] for r in rows), out
        assert "runners:  0 available of 0" in out

        as_json = await valkyrie_status(settings, "status", "--json")
        assert as_json.returncode == 0, as_json.stderr.decode()
        summary = _SUMMARY.decode(as_json.stdout)
        assert summary.status == "healthy"
        assert [c.component for c in summary.components] == ["monitor+config"]

        verdict = await ConfigClient(bus, actor="test").change(
            set_values={"health.min_active_runners": 1, "features.auto_fallback": False}
        )
        assert verdict.accepted, verdict.errors
        await wait_summary(
            bus,
            lambda s: s.runner_pool.status == "unhealthy",
            timeout_s=10,
            what="the runner pool unhealthy",
        )
        unhealthy = await valkyrie_status(settings, "status")
        out = unhealthy.stdout.decode()
        assert unhealthy.returncode == 1, out + unhealthy.stderr.decode()
        assert out.startswith("status:   unhealthy\n"), out
        assert "  - runner pool unhealthy: 0 available of 0, minimum 1" in out
        assert "; minimum 1: unhealthy" in out
        # automatic fallback is off: the mode stays
        assert (await mode_of(bus))[0] == "full"
        assert ("overall", "unhealthy") in await health_events(bus)


@pytest.mark.timeout(90)
async def test_status_without_a_monitor_evaluates_the_reports_itself(
    settings: Settings, fast_health: None
) -> None:
    async with running(settings, ["config"]):
        result = await valkyrie_status(settings, "status", "--wait", "1.5")
        out = result.stdout.decode()
        assert result.returncode == 0, out + result.stderr.decode()
        assert "no monitor is running" in out
        assert any(line.split()[:1] == ["config"] for line in out.splitlines()), out
    # the process said goodbye: now nothing answers
    gone = await valkyrie_status(settings, "status", "--wait", "0.5")
    assert gone.returncode == 5, gone.stdout.decode() + gone.stderr.decode()


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_status_exit_code_when_the_server_is_unreachable(settings: Settings) -> None:
    result = await valkyrie_status(settings, "--nats-url", "nats://127.0.0.1:1", "status")
    assert result.returncode == 5, result.stderr.decode()
