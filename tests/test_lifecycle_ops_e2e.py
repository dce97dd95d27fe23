"""The operator's side of the job lifecycle, end to end on a real server: dead-letter replay and
the CLI commands (cancel, drain/undrain, dead ls/show/replay).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import anyio
import anyio.to_thread
import click
import pytest
from click.testing import CliRunner, Result

from schemas import CancelJob, JobState
from tests._helpers import env_for, running, wait_until
from tests._lifecycle_helpers import fleet, runner_record, sim, submit, wait_state
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import encode
from valkyrie.client.admin import Admin
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


# -- dead letters -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_dead_lettered_cancel_replayed_once_the_job_exists(settings: Settings) -> None:
    async with running(settings) as bus:
        client, admin = Client(bus), Admin(bus, actor="test")
        job_id = f"early-{prefix_of(bus)}"
        await bus.js.publish(bus.names.cancel, encode(CancelJob(job_id=job_id)))

        async def dead_letter_kept() -> bool:
            return bool([d async for d in admin.dead_letters()])

        await wait_until(dead_letter_kept, timeout_s=10)
        (stored,) = [d async for d in admin.dead_letters()]
        assert stored.letter.handler == "canceller"
        assert stored.letter.original_subject == bus.names.cancel
        assert "no job" in stored.letter.reason

        assert await submit(client, {"job_type": "nobody-runs-this", "job_id": job_id}) == job_id
        await anyio.sleep(0.3)
        assert (await client.get_job(job_id)).state == JobState.QUEUED
        await admin.replay(stored.seq)
        record = await wait_state(client, job_id, timeout_s=10)
        assert record.state == JobState.CANCELLED
        assert [d async for d in admin.dead_letters()] == []


def prefix_of(bus: Bus) -> str:
    return bus.names.prefix


# -- operator CLI -----------------------------------------------------------------------------------


def _resolve(path: Sequence[str], fallback: click.Command) -> tuple[click.Command, list[str]]:
    """The top-level CLI and ``path`` if it has that command; else the command object itself.

    (``jobs cancel``, ``runners drain|undrain`` and ``dead`` are defined in ``valkyrie.cli._admin``
    and may not be wired into the top-level group yet.)
    """
    from valkyrie.cli import cli

    node: click.Command = cli
    for name in path:
        if not isinstance(node, click.Group) or name not in node.commands:
            return fallback, []
        node = node.commands[name]
    return cli, list(path)


async def invoke(settings: Settings, path: Sequence[str], *args: str) -> Result:
    """Run a CLI command in a thread (it runs its own event loop) against ``settings``."""
    from valkyrie.cli import _admin

    fallbacks: dict[tuple[str, ...], click.Command] = {
        ("jobs", "cancel"): _admin.cancel,
        ("runners", "drain"): _admin.drain,
        ("runners", "undrain"): _admin.undrain,
        ("dead",): _admin.dead,
    }
    command, head = _resolve(path, fallbacks[tuple(path)])
    env = {k: v for k, v in env_for(settings).items() if k.startswith("VALKYRIE_")}
    call = functools.partial(
        CliRunner().invoke, command, [*head, *args], env=env, catch_exceptions=False
    )
    with anyio.fail_after(60):
        return await anyio.to_thread.run_sync(call)


@pytest.mark.timeout(60)
async def test_cli_cancel_drain_undrain(settings: Settings) -> None:
    async with running(settings) as bus, fleet(bus) as runners:
        r1 = await runners.start(SimulatedRunner(bus, "r1"))
        client = Client(bus)
        job_id = await submit(client, sim(work_s=30))
        await wait_state(client, job_id, JobState.RUNNING)
        result = await invoke(settings, ["jobs", "cancel"], job_id, "--timeout", "20")
        assert result.exit_code == 0, result.output
        assert f"{job_id}: cancelled" in result.output
        assert (await client.get_job(job_id)).state == JobState.CANCELLED

        again = await invoke(settings, ["jobs", "cancel"], job_id)
        assert again.exit_code == 0
        assert "already ended" in again.output

        missing = await invoke(settings, ["jobs", "cancel"], "no-such-job")
        assert missing.exit_code == 4, missing.output

        result = await invoke(settings, ["runners", "drain"], "r1")
        assert result.exit_code == 0, result.output
        assert "r1: draining" in result.output
        assert (await runner_record(bus, "r1")).drain_requested
        queued = await submit(client, sim(work_s=0.1))
        await anyio.sleep(1.0)
        assert (await client.get_job(queued)).state == JobState.QUEUED

        result = await invoke(settings, ["runners", "undrain"], "r1")
        assert result.exit_code == 0, result.output
        assert "r1: active" in result.output
        assert (await wait_state(client, queued)).state == JobState.SUCCEEDED
        assert not r1.draining

        unknown = await invoke(settings, ["runners", "drain"], "no-such-runner")
        assert unknown.exit_code == 4, unknown.output


@pytest.mark.timeout(60)
async def test_cli_dead_ls_show_replay(settings: Settings) -> None:
    async with running(settings) as bus:
        client = Client(bus)
        job_id = f"cli-{prefix_of(bus)}"
        await bus.js.publish(bus.names.cancel, encode(CancelJob(job_id=job_id)))
        invalid = await client.submit(b'{"job_type": 7}')
        assert invalid is not None
        assert not invalid.accepted

        async def two_letters() -> bool:
            return len([d async for d in Admin(bus).dead_letters()]) == 2

        await wait_until(two_letters, timeout_s=10)
        listed = await invoke(settings, ["dead"], "ls")
        assert listed.exit_code == 0, listed.output
        lines = listed.output.splitlines()
        assert lines[0].split()[:3] == ["SEQ", "AT", "HANDLER"]
        assert len(lines) == 4
        as_json = await invoke(settings, ["dead"], "ls", "--json")
        assert as_json.exit_code == 0, as_json.output
        letters = [json.loads(line) for line in as_json.output.splitlines()]
        by_handler = {d["letter"]["handler"]: d["seq"] for d in letters}
        assert set(by_handler) == {"canceller", "intake"}

        shown = await invoke(settings, ["dead"], "show", str(by_handler["canceller"]))
        assert shown.exit_code == 0, shown.output
        assert "handler:     canceller" in shown.output
        assert f"no job '{job_id}'" in shown.output
        assert job_id in shown.output  # the payload

        missing = await invoke(settings, ["dead"], "show", "99999")
        assert missing.exit_code == 4, missing.output

        await submit(client, {"job_type": "nobody-runs-this", "job_id": job_id})
        replayed = await invoke(settings, ["dead"], "replay", str(by_handler["canceller"]))
        assert replayed.exit_code == 0, replayed.output
        assert f"replayed #{by_handler['canceller']} as #" in replayed.output
        assert (await wait_state(client, job_id, timeout_s=10)).state == JobState.CANCELLED
        remaining = [d.letter.handler async for d in Admin(bus).dead_letters()]
        assert remaining == ["intake"]

        usage = await invoke(settings, ["dead"], "replay")
        assert usage.exit_code == 2
