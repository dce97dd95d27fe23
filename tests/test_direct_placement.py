"""Intake handing new jobs to the dispatcher of its process (LocalPlacer.place_new)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import nats.js.errors
import pytest

from handlers import dispatcher as dispatcher_module
from handlers.dispatcher import DispatcherWorker
from schemas import JobState
from tests._helpers import (
    config_for_test,
    events_of,
    handler_context,
    queued_job,
    running,
    settings_for,
    wait_until,
)
from tests._sched_helpers import submit
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER
from valkyrie.config.load import LoadedConfig
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


async def test_a_new_job_is_placed_at_once_and_announced_in_order(settings: Settings) -> None:
    async with running(settings, ["intake", "dispatcher", "registry", "results"]) as bus:
        stop = anyio.Event()
        runner = SimulatedRunner(bus, "r1", capacity=4)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            client = Client(bus)
            job_id = await submit(client, payload={"command": ["true"]})
            record = await client.wait_for_job(job_id, timeout_s=10)
            stop.set()
        assert record.state == JobState.SUCCEEDED
        assert record.attempt == 1
        assert record.runner_id == "r1"
        events = await events_of(bus, f"job.{job_id}.*")
        kinds = [e.type for e in events]
        assert (
            kinds.index("job.queued") < kinds.index("job.dispatched") < kinds.index("job.succeeded")
        )
        queued = events[kinds.index("job.queued")]
        assert queued.data["placed_attempt"] == 1
        assert "record" not in queued.data  # nothing for a dispatcher to place
        dispatched = events[kinds.index("job.dispatched")]
        assert dispatched.data["runner_id"] == "r1"

        # the dispatcher settled the placed job's queued event without placing it again
        async def settled() -> bool:
            info = await bus.js.consumer_info(bus.names.stream("events"), "dispatcher")
            return not info.num_pending and not info.num_ack_pending

        await wait_until(settled, timeout_s=10)


@asynccontextmanager
async def _dispatcher(
    bus: Bus,
    tg: anyio.abc.TaskGroup,
    config: LoadedConfig | None = None,
    *,
    keepalive_s: float | None = None,
) -> AsyncIterator[DispatcherWorker]:
    """A dispatcher of this process, as intake would find it."""
    ctx = handler_context(bus, tg, "dispatcher", config)
    worker = dispatcher_module.create(ctx)
    if keepalive_s is not None:
        worker.holding.keepalive_s = keepalive_s
    stop = anyio.Event()
    await tg.start(worker.run, stop)
    assert ctx.views.placer is worker
    try:
        yield worker
    finally:
        stop.set()


@asynccontextmanager
async def _solo(settings: Settings) -> AsyncIterator[tuple[Bus, DispatcherWorker]]:
    """A registry, one runner "solo" (2 slots, 30 s jobs) and this process's dispatcher."""
    async with running(settings, ["registry"]) as bus, anyio.create_task_group() as tg:
        runner = SimulatedRunner(bus, "solo", capacity=2, work_s=30.0)
        await tg.start(runner.run, anyio.Event())
        async with _dispatcher(bus, tg) as worker:
            await wait_until(lambda: _has_free(worker), timeout_s=10)
            yield bus, worker
        tg.cancel_scope.cancel()  # the runner would work on its jobs for 30 s


async def _slots(bus: Bus, rid: str) -> dict[str, int]:
    entry = await (await bus.kv("runners")).get(rid)
    return dict(RUNNER_DECODER.decode(entry.value or b"").assigned_jobs)


async def test_place_new_stores_the_record_dispatched_and_is_idempotent(settings: Settings) -> None:
    async with _solo(settings) as (bus, worker):
        record = queued_job("t-1")
        assert await worker.place_new(record)
        jobs = await bus.kv("jobs")
        stored = JOB_DECODER.decode((await jobs.get(record.id)).value or b"")
        assert stored.state == JobState.DISPATCHED
        assert stored.attempt == 1
        assert stored.runner_id == "solo"
        assert (await _slots(bus, "solo")) == {record.id: 1}
        # the same job again (a redelivered submission): nothing moves, the slot stays
        assert not await worker.place_new(record)
        again = JOB_DECODER.decode((await jobs.get(record.id)).value or b"")
        assert again == stored
        assert (await _slots(bus, "solo")) == {record.id: 1}


async def test_place_new_declines_while_others_wait(settings: Settings) -> None:
    async with _solo(settings) as (bus, worker):
        # a job this dispatcher holds (its queued event arrived, not yet placed)
        worker.queue.offer("held", 0)
        newcomer = queued_job("t-2")
        assert not await worker.place_new(newcomer)
        held = worker.queue.get("held")
        assert held is not None
        worker.queue.drop(held)
        # nothing stored: intake records it as queued and it goes through its queued event
        assert await _missing(bus, newcomer.id)
        # until that event arrives, later jobs queue behind it too
        assert worker.queue.is_declined(newcomer.id)
        third = queued_job("t-3")
        assert not await worker.place_new(third)
        for declined in (newcomer, third):  # their queued events arrive
            worker.queue.arrived(declined.id)
        assert await worker.place_new(queued_job("t-4"))


async def _has_free(worker: DispatcherWorker) -> bool:
    return worker.index.has_free("shell")


async def _missing(bus: Bus, job_id: str) -> bool:
    try:
        await (await bus.kv("jobs")).get(job_id)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return True
    return False


async def test_a_held_job_delivered_again_stays_held(nats_url: str, prefix: str) -> None:
    """A held job's message delivered again (its keep-alive came too late) is held, not acked:
    acking the new delivery would release the job while this dispatcher still holds it, and a
    crash would then leave it queued with no message to bring it back."""
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, performance__ack_wait_s=1.0)
    # intake alone: no runner ever registers, so the job waits in the dispatcher below
    async with (
        running(settings, ["intake"], config=config) as bus,
        anyio.create_task_group() as tg,
    ):
        # no keep-alive within the test: the held message is delivered again after the ack wait
        async with _dispatcher(bus, tg, config, keepalive_s=3600) as worker:
            job_id = await submit(Client(bus), payload={})
            events = bus.names.stream("events")

            async def delivered_again() -> bool:
                info = await bus.js.consumer_info(events, "dispatcher")
                delivered = info.delivered
                return (delivered.consumer_seq or 0) > (delivered.stream_seq or 0)

            await wait_until(delivered_again, timeout_s=10)
            await anyio.sleep(0.3)  # time to settle the second delivery, were it settled
            info = await bus.js.consumer_info(events, "dispatcher")
            assert info.num_ack_pending == 1
            held = worker.holding.held(job_id)
            assert held is not None
            assert held.metadata.num_delivered >= 2  # the newest delivery is the one held
        tg.cancel_scope.cancel()


async def test_explain_answers_from_the_dispatcher_holding_the_job(settings: Settings) -> None:
    """With two dispatchers each holding some queued jobs (no runner yet), every explain has the
    holder's answer: its place in line, not a blank from the other dispatcher."""
    total = 12
    async with running(settings, ["intake", "dispatcher"]) as bus, anyio.create_task_group() as tg:
        async with _dispatcher(bus, tg) as second:
            client = Client(bus)
            ids = [await submit(client, metadata={"n": str(n)}) for n in range(total)]

            async def all_held() -> bool:
                info = await bus.js.consumer_info(bus.names.stream("events"), "dispatcher")
                return int(info.num_ack_pending or 0) == total

            await wait_until(all_held, timeout_s=10)
            mine = set(second.queue.jobs)
            assert 0 < len(mine) < total, "both dispatchers should hold some of the jobs"
            for job_id in ids:
                e = await client.explain(job_id)
                assert e.state == "queued"
                assert e.held, (job_id, job_id in mine)
                assert e.queue_position is not None
                assert e.queue_length == (len(mine) if job_id in mine else total - len(mine))
                assert "no_runners" in e.causes
        tg.cancel_scope.cancel()
