"""``valkyrie runner``, ``valkyrie runners …``, ``valkyrie jobs logs`` and ``valkyrie up --runners``."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from click.testing import CliRunner, Result

from schemas import (
    FieldError,
    JobLog,
    JobRecord,
    JobState,
    JobSubmission,
    RegistrationVerdict,
    RunnerCapabilities,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from tests._helpers import spawn, stop_process
from tests._runner_fakes import fake_control_plane, new_runner_id
from valkyrie import Bus, Settings
from valkyrie.bus.codec import REGISTRATION_DECODER, encode, now_ms
from valkyrie.cli import cli
from valkyrie.runner import LogStream

pytestmark = pytest.mark.nats


async def invoke(settings: Settings, *args: str, timeout_s: float = 20) -> Result:
    """Run the CLI in a worker thread (it starts its own event loop)."""
    argv = ["--nats-url", settings.nats_url or "", "--prefix", settings.prefix, *args]
    with anyio.fail_after(timeout_s):
        return await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(cli, argv), abandon_on_cancel=True
        )


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    with anyio.fail_after(timeout_s):
        return await anyio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)


# -- runners ls / show --------------------------------------------------------------------------


async def test_runners_ls_and_show(bus: Bus, settings: Settings) -> None:
    now = now_ms()
    record = RunnerRecord(
        registration=RunnerRegistration(
            runner_id="builder-1",
            capabilities=RunnerCapabilities(job_types=["shell", "build"]),
            max_concurrent_jobs=4,
            labels={"os": "linux"},
        ),
        state=RunnerState.BUSY,
        registered_at_ms=now,
        last_heartbeat_at_ms=now,
        load=0.5,
        assigned_jobs={"job-1": 1, "job-2": 3},
    )
    kv = await bus.kv("runners")
    await kv.put("builder-1", encode(record))

    table = await invoke(settings, "runners", "ls")
    assert table.exit_code == 0, table.output
    header, _rule, row = table.stdout.splitlines()
    assert header.split() == [
        "ID",
        "STATE",
        "LOAD",
        "JOBS",
        "TYPES",
        "REGION",
        "HEARTBEAT",
        "LABELS",
    ]
    assert row.split()[:5] == ["builder-1", "busy", "0.50", "2/4", "shell,build"]
    assert row.split()[-1] == "os=linux"

    listed = await invoke(settings, "runners", "ls", "--json")
    assert [r["registration"]["runner_id"] for r in json.loads(listed.stdout)] == ["builder-1"]

    shown = await invoke(settings, "runners", "show", "builder-1")
    assert shown.exit_code == 0, shown.output
    assert "capacity:    4" in shown.stdout
    assert "job-2 (attempt 3)" in shown.stdout

    as_json = await invoke(settings, "runners", "show", "builder-1", "--json")
    assert json.loads(as_json.stdout)["state"] == "busy"

    missing = await invoke(settings, "runners", "show", "nope")
    assert missing.exit_code == 4
    assert "no runner 'nope'" in missing.stderr


# -- jobs logs ----------------------------------------------------------------------------------


async def put_job(bus: Bus, job_id: str, state: JobState) -> None:
    now = now_ms()
    record = JobRecord(
        id=job_id,
        state=state,
        spec=JobSubmission(job_type="shell"),
        submitted_at_ms=now,
        updated_at_ms=now,
        attempt=1,
        runner_id="r1",
    )
    kv = await bus.kv("jobs")
    await kv.put(job_id, encode(record))


async def put_log(
    bus: Bus, job_id: str, seq: int, lines: list[str], stream: LogStream = "stdout"
) -> None:
    batch = JobLog(
        job_id=job_id,
        attempt=1,
        runner_id="r1",
        at_ms=now_ms(),
        stream=stream,
        seq=seq,
        lines=lines,
    )
    await bus.js.publish(bus.names.logs("r1", job_id), encode(batch))


async def test_jobs_logs_prints_stored_lines(bus: Bus, settings: Settings) -> None:
    await put_job(bus, "j1", JobState.SUCCEEDED)
    await put_log(bus, "j1", 0, ["a", "b"])
    await put_log(bus, "j1", 1, ["careful"], "stderr")
    await put_log(bus, "j1", 2, ["c"])
    await put_log(bus, "other", 0, ["not mine"])
    result = await invoke(settings, "jobs", "logs", "j1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "a\nb\nc\n"
    assert result.stderr == "careful\n"

    missing = await invoke(settings, "jobs", "logs", "nope")
    assert missing.exit_code == 4


async def test_jobs_logs_follow_until_terminal(bus: Bus, settings: Settings) -> None:
    await put_job(bus, "j2", JobState.RUNNING)
    await put_log(bus, "j2", 0, ["first"])
    async with anyio.create_task_group() as tg:
        results: list[Result] = []

        async def follow() -> None:
            results.append(await invoke(settings, "jobs", "logs", "j2", "--follow"))

        tg.start_soon(follow)
        await anyio.sleep(1.0)
        assert results == [], "--follow must wait while the job runs"
        await put_log(bus, "j2", 1, ["second"])
        await put_job(bus, "j2", JobState.FAILED)
    (result,) = results
    assert result.stdout == "first\nsecond\n"
    assert result.exit_code == 1  # the job did not succeed


# -- valkyrie runner (subprocess) ---------------------------------------------------------------


@pytest.mark.slow
async def test_runner_drains_on_sigterm(bus: Bus, settings: Settings, tmp_path: Path) -> None:
    rid = new_runner_id()
    args = ["runner", "--id", rid, "--heartbeat-ms", "200", "--labels", "os=linux,tier=fast"]
    async with fake_control_plane(bus, rid) as cp:
        proc = spawn(args, settings, tmp_path / "runner.log")
        try:
            reg = await cp.registered(timeout_s=20)
            assert reg.capabilities.job_types == ["shell"]
            assert reg.labels == {"os": "linux", "tier": "fast"}
            assert reg.max_concurrent_jobs == 1
            await cp.dispatch("work", {"command": "sleep 1; echo done"})
            await cp.started("work")
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0, (tmp_path / "runner.log").read_text()
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        finished = await cp.finished("work")
        assert finished.outcome == "succeeded"
        assert finished.result.output_tail == "done"
        await cp.wait_for(lambda: cp.heartbeats[-1].draining)


async def test_runner_exits_3_when_rejected(bus: Bus, settings: Settings, tmp_path: Path) -> None:
    rid = new_runner_id()
    async with fake_control_plane(bus, rid) as cp:
        cp.verdict = lambda reg: RegistrationVerdict(
            accepted=False, errors=[FieldError(path="$.runner_id", reason="banned")]
        )
        proc = spawn(["runner", "--id", rid], settings, tmp_path / "runner.log")
        try:
            assert await wait_exit(proc) == 3
        finally:
            stop_process(proc, sig=signal.SIGKILL)
        assert "banned" in (tmp_path / "runner.log").read_text()


@pytest.mark.slow
async def test_up_starts_local_runners(bus: Bus, settings: Settings, tmp_path: Path) -> None:
    seen: set[str] = set()
    sub = await bus.nc.subscribe(bus.names.register_as("*"))
    proc = spawn(["up", "--handlers", "intake", "--runners", "2"], settings, tmp_path / "up.log")
    try:
        with anyio.fail_after(30):
            async for msg in sub.messages:
                reg = REGISTRATION_DECODER.decode(msg.data)
                seen.add(reg.runner_id)
                await msg.respond(
                    encode(RegistrationVerdict(accepted=True, runner_id=reg.runner_id))
                )
                if len(seen) == 2:
                    break
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, (tmp_path / "up.log").read_text()
    finally:
        stop_process(proc, sig=signal.SIGKILL)
        await sub.unsubscribe()
    assert len(seen) == 2
