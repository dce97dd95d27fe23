"""What docs/runners.md tells a runner author, checked: outcomes and retries, refusals, stale
updates, the duplicate window, the heartbeat's abandon, and the registration verdict example.

The end-to-end tests speak the protocol with plain nats-py, as a runner written in another
language would, against the real handlers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from schemas import (
    Dispatch,
    JobFinished,
    JobRecord,
    JobState,
    JobSubmission,
    RegistrationVerdict,
    RetryPolicy,
    RunnerCapabilities,
    RunnerCommand,
    RunnerRegistration,
)
from tests._helpers import events_of, running, wait_until
from tests.test_docs_examples import SECTIONS
from valkyrie import Bus, Client, Names, Settings
from valkyrie.bus.codec import now_ms
from valkyrie.domain.lifecycle import MAX_REFUSALS, apply_update, dispatch_job

RUNNERS_MD = Path(__file__).resolve().parent.parent / "docs" / "runners.md"
NOW = 1_795_765_891_808


def outcome_table() -> dict[str, tuple[str, str]]:
    """The runners.md table from `outcome` to (job state, retried?)."""
    text = RUNNERS_MD.read_text(encoding="utf-8")
    start = text.index("<!-- outcome table")
    rows: dict[str, tuple[str, str]] = {}
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def queued(policy: RetryPolicy | None = None) -> JobRecord:
    return JobRecord(
        id="j1",
        state=JobState.QUEUED,
        spec=JobSubmission(job_type="shell", retry_policy=policy),
        submitted_at_ms=NOW,
        updated_at_ms=NOW,
    )


def finish(record: JobRecord, outcome: str, runner: str = "r1") -> JobRecord:
    """Dispatch ``record`` to ``runner`` and apply that attempt's ``JobFinished(outcome)``."""
    placed = dispatch_job(record, runner, now_ms=NOW)
    update = JobFinished(
        job_id=placed.id,
        attempt=placed.attempt,
        runner_id=runner,
        at_ms=NOW,
        outcome=outcome,  # type: ignore[arg-type]
    )
    result = apply_update(placed, update, now_ms=NOW, jitter=lambda: 0.0)
    assert result.record is not None
    return result.record


def test_the_outcome_table_is_what_the_lifecycle_does() -> None:
    table = outcome_table()
    assert set(table) == {"succeeded", "failed", "timed_out", "cancelled", "error", "rejected"}
    assert finish(queued(), "succeeded").state == JobState.SUCCEEDED
    assert table["succeeded"] == ("`succeeded`", "no")
    retry_exit = RetryPolicy(retry_on_exit_code=True, initial_backoff_ms=0)
    for outcome in ("failed", "timed_out"):
        assert table[outcome][0] == f"`{outcome}`"
        assert "only with `retry_policy.retry_on_exit_code`" in table[outcome][1]
        assert finish(queued(), outcome).state == JobState(outcome)
        assert finish(queued(retry_exit), outcome).state == JobState.QUEUED
    assert table["cancelled"] == ("`cancelled`", "never")
    assert finish(queued(retry_exit), "cancelled").state == JobState.CANCELLED
    # error: retried while failed attempts < max_attempts, 3 attempts by default
    assert "3 attempts by default" in table["error"][1]
    record = queued()
    for _ in range(2):
        record = finish(record, "error")
        assert record.state == JobState.QUEUED
    record = finish(record, "error")
    assert (record.state, record.attempt) == (JobState.FAILED, 3)
    assert table["error"][0] == "`failed` once the budget is spent"
    # rejected: a new attempt at once, not counted; failed after 10 refusals
    assert table["rejected"][0] == "`queued` (a new attempt)"
    assert "after 10 refusals" in table["rejected"][1]
    assert MAX_REFUSALS == 10
    record = queued(RetryPolicy(max_attempts=1))
    for n in range(MAX_REFUSALS):
        record = finish(record, "rejected")
        expected = JobState.FAILED if n == MAX_REFUSALS - 1 else JobState.QUEUED
        assert (record.state, record.not_before_at_ms) == (expected, None)


def test_a_refused_attempt_never_comes_back() -> None:
    """runners.md: a job refused twice and then run has attempts 1: rejected, 2: rejected,
    3: succeeded."""
    text = " ".join(RUNNERS_MD.read_text(encoding="utf-8").split())
    assert "`1: rejected`, `2: rejected`, `3: succeeded`" in text
    record = finish(finish(queued(), "rejected"), "rejected")
    record = finish(record, "succeeded")
    assert [(a.attempt, a.outcome) for a in record.attempts] == [
        (1, "rejected"),
        (2, "rejected"),
        (3, "succeeded"),
    ]


@dataclass
class ForeignRunner:
    """A runner written with nothing but nats-py: what it sent, and what it was told."""

    nc: NatsClient
    names: Names
    runner_id: str
    dispatches: list[Dispatch] = field(default_factory=list)
    commands: list[RunnerCommand] = field(default_factory=list)

    async def register(self, body: dict[str, Any]) -> RegistrationVerdict:
        reply = await self.nc.request(
            self.names.register_as(self.runner_id), json.dumps(body).encode(), timeout=5
        )
        return msgspec.json.decode(reply.data, type=RegistrationVerdict)

    async def update(self, update: dict[str, Any], msg_id: str) -> bool:
        """Publish an update; whether the stream took it as a duplicate."""
        ack = await self.nc.jetstream().publish(
            self.names.updates(self.runner_id),
            json.dumps(update).encode(),
            headers={"Nats-Msg-Id": msg_id},
        )
        return bool(ack.duplicate)

    async def heartbeat(self, running: list[str], session_id: str) -> None:
        beat = {
            "runner_id": self.runner_id,
            "sent_at_ms": now_ms(),
            "running_jobs": running,
            "session_id": session_id,
        }
        await self.nc.publish(self.names.heartbeat(self.runner_id), json.dumps(beat).encode())


@asynccontextmanager
async def foreign_runner(
    url: str, names: Names, runner_id: str, control_of: str | None = None
) -> AsyncIterator[ForeignRunner]:
    nc = await nats.connect(url)
    runner = ForeignRunner(nc, names, runner_id)

    async def on_dispatch(msg: Msg) -> None:
        runner.dispatches.append(msgspec.json.decode(msg.data, type=Dispatch))

    async def on_command(msg: Msg) -> None:
        runner.commands.append(msgspec.json.decode(msg.data, type=RunnerCommand))

    try:
        await nc.subscribe(names.dispatch(runner_id), cb=on_dispatch)
        await nc.subscribe(names.control(control_of or runner_id), cb=on_command)
        yield runner
    finally:
        await nc.close()


def update(kind: str, job_id: str, attempt: int, runner_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "job_id": job_id,
        "attempt": attempt,
        "runner_id": runner_id,
        "at_ms": now_ms(),
        **extra,
    }


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_the_registration_verdict_example_is_what_the_registry_answers(
    settings: Settings, nats_url: str
) -> None:
    names = Names(settings.prefix)
    documented = msgspec.json.decode(SECTIONS[Names().register_as("<runner_id>")][1].encode())
    body = msgspec.json.decode(SECTIONS[Names().register_as("<runner_id>")][0].encode())
    async with (
        running(settings, ["registry"]),
        foreign_runner(nats_url, names, body["runner_id"]) as runner,
    ):
        verdict = await runner.register(body)
    assert msgspec.to_builtins(verdict) == documented


@pytest.mark.nats
@pytest.mark.timeout(90)
async def test_what_a_foreign_runner_is_told(settings: Settings, nats_url: str) -> None:
    names = Names(settings.prefix)
    session = "s" + "1" * 31
    async with (
        running(settings) as bus,
        foreign_runner(nats_url, names, "fr") as runner,
        foreign_runner(nats_url, names, "ghost") as ghost,
        anyio.create_task_group() as beats,
    ):
        registration = RunnerRegistration(
            runner_id="fr",
            session_id=session,
            capabilities=RunnerCapabilities(job_types=["shell"]),
            heartbeat_interval_ms=200,
        )
        verdict = await runner.register(msgspec.to_builtins(registration))
        assert verdict.accepted
        assert verdict.lost_after_ms == 3000

        async def keep_beating() -> None:
            while True:
                await runner.heartbeat([], session)
                await anyio.sleep(0.2)

        beats.start_soon(keep_beating)
        await protocol_steps(bus, runner, ghost, session)
        beats.cancel_scope.cancel()


async def protocol_steps(
    bus: Bus, runner: ForeignRunner, ghost: ForeignRunner, session: str
) -> None:
    client = Client(bus)
    submitted = await client.submit({"job_type": "shell"})
    assert submitted is not None
    job_id = submitted.job_id
    assert job_id is not None

    async def dispatched(n: int) -> bool:
        return len(runner.dispatches) >= n

    # refusals: each one is answered with a new attempt, never the same one again
    for attempt in (1, 2):
        await wait_until(functools.partial(dispatched, attempt), timeout_s=10)
        assert runner.dispatches[-1].attempt == attempt
        await runner.update(
            update("finished", job_id, attempt, "fr", outcome="rejected", result={"error": "full"}),
            f"{job_id}.{attempt}.rejected",
        )
    await wait_until(lambda: dispatched(3), timeout_s=10)
    assert [d.attempt for d in runner.dispatches] == [1, 2, 3]
    assert not await runner.update(update("accepted", job_id, 3, "fr"), f"{job_id}.3.accepted")
    assert not await runner.update(update("started", job_id, 3, "fr"), f"{job_id}.3.started")

    # stale updates: an abandon for a stale `started`, nothing for a stale `finished`
    await ghost.update(update("started", job_id, 3, "ghost"), f"{job_id}.3.started.g")
    await ghost.update(
        update("finished", job_id, 3, "ghost", outcome="succeeded"), f"{job_id}.3.finished.g"
    )

    async def both_stale() -> bool:
        return len(await events_of(bus, f"job.{job_id}.stale_update")) == 2

    await wait_until(both_stale, timeout_s=10)
    await anyio.sleep(0.3)
    assert [(c.command, c.job_id, c.attempt) for c in ghost.commands] == [("abandon", job_id, 3)]
    stale = await events_of(bus, f"job.{job_id}.stale_update")
    assert sorted(e.data["update"] for e in stale) == ["finished", "started"]

    # the same update id again, even with another body: dropped by the stream, silently
    finished = update("finished", job_id, 3, "fr", outcome="succeeded", result={"exit_code": 0})
    assert not await runner.update(finished, f"{job_id}.3.finished")
    done = await client.wait_for_job(job_id, timeout_s=10)
    assert done.state == JobState.SUCCEEDED
    again = update("finished", job_id, 3, "fr", outcome="failed", result={"exit_code": 9})
    assert await runner.update(again, f"{job_id}.3.finished")  # duplicate: true
    await anyio.sleep(0.5)
    assert (await client.get_job(job_id)).result == done.result
    assert [(a.attempt, a.outcome) for a in done.attempts] == [
        (1, "rejected"),
        (2, "rejected"),
        (3, "succeeded"),
    ]

    # the heartbeat is how a runner learns a job is no longer its own
    await runner.heartbeat([job_id], session)

    async def told() -> bool:
        return any(c.command == "abandon" and c.job_id == job_id for c in runner.commands)

    await wait_until(told, timeout_s=10)


def test_the_docs_name_no_python_source_for_the_protocol() -> None:
    protocol = RUNNERS_MD.read_text(encoding="utf-8").split("## The SDK")[0]
    assert not re.search(r"schemas/\w+\.py", protocol)
    assert "names.register" not in protocol
    for schema in re.findall(r"\(\.\./schemas/json/([\w-]+)\.schema\.json\)", protocol):
        assert (RUNNERS_MD.parent.parent / "schemas" / "json" / f"{schema}.schema.json").exists()
