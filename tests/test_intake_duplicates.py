"""Duplicates are recorded once: idempotency key, Nats-Msg-Id (in and past the window), job id."""

from __future__ import annotations

import json
from typing import Any

import anyio
import nats
import pytest

from schemas import JobState, SubmitVerdict
from tests._helpers import events_of, job_count, running, settings_for
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import now_ms

pytestmark = pytest.mark.nats


def _accepted(verdict: SubmitVerdict | None) -> str:
    assert verdict is not None
    assert verdict.accepted, verdict.errors
    assert verdict.job_id is not None
    return verdict.job_id


async def _assert_recorded_once(bus: Bus, job_id: str) -> None:
    assert await job_count(bus) == 1
    queued = await events_of(bus, "job.*.queued")
    assert [e.subject_id for e in queued] == [job_id]


async def test_same_idempotency_key_twice(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        first = await client.submit(
            {"job_type": "build", "idempotency_key": "deploy-42", "payload": 1}
        )
        job_id = _accepted(first)
        assert first is not None
        assert not first.duplicate
        # the same body (its keys in another order) is the same job, in its current state
        again = await client.submit(
            {"payload": 1, "idempotency_key": "deploy-42", "job_type": "build"}
        )
        assert again == SubmitVerdict(
            accepted=True, job_id=job_id, duplicate=True, state=JobState.QUEUED
        )
        # a different body with the same key is refused, naming the first job
        other = await client.submit(
            {"job_type": "build", "idempotency_key": "deploy-42", "payload": 2}
        )
        assert other is not None
        assert (other.accepted, other.duplicate, other.job_id) == (False, True, job_id)
        assert other.refusal == "conflict"
        assert [e.path for e in other.errors] == ["$.idempotency_key"]
        assert job_id in other.errors[0].reason

        await _assert_recorded_once(bus, job_id)
        assert (await client.get_job(job_id)).spec.payload == 1
        duplicates = await events_of(bus, f"job.{job_id}.duplicate")
        assert len(duplicates) == 1
        rejected = await events_of(bus, "intake.*.rejected")
        assert len(rejected) == 1


async def test_same_msg_id_twice_within_the_duplicate_window(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        body = {"job_type": "build", "payload": {"command": ["true"]}}
        job_id = _accepted(await client.submit(body, msg_id="pub-1"))
        again = await client.submit(body, msg_id="pub-1")
        assert again == SubmitVerdict(
            accepted=True, job_id=job_id, duplicate=True, state=JobState.QUEUED
        )

        info = await bus.js.stream_info(bus.names.stream("submit"))
        assert info.state.last_seq == 1  # the stream itself dropped the second publish
        await _assert_recorded_once(bus, job_id)


async def _plain_publish(
    nats_url: str, prefix: str, body: bytes, msg_id: str
) -> tuple[bool, dict[str, Any]]:
    """Publish with plain nats-py; return (the stream's duplicate flag, the verdict)."""
    nc = await nats.connect(nats_url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        ack = await nc.jetstream().publish(
            f"{prefix}.jobs.submit",
            body,
            headers={"Nats-Msg-Id": msg_id, "Valkyrie-Reply-To": inbox},
        )
        verdict = json.loads((await sub.next_msg(timeout=10)).data)
        assert isinstance(verdict, dict)
        return bool(ack.duplicate), verdict
    finally:
        await nc.close()


@pytest.mark.slow
async def test_same_msg_id_after_the_duplicate_window(nats_url: str, prefix: str) -> None:
    settings = settings_for(nats_url, prefix, duplicate_window_s=1)
    body = json.dumps({"job_type": "build"}).encode()
    async with running(settings, ["intake"]) as bus:
        stream_dup, first = await _plain_publish(nats_url, prefix, body, "pub-late")
        assert not stream_dup
        assert first["accepted"] is True
        assert first["duplicate"] is False
        job_id = first["job_id"]

        await anyio.sleep(1.6)  # past the stream's 1 s window: only the idempotency bucket remains
        stream_dup, second = await _plain_publish(nats_url, prefix, body, "pub-late")
        assert not stream_dup  # the stream stored it again ...
        assert second["accepted"] is True  # ... and intake recognised it
        assert second["duplicate"] is True
        assert second["job_id"] == job_id

        info = await bus.js.stream_info(bus.names.stream("submit"))
        assert info.state.last_seq == 2
        await _assert_recorded_once(bus, job_id)


async def test_same_job_id_twice(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        first = await client.submit({"job_type": "build", "job_id": "build-42", "payload": "a"})
        assert _accepted(first) == "build-42"
        again = await client.submit({"job_type": "build", "job_id": "build-42", "payload": "a"})
        assert again == SubmitVerdict(
            accepted=True, job_id="build-42", duplicate=True, state=JobState.QUEUED
        )
        other = await client.submit({"job_type": "test", "job_id": "build-42", "payload": "b"})
        assert other is not None
        assert (other.accepted, other.duplicate, other.job_id) == (False, True, "build-42")
        assert [e.path for e in other.errors] == ["$.job_id"]

        await _assert_recorded_once(bus, "build-42")
        record = await client.get_job("build-42")
        assert record.spec.job_type == "build"
        assert record.spec.payload == "a"


async def test_concurrent_duplicates_make_one_job(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        verdicts: list[SubmitVerdict | None] = []

        async def submit(n: int) -> None:
            verdicts.append(
                await client.submit(
                    {"job_type": "build", "idempotency_key": "race", "metadata": {"n": "1"}}
                )
            )

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(submit, n)

        ids = {_accepted(v) for v in verdicts}
        assert len(verdicts) == 20
        assert len(ids) == 1
        assert sum(1 for v in verdicts if v is not None and not v.duplicate) == 1
        await _assert_recorded_once(bus, ids.pop())


async def test_distinct_submissions_are_distinct_jobs(settings: Settings) -> None:
    """The control: without a shared key, id or msg id, equal bodies are separate jobs."""
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        a = _accepted(await client.submit({"job_type": "build"}, msg_id="x-1"))
        b = _accepted(await client.submit({"job_type": "build"}, msg_id="x-2"))
        c = _accepted(await client.submit({"job_type": "build"}))
        assert len({a, b, c}) == 3
        assert await job_count(bus) == 3
        assert len(await events_of(bus, "job.*.queued")) == 3


async def test_rejected_submission_resent_with_the_same_msg_id(settings: Settings) -> None:
    body = {"job_type": "build", "priority": 9}
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        first = await client.submit(body, msg_id="bad-1")
        again = await client.submit(body, msg_id="bad-1")
        assert first is not None
        assert again is not None
        assert not first.accepted
        assert not first.duplicate
        assert again == SubmitVerdict(accepted=False, duplicate=True, errors=first.errors)
        assert await job_count(bus) == 0


@pytest.mark.slow
async def test_msg_id_duplicate_after_its_deadline_passed_is_still_the_first_job(
    settings: Settings,
) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        body = {"job_type": "build", "deadline_at_ms": now_ms() + 1000}
        job_id = _accepted(await client.submit(body, msg_id="late-1"))
        await anyio.sleep(1.2)  # the same body would now be rejected as past its deadline
        again = await client.submit(body, msg_id="late-1")
        assert again == SubmitVerdict(
            accepted=True, job_id=job_id, duplicate=True, state=JobState.QUEUED
        )
        await _assert_recorded_once(bus, job_id)
