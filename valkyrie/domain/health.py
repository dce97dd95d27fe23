"""Health evaluation as pure functions: thresholds to statuses, the runner pool, the summary.

Nothing here does I/O or reads a clock: the monitor handler, ``valkyrie status`` and the gateway
gather the inputs (reports with the instant they arrived, consumer backlogs, runner states, the
config) and pass ``now_ms`` in, so every rule can be tested on its own. The automatic-fallback
rules are in :mod:`valkyrie.domain.fallback`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import msgspec

from schemas import (
    HEALTH_CHANGED,
    HEALTH_STATUSES,
    CheckResult,
    ComponentHealth,
    ConsumerLag,
    FallbackRecord,
    HealthChanged,
    HealthReport,
    HealthStatus,
    HealthSummary,
    RunnerPool,
)
from valkyrie.config.model import HealthConfig

__all__ = [
    "AVAILABLE_RUNNER_STATES",
    "CONSUMER_LAG_COMPONENT",
    "FORGET_AFTER_STALE",
    "RUNNER_POOL_COMPONENT",
    "Seen",
    "component_statuses",
    "config_handler_alive",
    "evaluate_consumer",
    "health_changes",
    "instance_health",
    "kv_latency_check",
    "note_report",
    "pool_status",
    "runner_pool",
    "runner_pool_detail",
    "should_forget",
    "summarize",
    "threshold_status",
    "transition_details",
    "transitions",
    "worst",
]

#: Pseudo-component names under which consumer lag and the runner pool get transition events.
CONSUMER_LAG_COMPONENT = "consumer-lag"
RUNNER_POOL_COMPONENT = "runner-pool"
#: An instance silent for this many times ``stale_after_ms`` is forgotten: a process that died
#: without saying goodbye must not keep the installation unhealthy (and in fallback) forever.
FORGET_AFTER_STALE = 10
#: The runner states that count as available: taking work (``active``) or doing it (``busy``).
#: A draining runner is leaving and takes nothing new; an offline one is gone.
AVAILABLE_RUNNER_STATES = frozenset({"active", "busy"})

_RANK = {status: n for n, status in enumerate(HEALTH_STATUSES)}


def worst(statuses: Iterable[HealthStatus]) -> HealthStatus:
    """The worst of ``statuses`` (``healthy`` when there are none)."""
    return max(statuses, key=_RANK.__getitem__, default="healthy")


def threshold_status(value: float, degraded: float, unhealthy: float) -> HealthStatus:
    """``unhealthy`` at or above ``unhealthy``, else ``degraded`` at or above ``degraded``."""
    if value >= unhealthy:
        return "unhealthy"
    if value >= degraded:
        return "degraded"
    return "healthy"


def kv_latency_check(
    latency_ms: float | None, health: HealthConfig, error: str = ""
) -> CheckResult:
    """The ``kv_latency_ms`` check: one KV read's time against the configured thresholds.

    ``None`` means the read failed or did not answer in time (``error`` says which).
    """
    if latency_ms is None:
        return CheckResult(status="unhealthy", detail=error or "no answer")
    status = threshold_status(
        latency_ms, health.kv_latency_degraded_ms, health.kv_latency_unhealthy_ms
    )
    detail = ""
    if status != "healthy":
        limit = (
            health.kv_latency_unhealthy_ms
            if status == "unhealthy"
            else health.kv_latency_degraded_ms
        )
        detail = f"config KV read took {latency_ms:.1f} ms (>= {limit:g} ms)"
    return CheckResult(status=status, value=round(latency_ms, 3), detail=detail)


def evaluate_consumer(lag: ConsumerLag, health: HealthConfig) -> ConsumerLag:
    """``lag`` with its status from the consumer-lag thresholds (unmeasured counts as healthy).

    An unmeasured backlog is no evidence of a problem: a consumer that does not exist on the
    events stream, say, simply has no dispatcher yet, which the components' reports show.
    """
    if lag.pending is None:
        return msgspec.structs.replace(lag, status="healthy")
    status = threshold_status(
        lag.pending, health.consumer_lag_degraded, health.consumer_lag_unhealthy
    )
    detail = lag.detail
    if status != "healthy":
        limit = (
            health.consumer_lag_unhealthy if status == "unhealthy" else health.consumer_lag_degraded
        )
        why = f"{lag.pending} pending (>= {limit})"
        detail = f"{why}; {detail}" if detail else why
    return msgspec.structs.replace(lag, status=status, detail=detail)


def pool_status(available: int, min_active: int) -> HealthStatus:
    """The runner pool's status from its available runners and ``health.min_active_runners``.

    ``min_active`` 0 switches the check off. Otherwise no available runner at all is
    ``unhealthy`` (no job can run), fewer than ``min_active`` is ``degraded``.
    """
    if available >= min_active:
        return "healthy"
    return "unhealthy" if available == 0 else "degraded"


def runner_pool(states: Iterable[str], min_active: int) -> RunnerPool:
    """Count runner states and judge the pool.

    This is the one rule the monitor, ``valkyrie status`` and the gateway's
    ``/api/v2/performance/health`` apply. Available are the runners in :data:`AVAILABLE_RUNNER_STATES` (a busy runner is alive and
    working: a fully loaded pool is not an unhealthy one; the queue shows the load); the status
    is :func:`pool_status`.
    """
    counts = {"active": 0, "busy": 0, "draining": 0, "offline": 0}
    total = available = 0
    for state in states:
        total += 1
        if state in counts:
            counts[state] += 1
        if state in AVAILABLE_RUNNER_STATES:
            available += 1
    return RunnerPool(
        total=total,
        available=available,
        min_active=min_active,
        active=counts["active"],
        busy=counts["busy"],
        draining=counts["draining"],
        offline=counts["offline"],
        status=pool_status(available, min_active),
    )


def runner_pool_detail(pool: RunnerPool) -> str:
    """The pool in words, as reasons, events and the gateway's check say it."""
    away = [f"{n} {state}" for n, state in ((pool.draining, "draining"), (pool.offline, "offline"))]
    shown = [text for text in away if not text.startswith("0 ")]
    extra = f" ({', '.join(shown)})" if shown else ""
    return f"{pool.available} available of {pool.total}{extra}, minimum {pool.min_active}"


@dataclass(frozen=True, slots=True)
class Seen:
    """A report and when it arrived, by the evaluator's clock (reporters' clocks may be skewed)."""

    report: HealthReport
    received_at_ms: int


def note_report(seen: MutableMapping[str, Seen], report: HealthReport, received_at_ms: int) -> None:
    """Fold a report into the latest report per instance (``seen``, by instance id).

    A goodbye (``stopping``) forgets the instance at once; a report older than the one held (they
    can overtake each other) is ignored.
    """
    if report.stopping:
        seen.pop(report.instance, None)
        return
    known = seen.get(report.instance)
    if known is not None and known.report.at_ms > report.at_ms:
        return
    seen[report.instance] = Seen(report, received_at_ms)


def config_handler_alive(seen: Mapping[str, Seen], now_ms: int, health: HealthConfig) -> bool:
    """Whether an instance running the ``config`` handler reports (so a mode change is taken)."""
    return any(
        "config" in s.report.handlers and now_ms - s.received_at_ms <= health.stale_after_ms
        for s in seen.values()
    )


def should_forget(seen: Seen, now_ms: int, health: HealthConfig) -> bool:
    """Whether to drop an instance: it said goodbye, or it has been silent for very long."""
    if seen.report.stopping:
        return True
    return now_ms - seen.received_at_ms > FORGET_AFTER_STALE * health.stale_after_ms


def instance_health(
    seen: Seen,
    now_ms: int,
    health: HealthConfig,
    *,
    config_revision: int,
    revision_settled: bool,
) -> ComponentHealth:
    """The verdict on one instance: its own checks, liveness, and whether it runs the current config.

    Args:
        seen: the instance's latest report.
        now_ms: the evaluator's clock.
        health: thresholds.
        config_revision: the revision the evaluator runs.
        revision_settled: whether every process should have applied ``config_revision`` by now
            (it was applied long enough ago); until then an older revision is not held against it.
    """
    report = seen.report
    age = max(0, now_ms - seen.received_at_ms)
    failing = {name: c for name, c in report.checks.items() if c.status != "healthy"}
    if age > health.stale_after_ms:
        failing["liveness"] = CheckResult(
            status="unhealthy",
            value=float(age),
            detail=f"stalled: no report for {age / 1000:.1f}s (stale after {health.stale_after_ms} ms)",
        )
    if revision_settled and report.config_revision < config_revision:
        failing["config_revision"] = CheckResult(
            status="degraded",
            value=float(report.config_revision),
            detail=f"runs config revision {report.config_revision}, current is {config_revision}",
        )
    status = worst([report.status, *(c.status for c in failing.values())])
    return ComponentHealth(
        component=report.component,
        instance=report.instance,
        status=status,
        config_revision=report.config_revision,
        last_report_at_ms=seen.received_at_ms,
        age_ms=age,
        failing=failing,
        host=report.host,
        pid=report.pid,
    )


def _reasons(
    components: Sequence[ComponentHealth], consumers: Sequence[ConsumerLag], pool: RunnerPool
) -> list[str]:
    out: list[str] = []
    for c in components:
        if c.status == "healthy":
            continue
        details = [f"{name}: {check.detail or check.status}" for name, check in c.failing.items()]
        out.append(f"{c.component} ({c.instance}) {c.status}: " + ("; ".join(details) or "-"))
    for lag in consumers:
        if lag.status != "healthy":
            out.append(f"consumer {lag.durable} {lag.status}: {lag.detail}")
    if pool.status != "healthy":
        out.append(f"runner pool {pool.status}: {runner_pool_detail(pool)}")
    return out


def summarize(
    seen: Mapping[str, Seen],
    *,
    now_ms: int,
    health: HealthConfig,
    mode: str,
    config_revision: int,
    revision_settled: bool,
    consumers: Sequence[ConsumerLag],
    pool: RunnerPool,
    monitor: str = "",
    fallback: FallbackRecord | None = None,
) -> HealthSummary:
    """Fold every input into one summary; its status is the worst of all of them.

    ``seen`` maps instance ids to their latest report; forgotten instances must already be gone.
    ``consumers`` are raw measurements (their status is derived here).
    """
    components = sorted(
        (
            instance_health(
                s,
                now_ms,
                health,
                config_revision=config_revision,
                revision_settled=revision_settled,
            )
            for s in seen.values()
        ),
        key=lambda c: (c.component, c.instance),
    )
    lags = [evaluate_consumer(lag, health) for lag in consumers]
    status = worst([*(c.status for c in components), *(lag.status for lag in lags), pool.status])
    return HealthSummary(
        status=status,
        at_ms=now_ms,
        mode=mode,
        config_revision=config_revision,
        components=components,
        consumers=lags,
        runner_pool=pool,
        reasons=_reasons(components, lags, pool),
        monitor=monitor,
        report_interval_ms=health.report_interval_ms,
        stale_after_ms=health.stale_after_ms,
        fallback=fallback,
    )


def component_statuses(summary: HealthSummary) -> dict[str, HealthStatus]:
    """Status per component name (worst of its instances), plus consumer lag and the runner pool."""
    out: dict[str, HealthStatus] = {}
    for c in summary.components:
        out[c.component] = worst([out.get(c.component, "healthy"), c.status])
    out[CONSUMER_LAG_COMPONENT] = worst(lag.status for lag in summary.consumers)
    out[RUNNER_POOL_COMPONENT] = summary.runner_pool.status
    return out


def transitions(
    previous: Mapping[str, HealthStatus], current: Mapping[str, HealthStatus]
) -> list[tuple[str, HealthStatus, HealthStatus]]:
    """``(component, old, new)`` for every component whose status changed, sorted by name.

    A component seen for the first time counts as coming from ``healthy``; one that is gone (it
    said goodbye or was forgotten) has no transition of its own.
    """
    out: list[tuple[str, HealthStatus, HealthStatus]] = []
    for name in sorted(current):
        old = previous.get(name, "healthy")
        if current[name] != old:
            out.append((name, old, current[name]))
    return out


def transition_details(summary: HealthSummary, component: str) -> list[str]:
    """What a component's transition event says about it (``details``): what is not healthy."""
    if component == CONSUMER_LAG_COMPONENT:
        return [f"{c.durable}: {c.detail}" for c in summary.consumers if c.status != "healthy"]
    if component == RUNNER_POOL_COMPONENT:
        return [runner_pool_detail(summary.runner_pool)]
    return [
        f"{c.instance} {name}: {check.detail or check.status}"
        for c in summary.components
        if c.component == component
        for name, check in c.failing.items()
    ]


def health_changes(
    previous: HealthSummary | None, summary: HealthSummary, *, summary_revision: int
) -> list[HealthChanged]:
    """The events announcing every status change since ``previous``: components first, overall last.

    ``summary_revision`` is the stats-bucket write that recorded ``summary`` (it makes each event's
    id, so a monitor repeating its announcement is de-duplicated).
    """
    before = component_statuses(previous) if previous is not None else {}
    events = [
        HEALTH_CHANGED[new](
            subject_id=name,
            from_=old,
            to=new,
            details=transition_details(summary, name),
            mode=summary.mode,
            config_revision=summary.config_revision,
            summary_revision=summary_revision,
        )
        for name, old, new in transitions(before, component_statuses(summary))
    ]
    old_overall: HealthStatus = previous.status if previous is not None else "healthy"
    if summary.status != old_overall:
        events.append(
            HEALTH_CHANGED[summary.status](
                subject_id="overall",
                from_=old_overall,
                to=summary.status,
                reasons=summary.reasons,
                mode=summary.mode,
                config_revision=summary.config_revision,
                summary_revision=summary_revision,
            )
        )
    return events
