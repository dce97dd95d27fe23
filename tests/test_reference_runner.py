"""The reference runner (Runner + ShellHandler) executing real commands, control plane faked."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas import RunnerCommand
from tests._runner_fakes import (
    FakeControlPlane,
    fake_control_plane,
    new_runner_id,
    registration,
    started,
)
from valkyrie import Bus
from valkyrie.runner import CommandPayload, ShellHandler, parse_command_payload

nats = pytest.mark.nats


@asynccontextmanager
async def shell_runner(
    bus: Bus, *, capacity: int = 1, **options: Any
) -> AsyncIterator[FakeControlPlane]:
    rid = new_runner_id()
    async with (
        fake_control_plane(bus, rid) as cp,
        started(bus, registration(rid, capacity=capacity), ShellHandler(), **options),
    ):
        yield cp


# -- payload parsing (no NATS) ----------------------------------------------------------------------


def test_payload_list_runs_without_shell() -> None:
    payload, errors = parse_command_payload({"command": ["echo", "a b"]})
    assert errors == []
    assert payload is not None
    assert payload.argv() == (["echo", "a b"], False)


def test_payload_string_implies_shell() -> None:
    assert CommandPayload(command="echo $HOME").argv() == ("echo $HOME", True)
    assert CommandPayload(command="echo 'a b'", shell=False).argv() == (["echo", "a b"], False)
    joined = CommandPayload(command=["echo", "a b"], shell=True)  # noqa: S604 - a field, no call
    assert joined.argv() == ("echo 'a b'", True)


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (None, "$.payload.command"),
        ({"cmd": "ls"}, "$.payload.command"),
        ({"command": []}, "$.payload.command"),
        ({"command": 3}, "$.payload.command"),
        ({"command": "ls", "env": {"A": 1}}, "$.payload.env"),
        ("ls", "$.payload"),
    ],
)
def test_payload_errors_name_the_field(payload: Any, path: str) -> None:
    parsed, errors = parse_command_payload(payload)
    assert parsed is None
    assert [e.path for e in errors][:1] == [path] or any(e.path.startswith(path) for e in errors)


# -- executing ------------------------------------------------------------------------------------


@nats
async def test_echo_succeeds(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("echo", {"command": ["echo", "hi there"]})
        finished = await cp.finished("echo")
        assert finished.outcome == "succeeded"
        result = finished.result
        assert result.exit_code == 0
        assert result.output_tail == "hi there"
        assert result.error is None
        assert result.duration_ms >= 0
        assert result.resource_usage.memory_peak_mb > 0
        assert await cp.log_lines("echo", "stdout") == ["hi there"]
        assert "[valkyrie] $ echo 'hi there'" in await cp.log_lines("echo", "system")


@nats
async def test_failing_command_reports_exit_code(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("fail", {"command": "echo out; echo oops >&2; exit 3"})
        finished = await cp.finished("fail")
        assert finished.outcome == "failed"
        assert finished.result.exit_code == 3
        assert await cp.log_lines("fail", "stderr") == ["oops"]
        assert finished.result.output_tail.splitlines() == ["out", "oops"]


@nats
async def test_missing_executable_is_the_jobs_failure(bus: Bus, tmp_path: Path) -> None:
    """As in the shell form (exit 127): ``failed``, which is not retried by default."""
    locked = tmp_path / "locked.sh"
    locked.write_text("#!/bin/sh\necho hi\n")
    locked.chmod(0o644)
    async with shell_runner(bus) as cp:
        await cp.dispatch("missing", {"command": ["no-such-program-valkyrie"]})
        finished = await cp.finished("missing")
        assert finished.outcome == "failed"
        assert finished.result.exit_code == 127
        assert finished.result.error == "executable not found: no-such-program-valkyrie"
        await cp.dispatch("shell-missing", {"command": "no-such-program-valkyrie"})
        in_shell = await cp.finished("shell-missing")
        assert (in_shell.outcome, in_shell.result.exit_code) == ("failed", 127)
        await cp.dispatch("denied", {"command": [str(locked)]})
        denied = await cp.finished("denied")
        assert (denied.outcome, denied.result.exit_code) == ("failed", 126)
        assert (denied.result.error or "").startswith("permission denied")


@nats
async def test_payload_without_command_is_an_error(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("nocmd", {"script": "ls"})
        finished = await cp.finished("nocmd")
        assert finished.outcome == "error"
        assert "$.payload.command" in (finished.result.error or "")


@nats
async def test_env_cwd_and_no_runner_secrets(
    bus: Bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VALKYRIE_NATS_PASSWORD", "secret")
    command = 'echo "$GREETING"; pwd; env | grep ^VALKYRIE_ | sort'
    async with shell_runner(bus) as cp:
        await cp.dispatch(
            "env", {"command": command, "env": {"GREETING": "hej"}, "cwd": str(tmp_path)}
        )
        assert (await cp.finished("env")).outcome == "succeeded"
        lines = await cp.log_lines("env", "stdout")
        assert lines[:2] == ["hej", str(tmp_path)]
        assert [line.split("=")[0] for line in lines[2:]] == [
            "VALKYRIE_JOB_ATTEMPT",
            "VALKYRIE_JOB_ID",
            "VALKYRIE_RUNNER_ID",
        ]


@nats
async def test_default_cwd_is_a_fresh_directory_removed_afterwards(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("tmp", {"command": ["pwd"]})
        finished = await cp.finished("tmp")
        workdir = finished.result.output_tail
        assert "valkyrie-tmp-" in workdir
        assert not await anyio.Path(workdir).exists()


@nats
async def test_chatty_output_is_batched_without_loss(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("seq", {"command": ["seq", "1", "50000"]})
        finished = await cp.finished("seq", timeout_s=60)
        assert finished.outcome == "succeeded"
        batches = [b for b in await cp.logs("seq") if b.stream == "stdout"]
        assert [line for b in batches for line in b.lines] == [str(i) for i in range(1, 50001)]
        assert len(batches) <= 600
        tail = [str(i) for i in range(49951, 50001)]
        assert finished.result.output_tail.splitlines() == tail


@nats
async def test_resource_usage_counts_cpu_time(bus: Bus) -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    async with shell_runner(bus) as cp:
        await cp.dispatch("burn", {"command": [sys.executable, "-c", burn]})
        finished = await cp.finished("burn")
        assert finished.outcome == "succeeded"
        assert finished.result.resource_usage.cpu_time_ms >= 250
        assert finished.result.resource_usage.memory_peak_mb > 1


@nats
async def test_processes_left_behind_are_killed(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        begin = anyio.current_time()
        await cp.dispatch("bg", {"command": "sleep 30 & echo started"})
        finished = await cp.finished("bg")
        assert finished.outcome == "succeeded"
        assert anyio.current_time() - begin < 5


@nats
@pytest.mark.slow
async def test_timeout_kills_the_process_group(bus: Bus) -> None:
    async with shell_runner(bus, kill_grace_s=2) as cp:
        begin = anyio.current_time()
        await cp.dispatch("slow", {"command": ["sleep", "30"]}, max_execution_time_s=1)
        finished = await cp.finished("slow")
        assert finished.outcome == "timed_out"
        assert finished.result.exit_code == -15  # SIGTERM was enough
        assert "max_execution_time_s=1" in (finished.result.error or "")
        assert 1 <= anyio.current_time() - begin < 6


@nats
@pytest.mark.slow
async def test_cancel_escalates_to_sigkill(bus: Bus) -> None:
    command = "trap '' TERM; echo ready; sleep 30"
    async with shell_runner(bus) as cp:
        await cp.dispatch("stubborn", {"command": command})
        await cp.wait_for(lambda: cp.updates_of("stubborn"))
        await _wait_for_line(cp, "stubborn", "ready")
        begin = anyio.current_time()
        await cp.command(
            RunnerCommand(command="cancel", job_id="stubborn", grace_period_s=0.5, reason="stop")
        )
        finished = await cp.finished("stubborn")
        elapsed = anyio.current_time() - begin
        assert finished.outcome == "cancelled"
        assert finished.result.exit_code == -9
        assert finished.result.error == "stop"
        assert 0.5 <= elapsed < 5
        system = await cp.log_lines("stubborn", "system")
        assert any("SIGTERM to the process group" in line for line in system)
        assert any("SIGKILL" in line and "still running" in line for line in system)


@nats
async def test_abandon_kills_without_reporting(bus: Bus) -> None:
    async with shell_runner(bus) as cp:
        await cp.dispatch("gone", {"command": "echo ready; sleep 30"})
        await _wait_for_line(cp, "gone", "ready")
        await cp.command(RunnerCommand(command="abandon", job_id="gone", grace_period_s=1))
        await cp.heartbeat(lambda h: h.load == 0.0)
        await anyio.sleep(0.5)
        assert [u.__struct_config__.tag for u in cp.updates_of("gone")] == ["started"]


@nats
async def test_capacity_two_runs_jobs_concurrently(bus: Bus) -> None:
    async with shell_runner(bus, capacity=2) as cp:
        begin = anyio.current_time()
        await cp.dispatch("a", {"command": ["sleep", "1"]})
        await cp.dispatch("b", {"command": ["sleep", "1"]})
        await cp.dispatch("c", {"command": ["sleep", "1"]})
        assert (await cp.finished("c")).outcome == "rejected"
        assert (await cp.finished("a")).outcome == "succeeded"
        assert (await cp.finished("b")).outcome == "succeeded"
        assert anyio.current_time() - begin < 1.9


async def _wait_for_line(cp: FakeControlPlane, job_id: str, line: str) -> None:
    for _ in range(200):
        if line in await cp.log_lines(job_id):
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"{line!r} not logged by {job_id} within 10s")
