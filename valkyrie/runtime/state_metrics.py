"""Gauges of state a process already keeps: the runner pool (monitor) and a dispatcher's queue.

Nothing here reads a bucket per scrape. :class:`RunnerGauges` is a listener of the process's
runner view and moves its counts by each record's change (O(1) per change, whatever the pool's
size). :class:`QueueCollector` reads the last :class:`~schemas.QueueSnapshot` the dispatcher made
for the queue ledger (once a second); the oldest-job age is computed at scrape time, so it grows
between snapshots. Scrapes run on the metrics server's thread: the gauges are set from the event
loop through prometheus_client's locks, and the snapshot is an immutable value read in one step.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas import QueueSnapshot, RunnerRecord, RunnerState
from valkyrie.bus.kv import Versioned
from valkyrie.domain.health import AVAILABLE_RUNNER_STATES
from valkyrie.runtime.metric_catalogue import spec
from valkyrie.runtime.metrics import BoundedLabel

__all__ = ["MAX_POOLS", "QueueCollector", "RunnerGauges", "runner_pool_of"]

#: pools (regions) the runner gauges keep apart; the rest is ``(other)``
MAX_POOLS = 64


def runner_pool_of(record: RunnerRecord) -> str:
    """The pool a runner counts in: its region, ``-`` when it names none."""
    return record.registration.location.region or "-"


@dataclass(frozen=True)
class _Share:
    """What one runner adds to the gauges."""

    state: str
    pool: str
    used: int
    capacity: int


class RunnerGauges:
    """Runners by state and pool, slots used and slots of runners that take work."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._runners = spec("valkyrie_runners").gauge(registry)
        self._used = spec("valkyrie_runner_slots_used").gauge(registry)
        self._capacity = spec("valkyrie_runner_slots_capacity").gauge(registry)
        self._pools = BoundedLabel(MAX_POOLS)
        self._shares: dict[str, _Share] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._used_by: Counter[str] = Counter()
        self._capacity_by: Counter[str] = Counter()

    def hear(self, runner_id: str, versioned: Versioned[RunnerRecord] | None) -> None:
        """A listener for the process's :class:`~valkyrie.runtime.views.RunnerView`."""
        old = self._shares.pop(runner_id, None)
        if old is not None:
            self._apply(old, -1)
        if versioned is not None:
            record = versioned.value
            state = record.state.value
            share = _Share(
                state=state,
                pool=self._pools(runner_pool_of(record)),
                used=len(record.assigned_jobs),
                capacity=record.registration.max_concurrent_jobs
                if state in AVAILABLE_RUNNER_STATES
                else 0,
            )
            self._shares[runner_id] = share
            self._apply(share, +1)

    def _apply(self, share: _Share, sign: int) -> None:
        self._counts[(share.state, share.pool)] += sign
        self._used_by[share.pool] += sign * share.used
        self._capacity_by[share.pool] += sign * share.capacity
        # every state of a pool is exported (0 included), so a panel shows "0 offline", not a gap
        for state in RunnerState:
            self._runners.labels(state.value, share.pool).set(
                self._counts[(state.value, share.pool)]
            )
        self._used.labels(share.pool).set(self._used_by[share.pool])
        self._capacity.labels(share.pool).set(self._capacity_by[share.pool])


class QueueCollector(Collector):
    """The queue gauges of one dispatcher, from the last snapshot ``latest()`` returns."""

    def __init__(
        self, latest: Callable[[], QueueSnapshot | None], clock: Callable[[], float] = time.time
    ) -> None:
        self._latest = latest
        self._clock = clock
        self._depth = spec("valkyrie_queue_depth_jobs")
        self._age = spec("valkyrie_queue_oldest_age_seconds")
        self._tenants = spec("valkyrie_queue_tenant_jobs")

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(self._depth.name, self._depth.help, labels=self._depth.labels),
            GaugeMetricFamily(self._age.name, self._age.help, labels=self._age.labels),
            GaugeMetricFamily(self._tenants.name, self._tenants.help, labels=self._tenants.labels),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The families (no samples): what the registry checks for duplicate names."""
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per queue group and tenant; nothing while the dispatcher holds no job."""
        depth, age, tenants = self._families()
        snapshot = self._latest()
        if snapshot is not None:
            now_ms = self._clock() * 1000
            for group in snapshot.groups:
                labels = [group.job_type, group.region, group.labels]
                depth.add_metric(labels, group.count)
                age.add_metric(labels, max(0.0, now_ms - group.oldest_queued_at_ms) / 1000)
            for tenant, count in snapshot.tenants.items():
                tenants.add_metric([tenant], count)
        yield from (depth, age, tenants)
