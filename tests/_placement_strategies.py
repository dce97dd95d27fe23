"""Hypothesis strategies and the placement oracle shared by the scheduling property tests.

Constraints are checked against an oracle written here from the documented rules
(docs/scheduling.md), not against ``failing_constraints`` itself.
"""

from __future__ import annotations

import hypothesis
from hypothesis import strategies as st

from schemas import (
    AffinityRule,
    JobSubmission,
    QosRequirements,
    Requirements,
    RoutingHints,
    RunnerCapabilities,
    RunnerLocation,
    RunnerRecord,
    RunnerRegistration,
    RunnerResources,
    RunnerState,
    RunnerStats,
)
from valkyrie.domain.scheduling.placement import MIN_SAMPLES

__all__ = [
    "IDS",
    "KEYS",
    "NOW",
    "PROPS",
    "REGIONS",
    "SLA",
    "TYPES",
    "VALUES",
    "ZONES",
    "affinity_rules",
    "fleets",
    "jobs",
    "runner_records",
    "small_runner",
    "violations",
]

NOW = 1_700_000_000_000
IDS = [f"r{i}" for i in range(8)]
TYPES = ["build", "test"]
KEYS = ["os", "disk", "arch"]
VALUES = ["a", "b", "c"]
REGIONS = ["eu", "us"]
ZONES = ["z1", "z2"]
SLA = {"platinum": 0, "gold": 1, "silver": 2, "bronze": 3, "best_effort": 4}

PROPS = hypothesis.settings(max_examples=150, deadline=None)


# -- strategies ------------------------------------------------------------------------------------
@st.composite
def runner_records(draw: st.DrawFn, runner_id: str | None = None) -> RunnerRecord:
    rid = runner_id or draw(st.sampled_from(IDS))
    capacity = draw(st.integers(1, 4))
    used = draw(st.integers(0, capacity))
    completed = draw(st.integers(0, 12))
    failed = draw(st.integers(0, 12))
    region = draw(st.none() | st.sampled_from(REGIONS))
    return RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(
                job_types=draw(st.lists(st.sampled_from(TYPES), min_size=1, unique=True)),
                languages=draw(st.lists(st.sampled_from(["py", "go"]), unique=True)),
            ),
            resources=RunnerResources(
                cpu_cores=draw(st.sampled_from([1.0, 2.0, 8.0])),
                memory_mb=draw(st.sampled_from([512, 4096])),
                gpu_count=draw(st.integers(0, 1)),
            ),
            max_concurrent_jobs=capacity,
            location=RunnerLocation(
                region=region, zone=draw(st.sampled_from(ZONES)) if region else None
            ),
            labels=draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES))),
        ),
        state=draw(st.sampled_from(list(RunnerState))),
        registered_at_ms=NOW - 60_000,
        last_heartbeat_at_ms=NOW - draw(st.sampled_from([0, 500, 10_000])),
        assigned_jobs={f"{rid}-busy-{i}": 1 for i in range(used)},
        drain_requested=draw(st.booleans()),
        stats=RunnerStats(
            jobs_completed=completed,
            jobs_failed=failed,
            success_rate=draw(st.sampled_from([0.3, 0.8, 0.95, 1.0])),
            accept_latency_ms=draw(st.sampled_from([5.0, 80.0, 400.0])),
            recent_failures=draw(st.integers(0, 6)),
        ),
    )


@st.composite
def fleets(draw: st.DrawFn) -> list[RunnerRecord]:
    ids = draw(st.lists(st.sampled_from(IDS), min_size=0, max_size=len(IDS), unique=True))
    return [draw(runner_records(rid)) for rid in ids]


affinity_rules = st.builds(
    AffinityRule,
    rule_type=st.sampled_from(["required", "preferred", "anti_affinity"]),
    key=st.sampled_from(KEYS),
    values=st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True),
    weight=st.none() | st.sampled_from([0.5, 2.0]),
)


@st.composite
def jobs(draw: st.DrawFn, *, wait: bool = True) -> JobSubmission:
    hints = None
    if draw(st.booleans()):
        preferred = draw(st.lists(st.sampled_from(IDS), max_size=2, unique=True))
        hints = RoutingHints(
            preferred_runners=preferred,
            excluded_runners=draw(
                st.lists(st.sampled_from([i for i in IDS if i not in preferred]), max_size=2)
            ),
            geographic_preference=draw(st.none() | st.sampled_from(["eu", "us", "eu/z1", "us/z2"])),
            affinity_rules=draw(st.lists(affinity_rules, max_size=3)),
            preferred_wait_s=draw(st.sampled_from([0.0, 5.0])) if wait else 0.0,
        )
    qos = None
    if draw(st.booleans()):
        qos = QosRequirements(
            max_latency_ms=draw(st.none() | st.sampled_from([50.0, 200.0])),
            reliability_threshold=draw(st.none() | st.sampled_from([0.5, 0.9])),
        )
    return JobSubmission(
        job_type=draw(st.sampled_from(TYPES)),
        priority=draw(st.integers(0, 4)),
        requirements=Requirements(
            cpu_cores=draw(st.sampled_from([0.0, 2.0, 4.0])),
            memory_mb=draw(st.sampled_from([0, 1024])),
            gpu_count=draw(st.integers(0, 1)),
            required_capabilities=draw(st.lists(st.sampled_from(["py", "go"]), max_size=1)),
            preferred_regions=draw(st.lists(st.sampled_from(REGIONS), max_size=2, unique=True)),
        ),
        labels=draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1)),
        routing_hints=hints,
        qos_requirements=qos,
    )


# -- the oracle ------------------------------------------------------------------------------------
def _labels(r: RunnerRecord) -> dict[str, str]:
    reg = r.registration
    out = {**reg.metadata, **reg.labels}
    if reg.location.region:
        out.setdefault("region", reg.location.region)
    if reg.location.zone:
        out.setdefault("zone", reg.location.zone)
    return out


def violations(
    job: JobSubmission, r: RunnerRecord, *, lost_after_ms: int | None = None
) -> set[str]:
    """Every documented hard rule ``r`` breaks for ``job`` (advanced placement)."""
    reg, req, res = r.registration, job.requirements, r.registration.resources
    out: set[str] = set()
    if r.state == RunnerState.OFFLINE or (
        lost_after_ms is not None and NOW - r.last_heartbeat_at_ms > lost_after_ms
    ):
        out.add("offline")
    if r.state == RunnerState.DRAINING or r.drain_requested:
        out.add("draining")
    hints = job.routing_hints
    if hints and reg.runner_id in hints.excluded_runners:
        out.add("excluded")
    if job.job_type not in reg.capabilities.job_types:
        out.add("job_type")
    caps = set(reg.capabilities.languages) | set(reg.capabilities.job_types)
    if not set(req.required_capabilities) <= caps:
        out.add("capabilities")
    if req.cpu_cores > res.cpu_cores or req.memory_mb > res.memory_mb:
        out.add("resources")
    if req.gpu_count > res.gpu_count:
        out.add("resources")
    labels = _labels(r)
    if any(labels.get(k) != v for k, v in job.labels.items()):
        out.add("labels")
    for rule in hints.affinity_rules if hints else []:
        have = labels.get(rule.key)
        if rule.rule_type == "required" and have not in rule.values:
            out.add("affinity")
        if rule.rule_type == "anti_affinity" and rule.weight is None and have in rule.values:
            out.add("anti_affinity")
    qos = job.qos_requirements
    measured = r.stats.jobs_completed + r.stats.jobs_failed >= MIN_SAMPLES
    if qos and measured:
        if qos.max_latency_ms is not None and r.stats.accept_latency_ms > qos.max_latency_ms:
            out.add("qos_latency")
        if (
            qos.reliability_threshold is not None
            and r.stats.success_rate < qos.reliability_threshold
        ):
            out.add("qos_reliability")
    if len(r.assigned_jobs) >= reg.max_concurrent_jobs:
        out.add("capacity")
    return out


def small_runner(rid: str, *, capacity: int = 1, used: int = 0, **labels: str) -> RunnerRecord:
    return RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(job_types=["build"]),
            max_concurrent_jobs=capacity,
            labels=labels,
        ),
        state=RunnerState.ACTIVE,
        registered_at_ms=NOW,
        last_heartbeat_at_ms=NOW,
        assigned_jobs={f"{rid}-{i}": 1 for i in range(used)},
    )
