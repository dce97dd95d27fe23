"""Runner indexes so placement never scans every runner per job.

Runners are indexed by job type among those with a free slot; a job draws a bounded random sample
from that set (the "power of K choices": near-best placement at O(K) cost) plus every preferred and
region-matching runner, so with thousands of runners a decision costs the same as with a hundred.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from schemas import JobSubmission, RunnerRecord, RunnerState

__all__ = ["IndexedSet", "RunnerIndex"]


@dataclass
class IndexedSet:
    """A set with O(1) add, remove and uniform random sampling."""

    _items: list[str] = field(default_factory=list)
    _pos: dict[str, int] = field(default_factory=dict)

    def add(self, item: str) -> None:
        """Add ``item`` (no-op when present)."""
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: str) -> None:
        """Remove ``item`` (no-op when absent)."""
        index = self._pos.pop(item, None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._pos[last] = index

    def sample(self, k: int, rng: random.Random) -> list[str]:
        """Up to ``k`` distinct items chosen uniformly."""
        if len(self._items) <= k:
            return list(self._items)
        return rng.sample(self._items, k)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))


class RunnerIndex:
    """Runner records plus indexes by job type (free runners only) and region."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.records: dict[str, RunnerRecord] = {}
        self._reserved: dict[str, set[str]] = {}
        self._free_by_type: dict[str, IndexedSet] = {}
        self._by_region: dict[str, set[str]] = {}
        # sampling spreads load over runners; nobody gains by predicting it
        self._rng = rng or random.Random()  # noqa: S311 - not a secret
        self.version = 0

    def _view(self, runner_id: str) -> RunnerRecord:
        record = self.records[runner_id]
        extra = {j: 0 for j in self._reserved.get(runner_id, ()) if j not in record.assigned_jobs}
        if not extra:
            return record
        return msgspec.structs.replace(record, assigned_jobs={**record.assigned_jobs, **extra})

    def used(self, runner_id: str) -> int:
        """Slots taken, counting reservations of placements still being committed."""
        record = self.records[runner_id]
        extra = sum(1 for j in self._reserved.get(runner_id, ()) if j not in record.assigned_jobs)
        return len(record.assigned_jobs) + extra

    def _has_room(self, runner_id: str) -> bool:
        record = self.records[runner_id]
        return (
            record.state not in (RunnerState.OFFLINE, RunnerState.DRAINING)
            and not record.drain_requested
            and self.used(runner_id) < record.registration.max_concurrent_jobs
        )

    def _reindex(self, runner_id: str) -> None:
        record = self.records.get(runner_id)
        for job_type, members in self._free_by_type.items():
            if record is None or job_type not in record.registration.capabilities.job_types:
                members.discard(runner_id)
        if record is None:
            return
        room = self._has_room(runner_id)
        for job_type in record.registration.capabilities.job_types:
            members = self._free_by_type.setdefault(job_type, IndexedSet())
            if room:
                members.add(runner_id)
            else:
                members.discard(runner_id)

    def upsert(self, record: RunnerRecord) -> None:
        """Add or replace a runner's record."""
        rid = record.registration.runner_id
        old = self.records.get(rid)
        if old is not None and old.registration.location.region:
            self._by_region.get(old.registration.location.region, set()).discard(rid)
        self.records[rid] = record
        if record.registration.location.region:
            self._by_region.setdefault(record.registration.location.region, set()).add(rid)
        reserved = self._reserved.get(rid)
        if reserved:
            reserved.difference_update(record.assigned_jobs)
        self._reindex(rid)
        self.version += 1

    def remove(self, runner_id: str) -> None:
        """Forget a runner."""
        record = self.records.pop(runner_id, None)
        if record is not None and record.registration.location.region:
            self._by_region.get(record.registration.location.region, set()).discard(runner_id)
        self._reserved.pop(runner_id, None)
        self._reindex(runner_id)
        self.version += 1

    def reserve(self, runner_id: str, job_id: str) -> None:
        """Hold a slot for a placement being committed."""
        self._reserved.setdefault(runner_id, set()).add(job_id)
        self._reindex(runner_id)

    def unreserve(self, runner_id: str, job_id: str) -> None:
        """Release a held slot (committed or abandoned)."""
        self._reserved.get(runner_id, set()).discard(job_id)
        if runner_id in self.records:
            self._reindex(runner_id)

    def free_slots(self) -> int:
        """Free slots over all runners that can take work."""
        return sum(
            max(0, r.registration.max_concurrent_jobs - self.used(rid))
            for rid, r in self.records.items()
            if self._has_room(rid)
        )

    def has_free(self, job_type: str) -> bool:
        """Whether any runner of ``job_type`` has a free slot."""
        members = self._free_by_type.get(job_type)
        return bool(members)

    def candidates(self, spec: JobSubmission, sample: int) -> list[RunnerRecord]:
        """Runners worth scoring for ``spec``.

        A bounded sample of the free ones of its job type, plus every preferred runner and every
        free runner in a preferred region (views include reservations).
        """
        members = self._free_by_type.get(spec.job_type)
        chosen: set[str] = set(members.sample(sample, self._rng)) if members else set()
        hints = spec.routing_hints
        wanted = list(hints.preferred_runners) if hints is not None else []
        regions = list(spec.requirements.preferred_regions)
        if hints is not None and hints.geographic_preference:
            regions.append(hints.geographic_preference.partition("/")[0])
        for region in regions:
            wanted.extend(r for r in self._by_region.get(region, ()) if members and r in members)
        for rid in wanted:
            if rid in self.records:
                chosen.add(rid)
        return [self._view(rid) for rid in sorted(chosen)]

    def free_count(self, job_type: str) -> int:
        """How many runners of ``job_type`` have a free slot."""
        members = self._free_by_type.get(job_type)
        return len(members) if members else 0

    def free_views(self, job_type: str) -> list[RunnerRecord]:
        """Every runner of ``job_type`` with a free slot (the exhaustive fallback)."""
        members = self._free_by_type.get(job_type)
        return [self._view(rid) for rid in sorted(members)] if members else []

    def all_views(self) -> list[RunnerRecord]:
        """Every runner (for explanations, which may scan)."""
        return [self._view(rid) for rid in sorted(self.records)]
