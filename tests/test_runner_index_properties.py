"""Property tests of the runner index (pure logic, no server): candidates, reservations, sampling."""

from __future__ import annotations

import random
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from schemas import (
    JobSubmission,
    RoutingHints,
    RunnerCapabilities,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
)
from tests._placement_strategies import IDS, NOW, jobs, runner_records
from valkyrie.domain.scheduling.index import RunnerIndex

pytestmark = pytest.mark.timeout(120)


# -- the runner index ------------------------------------------------------------------------------
operations = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), runner_records()),
        st.tuples(st.just("remove"), st.sampled_from(IDS)),
        st.tuples(st.just("reserve"), st.sampled_from(IDS), st.integers(0, 5)),
        st.tuples(st.just("unreserve"), st.sampled_from(IDS), st.integers(0, 5)),
        st.tuples(st.just("commit"), st.sampled_from(IDS), st.integers(0, 5)),
    ),
    max_size=40,
)


def _free(record: RunnerRecord, reserved: set[str]) -> bool:
    used = len(record.assigned_jobs) + len(reserved - set(record.assigned_jobs))
    return (
        record.state not in (RunnerState.OFFLINE, RunnerState.DRAINING)
        and not record.drain_requested
        and used < record.registration.max_concurrent_jobs
    )


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(
    ops=operations,
    probes=st.lists(jobs(wait=False), min_size=1, max_size=4),
    sample=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_runner_index_candidates_and_bookkeeping(
    ops: list[tuple[Any, ...]], probes: list[JobSubmission], sample: int, seed: int
) -> None:
    index = RunnerIndex(random.Random(seed))
    records: dict[str, RunnerRecord] = {}
    reserved: dict[str, set[str]] = {}

    def check() -> None:
        for job in probes:
            free = {
                rid
                for rid, r in records.items()
                if job.job_type in r.registration.capabilities.job_types
                and _free(r, reserved.get(rid, set()))
            }
            assert index.has_free(job.job_type) == bool(free)
            hints = job.routing_hints
            preferred = {p for p in (hints.preferred_runners if hints else []) if p in records}
            regions = set(job.requirements.preferred_regions)
            if hints and hints.geographic_preference:
                regions.add(hints.geographic_preference.partition("/")[0])
            in_region = {
                rid for rid in free if records[rid].registration.location.region in regions
            }
            got = index.candidates(job, sample)
            ids = [r.registration.runner_id for r in got]
            assert len(ids) == len(set(ids))
            chosen = set(ids)
            assert preferred | in_region <= chosen  # always considered
            assert chosen <= free | preferred  # nothing else: right type and a free slot
            assert len(chosen - preferred - in_region) <= sample  # the sample is bounded
            if len(free) <= sample:
                assert free <= chosen
            for view in got:  # views count the reservations as taken slots
                rid = view.registration.runner_id
                assert set(view.assigned_jobs) == set(records[rid].assigned_jobs) | reserved.get(
                    rid, set()
                )
        expected_free_slots = sum(
            r.registration.max_concurrent_jobs
            - len(r.assigned_jobs)
            - len(reserved.get(rid, set()) - set(r.assigned_jobs))
            for rid, r in records.items()
            if _free(r, reserved.get(rid, set()))
        )
        assert index.free_slots() == expected_free_slots

    for op in ops:
        match op:
            case ("upsert", record):
                rid = record.registration.runner_id
                records[rid] = record
                reserved.get(rid, set()).difference_update(record.assigned_jobs)
                index.upsert(record)
            case ("remove", rid):
                records.pop(rid, None)
                reserved.pop(rid, None)
                index.remove(rid)
            case ("reserve", rid, n):
                if rid not in records:
                    continue  # the dispatcher only reserves runners it placed on
                reserved.setdefault(rid, set()).add(f"job-{n}")
                index.reserve(rid, f"job-{n}")
            case ("unreserve", rid, n):
                reserved.get(rid, set()).discard(f"job-{n}")
                index.unreserve(rid, f"job-{n}")
            case ("commit", rid, n):
                # the slot is written to the runner's record, then the reservation is released
                if rid not in records or f"job-{n}" not in reserved.get(rid, set()):
                    continue
                record = records[rid]
                record = msgspec.structs.replace(
                    record, assigned_jobs={**record.assigned_jobs, f"job-{n}": 1}
                )
                records[rid] = record
                reserved[rid].discard(f"job-{n}")
                index.upsert(record)
                index.unreserve(rid, f"job-{n}")
        check()
    check()


def test_runner_index_sampling_is_bounded_with_many_runners() -> None:
    index = RunnerIndex(random.Random(7))
    for i in range(2000):
        index.upsert(
            RunnerRecord(
                registration=RunnerRegistration(
                    runner_id=f"r{i}",
                    capabilities=RunnerCapabilities(job_types=["build"]),
                    max_concurrent_jobs=2,
                ),
                state=RunnerState.ACTIVE,
                registered_at_ms=NOW,
                last_heartbeat_at_ms=NOW,
            )
        )
    job = JobSubmission(job_type="build", routing_hints=RoutingHints(preferred_runners=["r1999"]))
    seen: set[str] = set()
    for _ in range(50):
        ids = {r.registration.runner_id for r in index.candidates(job, 16)}
        assert "r1999" in ids
        assert len(ids) <= 17
        seen |= ids
    assert len(seen) > 100  # a different random sample each time, not the same first 16
    assert index.candidates(JobSubmission(job_type="deploy"), 16) == []
