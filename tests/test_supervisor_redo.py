"""A take-back whose process died after writing the record is finished by the supervisor's scan."""

from __future__ import annotations

import anyio
import pytest

from schemas import JobState
from tests._helpers import events_of, queued_job, running, wait_until
from valkyrie import Client, Settings
from valkyrie.bus.codec import RUNNER_DECODER, encode, now_ms
from valkyrie.bus.kv import cas_update
from valkyrie.domain.lifecycle import assign_slot, dispatch_job, retry_after_failure
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


async def test_a_half_done_take_back_is_announced_and_its_slot_freed(settings: Settings) -> None:
    async with running(settings, ["registry", "supervisor", "dispatcher", "results"]) as bus:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(SimulatedRunner(bus, "r1", capacity=2).run, stop)
            # what a take-back leaves when its process dies right after the record write: the
            # job re-queued (attempt 1 ended not_accepted), r1 still holding the slot, no events
            now = now_ms()
            queued = queued_job("redo-1", now_ms=now)
            job_id = queued.id
            record = retry_after_failure(
                dispatch_job(queued, "r1", now_ms=now),
                "not_accepted",
                now_ms=now,
                reason="runner r1 did not accept within 5000 ms",
            )
            assert record.state == JobState.QUEUED
            await (await bus.kv("jobs")).create(job_id, encode(record))
            runners = await bus.kv("runners")
            await cas_update(runners, "r1", RUNNER_DECODER, lambda r: assign_slot(r, job_id, 1))

            final = await Client(bus).wait_for_job(job_id, timeout_s=20)
            assert final.state == JobState.SUCCEEDED
            assert final.attempt == 2

            async def slot_freed() -> bool:
                entry = await runners.get("r1")
                return job_id not in RUNNER_DECODER.decode(entry.value or b"").assigned_jobs

            await wait_until(slot_freed, timeout_s=10)
            kinds = [e.type for e in await events_of(bus, f"job.{job_id}.*")]
            assert kinds[:2] == ["job.requeued", "job.queued"]
            stop.set()
