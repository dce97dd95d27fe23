"""The queue ledger: what each dispatcher holds, summarised (pure) and shared (stats bucket)."""

from __future__ import annotations

import anyio
import hypothesis
import pytest
from hypothesis import strategies as st

from schemas import OTHER, JobRecord, JobState, JobSubmission, QueueSnapshot, RoutingHints
from schemas.jobs import Requirements
from tests._helpers import running, wait_until
from tests._sched_helpers import submit
from valkyrie import Client, Settings
from valkyrie.domain.scheduling import (
    DispatchQueue,
    job_labels,
    job_region,
    merge_snapshots,
    queue_snapshot,
)
from valkyrie.runtime import QueueLedger
from valkyrie.testing import SimulatedRunner

NOW = 1_700_000_000_000


def _hold(queue: DispatchQueue, job_id: str, spec: JobSubmission, waited_ms: int) -> None:
    queue.offer(job_id, 0)
    job = queue.get(job_id)
    assert job is not None
    record = JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=spec,
        submitted_at_ms=NOW - waited_ms,
        updated_at_ms=NOW - waited_ms,
    )
    assert queue.known(job, record, 1)


def test_region_and_labels_of_a_job() -> None:
    assert job_region(JobSubmission(job_type="t")) == "-"
    assert job_region(JobSubmission(job_type="t", labels={"region": "eu"})) == "eu"
    hinted = JobSubmission(job_type="t", routing_hints=RoutingHints(geographic_preference="us/z1"))
    assert job_region(hinted) == "us"
    preferred = JobSubmission(job_type="t", requirements=Requirements(preferred_regions=["ap"]))
    assert job_region(preferred) == "ap"
    spec = JobSubmission(job_type="t", labels={"region": "eu", "os": "linux", "arch": "arm"})
    assert job_labels(spec) == "arch=arm,os=linux"
    long = JobSubmission(job_type="t", labels={f"k{i}": "v" * 30 for i in range(20)})
    assert len(job_labels(long)) <= 200


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(["build", "test", "deploy"]),
            st.sampled_from(["", "eu", "us"]),
            st.sampled_from(["", "linux", "mac"]),
            st.integers(0, 60_000),
            st.sampled_from(["a", "b", "c", ""]),
        ),
        max_size=40,
    ),
    max_groups=st.integers(1, 8),
    max_tenants=st.integers(1, 3),
)
def test_a_snapshot_counts_every_held_job_once_within_its_bounds(
    jobs: list[tuple[str, str, str, int, str]], max_groups: int, max_tenants: int
) -> None:
    queue = DispatchQueue()
    for i, (job_type, region, os_, waited, tenant) in enumerate(jobs):
        labels = {k: v for k, v in (("region", region), ("os", os_)) if v}
        metadata = {"project_id": tenant} if tenant else {}
        spec = JobSubmission(job_type=job_type, labels=labels, metadata=metadata)
        _hold(queue, f"j{i}", spec, waited)
    snap = queue_snapshot(
        queue,
        instance="d1",
        now_ms=NOW,
        tenant_key="project_id",
        max_groups=max_groups,
        max_tenants=max_tenants,
    )
    assert snap.held == snap.waiting == len(jobs)
    assert sum(g.count for g in snap.groups) == len(jobs)
    assert sum(snap.tenants.values()) == len(jobs)
    assert len(snap.groups) <= max_groups
    assert len(snap.tenants) <= max_tenants
    if jobs:
        assert snap.oldest_queued_at_ms == NOW - max(w for *_, w, _ in jobs)
    distinct = {(t, r or "-", f"os={o}" if o else "") for t, r, o, _, _ in jobs}
    if len(distinct) <= max_groups:
        assert {(g.job_type, g.region, g.labels) for g in snap.groups} == distinct
    else:
        assert snap.groups[-1].job_type == OTHER


def test_merging_adds_fresh_snapshots_and_ignores_stale_ones() -> None:
    def snap(instance: str, at_ms: int, n: int) -> QueueSnapshot:
        queue = DispatchQueue()
        for i in range(n):
            _hold(queue, f"{instance}-{i}", JobSubmission(job_type="build"), 1000)
        return queue_snapshot(queue, instance=instance, now_ms=at_ms, tenant_key="project_id")

    merged = merge_snapshots(
        [snap("a", NOW, 2), snap("b", NOW - 1000, 3), snap("gone", NOW - 60_000, 7)],
        now_ms=NOW,
        fresh_ms=15_000,
    )
    assert merged.held == 5
    assert [(g.job_type, g.count) for g in merged.groups] == [("build", 5)]
    assert merged.tenants == {"-": 5}


@pytest.mark.nats
async def test_the_ledger_counts_jobs_waiting_for_a_runner(settings: Settings) -> None:
    async with running(settings, ["intake", "dispatcher", "registry", "results"]) as bus:
        client = Client(bus)
        for n in range(3):
            await submit(client, job_type="gpu", labels={"gpu": "a100"}, metadata={"n": str(n)})
        ledger = QueueLedger()
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.follow, bus)

            async def three_waiting() -> bool:
                total = ledger.total()
                return [(g.job_type, g.labels, g.count) for g in total.groups] == [
                    ("gpu", "gpu=a100", 3)
                ]

            await wait_until(three_waiting, timeout_s=10)
            assert (await QueueLedger.read(bus)).held == 3
            # a runner that takes them empties the queue
            runner = SimulatedRunner(
                bus, "g1", job_types=["gpu"], capacity=3, labels={"gpu": "a100"}
            )
            stop = anyio.Event()
            await tg.start(runner.run, stop)

            async def empty() -> bool:
                return ledger.total().held == 0

            await wait_until(empty, timeout_s=15)
            stop.set()
            tg.cancel_scope.cancel()
    # a dispatcher that stops cleanly removes its entry
    async with running(settings, ["registry"]) as bus:
        assert (await QueueLedger.read(bus)).groups == []
