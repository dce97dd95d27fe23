"""Placement as pure logic: hard constraints filter runners, a documented score ranks the rest.

Every rejection carries a reason code so that "why is my job pending?" can be answered; the codes,
in the order they are checked, are listed in ``CONSTRAINTS`` (docs/scheduling.md explains each).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from schemas import (
    AffinityRule,
    JobSubmission,
    QosRequirements,
    RunnerRecord,
    RunnerState,
)

__all__ = [
    "CONSTRAINTS",
    "Placement",
    "ScoreWeights",
    "Scored",
    "check_runner",
    "failing_constraints",
    "place",
    "runner_labels",
    "score_runner",
]

#: Hard-constraint reason codes, in checking order.
CONSTRAINTS = (
    "offline",
    "draining",
    "excluded",
    "job_type",
    "capabilities",
    "cpu",
    "memory",
    "storage",
    "gpu",
    "labels",
    "affinity",
    "anti_affinity",
    "qos_latency",
    "qos_reliability",
    "qos_throughput",
    "capacity",
)
#: A runner measured on fewer jobs than this is not judged on its statistics yet.
MIN_SAMPLES = 5


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """Weights of the placement score (each term is in [0, 1] before weighting)."""

    free_capacity: float = 0.4
    success_rate: float = 0.2
    preferred_runner: float = 0.3
    region: float = 0.1
    affinity: float = 0.1
    accept_latency: float = 0.1
    efficiency: float = 0.1


@dataclass(frozen=True, slots=True)
class Scored:
    """A feasible runner and its score."""

    runner_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Placement:
    """The outcome of placing one job.

    ``waiting_for_preferred`` is set when a preferred runner is only busy and the job may still
    wait for it (``routing_hints.preferred_wait_s``) instead of spilling over.
    """

    runner_id: str | None
    ranked: list[Scored] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)
    waiting_for_preferred: bool = False

    def reasons(self) -> Counter[str]:
        """How many runners each constraint rejected."""
        return Counter({k: len(v) for k, v in self.rejected.items()})


def runner_labels(runner: RunnerRecord) -> dict[str, str]:
    """Labels and metadata of a runner, plus ``region``/``zone`` from its location."""
    reg = runner.registration
    merged = dict(reg.metadata)
    merged.update(reg.labels)
    if reg.location.region:
        merged.setdefault("region", reg.location.region)
    if reg.location.zone:
        merged.setdefault("zone", reg.location.zone)
    return merged


def _capabilities(runner: RunnerRecord) -> set[str]:
    caps = runner.registration.capabilities
    return {*caps.languages, *caps.frameworks, *caps.job_types, *caps.custom}


def _measured(runner: RunnerRecord) -> bool:
    stats = runner.stats
    return stats.jobs_completed + stats.jobs_failed >= MIN_SAMPLES


def failing_constraints(
    job: JobSubmission,
    runner: RunnerRecord,
    *,
    now_ms: int,
    lost_after_ms: int | None = None,
    advanced: bool = True,
    first_only: bool = False,
) -> list[str]:
    """Every hard constraint ``runner`` fails for ``job`` (reason codes in ``CONSTRAINTS`` order).

    ``lost_after_ms``, when given, also treats a runner whose recorded heartbeat is older as
    offline (the dispatcher leaves liveness to the supervisor and passes ``None``). Without
    ``advanced`` placement, affinity rules and QoS filters do not apply (integration modes).
    """
    failing = _failing(job, runner, now_ms=now_ms, lost_after_ms=lost_after_ms, advanced=advanced)
    if not first_only:
        return list(failing)
    first = next(failing, None)
    return [] if first is None else [first]


def _failing(
    job: JobSubmission,
    runner: RunnerRecord,
    *,
    now_ms: int,
    lost_after_ms: int | None,
    advanced: bool,
) -> Iterator[str]:
    """The failed constraints in ``CONSTRAINTS`` order, lazily: the first one checks least."""
    silent = lost_after_ms is not None and now_ms - runner.last_heartbeat_at_ms > lost_after_ms
    if runner.state == RunnerState.OFFLINE or silent:
        yield "offline"
    if runner.drain_requested or runner.state == RunnerState.DRAINING:
        yield "draining"
    yield from _unfit(job, runner)
    labels = runner_labels(runner)
    if any(labels.get(k) != v for k, v in job.labels.items()):
        yield "labels"
    if advanced and job.routing_hints is not None and job.routing_hints.affinity_rules:
        yield from _affinity_failures(job.routing_hints.affinity_rules, labels)
    if advanced and job.qos_requirements is not None:
        yield from _qos_failures(job.qos_requirements, runner, labels)
    if len(runner.assigned_jobs) >= runner.registration.max_concurrent_jobs:
        yield "capacity"


def _unfit(job: JobSubmission, runner: RunnerRecord) -> Iterator[str]:
    """``excluded`` to ``gpu``: what the job names or needs that the runner is not or lacks."""
    reg = runner.registration
    hints = job.routing_hints
    if hints is not None and reg.runner_id in hints.excluded_runners:
        yield "excluded"
    if job.job_type not in reg.capabilities.job_types:
        yield "job_type"
    needed = job.requirements.required_capabilities
    if needed and not set(needed) <= _capabilities(runner):
        yield "capabilities"
    req, res = job.requirements, reg.resources
    for code, wanted, offered in (
        ("cpu", req.cpu_cores, res.cpu_cores),
        ("memory", req.memory_mb, res.memory_mb),
        ("storage", req.storage_gb, res.storage_gb),
        ("gpu", req.gpu_count, res.gpu_count),
    ):
        if wanted > offered:
            yield code


def _affinity_failures(rules: Sequence[AffinityRule], labels: Mapping[str, str]) -> Iterator[str]:
    """A required rule the labels miss; a hard (unweighted) anti-affinity rule they hit."""
    for rule in rules:
        if rule.rule_type == "required" and labels.get(rule.key) not in rule.values:
            yield "affinity"
            break
    for rule in rules:
        if rule.rule_type == "anti_affinity" and rule.weight is None and _hits(rule, labels):
            yield "anti_affinity"
            break


def _hits(rule: AffinityRule, labels: Mapping[str, str]) -> bool:
    """Whether the labels have one of the rule's values (any value, when it lists none)."""
    have = labels.get(rule.key)
    return have in rule.values if rule.values else have is not None


def _qos_failures(
    qos: QosRequirements, runner: RunnerRecord, labels: Mapping[str, str]
) -> Iterator[str]:
    """The QoS filters; latency and reliability judge only a runner measured often enough."""
    stats = runner.stats
    if (
        qos.max_latency_ms is not None
        and _measured(runner)
        and stats.accept_latency_ms > qos.max_latency_ms
    ):
        yield "qos_latency"
    if (
        qos.reliability_threshold is not None
        and _measured(runner)
        and stats.success_rate < qos.reliability_threshold
    ):
        yield "qos_reliability"
    if qos.min_throughput_bytes_per_s is not None:
        declared = labels.get("network_bytes_per_s", "")
        if not (declared.isdigit() and int(declared) >= qos.min_throughput_bytes_per_s):
            yield "qos_throughput"


def check_runner(
    job: JobSubmission,
    runner: RunnerRecord,
    *,
    now_ms: int,
    lost_after_ms: int | None = None,
    advanced: bool = True,
) -> str | None:
    """The first hard constraint ``runner`` fails for ``job`` (a reason code), or ``None``."""
    failing = failing_constraints(
        job, runner, now_ms=now_ms, lost_after_ms=lost_after_ms, advanced=advanced, first_only=True
    )
    return failing[0] if failing else None


def _geo(job: JobSubmission, runner: RunnerRecord) -> float:
    """1 for the preferred zone, 0.7 for the preferred region, graded for preferred_regions."""
    loc = runner.registration.location
    hints = job.routing_hints
    if hints is not None and hints.geographic_preference:
        region, _, zone = hints.geographic_preference.partition("/")
        if loc.region == region:
            return 1.0 if not zone or loc.zone == zone else 0.7
    regions = job.requirements.preferred_regions
    if loc.region in regions:
        return 0.7 * (1.0 - regions.index(loc.region) / len(regions))
    return 0.0


def score_runner(
    job: JobSubmission, runner: RunnerRecord, weights: ScoreWeights, *, advanced: bool = True
) -> float:
    """Higher is better; see docs/scheduling.md for the terms.

    Without ``advanced`` placement the score is the free-capacity fraction alone (least loaded).
    """
    reg = runner.registration
    capacity = reg.max_concurrent_jobs
    free = (capacity - len(runner.assigned_jobs)) / capacity
    if not advanced:
        return free
    stats = runner.stats
    score = weights.free_capacity * free + weights.success_rate * stats.success_rate
    score -= weights.success_rate * min(stats.recent_failures, 5) / 10
    score += weights.accept_latency / (1.0 + stats.accept_latency_ms / 100.0)
    hints = job.routing_hints
    if hints is not None and reg.runner_id in hints.preferred_runners:
        score += weights.preferred_runner
    score += weights.region * _geo(job, runner)
    if hints is not None:
        labels = runner_labels(runner)
        for rule in hints.affinity_rules:
            have = labels.get(rule.key)
            weight = (rule.weight if rule.weight is not None else 1.0) * weights.affinity
            hit = have in rule.values
            if rule.rule_type == "anti_affinity" and not rule.values:
                hit = have is not None  # like the hard rule: "has the key at all"
            if rule.rule_type == "preferred" and hit:
                score += weight
            elif rule.rule_type == "anti_affinity" and rule.weight is not None and hit:
                score -= weight
    targets = job.performance_targets
    if targets is not None and targets.resource_efficiency_target:
        res, req = reg.resources, job.requirements
        shares = [
            req.cpu_cores / res.cpu_cores if res.cpu_cores else 0.0,
            req.memory_mb / res.memory_mb if res.memory_mb else 0.0,
        ]
        # a runner the job fills well (little left idle) scores higher: bin packing
        score += weights.efficiency * targets.resource_efficiency_target * (sum(shares) / 2)
    return score


def place(
    job: JobSubmission,
    runners: Iterable[RunnerRecord],
    *,
    now_ms: int,
    lost_after_ms: int | None = None,
    weights: ScoreWeights | None = None,
    advanced: bool = True,
    queued_for_ms: int = 0,
) -> Placement:
    """Pick the best feasible runner for ``job`` (ties go to the lexically smallest id).

    A feasible preferred runner always wins (the best-scoring one) unless
    ``weights.preferred_runner`` is 0; ``ranked`` lists the winner first. Preferred runners that
    are only busy make the job wait for them while it has been queued for less than
    ``routing_hints.preferred_wait_s``; after that it spills over to the best other one.
    """
    weights = weights or ScoreWeights()
    rejected: dict[str, list[str]] = {}
    ranked: list[Scored] = []
    for runner in runners:
        reason = check_runner(
            job, runner, now_ms=now_ms, lost_after_ms=lost_after_ms, advanced=advanced
        )
        if reason is not None:
            rejected.setdefault(reason, []).append(runner.registration.runner_id)
            continue
        ranked.append(
            Scored(
                runner.registration.runner_id, score_runner(job, runner, weights, advanced=advanced)
            )
        )
    ranked.sort(key=lambda s: (-s.score, s.runner_id))
    hints = job.routing_hints
    if advanced and hints is not None and hints.preferred_runners and weights.preferred_runner > 0:
        # preferred runners go first (the score bonus alone could lose to e.g. free capacity)
        preferred = set(hints.preferred_runners)
        ranked.sort(key=lambda s: s.runner_id not in preferred)  # stable: by score within
    if advanced and hints is not None and hints.preferred_runners and hints.preferred_wait_s > 0:
        preferred = set(hints.preferred_runners)
        chosen_preferred = bool(ranked) and ranked[0].runner_id in preferred
        busy_preferred = preferred & set(rejected.get("capacity", ()))
        if (
            not chosen_preferred
            and busy_preferred
            and queued_for_ms < hints.preferred_wait_s * 1000
        ):
            return Placement(None, ranked, rejected, waiting_for_preferred=True)
    return Placement(ranked[0].runner_id if ranked else None, ranked, rejected)
