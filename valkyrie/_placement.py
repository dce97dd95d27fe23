"""Placement as pure logic: hard constraints filter runners, a documented score ranks the rest.

Every rejection carries a reason code so that "why is my job pending?" can be answered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from schemas import JobSubmission, RunnerRecord, RunnerState

__all__ = ["Placement", "ScoreWeights", "Scored", "check_runner", "place", "score_runner"]


@dataclass(frozen=True, slots=True)
class ScoreWeights:
    """Weights of the placement score (each term is in [0, 1])."""

    free_capacity: float = 0.4
    success_rate: float = 0.2
    preferred_runner: float = 0.3
    region: float = 0.1
    affinity: float = 0.1


@dataclass(frozen=True, slots=True)
class Scored:
    """A feasible runner and its score."""

    runner_id: str
    score: float


@dataclass(frozen=True, slots=True)
class Placement:
    """The outcome of placing one job."""

    runner_id: str | None
    ranked: list[Scored] = field(default_factory=list)
    rejected: dict[str, list[str]] = field(default_factory=dict)

    def reasons(self) -> Counter[str]:
        """How many runners each constraint rejected."""
        return Counter({k: len(v) for k, v in self.rejected.items()})


def _runner_labels(runner: RunnerRecord) -> dict[str, str]:
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


def check_runner(
    job: JobSubmission,
    runner: RunnerRecord,
    *,
    now_ms: int,
    lost_after_ms: int,
    advanced: bool = True,
) -> str | None:
    """The first hard constraint ``runner`` fails for ``job`` (a reason code), or ``None``."""
    reg = runner.registration
    if runner.state == RunnerState.OFFLINE or now_ms - runner.last_heartbeat_at_ms > lost_after_ms:
        return "offline"
    if runner.drain_requested or runner.state == RunnerState.DRAINING:
        return "draining"
    hints = job.routing_hints
    if hints is not None and reg.runner_id in hints.excluded_runners:
        return "excluded"
    if job.job_type not in reg.capabilities.job_types:
        return "job_type"
    needed = job.requirements.required_capabilities
    if needed and not set(needed) <= _capabilities(runner):
        return "capabilities"
    req, res = job.requirements, reg.resources
    if req.cpu_cores > res.cpu_cores:
        return "cpu"
    if req.memory_mb > res.memory_mb:
        return "memory"
    if req.storage_gb > res.storage_gb:
        return "storage"
    if req.gpu_count > res.gpu_count:
        return "gpu"
    labels = _runner_labels(runner)
    for key, value in job.labels.items():
        if labels.get(key) != value:
            return "labels"
    if hints is not None and advanced:
        for rule in hints.affinity_rules:
            have = labels.get(rule.key)
            if rule.rule_type == "required" and have not in rule.values:
                return "affinity"
            if (
                rule.rule_type == "anti_affinity"
                and rule.weight is None
                and (have in rule.values if rule.values else have is not None)
            ):
                return "anti_affinity"
    if len(runner.assigned_jobs) >= reg.max_concurrent_jobs:
        return "capacity"
    return None


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
    score = weights.free_capacity * free + weights.success_rate * runner.stats.success_rate
    hints = job.routing_hints
    if hints is not None and reg.runner_id in hints.preferred_runners:
        score += weights.preferred_runner
    regions = list(job.requirements.preferred_regions)
    if hints is not None and hints.geographic_preference:
        regions.insert(0, hints.geographic_preference)
    if regions and reg.location.region in regions:
        score += weights.region * (1.0 - regions.index(reg.location.region) / len(regions))
    if hints is not None:
        labels = _runner_labels(runner)
        for rule in hints.affinity_rules:
            have = labels.get(rule.key)
            weight = (rule.weight if rule.weight is not None else 1.0) * weights.affinity
            if rule.rule_type == "preferred" and have in rule.values:
                score += weight
            elif (
                rule.rule_type == "anti_affinity"
                and rule.weight is not None
                and have in rule.values
            ):
                score -= weight
    return score


def place(
    job: JobSubmission,
    runners: Iterable[RunnerRecord],
    *,
    now_ms: int,
    lost_after_ms: int,
    weights: ScoreWeights | None = None,
    advanced: bool = True,
) -> Placement:
    """Pick the best feasible runner for ``job`` (ties go to the lexically smallest id)."""
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
    return Placement(ranked[0].runner_id if ranked else None, ranked, rejected)
