"""Health monitoring against a real nats-server, the operator's side: a mode set by hand is never
overridden, two monitors switch once each way, and ``valkyrie status`` (exit codes, JSON).
"""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest

from tests._health_helpers import (
    HEALTH_ENV,
    SUMMARY_DECODER,
    eventually,
    fallback_gone,
    health_events,
    held_fallback,
    mode_of,
    wait_mode,
    wait_summary,
)
from tests._helpers import ROOT, env_for, running
from valkyrie import Settings
from valkyrie.client.config import ConfigClient

pytestmark = pytest.mark.nats


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
            lambda: held_fallback(bus), timeout_s=10, what="the fallback marked overridden"
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
        await eventually(lambda: fallback_gone(bus), timeout_s=10, what="the hold released")
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
        summary = SUMMARY_DECODER.decode(as_json.stdout)
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
