"""Bounded storage: every stream and bucket has a size limit, and a full JetStream is survivable.

The full-store scenarios run a dedicated nats-server with a tiny store (the session server's
limits are far away): what is refused is refused clearly, and nothing already accepted is lost.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import DiscardPolicy

from schemas import JobState, RunnerCapabilities, RunnerRegistration
from tests._gateway_helpers import gateway, problem
from tests._helpers import (
    MiB,
    config_for_test,
    dead_letters,
    events_of,
    running,
    settings_for,
    unique_prefix,
)
from tests._runner_fakes import new_runner_id, started
from valkyrie import Bus, BusError, Client, NatsServer, Settings, StorageFullError, open_bus
from valkyrie.bus import ANY_DECODER, get_versioned
from valkyrie.bus.storage import storage_full
from valkyrie.domain.intake import token_for
from valkyrie.runner import ShellHandler

pytestmark = [pytest.mark.nats, pytest.mark.security]

#: what a tiny installation gets: about 12 MiB of limits in a 24 MiB store
TINY = dict.fromkeys(("events_max_bytes", "logs_max_bytes", "jobs_max_bytes"), MiB)
PAD = "x" * (100 * 1024)


@pytest.fixture
async def tiny() -> AsyncIterator[NatsServer]:
    store = Path(tempfile.mkdtemp(prefix="valkyrie-tiny-"))
    server = NatsServer(store_dir=store, port=0, name="tiny", max_mem="8M", max_file="24M")
    await server.astart()
    try:
        yield server
    finally:
        await server.astop()


def tiny_settings(server: NatsServer, **sizes: int) -> Settings:
    every = {f"{n}_max_bytes": MiB for n in _SHORT}
    return settings_for(server.url, unique_prefix(), **{**every, **TINY, **sizes})


_SHORT = (
    "submit",
    "commands",
    "updates",
    "events",
    "logs",
    "dead",
    "jobs",
    "runners",
    "idempotency",
    "config",
    "stats",
    "secrets",
)


async def test_every_stream_and_bucket_is_bounded(bus: Bus, settings: Settings) -> None:
    names = bus.names
    for short in ("submit", "commands", "updates", "events", "logs", "dead"):
        config = (await bus.js.stream_info(names.stream(short))).config
        assert config.max_bytes == settings.max_bytes(short), short
        # a full queue or dead-letter stream refuses the new message; it never drops a kept one
        wanted = DiscardPolicy.OLD if short in ("events", "logs") else DiscardPolicy.NEW
        assert config.discard == wanted, short
    logs = (await bus.js.stream_info(names.stream("logs"))).config
    assert logs.max_msgs_per_subject == settings.logs_max_msgs_per_job
    assert logs.subjects != (await bus.js.stream_info(names.stream("events"))).config.subjects
    for short in ("jobs", "runners", "idempotency", "config", "stats", "secrets"):
        config = (await bus.js.stream_info(f"KV_{names.bucket(short)}")).config
        assert config.max_bytes == settings.max_bytes(short), short
    secrets = (await bus.js.stream_info(f"KV_{names.bucket('secrets')}")).config
    assert secrets.max_age == config_for_test(settings).config.limits.job_retention_s


async def test_limits_reach_existing_streams_on_provisioning(nats_url: str) -> None:
    prefix = unique_prefix()
    first = settings_for(nats_url, prefix)
    async with open_bus(first, embed=False, config=config_for_test(first).config):
        pass
    again = settings_for(nats_url, prefix, jobs_max_bytes=3 * MiB, dead_max_bytes=3 * MiB)
    async with open_bus(again, embed=False, config=config_for_test(again).config) as (bus, _):
        jobs = (await bus.js.stream_info(f"KV_{bus.names.bucket('jobs')}")).config
        dead = (await bus.js.stream_info(bus.names.stream("dead"))).config
    assert jobs.max_bytes == dead.max_bytes == 3 * MiB


async def test_provisioning_without_room_says_which_limit(tiny: NatsServer) -> None:
    settings = tiny_settings(tiny, events_max_bytes=64 * MiB)
    with pytest.raises(BusError) as caught:
        async with open_bus(settings, embed=False, config=config_for_test(settings).config):
            pass
    message = str(caught.value)
    assert "VALKYRIE_EVENTS_MAX_BYTES" in message
    assert "no room" in message
    assert "is JetStream enabled" not in message


async def test_a_full_submit_stream_refuses_and_keeps_what_it_has(tiny: NatsServer) -> None:
    settings = tiny_settings(tiny)
    async with gateway(settings, handlers=[]) as gw:  # no intake: submissions pile up
        client = Client(gw.bus)
        stored, refusal = 0, None
        for _ in range(20):
            try:
                await client.submit(_big_job(), wait_verdict=False)
            except StorageFullError as e:
                refusal = e
                break
            stored += 1
        assert stored >= 5
        assert "JetStream is full" in str(refusal)
        response = await gw.http.post("/api/v2/jobs", json=_big_job())
        assert response.status_code == 507
        assert problem(response)["type"].endswith("/storage-full")
        assert int(response.headers["retry-after"]) >= 1
    # every submission the stream took becomes a job once intake runs
    async with running(settings, ["intake"]) as bus:
        await _wait_jobs(bus, stored)


async def test_a_full_jobs_bucket_refuses_new_jobs_and_runs_the_accepted(
    tiny: NatsServer,
) -> None:
    settings = tiny_settings(tiny)
    async with gateway(settings) as gw:
        client = Client(gw.bus)
        accepted: list[str] = []
        refused = None
        for i in range(30):
            response = await gw.http.post(
                "/api/v2/jobs", json={**_big_job(), "idempotency_key": f"k{i}"}
            )
            if response.status_code != 201:
                refused = (i, response)
                break
            accepted.append(response.json()["job_id"])
        assert refused is not None, "the jobs bucket never filled"
        index, response = refused
        assert response.status_code == 507, response.text
        body = problem(response)
        assert body["type"].endswith("/storage-full")
        assert "JetStream is full" in body["errors"][0]["reason"]
        rejected = [e for e in await events_of(gw.bus, "intake.>") if e.type == "intake.rejected"]
        assert rejected
        assert rejected[-1].data["refusal"] == "storage_full"
        letters = await dead_letters(gw.bus)
        assert letters
        assert "JetStream is full" in letters[-1].reason
        # the refused job's idempotency key was given back: nothing points at a missing job
        idem = await gw.bus.kv("idempotency")
        assert len(await idem.keys()) == len(accepted)
        # every accepted job runs to its end: rewriting a record needs no more room
        async with started(gw.bus, _runner(), ShellHandler(inherit_env=False), drain_timeout_s=30):
            for job_id in accepted:
                record = await client.wait_for_job(job_id, timeout_s=30)
                assert record.state == JobState.SUCCEEDED, record
        assert index == len(accepted)


async def test_a_full_secrets_bucket_refuses_only_jobs_with_secrets(tiny: NatsServer) -> None:
    settings = tiny_settings(tiny)
    secrets = {f"S{i}": "v" * 30_000 for i in range(20)}  # ~600 KiB a job: 1 MiB holds one
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        first = await client.submit({"job_type": "shell", "secret_env": secrets})
        assert first is not None
        assert first.accepted
        second = await client.submit(
            {"job_type": "shell", "secret_env": secrets, "idempotency_key": "again"}
        )
        assert second is not None
        assert not second.accepted
        assert second.refusal == "storage_full"
        plain = await client.submit({"job_type": "shell"})
        assert plain is not None
        assert plain.accepted
        # no job, no key and no half-stored secrets were left by the refusal
        assert len(await (await bus.kv("secrets")).keys()) == 1
        token = token_for("again", None)
        assert token is not None
        assert await get_versioned(await bus.kv("idempotency"), token, ANY_DECODER) is None


def test_only_room_errors_count_as_full() -> None:
    import nats.js.errors

    def api(code: int, description: str) -> Any:
        error = nats.js.errors.ServiceUnavailableError()
        error.err_code, error.description = code, description
        return error

    assert storage_full(api(10077, "maximum bytes exceeded"))
    assert storage_full(api(10023, "insufficient resources"))
    assert storage_full(api(10047, "insufficient storage resources available"))
    assert not storage_full(api(10077, "some other store failure"))
    assert not storage_full(api(10058, "stream name already in use"))
    assert not storage_full(TimeoutError())


def _big_job() -> dict[str, Any]:
    return {"job_type": "shell", "payload": {"command": "true", "pad": PAD}}


def _runner() -> RunnerRegistration:
    return RunnerRegistration(
        runner_id=new_runner_id(),
        max_concurrent_jobs=4,
        heartbeat_interval_ms=200,
        capabilities=RunnerCapabilities(job_types=["shell"]),
    )


async def _wait_jobs(bus: Bus, n: int) -> None:
    from tests._helpers import job_count, wait_until

    async def enough() -> bool:
        return await job_count(bus) >= n

    await wait_until(enough, timeout_s=30)
