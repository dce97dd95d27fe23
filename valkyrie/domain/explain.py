"""Explaining placement as pure logic: which constraint rejected which runners, what would help.

The queue-side facts (position, boosts, backoff) come from the dispatcher; the runner-side facts
are recomputed here over every runner, so an explanation scans where placement samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from schemas import ConstraintGroup, JobDispatched, JobExplanation, JobRecord, RunnerRecord
from valkyrie.domain.scheduling.placement import CONSTRAINTS, failing_constraints, runner_labels

__all__ = ["QueueFacts", "explain_dispatched", "explain_queued"]

_WHAT = {
    "offline": "they are offline",
    "draining": "they are draining",
    "excluded": "routing_hints.excluded_runners names them",
    "job_type": "they do not take job type {job_type!r}",
    "capabilities": "they lack required capabilities {capabilities}",
    "cpu": "they have fewer than {cpu} CPU cores",
    "memory": "they have less than {memory} MB of memory",
    "storage": "they have less than {storage} GB of storage",
    "gpu": "they have fewer than {gpu} GPUs",
    "labels": "their labels do not match {labels}",
    "affinity": "they fail a required affinity rule",
    "anti_affinity": "an anti-affinity rule excludes them",
    "qos_latency": "their measured accept latency exceeds max_latency_ms={latency}",
    "qos_reliability": "their success rate is below reliability_threshold={reliability}",
    "qos_throughput": "they do not declare network_bytes_per_s >= {throughput}",
    "capacity": "every slot is taken",
}
_WITHOUT = {
    "job_type": "without the job type {job_type!r}",
    "capabilities": "without required capabilities {capabilities}",
    "cpu": "with cpu_cores <= their cores",
    "memory": "with less memory_mb",
    "storage": "with less storage_gb",
    "gpu": "with fewer GPUs",
    "labels": "without labels {labels}",
    "affinity": "without the required affinity rule",
    "anti_affinity": "without the anti-affinity rule",
    "excluded": "if they were not excluded",
    "qos_latency": "without qos_requirements.max_latency_ms",
    "qos_reliability": "without qos_requirements.reliability_threshold",
    "qos_throughput": "without qos_requirements.min_throughput_bytes_per_s",
    "draining": "once they are undrained",
    "offline": "once they come back online",
    "capacity": "as soon as a slot frees up",
}


@dataclass(frozen=True, slots=True)
class QueueFacts:
    """What the dispatcher knows about a queued job's place in line."""

    mode: str
    advanced: bool
    effective_priority: int | None
    position: int | None
    length: int | None
    boosted: bool = False
    waiting_for_preferred: bool = False
    avg_duration_ms: float | None = None


def _fill(template: str, record: JobRecord) -> str:
    spec = spec_ = record.spec
    qos = spec_.qos_requirements
    return template.format(
        job_type=spec.job_type,
        capabilities=list(spec.requirements.required_capabilities),
        cpu=spec.requirements.cpu_cores,
        memory=spec.requirements.memory_mb,
        storage=spec.requirements.storage_gb,
        gpu=spec.requirements.gpu_count,
        labels=dict(spec.labels),
        latency=qos.max_latency_ms if qos else None,
        reliability=qos.reliability_threshold if qos else None,
        throughput=qos.min_throughput_bytes_per_s if qos else None,
    )


def explain_queued(
    record: JobRecord,
    runners: Sequence[RunnerRecord],
    facts: QueueFacts,
    *,
    now_ms: int,
) -> JobExplanation:
    """Why ``record`` (queued) is not running yet, and what would make it placeable."""
    causes: list[str] = []
    spec = record.spec
    if facts.mode == "disabled":
        causes.append("mode_disabled")
    if record.not_before_at_ms is not None and record.not_before_at_ms > now_ms:
        causes.append("retry_backoff")
    if facts.waiting_for_preferred:
        causes.append("preferred_wait")
    groups: dict[str, list[str]] = {}
    single: Counter[str] = Counter()
    feasible: list[RunnerRecord] = []
    full: list[RunnerRecord] = []  # runners that only lack a free slot
    for runner in runners:
        failing = failing_constraints(spec, runner, now_ms=now_ms, advanced=facts.advanced)
        rid = runner.registration.runner_id
        if not failing:
            feasible.append(runner)
            continue
        groups.setdefault(failing[0], []).append(rid)
        if len(failing) == 1:
            single[failing[0]] += 1
        if failing == ["capacity"]:
            full.append(runner)
    if not runners:
        causes.append("no_runners")
    rejected = [
        ConstraintGroup(
            constraint=code,
            count=len(groups[code]),
            runners=sorted(groups[code])[:5],
            detail=_fill(_WHAT[code], record),
        )
        for code in CONSTRAINTS
        if code in groups
    ]
    for group in rejected:
        if group.constraint not in causes:
            causes.append(group.constraint)
    suggestions = [
        f"{count} runner(s) match {_fill(_WITHOUT[code], record)}"
        for code, count in sorted(single.items(), key=lambda kv: (-kv[1], kv[0]))
        if code != "capacity"
    ]
    if spec.labels and "labels" in groups:
        have = Counter(
            f"{k}={runner_labels(r).get(k)}"
            for r in runners
            for k in spec.labels
            if runner_labels(r).get(k)
        )
        if have:
            suggestions.append(
                "labels offered: " + ", ".join(f"{k} ({n})" for k, n in have.most_common(5))
            )
    if feasible:
        summary = f"{len(feasible)} runner(s) can take it; " + (
            "placement is paused (mode disabled)"
            if "mode_disabled" in causes
            else "it waits for a busy preferred runner (routing_hints.preferred_wait_s)"
            if "preferred_wait" in causes
            else "it is waiting its turn"
        )
    elif not runners:
        summary = "no runner is registered"
    else:
        summary = _headline(rejected)
    estimate = None
    if facts.position is not None and facts.avg_duration_ms and (feasible or full):
        if feasible:  # the jobs ahead fill the feasible slots, one round per average duration
            slots = sum(r.registration.max_concurrent_jobs for r in feasible)
            rounds = facts.position // slots
        else:  # every slot is taken: the first one frees after (about) one average duration
            slots = sum(r.registration.max_concurrent_jobs for r in full)
            rounds = facts.position // slots + 1
        estimate = now_ms + int(rounds * facts.avg_duration_ms)
    if feasible and "mode_disabled" not in causes:
        estimate = now_ms if estimate is None else estimate
    if estimate is not None and record.not_before_at_ms is not None:
        estimate = max(estimate, record.not_before_at_ms)  # not before its retry backoff ends
    if "mode_disabled" in causes:
        estimate = None  # nothing starts until the mode changes
    finish = (
        estimate + int(facts.avg_duration_ms)
        if estimate is not None and facts.avg_duration_ms
        else None
    )
    return JobExplanation(
        job_id=record.id,
        state=record.state.value,
        summary=summary,
        causes=causes,
        mode=facts.mode,
        effective_priority=facts.effective_priority,
        queue_position=facts.position,
        queue_length=facts.length,
        estimated_start_at_ms=estimate,
        predicted_finish_at_ms=finish,
        rejected=rejected,
        suggestions=suggestions,
    )


def _headline(rejected: list[ConstraintGroup]) -> str:
    """Why no runner can take the job, led by what keeps the most live runners away.

    Offline runners are checked first, so they would lead the groups; but what the job asks of
    the runners that are up is the news, so their largest group leads and offline ones follow.
    """
    live = [g for g in rejected if g.constraint != "offline"]
    offline = next((g for g in rejected if g.constraint == "offline"), None)
    top = max(live, key=lambda g: g.count) if live else offline  # max keeps the first of equals
    if top is None:
        return "no runner can take it"
    summary = f"no runner can take it: {top.count} runner(s) rejected because {top.detail}"
    if offline is not None and top is not offline:
        summary += f" ({offline.count} more offline)"
    return summary


def explain_dispatched(record: JobRecord, decision: JobDispatched | None) -> JobExplanation:
    """Why a placed job went to its runner: its score against the runners-up, from the decision."""
    winner = record.runner_id
    if decision is None:
        return JobExplanation(
            job_id=record.id, state=record.state.value, summary=f"placed on {winner}"
        )
    score = decision.score
    summary = f"placed on {winner}" + (f" with score {score}" if score is not None else "")
    if decision.preferred:
        summary += " (a preferred runner: those go first)"
    if decision.runners_up:
        summary += "; runners-up: " + ", ".join(
            f"{u.runner_id} ({u.score})" for u in decision.runners_up
        )
    rejected = [
        ConstraintGroup(
            constraint=code, count=int(n), detail=_WHAT.get(code, code).split("{")[0].strip()
        )
        for code, n in sorted(decision.rejected.items())
    ]
    return JobExplanation(
        job_id=record.id,
        state=record.state.value,
        summary=summary,
        placement=msgspec.to_builtins(decision.data()),
        rejected=rejected,
    )
