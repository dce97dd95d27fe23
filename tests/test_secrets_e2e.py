"""Secret values through the whole installation: only the runner of an attempt ever sees them.

The control plane, the HTTP gateway, the CLI and a reference runner (real shell commands) run
against a real nats-server; after each scenario every message of every stream and bucket of the
installation is read back and must not hold the value.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import nats.js.errors
import pytest

from schemas import REDACTED, JobRecord, JobState, RunnerCapabilities, RunnerRegistration
from tests._gateway_helpers import gateway
from tests._helpers import ROOT, dead_letters, env_for, events_of, running, wait_until
from tests._runner_fakes import new_runner_id, started
from valkyrie import Bus, Client, Settings
from valkyrie.runner import Runner, ShellHandler

pytestmark = [pytest.mark.nats, pytest.mark.security]

SECRET = "pa55-Valkyrie-secret-7f3a"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
#: prints what the job sees of $TOKEN without printing the value itself (and then the value)
COMMAND = 'printf %s "$TOKEN" | sha256sum; echo "token=$TOKEN"'


def shell_runner(runner_id: str, capacity: int = 2) -> RunnerRegistration:
    return RunnerRegistration(
        runner_id=runner_id,
        max_concurrent_jobs=capacity,
        heartbeat_interval_ms=200,
        capabilities=RunnerCapabilities(job_types=["shell"]),
    )


def job(command: str = COMMAND, **extra: Any) -> dict[str, Any]:
    return {
        "job_type": "shell",
        "payload": {"command": command},
        "secret_env": {"TOKEN": SECRET},
        **extra,
    }


@asynccontextmanager
async def shell(bus: Bus, runner_id: str) -> AsyncIterator[Runner]:
    async with started(bus, shell_runner(runner_id), ShellHandler(inherit_env=False)) as runner:
        runners = await bus.kv("runners")
        await wait_until(lambda: _registered(runners, runner_id), timeout_s=10)
        yield runner


async def _registered(runners: Any, runner_id: str) -> bool:
    return runner_id in (await runners.keys())


async def stored_everywhere(bus: Bus) -> list[tuple[str, bytes]]:
    """Every message of every stream and bucket of this installation (but the secrets bucket)."""
    prefix = bus.names.prefix
    found: list[tuple[str, bytes]] = []
    for info in await bus.js.streams_info():
        name = info.config.name or ""
        if not (name.startswith(prefix.upper() + "_") or name.startswith(f"KV_{prefix}_")):
            continue
        if name == f"KV_{bus.names.bucket('secrets')}":
            continue
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            try:
                msg = await bus.js.get_msg(name, seq=seq)
            except nats.js.errors.NotFoundError:  # deleted or aged out in between
                continue
            found.append((name, (msg.data or b"") + repr(msg.headers).encode()))
    return found


async def assert_nowhere(bus: Bus) -> None:
    leaks = [name for name, data in await stored_everywhere(bus) if SECRET.encode() in data]
    assert not leaks, f"the secret value is stored in {leaks}"


async def secrets_left(bus: Bus) -> list[str]:
    kv = await bus.kv("secrets")
    try:
        return list(await kv.keys())
    except nats.js.errors.NoKeysError:
        return []


async def ended(client: Client, job_id: str) -> JobRecord:
    return await client.wait_for_job(job_id, timeout_s=30)


async def valkyrie_cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "valkyrie", *args],
            env={**env_for(settings), **env},
            cwd=ROOT,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_only_the_runner_sees_a_secret(settings: Settings) -> None:
    rid = new_runner_id()
    async with gateway(settings) as gw, shell(gw.bus, rid):
        client = Client(gw.bus)
        response = await gw.http.post("/api/v2/jobs", json=job())
        assert response.status_code == 201, response.text
        assert SECRET not in response.text
        assert response.json()["job"]["spec"]["secret_env"] == {"TOKEN": REDACTED}
        job_id = response.json()["job_id"]
        record = await ended(client, job_id)
        assert record.state == JobState.SUCCEEDED, record
        # the job saw the value (its digest), its output shows *** instead
        assert record.result is not None
        assert DIGEST in record.result.output_tail
        assert f"token={REDACTED}" in record.result.output_tail
        assert record.spec.secret_env == {"TOKEN": REDACTED}

        # the CLI: submitted from the shell's environment, never from its command line
        code, out, err = await valkyrie_cli(
            settings,
            "submit",
            "--secret-env",
            "TOKEN",
            "--wait",
            "--",
            "sh",
            "-c",
            COMMAND,
            TOKEN=SECRET,
        )
        assert code == 0, err
        cli_job = out.strip().splitlines()[0]
        for args in (("jobs", "show", job_id), ("jobs", "show", cli_job, "--json")):
            code, out, err = await valkyrie_cli(settings, *args)
            assert code == 0, err
            assert SECRET not in out + err
        code, out, _ = await valkyrie_cli(settings, "jobs", "show", cli_job)
        assert "secret env:  TOKEN (values hidden)" in out
        code, out, _ = await valkyrie_cli(settings, "jobs", "logs", cli_job)
        assert DIGEST in out
        assert SECRET not in out

        # every HTTP view of the job
        for path in (
            f"/api/v2/jobs/{job_id}",
            f"/api/v2/jobs/{job_id}/explain",
            "/api/v2/jobs",
            f"/api/v1/jobs/{job_id}",
        ):
            seen = await gw.http.get(path)
            assert seen.status_code == 200, (path, seen.text)
            assert SECRET not in seen.text, path
        # and once the jobs ended, their secrets are gone from the secrets bucket too
        await wait_until(lambda: _no_secrets(gw.bus), timeout_s=10)
        await assert_nowhere(gw.bus)


async def _no_secrets(bus: Bus) -> bool:
    return not await secrets_left(bus)


async def test_every_attempt_gets_the_secret_the_usual_way(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        retry = {"max_attempts": 2, "retry_on_exit_code": True, "initial_backoff_ms": 0}
        verdict = await client.submit(job(f"{COMMAND}; exit 1", retry_policy=retry))
        assert verdict is not None
        assert verdict.accepted, verdict.errors
        assert verdict.job_id is not None
        assert await secrets_left(bus) == [verdict.job_id]  # stored before the record
        # no runner yet: the job waits queued, and is placed through its job.queued event
        assert (await client.get_job(verdict.job_id)).state == JobState.QUEUED
        async with shell(bus, new_runner_id()):
            record = await ended(client, verdict.job_id)
        assert record.state == JobState.FAILED
        assert record.attempt == 2
        logs = [line async for line in _log_lines(bus, verdict.job_id)]
        assert logs.count(DIGEST + "  -") == 2, logs  # each attempt had the value
        assert not await secrets_left(bus)
        await assert_nowhere(bus)


async def _log_lines(bus: Bus, job_id: str) -> AsyncIterator[str]:
    from tests._helpers import stream_messages
    from valkyrie.bus.codec import LOG_DECODER

    for msg in await stream_messages(bus, bus.names.stream("logs"), bus.names.logs("*", job_id)):
        for line in LOG_DECODER.decode(msg.data or b"").lines:
            yield line


async def test_a_rejected_submission_keeps_no_value(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        verdict = await client.submit(job(priority=9))
        assert verdict is not None
        assert not verdict.accepted
        letter = (await dead_letters(bus))[0]
        assert "secret_env values redacted" in letter.reason
        assert json.loads(letter.payload)["secret_env"] == {"TOKEN": REDACTED}
        assert json.loads(letter.payload)["priority"] == 9
        # a body that cannot be read but names the field is not kept at all
        broken = b'{"job_type": "shell", "secret_env": {"TOKEN": "' + SECRET.encode() + b'"'
        verdict = await client.submit(broken)
        assert verdict is not None
        assert not verdict.accepted
        await wait_until(lambda: _count_dead(bus, 2), timeout_s=10)
        letters = await dead_letters(bus)
        assert letters[1].payload == b""
        assert "payload dropped" in letters[1].reason
        assert any(e.type == "intake.rejected" for e in await events_of(bus))
        assert not await secrets_left(bus)
        await assert_nowhere(bus)


async def _count_dead(bus: Bus, n: int) -> bool:
    return len(await dead_letters(bus)) >= n


async def test_naming_another_jobs_id_does_not_replace_its_secret(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        first = await client.submit(job(job_id="victim"))
        assert first is not None
        assert first.accepted
        forged = {**job(job_id="victim"), "secret_env": {"TOKEN": "attacker-chosen-value"}}
        second = await client.submit(forged)
        assert second is not None
        assert second.duplicate
        async with shell(bus, new_runner_id()):
            record = await ended(client, "victim")
        assert record.result is not None
        assert DIGEST in record.result.output_tail  # the first submission's value ran


async def test_a_job_whose_secret_is_gone_fails_saying_so(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        verdict = await client.submit(job())
        assert verdict is not None
        assert verdict.job_id is not None
        await (await bus.kv("secrets")).purge(verdict.job_id)  # as the bucket's TTL would
        async with shell(bus, new_runner_id()):
            record = await ended(client, verdict.job_id)
        assert record.state == JobState.FAILED
        assert record.reason is not None
        assert "secret values are no longer stored" in record.reason
        assert record.attempt == 0  # never dispatched without its values


def test_the_cli_refuses_a_secret_it_cannot_read(settings: Settings) -> None:
    import subprocess

    env = {k: v for k, v in env_for(settings).items() if k != "NOT_SET_ANYWHERE"}
    os.environ.pop("NOT_SET_ANYWHERE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "valkyrie",
            "submit",
            "--secret-env",
            "NOT_SET_ANYWHERE",
            "--",
            "true",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 2
    assert b"not set in this shell: NOT_SET_ANYWHERE" in done.stderr
