"""Explaining placement as pure logic: which constraint rejected which runners, what would help.

The queue-side facts (position, boosts, backoff) come from the dispatcher; the runner-side facts
are recomputed here over every runner, so an explanation scans where placement samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from schemas import (
    ConstraintGroup,
    JobDispatched,
    JobExplanation,
    JobRecord,
    JobSubmission,
    RunnerRecord,
)
from valkyrie.domain.scheduling.placement import (
    CONSTRAINTS,
    Placement,
    failing_constraints,
    runner_labels,
)

__all__ = ["QueueFacts", "explain_dispatched", "explain_queued", "pending_reason"]

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


#: rejections for what a runner is doing now, not for what the job asks
_TRANSIENT = frozenset({"capacity", "offline", "draining"})


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


@dataclass
class _Survey:
    """Where every runner stands for one job."""

    #: runner ids by the first constraint that rejects them
    groups: dict[str, list[str]] = field(default_factory=dict)
    #: how many runners each constraint alone rejects (lifting it would make them match)
    single: Counter[str] = field(default_factory=Counter)
    feasible: list[RunnerRecord] = field(default_factory=list)
    #: runners that only lack a free slot
    full: list[RunnerRecord] = field(default_factory=list)


def _survey(
    spec: JobSubmission, runners: Sequence[RunnerRecord], *, now_ms: int, advanced: bool
) -> _Survey:
    survey = _Survey()
    for runner in runners:
        failing = failing_constraints(spec, runner, now_ms=now_ms, advanced=advanced)
        if not failing:
            survey.feasible.append(runner)
            continue
        survey.groups.setdefault(failing[0], []).append(runner.registration.runner_id)
        if len(failing) == 1:
            survey.single[failing[0]] += 1
        if failing == ["capacity"]:
            survey.full.append(runner)
    return survey


def _queue_causes(record: JobRecord, facts: QueueFacts, *, now_ms: int) -> list[str]:
    """What holds the job back on the queue's side, whatever the runners."""
    causes = []
    if facts.mode == "disabled":
        causes.append("mode_disabled")
    if record.not_before_at_ms is not None and record.not_before_at_ms > now_ms:
        causes.append("retry_backoff")
    if facts.waiting_for_preferred:
        causes.append("preferred_wait")
    return causes


def _suggestions(record: JobRecord, runners: Sequence[RunnerRecord], survey: _Survey) -> list[str]:
    suggestions = [
        f"{count} runner(s) match {_fill(_WITHOUT[code], record)}"
        for code, count in sorted(survey.single.items(), key=lambda kv: (-kv[1], kv[0]))
        if code != "capacity"
    ]
    wanted = record.spec.labels
    if wanted and "labels" in survey.groups:
        have = Counter(
            f"{k}={runner_labels(r).get(k)}"
            for r in runners
            for k in wanted
            if runner_labels(r).get(k)
        )
        if have:
            suggestions.append(
                "labels offered: " + ", ".join(f"{k} ({n})" for k, n in have.most_common(5))
            )
    return suggestions


def _summary(
    survey: _Survey,
    runners: Sequence[RunnerRecord],
    causes: list[str],
    rejected: list[ConstraintGroup],
) -> str:
    if survey.feasible:
        if "mode_disabled" in causes:
            why = "placement is paused (mode disabled)"
        elif "preferred_wait" in causes:
            why = "it waits for a busy preferred runner (routing_hints.preferred_wait_s)"
        else:
            why = "it is waiting its turn"
        return f"{len(survey.feasible)} runner(s) can take it; {why}"
    if not runners:
        return "no runner is registered"
    return _headline(rejected)


def _estimated_start(
    record: JobRecord, facts: QueueFacts, survey: _Survey, causes: list[str], *, now_ms: int
) -> int | None:
    if "mode_disabled" in causes:
        return None  # nothing starts until the mode changes
    estimate = None
    if facts.position is not None and facts.avg_duration_ms and (survey.feasible or survey.full):
        if (
            survey.feasible
        ):  # the jobs ahead fill the feasible slots, one round per average duration
            slots = sum(r.registration.max_concurrent_jobs for r in survey.feasible)
            rounds = facts.position // slots
        else:  # every slot is taken: the first one frees after (about) one average duration
            slots = sum(r.registration.max_concurrent_jobs for r in survey.full)
            rounds = facts.position // slots + 1
        estimate = now_ms + int(rounds * facts.avg_duration_ms)
    elif survey.feasible:
        estimate = now_ms
    if estimate is not None and record.not_before_at_ms is not None:
        estimate = max(estimate, record.not_before_at_ms)  # not before its retry backoff ends
    return estimate


def explain_queued(
    record: JobRecord,
    runners: Sequence[RunnerRecord],
    facts: QueueFacts,
    *,
    now_ms: int,
) -> JobExplanation:
    """Why ``record`` (queued) is not running yet, and what would make it placeable."""
    causes = _queue_causes(record, facts, now_ms=now_ms)
    survey = _survey(record.spec, runners, now_ms=now_ms, advanced=facts.advanced)
    if not runners:
        causes.append("no_runners")
    rejected = [
        ConstraintGroup(
            constraint=code,
            count=len(survey.groups[code]),
            runners=sorted(survey.groups[code])[:5],
            detail=_fill(_WHAT[code], record),
        )
        for code in CONSTRAINTS
        if code in survey.groups
    ]
    for group in rejected:
        if group.constraint not in causes:
            causes.append(group.constraint)
    estimate = _estimated_start(record, facts, survey, causes, now_ms=now_ms)
    finish = (
        estimate + int(facts.avg_duration_ms)
        if estimate is not None and facts.avg_duration_ms
        else None
    )
    return JobExplanation(
        job_id=record.id,
        state=record.state.value,
        summary=_summary(survey, runners, causes, rejected),
        causes=causes,
        mode=facts.mode,
        effective_priority=facts.effective_priority,
        queue_position=facts.position,
        queue_length=facts.length,
        estimated_start_at_ms=estimate,
        predicted_finish_at_ms=finish,
        rejected=rejected,
        suggestions=_suggestions(record, runners, survey),
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


def pending_reason(
    record: JobRecord,
    last: Placement | None,
    *,
    mode: str,
    now_ms: int,
    has_free: bool,
) -> str:
    """A one-line reason a queued job still waits, from what its dispatcher already knows.

    ``last`` is the dispatcher's last placement attempt for the job (it looks at a sample of the
    runners with a free slot; while none is free it keeps the previous one) and ``has_free``
    whether any runner of its job type has a free slot now. Cheap enough for every row of a queue listing; :func:`explain_queued` scans every
    runner for the full answer.
    """
    spec = record.spec
    if mode == "disabled":
        return "placement is paused (mode disabled)"
    if record.not_before_at_ms is not None and record.not_before_at_ms > now_ms:
        return f"retry backoff: placed again in {(record.not_before_at_ms - now_ms) / 1000:.1f}s"
    if last is not None and last.waiting_for_preferred:
        return "it waits for a busy preferred runner (routing_hints.preferred_wait_s)"
    if last is not None and last.runner_id is None and last.rejected:
        reasons = last.reasons()
        # a rejection for what the job asks (labels, resources...) stays true while runners are
        # busy; one for what runners are doing right now says less than "no free slot"
        if has_free or not set(reasons) <= _TRANSIENT:
            # the first constraint in checking order, as the full explanation's summary names it
            code = next((c for c in CONSTRAINTS if c in reasons), reasons.most_common(1)[0][0])
            detail = _fill(_WHAT.get(code, code), record)
            return f"no runner can take it: {reasons[code]} runner(s) rejected because {detail}"
    if not has_free and not (spec.routing_hints and spec.routing_hints.preferred_runners):
        return f"no runner that takes job type {spec.job_type!r} has a free slot"
    return "it is waiting its turn"
