"""Prometheus metrics; every collector is registered on a registry passed in, never the global one.

Names, help texts and labels come from :mod:`valkyrie.runtime.metric_catalogue` (one home, also
the source of the docs table). Counts that follow events (lost runners, retries, stale updates,
SLO breaches, fallbacks) are taken where the event is emitted (:meth:`HandlerMetrics.observe_event`
is every handler's :class:`~valkyrie.bus.events.EventPublisher` hook), so no handler counts twice
and a new emitter of the same event is counted without more code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from schemas import (
    HEALTH_STATUSES,
    OTHER,
    FallbackActivated,
    FallbackOverridden,
    FallbackRecovered,
    HealthSummary,
    JobRequeued,
    JobSloBreach,
    JobStaleUpdate,
    JobTargetMissed,
    RunnerLost,
    TypedEvent,
)
from valkyrie.config.live import LiveConfig
from valkyrie.config.model import IntegrationMode
from valkyrie.domain.health import component_statuses
from valkyrie.runtime.metric_catalogue import spec

__all__ = ["BoundedLabel", "HandlerMetrics", "HealthGauges", "ProcessGauges", "serve_metrics"]

_RANK = {status: n for n, status in enumerate(HEALTH_STATUSES)}
#: distinct job types the latency histograms keep apart (the rest is ``(other)``)
MAX_JOB_TYPES = 32


@dataclass
class BoundedLabel:
    """A label's values, at most ``limit`` distinct ones; later newcomers become ``(other)``.

    Job types, regions and tenants come from submitters and runners: a bound keeps a typo storm
    from turning into thousands of series.
    """

    limit: int
    seen: set[str] = field(default_factory=set)

    def __call__(self, value: str) -> str:
        """``value``, or ``(other)`` once ``limit`` other values were seen."""
        if value in self.seen:
            return value
        if len(self.seen) < self.limit:
            self.seen.add(value)
            return value
        return OTHER


_FALLBACK_ACTIONS: dict[type[TypedEvent], str] = {
    FallbackActivated: "activated",
    FallbackRecovered: "recovered",
    FallbackOverridden: "overridden",
}


@dataclass(frozen=True)
class HandlerMetrics:
    """What the handlers of one process count (one instance per registry)."""

    messages: Counter
    duration: Histogram
    in_flight: Gauge
    dead_letters: Counter
    jobs: Counter
    dispatch_latency: Histogram
    start_latency: Histogram
    runners_lost: Counter
    retries: Counter
    stale_updates: Counter
    slo_breaches: Counter
    fallbacks: Counter
    job_types: BoundedLabel

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HandlerMetrics:
        """Register the collectors on ``registry`` (once per registry)."""
        return cls(
            messages=spec("valkyrie_handler_messages").counter(registry),
            duration=spec("valkyrie_handler_duration_seconds").histogram(registry),
            in_flight=spec("valkyrie_handler_in_flight_messages").gauge(registry),
            dead_letters=spec("valkyrie_dead_letters").counter(registry),
            jobs=spec("valkyrie_jobs").counter(registry),
            dispatch_latency=spec("valkyrie_job_dispatch_latency_seconds").histogram(registry),
            start_latency=spec("valkyrie_job_start_latency_seconds").histogram(registry),
            runners_lost=spec("valkyrie_runners_lost").counter(registry),
            retries=spec("valkyrie_job_retries").counter(registry),
            stale_updates=spec("valkyrie_stale_updates").counter(registry),
            slo_breaches=spec("valkyrie_slo_breaches").counter(registry),
            fallbacks=spec("valkyrie_fallbacks").counter(registry),
            job_types=BoundedLabel(MAX_JOB_TYPES),
        )

    def observe_dispatch(self, job_type: str, waited_ms: int) -> None:
        """A job was dispatched ``waited_ms`` after it was queued."""
        seconds = max(waited_ms, 0) / 1000
        self.dispatch_latency.labels(self.job_types(job_type)).observe(seconds)

    def observe_start(self, job_type: str, after_dispatch_ms: int) -> None:
        """A job started ``after_dispatch_ms`` after its dispatch."""
        seconds = max(after_dispatch_ms, 0) / 1000
        self.start_latency.labels(self.job_types(job_type)).observe(seconds)

    def observe_event(self, source: str, event: TypedEvent) -> None:
        """Count ``event`` (emitted by handler ``source``) if it is one the catalogue counts."""
        if isinstance(event, JobRequeued):
            self.retries.labels(source).inc()
        elif isinstance(event, RunnerLost):
            self.runners_lost.inc()
        elif isinstance(event, JobStaleUpdate):
            self.stale_updates.inc()
        elif isinstance(event, JobSloBreach):
            self.slo_breaches.labels("dispatch_latency").inc()
        elif isinstance(event, JobTargetMissed):
            self.slo_breaches.labels("completion_time").inc()
        else:
            action = _FALLBACK_ACTIONS.get(type(event))
            if action is not None:
                self.fallbacks.labels(action).inc()


class ProcessGauges:
    """Facts about this process: its version, and the config revision and mode it runs."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        spec("valkyrie_build_info").gauge(registry).labels(version).set(1)
        self._revision = spec("valkyrie_config_revision").gauge(registry)
        self._mode = spec("valkyrie_mode").gauge(registry)

    def follow(self, live: LiveConfig) -> None:
        """Export ``live``'s revision and mode now and after every change."""
        self.export(live)
        live.on_change(lambda _old, _new: self.export(live))

    def export(self, live: LiveConfig) -> None:
        """Set the gauges from ``live``."""
        self._revision.set(live.revision)
        current = live.current.mode
        for mode in IntegrationMode:
            self._mode.labels(mode.value).set(1 if mode == current else 0)


class HealthGauges:
    """The monitor's gauges: status per component (and ``overall``), backlog per consumer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._status = spec("valkyrie_health_status").gauge(registry)
        self._pending = spec("valkyrie_consumer_pending").gauge(registry)

    def export(self, summary: HealthSummary) -> None:
        """Set the gauges from one evaluation."""
        for name, status in component_statuses(summary).items():
            self._status.labels(name).set(_RANK[status])
        self._status.labels("overall").set(_RANK[summary.status])
        for lag in summary.consumers:
            if lag.pending is not None:
                self._pending.labels(lag.durable).set(lag.pending)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve ``/metrics`` for ``registry`` on a daemon thread; return the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
