"""Prometheus metrics; every collector is registered on a registry passed in, never the global one."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from schemas import HEALTH_STATUSES, HealthSummary
from valkyrie.domain.health import component_statuses

__all__ = ["HandlerMetrics", "HealthGauges", "serve_metrics"]

_RANK = {status: n for n, status in enumerate(HEALTH_STATUSES)}


@dataclass(frozen=True)
class HandlerMetrics:
    """What every handler counts (labels: ``handler``, and ``outcome`` where it applies)."""

    messages: Counter
    duration: Histogram
    in_flight: Gauge
    dead_letters: Counter
    jobs: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> HandlerMetrics:
        """Register the collectors on ``registry`` (once per registry)."""
        return cls(
            messages=Counter(
                "valkyrie_handler_messages",
                "Messages a handler settled, by outcome (ack, retry, dead, error).",
                ["handler", "outcome"],
                registry=registry,
            ),
            duration=Histogram(
                "valkyrie_handler_duration_seconds",
                "Time a handler spent on one message.",
                ["handler"],
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
                registry=registry,
            ),
            in_flight=Gauge(
                "valkyrie_handler_in_flight_messages",
                "Messages a handler is processing now.",
                ["handler"],
                registry=registry,
            ),
            dead_letters=Counter(
                "valkyrie_dead_letters",
                "Messages sent to the dead-letter stream.",
                ["handler"],
                registry=registry,
            ),
            jobs=Counter(
                "valkyrie_jobs",
                "Job lifecycle transitions recorded, by resulting state.",
                ["handler", "state"],
                registry=registry,
            ),
        )


class HealthGauges:
    """The monitor's gauges: status per component (and ``overall``), backlog per consumer."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._status = Gauge(
            "valkyrie_health_status",
            "Health per component as the monitor sees it: 0 healthy, 1 degraded, 2 unhealthy.",
            ["component"],
            registry=registry,
        )
        self._pending = Gauge(
            "valkyrie_consumer_pending",
            "Messages waiting for a durable consumer, as the monitor last measured them.",
            ["consumer"],
            registry=registry,
        )

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
