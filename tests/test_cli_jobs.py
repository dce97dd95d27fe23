"""The `valkyrie` CLI as a user runs it: a subprocess against a running intake handler."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from schemas import JobRecord, JobResult, JobState, JobSubmission
from tests._helpers import ROOT, env_for, running
from valkyrie import Client, Settings
from valkyrie.bus.codec import EVENT_DECODER, JOB_DECODER
from valkyrie.cli._jobs import _show

pytestmark = pytest.mark.nats

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


async def valkyrie(
    settings: Settings, *args: str, stdin: bytes | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m valkyrie ARGS`` against ``settings``' server and prefix."""
    with anyio.fail_after(timeout_s):
        return await anyio.run_process(
            [sys.executable, "-m", "valkyrie", *args],
            input=stdin,
            env=env_for(settings),
            cwd=ROOT,
            check=False,
        )


def _out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def _err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


async def test_submit_then_show_and_list(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        submitted = await valkyrie(
            settings, "submit", "--type", "build", "--meta", "team=core", "--", "make", "test"
        )
        assert submitted.returncode == 0, _err(submitted)
        job_id = _out(submitted).strip()
        assert JOB_ID.match(job_id), _out(submitted)

        record = await Client(bus).get_job(job_id)
        assert record.state == JobState.QUEUED
        assert record.spec.job_type == "build"
        assert record.spec.payload == {"command": ["make", "test"]}
        assert record.spec.metadata == {"team": "core"}

        shown = await valkyrie(settings, "jobs", "show", job_id)
        assert shown.returncode == 0, _err(shown)
        fields = {
            key.strip(): value.strip()
            for key, _, value in (line.partition(":") for line in _out(shown).splitlines())
        }
        assert fields["id"] == job_id
        assert fields["state"] == "queued"
        assert fields["type"] == "build (api v2)"

        shown_json = await valkyrie(settings, "jobs", "show", job_id, "--json")
        assert shown_json.returncode == 0, _err(shown_json)
        assert JOB_DECODER.decode(shown_json.stdout) == record

        listed = await valkyrie(settings, "jobs", "ls")
        assert listed.returncode == 0, _err(listed)
        rows = [line.split() for line in _out(listed).splitlines()]
        assert rows[0][:3] == ["ID", "STATE", "TYPE"]
        assert [job_id, "queued", "build"] in [row[:3] for row in rows[2:]]

        listed_json = await valkyrie(settings, "jobs", "ls", "--json", "--state", "queued")
        assert listed_json.returncode == 0, _err(listed_json)
        assert [r["id"] for r in json.loads(listed_json.stdout)] == [job_id]


async def test_show_missing_job_exits_4(settings: Settings) -> None:
    async with running(settings, []):
        result = await valkyrie(settings, "jobs", "show", "no-such-job")
    assert result.returncode == 4
    assert "no-such-job" in _err(result)
    assert _out(result) == ""


async def test_invalid_submission_file_exits_3_and_names_the_field(
    settings: Settings, tmp_path: Path
) -> None:
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"job_type": "build", "requirements": {"memory_mb": -1}}))
    async with running(settings, ["intake"]):
        result = await valkyrie(settings, "submit", "--file", str(body))
    assert result.returncode == 3, _err(result)
    assert "$.requirements.memory_mb" in _err(result)
    assert _out(result) == ""


async def test_strict_refuses_a_typo_that_is_otherwise_a_warning(
    settings: Settings, tmp_path: Path
) -> None:
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"job_type": "build", "deadlin_at_ms": 1}))
    async with running(settings, ["intake"]):
        lenient = await valkyrie(settings, "submit", "--file", str(body))
        strict = await valkyrie(settings, "submit", "--strict", "--file", str(body))
    assert lenient.returncode == 0, _err(lenient)
    assert "warning: $.deadlin_at_ms: unknown field, ignored" in _err(lenient)
    assert strict.returncode == 3
    assert "rejected: $.deadlin_at_ms: unknown field (strict)" in _err(strict)


async def test_v1_submission_file_is_accepted(settings: Settings, tmp_path: Path) -> None:
    body = tmp_path / "legacy.json"
    body.write_text(json.dumps({"type": "Build", "payload": {"x": 1}, "pipeline": "p1"}))
    async with running(settings, ["intake"]) as bus:
        result = await valkyrie(settings, "submit", "--file", str(body))
        assert result.returncode == 0, _err(result)
        record = await Client(bus).get_job(_out(result).strip())
    assert record.api_version == "v1"
    assert record.spec.job_type == "build"
    assert record.spec.metadata == {"pipeline_id": "p1"}


async def test_submission_from_stdin(settings: Settings) -> None:
    body = json.dumps({"job_type": "deploy", "priority": 0}).encode()
    async with running(settings, ["intake"]) as bus:
        result = await valkyrie(settings, "submit", "--file", "-", stdin=body)
        assert result.returncode == 0, _err(result)
        record = await Client(bus).get_job(_out(result).strip())
    assert record.spec.job_type == "deploy"
    assert record.spec.priority == 0


async def test_missing_submission_file_is_a_usage_error(settings: Settings, tmp_path: Path) -> None:
    result = await valkyrie(settings, "submit", "--file", str(tmp_path / "nope.json"))
    assert result.returncode == 2
    assert "does not exist" in _err(result)


async def test_tail_prints_the_queued_event(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        verdict = await Client(bus).submit({"job_type": "build"})
        assert verdict is not None
        job_id = verdict.job_id
        assert job_id is not None

        text = await valkyrie(settings, "tail", "--all", "--idle-exit", "1")
        as_json = await valkyrie(settings, "tail", "--json", "--all", "--idle-exit", "1")
        by_job = await valkyrie(settings, "tail", job_id, "--all", "--idle-exit", "1")

    assert text.returncode == 0, _err(text)
    lines = _out(text).splitlines()
    assert len(lines) == 1
    assert "job.queued" in lines[0]
    assert job_id in lines[0]
    assert 'job_type="build"' in lines[0]

    assert as_json.returncode == 0, _err(as_json)
    (line,) = _out(as_json).splitlines()
    doc = json.loads(line)
    assert doc["seq"] == 1
    event = EVENT_DECODER.decode(json.dumps(doc["event"]))
    assert event.type == "job.queued"
    assert event.subject_id == job_id

    assert by_job.returncode == 0, _err(by_job)
    assert _out(by_job) == _out(text)


async def test_unreachable_server_exits_5(settings: Settings) -> None:
    dead = Settings.from_env({}, nats_url="nats://127.0.0.1:1", prefix=settings.prefix)
    try:
        # the CLI gives up connecting after 3 s
        result = await valkyrie(dead, "jobs", "ls", timeout_s=20)
    except TimeoutError:
        pytest.fail("`valkyrie jobs ls` hangs when the NATS server is unreachable")
    assert result.returncode == 5
    assert "VALKYRIE_NATS_URL" in _err(result)


def test_show_prints_a_dash_for_a_missing_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    record = JobRecord(
        id="j1",
        state=JobState.FAILED,
        spec=JobSubmission(job_type="shell"),
        submitted_at_ms=1,
        updated_at_ms=2,
        reason="retries exhausted after 3 failed attempts; last: $.payload.command: required",
        result=JobResult(error="$.payload.command: required"),
    )
    _show(record)
    lines = capsys.readouterr().out.splitlines()
    assert "exit code:   -" in lines
    assert "error:       $.payload.command: required" in lines
    assert not any("None" in line for line in lines)
