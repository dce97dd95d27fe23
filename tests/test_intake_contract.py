"""The submission contract from outside: plain nats-py publishers, v1 and v2 bodies, backlog."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import nats
import pytest

from schemas import JobState
from tests._helpers import events_of, job_count, running, wait_until
from valkyrie import Bus, Client, Settings

pytestmark = pytest.mark.nats


async def _plain_submit(
    nats_url: str, prefix: str, body: bytes, *, jetstream: bool = True
) -> dict[str, Any]:
    """Publish with nothing but nats-py and return the decoded verdict."""
    nc = await nats.connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        headers = {"Valkyrie-Reply-To": inbox}
        if jetstream:
            ack = await nc.jetstream().publish(f"{prefix}.jobs.submit", body, headers=headers)
            assert ack.stream == f"{prefix.upper()}_SUBMIT"
        else:
            await nc.publish(f"{prefix}.jobs.submit", body, headers=headers)
        msg = await sub.next_msg(timeout=10)
        verdict = json.loads(msg.data)
        assert isinstance(verdict, dict)
        return verdict
    finally:
        await nc.close()


async def _plain_record(nats_url: str, prefix: str, job_id: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(f"{prefix}_jobs")
        entry = await kv.get(job_id)
        record = json.loads(entry.value or b"")
        assert isinstance(record, dict)
        return record
    finally:
        await nc.close()


@pytest.mark.parametrize("jetstream", [True, False], ids=["jetstream-publish", "core-publish"])
async def test_plain_nats_py_submission_is_accepted(
    settings: Settings, nats_url: str, prefix: str, jetstream: bool
) -> None:
    body = json.dumps(
        {
            "job_type": "build",
            "priority": 1,
            "payload": {"command": ["make", "test"]},
            "requirements": {"cpu_cores": 2, "memory_mb": 1024},
            "metadata": {"repo": "valkyrie"},
        }
    ).encode()
    async with running(settings, ["intake"]):
        verdict = await _plain_submit(nats_url, prefix, body, jetstream=jetstream)
        assert verdict["accepted"] is True
        assert verdict["duplicate"] is False
        assert verdict["state"] == "queued"
        assert verdict["errors"] == []
        job_id = verdict["job_id"]
        assert isinstance(job_id, str)
        assert job_id

        record = await _plain_record(nats_url, prefix, job_id)
    assert record["id"] == job_id
    assert record["state"] == "queued"
    assert record["api_version"] == "v2"
    assert record["spec"]["job_type"] == "build"
    assert record["spec"]["priority"] == 1
    assert record["spec"]["payload"] == {"command": ["make", "test"]}
    assert record["spec"]["requirements"]["cpu_cores"] == 2
    assert record["spec"]["requirements"]["memory_mb"] == 1024
    assert record["spec"]["metadata"] == {"repo": "valkyrie"}


#: A publisher with nothing but nats-py: argv = url, prefix, body; prints the verdict.
PLAIN_PUBLISHER = """
import asyncio, json, sys
import nats

async def main():
    url, prefix, body = sys.argv[1:4]
    nc = await nats.connect(url)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    await nc.jetstream().publish(
        prefix + ".jobs.submit", body.encode(), headers={"Valkyrie-Reply-To": inbox}
    )
    msg = await sub.next_msg(timeout=10)
    await nc.close()
    ours = sorted(m for m in sys.modules if m.split(".")[0] in ("valkyrie", "schemas", "handlers"))
    print(json.dumps({"verdict": json.loads(msg.data), "valkyrie_modules": ours}))

asyncio.run(main())
"""


async def test_publisher_process_without_valkyrie_is_answered(
    settings: Settings, nats_url: str, prefix: str
) -> None:
    body = json.dumps({"job_type": "build", "payload": {"from": "outside"}})
    async with running(settings, ["intake"]) as bus:
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [sys.executable, "-I", "-c", PLAIN_PUBLISHER, nats_url, prefix, body],
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        out = json.loads(done.stdout)
        assert out["valkyrie_modules"] == []
        verdict = out["verdict"]
        assert verdict["accepted"] is True
        record = await Client(bus).get_job(verdict["job_id"])
    assert record.spec.payload == {"from": "outside"}


async def test_plain_nats_py_rejection_is_readable(
    settings: Settings, nats_url: str, prefix: str
) -> None:
    async with running(settings, ["intake"]):
        verdict = await _plain_submit(
            nats_url, prefix, b'{"job_type": "build", "requirements": {"cpu_cores": -1}}'
        )
    assert verdict["accepted"] is False
    assert verdict["job_id"] is None
    assert [e["path"] for e in verdict["errors"]] == ["$.requirements.cpu_cores"]
    assert all(e["reason"] for e in verdict["errors"])


async def test_v1_and_v2_forms_give_equal_records(settings: Settings) -> None:
    payload = {"command": ["cargo", "build"], "env": {"RUST_LOG": "debug"}}
    v1 = {
        "type": "Build",
        "payload": payload,
        "pipeline": "pipe-7",
        "environment": "staging",
        "priority": 1,
        "requirements": {
            "max_execution_time": 60,
            "cpu_cores": 2.5,
            "memory_mb": 2048,
            "gpu_count": 1,
            "required_capabilities": ["docker"],
        },
        "metadata": {"team": "core"},
    }
    v2 = {
        "job_type": "build",
        "payload": payload,
        "priority": 1,
        "requirements": {
            "max_execution_time_s": 60,
            "cpu_cores": 2.5,
            "memory_mb": 2048,
            "gpu_count": 1,
            "required_capabilities": ["docker"],
        },
        "metadata": {"team": "core", "pipeline_id": "pipe-7", "environment": "staging"},
    }
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        first = await client.submit(v1)
        second = await client.submit(v2)
        assert first is not None
        assert second is not None
        assert first.accepted
        assert second.accepted
        assert first.job_id is not None
        assert second.job_id is not None
        assert first.job_id != second.job_id
        old = await client.get_job(first.job_id)
        new = await client.get_job(second.job_id)

    assert old.spec == new.spec
    assert old.api_version == "v1"
    assert new.api_version == "v2"
    assert old.state == new.state == JobState.QUEUED
    # the conversion really happened (not two empty specs)
    assert old.spec.job_type == "build"
    assert old.spec.requirements.max_execution_time_s == 60
    assert old.spec.metadata["pipeline_id"] == "pipe-7"
    assert old.spec.metadata["environment"] == "staging"


async def test_queued_event_describes_the_job(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        verdict = await Client(bus).submit(
            {"job_type": "lint", "priority": 3, "correlation_id": "req-1"}
        )
        assert verdict is not None
        assert verdict.job_id is not None
        events = await events_of(bus, f"job.{verdict.job_id}.>")
    assert [e.type for e in events] == ["job.queued"]
    (event,) = events
    assert event.subject_id == verdict.job_id
    assert event.source == "intake"
    assert event.correlation_id == "req-1"
    assert event.attempt == 0
    data = dict(event.data)
    inline = data.pop("record")
    assert isinstance(data.pop("revision"), int)
    assert data == {
        "job_type": "lint",
        "priority": 3,
        "api_version": "v2",
        "reason": None,
        "not_before_at_ms": None,
    }
    # the record travels with the event so that a dispatcher need not read it back
    assert inline["id"] == verdict.job_id
    assert inline["state"] == "queued"


async def test_submissions_published_before_intake_runs_are_processed(
    settings: Settings, bus: Bus
) -> None:
    count = 25
    client = Client(bus)
    for i in range(count):
        verdict = await client.submit(
            {"job_type": "build", "metadata": {"n": str(i)}}, wait_verdict=False
        )
        assert verdict is None
    # stored durably, nothing recorded yet
    info = await bus.js.stream_info(bus.names.stream("submit"))
    assert info.state.messages == count
    assert await job_count(bus) == 0

    async with running(settings, ["intake"]):

        async def all_recorded() -> bool:
            return await job_count(bus) == count

        await wait_until(all_recorded, timeout_s=30)

    records = await client.list_jobs()
    assert sorted(int(r.spec.metadata["n"]) for r in records) == list(range(count))
    assert all(r.state == JobState.QUEUED for r in records)
    queued = await events_of(bus, "job.*.queued")
    assert sorted(e.subject_id or "" for e in queued) == sorted(r.id for r in records)

    async def submit_stream_empty() -> bool:  # work queue: acked submissions leave the stream
        return (await bus.js.stream_info(bus.names.stream("submit"))).state.messages == 0

    await wait_until(submit_stream_empty, timeout_s=10)


async def test_list_jobs_reads_every_current_record(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        ids = []
        for n in range(3):
            verdict = await client.submit({"job_type": "build", "metadata": {"n": str(n)}})
            assert verdict is not None
            assert verdict.job_id is not None
            ids.append(verdict.job_id)
        await (await bus.kv("jobs")).delete(ids[1])

        listed = await client.list_jobs()
        assert sorted(r.id for r in listed) == sorted([ids[0], ids[2]])
        assert [r.id for r in await client.list_jobs(states={JobState.QUEUED})] == [
            r.id for r in listed
        ]
        assert await client.list_jobs(states={JobState.RUNNING}) == []
        newest = await client.list_jobs(limit=1)
        assert len(newest) == 1
        assert newest[0] == listed[0]
        assert listed[0].submitted_at_ms >= listed[1].submitted_at_ms
