"""The results handler applies a job's updates that arrive together in one write."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.msg import Msg

from handlers import results as results_module
from schemas import JobAccepted, JobFinished, JobStarted, JobState
from tests._helpers import events_of, handler_context, queued_job, running
from valkyrie import Bus, Settings
from valkyrie.bus.codec import JOB_DECODER, encode
from valkyrie.domain.lifecycle import apply_update, dispatch_job

pytestmark = pytest.mark.nats


async def _dispatched_job(bus: Bus) -> tuple[str, int]:
    return await _dispatched_job_id(bus, "c-1")


async def _dispatched_job_id(bus: Bus, job_id: str) -> tuple[str, int]:
    queued = queued_job(job_id)
    record = dispatch_job(queued, "r1", now_ms=1_001)
    revision = await (await bus.kv("jobs")).create(record.id, encode(record))
    return record.id, int(revision)


def _msg(bus: Bus, update: JobAccepted | JobStarted | JobFinished) -> Msg:
    return Msg(_client=bus.nc, subject=bus.names.updates("r1"), data=encode(update))


async def test_updates_delivered_together_cost_one_write(settings: Settings) -> None:
    async with running(settings, []) as bus, anyio.create_task_group() as tg:
        worker = results_module.create(handler_context(bus, tg, "results"))
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


async def test_a_started_without_accepted_is_the_acceptance_too(settings: Settings) -> None:
    # the SDK sends no `accepted` for a job it starts at once: the record and the events still
    # show the acceptance, and a redelivery adds nothing
    async with running(settings, []) as bus, anyio.create_task_group() as tg:
        worker = results_module.create(handler_context(bus, tg, "results"))
        worker._jobs = await bus.kv("jobs")
        job_id, revision = await _dispatched_job(bus)
        started = JobStarted(job_id=job_id, attempt=1, runner_id="r1", at_ms=1_004)
        await worker.handle(_msg(bus, started))
        entry = await (await bus.kv("jobs")).get(job_id)
        record = JOB_DECODER.decode(entry.value or b"")
        assert record.state == JobState.RUNNING
        assert (record.accepted_at_ms, record.started_at_ms) == (1_004, 1_004)
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.*")]
        assert kinds == ["job.accepted", "job.started"]
        await worker.handle(_msg(bus, started))
        assert (await (await bus.kv("jobs")).get(job_id)).revision == revision + 1
        assert [e.type for e in await events_of(bus, f"job.{job_id}.*")] == kinds
        # a `started` after an `accepted` is no acceptance: one job.started, no second accepted
        job2, _ = await _dispatched_job_id(bus, "c-2")
        await worker.handle(
            _msg(bus, JobAccepted(job_id=job2, attempt=1, runner_id="r1", at_ms=1_005))
        )
        await worker.handle(
            _msg(bus, JobStarted(job_id=job2, attempt=1, runner_id="r1", at_ms=1_006))
        )
        assert [e.type for e in await events_of(bus, f"job.{job2}.*")] == [
            "job.accepted",
            "job.started",
        ]
        tg.cancel_scope.cancel()


async def test_a_crash_between_the_write_and_the_events_loses_no_event(settings: Settings) -> None:
    # the record was written (the step happened) but the process died before the events: the
    # redelivered update finds the step done and emits its events anyway, once
    async with running(settings, []) as bus, anyio.create_task_group() as tg:
        worker = results_module.create(handler_context(bus, tg, "results"))
        worker._jobs = await bus.kv("jobs")
        kv = await bus.kv("jobs")
        job_id, _ = await _dispatched_job_id(bus, "c-3")
        started = JobStarted(job_id=job_id, attempt=1, runner_id="r1", at_ms=1_007)
        record = JOB_DECODER.decode((await kv.get(job_id)).value or b"")
        outcome = apply_update(record, started, now_ms=1_008)
        assert outcome.record is not None
        await kv.put(job_id, encode(outcome.record))  # the write of the crashed attempt
        assert await events_of(bus, f"job.{job_id}.*") == []
        await worker.handle(_msg(bus, started))  # the redelivery
        await worker.handle(_msg(bus, started))  # and another: nothing new
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.*")]
        assert kinds == ["job.accepted", "job.started"]
        # once the job has moved on, an old update seen again emits nothing
        finished = JobFinished(
            job_id=job_id, attempt=1, runner_id="r1", at_ms=1_009, outcome="succeeded"
        )
        await worker.handle(_msg(bus, finished))
        await worker.handle(
            _msg(bus, JobAccepted(job_id=job_id, attempt=1, runner_id="r1", at_ms=1_010))
        )
        kinds = [e.type for e in await events_of(bus, f"job.{job_id}.*")]
        assert kinds == ["job.accepted", "job.started", "job.succeeded"]
        tg.cancel_scope.cancel()
