"""Listing the queue: each dispatcher's held jobs, filtered and paged, with a short reason each."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from schemas import JobRecord, JobState, JobSubmission, QueueListing, QueueListRequest
from tests._helpers import wait_until
from tests._metrics_helpers import plane_with_registry
from tests._sched_helpers import submit
from valkyrie import Bus, Client, Settings
from valkyrie.bus.codec import encode
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.explain import pending_reason
from valkyrie.domain.scheduling import DispatchQueue, list_queue, listing_key, merge_listings
from valkyrie.domain.scheduling.placement import Placement
from valkyrie.testing import SimulatedRunner

NOW = 1_700_000_000_000
_LISTING = msgspec.json.Decoder(QueueListing)


def _hold(queue: DispatchQueue, job_id: str, spec: JobSubmission, submitted: int) -> None:
    queue.offer(job_id, 0)
    job = queue.get(job_id)
    assert job is not None
    record = JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=spec,
        submitted_at_ms=submitted,
        updated_at_ms=submitted,
    )
    assert queue.known(job, record, 1)


def test_keys_sort_like_serving_order() -> None:
    keys = [
        listing_key(1, NOW + 5, "b"),
        listing_key(0, NOW + 9, "z"),
        listing_key(1, NOW + 5, "a"),
        listing_key(1, NOW, "c"),
    ]
    assert sorted(keys) == [keys[1], keys[3], keys[2], keys[0]]


def test_a_listing_filters_pages_and_gives_reasons() -> None:
    queue = DispatchQueue()
    config = ValkyrieConfig()
    for i in range(7):
        spec = JobSubmission(job_type="build", labels={"os": "linux"}, priority=2)
        _hold(queue, f"b{i}", spec, NOW - 10_000 + i)
    _hold(queue, "urgent", JobSubmission(job_type="build", labels={"os": "linux"}, priority=0), NOW)
    _hold(queue, "gpu", JobSubmission(job_type="gpu", labels={"region": "eu"}), NOW)
    queue.ordered(NOW, config)  # a placement round ranks every held job; listings read that

    def page(request: QueueListRequest) -> QueueListing:
        return list_queue(
            queue, request, instance="d1", now_ms=NOW, config=config, has_free=lambda _t: False
        )

    first = page(QueueListRequest(job_type="build", labels="os=linux", limit=3))
    assert first.instance == "d1"
    assert first.matching == 8
    assert [j.job_id for j in first.jobs] == ["urgent", "b0", "b1"]
    assert first.jobs[0].reason == "no runner that takes job type 'build' has a free slot"
    second = page(QueueListRequest(job_type="build", after=first.jobs[-1].key, limit=3))
    assert [j.job_id for j in second.jobs] == ["b2", "b3", "b4"]
    eu = page(QueueListRequest(region="eu"))
    assert [(j.job_id, j.region, j.labels) for j in eu.jobs] == [("gpu", "eu", "")]
    assert page(QueueListRequest(tenant="nobody")).matching == 0


def test_merging_pages_of_several_dispatchers() -> None:
    config = ValkyrieConfig()
    listings = []
    for name, offset in (("a", 0), ("b", 1)):
        queue = DispatchQueue()
        for i in range(4):
            _hold(queue, f"{name}{i}", JobSubmission(job_type="t"), NOW + 2 * i + offset)
        queue.ordered(NOW, config)
        listings.append(
            list_queue(
                queue,
                QueueListRequest(limit=4),
                instance=name,
                now_ms=NOW,
                config=config,
                has_free=lambda _t: True,
            )
        )
    jobs, total, more = merge_listings(listings, 3)
    assert [j.job_id for j in jobs] == ["a0", "b0", "a1"]
    assert total == 8
    assert more
    jobs, _, more = merge_listings(listings, 8)
    assert len(jobs) == 8
    assert not more


def _record(**spec: object) -> JobRecord:
    return JobRecord(
        id="j",
        state=JobState.QUEUED,
        spec=msgspec.convert({"job_type": "shell", **spec}, JobSubmission),
        submitted_at_ms=NOW,
        updated_at_ms=NOW,
    )


def test_pending_reasons() -> None:
    record = _record(labels={"os": "plan9"})
    rejected = Placement(runner_id=None, rejected={"labels": ["r1", "r2"]})
    assert pending_reason(record, rejected, mode="full", now_ms=NOW, has_free=True) == (
        "no runner can take it: 2 runner(s) rejected because their labels do not match "
        "{'os': 'plan9'}"
    )
    assert pending_reason(record, None, mode="disabled", now_ms=NOW, has_free=True) == (
        "placement is paused (mode disabled)"
    )
    assert pending_reason(record, None, mode="full", now_ms=NOW, has_free=True) == (
        "it is waiting its turn"
    )
    backoff = msgspec.structs.replace(record, not_before_at_ms=NOW + 2500)
    assert pending_reason(backoff, None, mode="full", now_ms=NOW, has_free=True) == (
        "retry backoff: placed again in 2.5s"
    )
    # what the job asks for stays the reason while every runner is busy; a full runner does not
    assert "labels do not match" in pending_reason(
        record, rejected, mode="full", now_ms=NOW, has_free=False
    )
    full = Placement(runner_id=None, rejected={"capacity": ["r1"]})
    assert pending_reason(record, full, mode="full", now_ms=NOW, has_free=False) == (
        "no runner that takes job type 'shell' has a free slot"
    )
    preferred = Placement(runner_id=None, waiting_for_preferred=True)
    assert "preferred runner" in pending_reason(
        record, preferred, mode="full", now_ms=NOW, has_free=True
    )


async def _ask(bus: Bus, request: QueueListRequest) -> list[QueueListing]:
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    answers: list[QueueListing] = []
    try:
        await bus.nc.publish(bus.names.queue_list, encode(request), reply=inbox)
        with anyio.move_on_after(1.0):
            while True:
                answers.append(_LISTING.decode((await sub.next_msg(timeout=1.0)).data))
    except TimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return answers


@pytest.mark.nats
async def test_every_dispatcher_lists_what_it_holds(settings: Settings) -> None:
    async with (
        plane_with_registry(settings, ["intake", "dispatcher", "registry", "results"]) as (bus, _),
        plane_with_registry(settings, ["dispatcher"]),
        anyio.create_task_group() as tg,
    ):
        stop = anyio.Event()
        await tg.start(SimulatedRunner(bus, "r1", capacity=2).run, stop)
        client = Client(bus)
        ids = {
            await submit(client, labels={"os": "plan9"}, metadata={"n": str(n)}) for n in range(6)
        }

        async def listed() -> bool:
            answers = await _ask(bus, QueueListRequest(labels="os=plan9", limit=7))
            jobs, total, _ = merge_listings(answers, 6)
            tried = all(j.reason.startswith("no runner can take it") for j in jobs)
            return len(answers) == 2 and total == 6 and {j.job_id for j in jobs} == ids and tried

        await wait_until(listed, timeout_s=15)
        answers = await _ask(bus, QueueListRequest(labels="os=plan9", limit=7))
        jobs, _, more = merge_listings(answers, 6)
        assert not more
        assert all(a.error is None for a in answers)
        assert {j.reason for j in jobs} == {
            "no runner can take it: 1 runner(s) rejected because their labels do not match "
            "{'os': 'plan9'}"
        }
        stop.set()
        tg.cancel_scope.cancel()
