"""The runner SDK with secret values and a log cap, against a real nats-server."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from schemas import REDACTED, JobResult
from tests._runner_fakes import fake_control_plane, new_runner_id, registration, started
from valkyrie import Bus
from valkyrie.runner import JobContext, ShellHandler

pytestmark = [pytest.mark.nats, pytest.mark.security]

SECRET = "s3cr3t-Valkyrie-value"


async def test_the_job_gets_its_secrets_and_nothing_published_shows_them(bus: Bus) -> None:
    rid = new_runner_id()
    command = (
        'echo "token=$TOKEN"; printf %s "$TOKEN" | sha256sum; echo "len=${#TOKEN}"; '
        'echo "$TOKEN" >&2; exit 3'
    )
    async with (
        fake_control_plane(bus, rid) as cp,
        started(bus, registration(rid), ShellHandler(inherit_env=False)),
    ):
        await cp.registered()
        dispatch = msgspec.structs.replace(
            cp.make_dispatch("sec-1", {"command": command}),
            secret_env={"TOKEN": SECRET},
        )
        await cp.send_dispatch(dispatch)
        finished = await cp.finished("sec-1")
        lines = await cp.log_lines("sec-1")
    # the job saw the value: its hash and length, computed by the shell
    assert hashlib.sha256(SECRET.encode()).hexdigest() in "\n".join(lines)
    assert f"len={len(SECRET)}" in lines
    # and nothing the runner published shows it
    assert f"token={REDACTED}" in lines
    assert REDACTED in lines  # the stderr line
    assert not any(SECRET in line for line in lines)
    assert finished.result.exit_code == 3
    assert SECRET not in finished.result.output_tail
    assert f"token={REDACTED}" in finished.result.output_tail
    stored = [m.data or b"" for m in await cp.logs_raw("sec-1")]
    assert stored
    assert not any(SECRET.encode() in data for data in stored)


async def test_a_log_past_its_cap_is_cut_with_a_last_line(bus: Bus) -> None:
    rid = new_runner_id()

    async def chatty(ctx: JobContext) -> JobResult:
        for i in range(500):
            await ctx.log(f"line {i:04d} " + "x" * 40)
        return JobResult(exit_code=0, output_tail=ctx.output_tail)

    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), chatty):
        await cp.registered()
        dispatch = msgspec.structs.replace(cp.make_dispatch("cap-1", None), log_max_bytes=2048)
        await cp.send_dispatch(dispatch)
        finished = await cp.finished("cap-1")
        lines = await cp.log_lines("cap-1")
    assert lines[-1].startswith("[valkyrie] log truncated")
    assert "2048 bytes" in lines[-1]
    published = lines[:-1]
    assert sum(len(line) for line in published) <= 2048
    assert published == [f"line {i:04d} " + "x" * 40 for i in range(len(published))]
    # the result still shows how the output ended
    assert "line 0499" in finished.result.output_tail
