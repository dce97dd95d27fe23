"""`valkyrie config …` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner

from tests._config_helpers import control_plane, wait_revision
from tests._helpers import ROOT, env_for
from valkyrie import Settings
from valkyrie.cli import cli
from valkyrie.config.model import IntegrationMode

SHA = "0" * 64


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "valkyrie.toml"
    path.write_text(text)
    return path


# -- offline: validate ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_validate_lists_every_error_path_and_exits_3(tmp_path: Path) -> None:
    file = write(
        tmp_path,
        'mode = "Hybrid"\n'
        "[dispatch]\naccept_timeout_ms = 0\nbogus = 1\n"
        "[health]\nconsumer_lag_degraded = 10\nconsumer_lag_unhealthy = 5\n"
        '[[http.tokens]]\nname = "ci"\nsha256 = "nope"\n',
    )
    result = CliRunner().invoke(cli, ["config", "validate", str(file)])
    assert result.exit_code == 3
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(":")[1].strip() for line in lines) == [
        "dispatch.accept_timeout_ms",
        "dispatch.bogus",
        "health.consumer_lag_degraded",
        "http.tokens[0].sha256",
        "mode",
    ]
    assert f"{file}: 5 error(s)" in result.stderr
    assert result.stdout == ""


@pytest.mark.timeout(30)
def test_validate_accepts_a_good_file_and_shows_warnings(tmp_path: Path) -> None:
    file = write(tmp_path, "[http]\nauth_required = true\n[dispatch]\nmax_queue_scan = 10\n")
    result = CliRunner().invoke(cli, ["config", "validate", str(file)])
    assert result.exit_code == 0, result.output
    assert "warning: http.tokens: http.auth_required is true" in result.stderr
    assert result.stdout.strip() == f"{file}: valid (1 warning(s))"


@pytest.mark.timeout(30)
def test_validate_checks_the_file_over_its_profile(tmp_path: Path) -> None:
    # production turns authentication on: no "unauthenticated in production" warning
    file = write(
        tmp_path, f'profile = "production"\n[[http.tokens]]\nname = "ci"\nsha256 = "{SHA}"\n'
    )
    result = CliRunner().invoke(cli, ["config", "validate", str(file)])
    assert result.exit_code == 0, result.output
    assert [line.split(":")[1].strip() for line in result.stderr.splitlines()] == [
        "security.tls_enabled"
    ]


@pytest.mark.timeout(30)
def test_validate_refuses_a_file_that_is_not_toml(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["config", "validate", str(write(tmp_path, "[dispatch\n"))])
    assert result.exit_code == 3
    assert "cannot read config file" in result.stderr


# -- against a running config handler ---------------------------------------------------------------


async def valkyrie(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "valkyrie", *args],
            env={**env_for(settings), **(env or {})},
            cwd=ROOT,
            check=False,
        )


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_show_effective_prints_every_value_with_its_source(
    settings: Settings, tmp_path: Path
) -> None:
    file = write(tmp_path, "[dispatch]\nmax_queue_scan = 9\nreconcile_interval_ms = 600\n")
    env = {
        "VALKYRIE_PROFILE": "testing",
        "VALKYRIE_CONFIG_FILE": str(file),
        "VALKYRIE_DISPATCH__RECONCILE_INTERVAL_MS": "700",
    }
    async with control_plane(settings, ["config"]) as (_bus, live):
        result = await valkyrie(settings, "config", "set", "mode", "hybrid", "--reason", "try")
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().splitlines() == ['mode: "full" -> "hybrid"', "revision 1"]
        await wait_revision(live, 1)
        assert live.current.mode == IntegrationMode.HYBRID

        shown = await valkyrie(settings, "config", "show", "--effective", "--json", env=env)
        assert shown.returncode == 0, shown.stderr.decode()
        doc = json.loads(shown.stdout)
        assert doc["mode"] == {"value": "hybrid", "source": "runtime"}
        assert doc["dispatch.reconcile_interval_ms"] == {"value": 700, "source": "env"}
        assert doc["dispatch.max_queue_scan"] == {"value": 9, "source": "file"}
        assert doc["dispatch.accept_timeout_ms"] == {"value": 2000, "source": "profile"}
        assert doc["dispatch.runner_lost_after_ms"] == {"value": 3000, "source": "default"}
        assert len(doc) >= 60

        table = await valkyrie(settings, "config", "show", "--effective", "dispatch.", env=env)
        lines = table.stdout.decode().splitlines()
        assert lines[0].split() == ["KEY", "VALUE", "SOURCE"]
        assert ["dispatch.max_queue_scan", "9", "file"] in [line.split() for line in lines]
        assert ["dispatch.reconcile_interval_ms", "700", "env"] in [line.split() for line in lines]
        assert all(line.startswith("dispatch.") for line in lines[2:])

        current = await valkyrie(settings, "config", "show")
        assert current.stdout.decode().splitlines()[1:] == ['  mode = "hybrid"']


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_set_refusal_history_rollback_unset(settings: Settings) -> None:
    async with control_plane(settings, ["config"]) as (_bus, live):
        refused = await valkyrie(settings, "config", "set", "http.port", "9000")
        assert refused.returncode == 3
        assert "error: http.port: cannot change live" in refused.stderr.decode()
        bad = await valkyrie(settings, "config", "set", "dispatch.accept_timeout_ms", "1")
        assert bad.returncode == 3
        assert "error: dispatch.accept_timeout_ms: Expected `int` >= 50" in bad.stderr.decode()

        for args in (("dispatch.max_queue_scan", "50"), ("mode", "fallback")):
            done = await valkyrie(settings, "config", "set", *args)
            assert done.returncode == 0, done.stderr.decode()
        history = await valkyrie(settings, "config", "history", "--json")
        revisions = json.loads(history.stdout)
        assert [r["revision"] for r in revisions] == [1, 2]
        assert revisions[1]["values"] == {"dispatch.max_queue_scan": 50, "mode": "fallback"}
        assert revisions[0]["changed_by"].startswith("cli")

        back = await valkyrie(settings, "config", "rollback", "1")
        assert back.returncode == 0, back.stderr.decode()
        assert back.stdout.decode().splitlines() == ['mode: "fallback" -> "full"', "revision 3"]
        await wait_revision(live, 3)
        assert live.current.mode == IntegrationMode.FULL
        assert live.current.dispatch.max_queue_scan == 50

        unset = await valkyrie(settings, "config", "unset", "dispatch.max_queue_scan")
        assert unset.returncode == 0
        await wait_revision(live, 4)
        assert live.runtime == {}
        assert live.current.dispatch.max_queue_scan == 2000

        table = await valkyrie(settings, "config", "history")
        rows = table.stdout.decode().splitlines()
        assert rows[0].split()[:4] == ["REV", "AT", "BY", "CHANGES"]
        assert len(rows) == 2 + 4
        assert "rollback to 1" in rows[4]


@pytest.mark.nats
@pytest.mark.timeout(120)
async def test_apply_sends_a_file_and_refuses_non_live_keys(
    settings: Settings, tmp_path: Path
) -> None:
    async with control_plane(settings, ["config"]) as (_bus, live):
        good = write(tmp_path, 'mode = "hybrid"\n[dispatch]\nmax_queue_scan = 11\n')
        done = await valkyrie(settings, "config", "apply", str(good), "--reason", "file")
        assert done.returncode == 0, done.stderr.decode()
        await wait_revision(live, 1)
        assert live.current.dispatch.max_queue_scan == 11
        bad = tmp_path / "bad.toml"
        bad.write_text("[performance]\nhandler_concurrency = 2\n")
        refused = await valkyrie(settings, "config", "apply", str(bad))
        assert refused.returncode == 3
        assert (
            "error: performance.handler_concurrency: cannot change live" in refused.stderr.decode()
        )
