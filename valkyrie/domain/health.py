"""Health evaluation as pure functions: thresholds to statuses, the summary, fallback decisions.

Nothing here does I/O or reads a clock: the monitor handler and ``valkyrie status`` gather the
inputs (reports with the instant they arrived, consumer backlogs, runner states, the config) and
pass ``now_ms`` in, so every rule can be tested on its own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgspec

from schemas import (
    HEALTH_STATUSES,
    CheckResult,
    ComponentHealth,
    ConfigRevision,
    ConsumerLag,
    FallbackRecord,
    HealthReport,
    HealthStatus,
    HealthSummary,
    RunnerPool,
)
from valkyrie.config.model import HealthConfig, IntegrationMode

__all__ = [
    "AUTO_ACTOR",
    "CONSUMER_LAG_COMPONENT",
    "FORGET_AFTER_STALE",
    "RUNNER_POOL_COMPONENT",
    "FallbackAction",
    "RecordFate",
    "Seen",
    "Streak",
    "component_statuses",
    "decide_fallback",
    "evaluate_consumer",
    "instance_health",
    "is_automatic_fallback",
    "kv_latency_check",
    "last_mode_change",
    "reconcile_record",
    "restore_target",
    "runner_pool",
    "should_forget",
    "summarize",
    "threshold_status",
    "transitions",
    "worst",
]

#: ``requested_by`` of the config changes the monitor makes; how automatic fallbacks are recognised.
AUTO_ACTOR = "health-monitor"
#: Pseudo-component names under which consumer lag and the runner pool get transition events.
CONSUMER_LAG_COMPONENT = "consumer-lag"
RUNNER_POOL_COMPONENT = "runner-pool"
#: An instance silent for this many times ``stale_after_ms`` is forgotten: a process that died
#: without saying goodbye must not keep the installation unhealthy (and in fallback) forever.
FORGET_AFTER_STALE = 10

_RANK = {status: n for n, status in enumerate(HEALTH_STATUSES)}
_FALLBACK_FROM = frozenset({IntegrationMode.FULL.value, IntegrationMode.HYBRID.value})


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


def runner_pool(states: Iterable[str], min_active: int) -> RunnerPool:
    """Count runner states; fewer than ``min_active`` runners not offline is ``degraded``."""
    counts = {"active": 0, "busy": 0, "draining": 0, "offline": 0}
    total = 0
    for state in states:
        total += 1
        if state in counts:
            counts[state] += 1
    available = total - counts["offline"]
    return RunnerPool(
        total=total,
        available=available,
        min_active=min_active,
        active=counts["active"],
        busy=counts["busy"],
        draining=counts["draining"],
        offline=counts["offline"],
        status="degraded" if available < min_active else "healthy",
    )


@dataclass(frozen=True, slots=True)
class Seen:
    """A report and when it arrived, by the evaluator's clock (reporters' clocks may be skewed)."""

    report: HealthReport
    received_at_ms: int


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
        out.append(
            f"runner pool {pool.status}: {pool.available} available, minimum {pool.min_active}"
        )
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


@dataclass(frozen=True, slots=True)
class Streak:
    """How many consecutive evaluations were not healthy (``failing``) or healthy."""

    failing: int = 0
    healthy: int = 0

    def observe(self, status: HealthStatus) -> Streak:
        """The streak after one more evaluation with ``status``."""
        if status == "healthy":
            return Streak(failing=0, healthy=self.healthy + 1)
        return Streak(failing=self.failing + 1, healthy=0)


class FallbackAction(enum.StrEnum):
    """What the monitor should do with the integration mode after an evaluation."""

    NONE = "none"
    FALLBACK = "fallback"
    RECOVER = "recover"


def decide_fallback(
    streak: Streak,
    *,
    mode: str,
    auto_fallback: bool,
    automatic: bool,
    held: bool,
    health: HealthConfig,
) -> FallbackAction:
    """Whether to switch to fallback, switch back, or leave the mode alone.

    Args:
        streak: consecutive evaluations, including the one just made.
        mode: the integration mode in force.
        auto_fallback: ``features.auto_fallback``; off means the monitor never touches the mode.
        automatic: the mode in force is a fallback the monitor itself put in.
        held: an operator overrode an automatic fallback and the system has not been healthy
            since; until it is, falling back again would undo the operator's decision.
        health: ``failure_threshold`` and ``recovery_threshold``.
    """
    if not auto_fallback:
        return FallbackAction.NONE
    if mode in _FALLBACK_FROM and not held and streak.failing >= health.failure_threshold:
        return FallbackAction.FALLBACK
    if (
        mode == IntegrationMode.FALLBACK.value
        and automatic
        and streak.healthy >= health.recovery_threshold
    ):
        return FallbackAction.RECOVER
    return FallbackAction.NONE


def last_mode_change(history: Sequence[ConfigRevision]) -> ConfigRevision | None:
    """The newest revision that changed the mode (``None`` when none in ``history`` did)."""
    for revision in sorted(history, key=lambda r: r.revision, reverse=True):
        if "mode" in revision.diff:
            return revision
    return None


def is_automatic_fallback(
    mode: str, record: FallbackRecord | None, change: ConfigRevision | None
) -> bool:
    """Whether the fallback in force is one the monitor put in (and may therefore take back).

    Args:
        mode: the integration mode in force.
        record: the stats bucket's fallback record, if any.
        change: the newest revision that changed the mode (:func:`last_mode_change`); ``None``
            when the kept history has none, in which case only an active record vouches for it.
    """
    if mode != IntegrationMode.FALLBACK.value:
        return False
    if change is None:
        return record is not None and record.state == "active"
    new = change.diff.get("mode", {})
    return (
        change.changed_by == AUTO_ACTOR
        and isinstance(new, dict)
        and new.get("new") == IntegrationMode.FALLBACK.value
    )


class RecordFate(enum.StrEnum):
    """What to do with the stats bucket's fallback record after looking at the config."""

    KEEP = "keep"
    FORGET = "forget"
    OVERRIDDEN = "overridden"


def reconcile_record(
    record: FallbackRecord | None,
    *,
    mode: str,
    change: ConfigRevision | None,
    config_revision: int,
) -> RecordFate:
    """Keep an automatic-fallback record, forget it, or note that an operator overrode it.

    Args:
        record: the fallback record.
        mode: the integration mode this process runs.
        change: the newest revision that changed the mode.
        config_revision: the revision this process runs; a record from a newer revision is kept,
            since this process has not seen the fallback it describes yet.
    """
    if record is None or record.state != "active":
        return RecordFate.KEEP
    if record.config_revision > config_revision:
        return RecordFate.KEEP
    if is_automatic_fallback(mode, record, change):
        return RecordFate.KEEP
    if change is not None and change.changed_by != AUTO_ACTOR:
        return RecordFate.OVERRIDDEN
    return RecordFate.FORGET


def restore_target(
    record: FallbackRecord | None, change: ConfigRevision | None, base_mode: str
) -> tuple[str | None, str]:
    """What to set ``mode`` to on recovery: ``(runtime value, resulting mode)``.

    A runtime value of ``None`` removes the override, so every process returns to the mode of its
    own config; that is what "the previous mode" was when the mode was not overridden at run time.
    Without a record (it was never written, or lost), the fallback revision's diff tells.
    """
    if record is not None:
        if record.previous_override:
            return record.previous_mode, record.previous_mode
        return None, base_mode
    if change is not None:
        old = change.diff.get("mode", {})
        if isinstance(old, dict) and isinstance(old.get("old"), str):
            return old["old"], old["old"]
    return None, base_mode
