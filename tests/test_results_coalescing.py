"""The results handler applies a job's updates that arrive together in one write."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from handlers import results as results_module
from schemas import JobAccepted, JobFinished, JobState
from tests._helpers import events_of, running
from valkyrie import Bus, HandlerContext, Settings
from valkyrie._codec import JOB_DECODER, encode
from valkyrie._intake import job_id_for, parse_submission, queued_record
from valkyrie._lifecycle import dispatch_job
from valkyrie._live import LiveConfig, config_for
from valkyrie._metrics import HandlerMetrics
from valkyrie._runnerview import SharedViews

pytestmark = pytest.mark.nats


async def _dispatched_job(bus: Bus) -> tuple[str, int]:
    parsed = parse_submission(
        msgspec.json.encode({"job_type": "shell"}),
        received_at_ms=1_000,
        max_bytes=1 << 20,
        max_metadata_entries=64,
    )
    queued = queued_record(
        job_id_for(parsed.spec, source="c-1"), parsed, now_ms=1_000, source_seq=1
    )
    record = dispatch_job(queued, "r1", now_ms=1_001)
    revision = await (await bus.kv("jobs")).create(record.id, encode(record))
    return record.id, int(revision)


def _msg(bus: Bus, update: JobAccepted | JobFinished) -> Msg:
    return Msg(_client=bus.nc, subject=bus.names.updates("r1"), data=encode(update))


async def test_updates_delivered_together_cost_one_write(settings: Settings) -> None:
    async with running(settings, []) as bus, anyio.create_task_group() as tg:
        registry = CollectorRegistry()
        ctx = HandlerContext(
            bus=bus,
            registry=registry,
            metrics=HandlerMetrics.create(registry),
            name="results",
            config=LiveConfig(config_for(bus.settings)),
            views=SharedViews(bus, tg),
        )
        worker = results_module.create(ctx)
        worker._jobs = await bus.kv("jobs")
        job_id, revision = await _dispatched_job(bus)
        accepted = JobAccepted(job_id=job_id, attempt=1, runner_id="r1", at_ms=1_002)
        finished = JobFinished(
            job_id=job_id, attempt=1, runner_id="r1", at_ms=1_003, outcome="succeeded"
        )
        async with anyio.create_task_group() as handling:  # as the consumer starts them
            handling.start_soon(worker.handle, _msg(bus, accepted))
            handling.start_soon(worker.handle, _msg(bus, finished))
        entry = await (await bus.kv("jobs")).get(job_id)
        record = JOB_DECODER.decode(entry.value or b"")
        assert record.state == JobState.SUCCEEDED
        assert record.accepted_at_ms == 1_002
        assert entry.revision == revision + 1  # one compare-and-set for both
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.*")]
        assert kinds == ["job.accepted", "job.succeeded"]
        # applying them again (a redelivery) changes nothing and emits nothing new
        await worker.handle(_msg(bus, accepted))
        await worker.handle(_msg(bus, finished))
        assert (await (await bus.kv("jobs")).get(job_id)).revision == revision + 1
        assert [e.type for e in await events_of(bus, f"job.{job_id}.*")] == kinds
        tg.cancel_scope.cancel()
