"""Every metric Valkyrie exports, defined once: name, type, labels, help, who exports it.

The collectors are built from these specs (:meth:`MetricSpec.create`), and the table in
docs/observability.md is generated from them (``python -m valkyrie.runtime.metric_catalogue
--write``; ``tests/test_metric_catalogue.py`` fails when it drifts), so the code, the table, the
dashboard and the alert rules cannot name different metrics.

**Who exports what, and why a ``sum`` counts each thing once.** Prometheus scrapes every process;
``sum by (...)`` over instances must not count one job or runner twice:

* ``work``: counters and gauges of the work a process did itself (messages it settled, jobs it
  dispatched, runners its supervisor declared lost). JetStream gives each message to one process
  and each decision is a compare-and-set that one process wins, so the processes' figures add up.
* ``held``: a dispatcher's queue gauges cover only the queued jobs that dispatcher holds; a queued
  job is held by exactly one dispatcher (its ``job.queued`` message is delivered to one), so the
  sum over dispatchers counts each queued job once. Jobs not yet delivered to any dispatcher are
  the ``dispatcher`` consumer's backlog (``valkyrie_consumer_pending``).
* ``shared``: figures of shared state (the runners bucket, the health summary, consumer backlogs)
  exported by every monitor alike: aggregate them with ``max``, never ``sum``.
* ``process``: a fact about the process itself (its version, the config revision it applied):
  compare across instances (``min``/``max``), do not add.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from valkyrie._docgen import generated_doc_main, replace_region

__all__ = [
    "CATALOGUE",
    "LATENCY_BUCKETS",
    "MetricSpec",
    "exposed_names",
    "main",
    "render_table",
    "spec",
]

Kind = Literal["counter", "gauge", "histogram"]
Sums = Literal["work", "held", "shared", "process"]

#: seconds; from sub-millisecond direct placement to jobs that wait for hours
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
    3600,
)
_HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its base name (counters get ``_total`` when exposed), help and labels.

    Attributes:
        name: ``valkyrie_<noun>[_<unit>]``, without the ``_total`` a counter is exposed with.
        kind: counter, gauge or histogram.
        help: the HELP text.
        labels: label names, in order.
        exporter: which process exports it (for the docs table).
        sums: how instances add up (see the module's docstring).
        buckets: a histogram's buckets.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...]
    exporter: str
    sums: Sums
    buckets: tuple[float, ...] = ()

    @property
    def exposed(self) -> str:
        """The name in the scrape (``_total`` added to counters)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name

    def create(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        """Register this metric's collector on ``registry`` (once per registry)."""
        if self.kind == "counter":
            return Counter(self.name, self.help, self.labels, registry=registry)
        if self.kind == "gauge":
            return Gauge(self.name, self.help, self.labels, registry=registry)
        return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=registry)

    def counter(self, registry: CollectorRegistry) -> Counter:
        """:meth:`create` for a counter."""
        made = self.create(registry)
        assert isinstance(made, Counter)
        return made

    def gauge(self, registry: CollectorRegistry) -> Gauge:
        """:meth:`create` for a gauge."""
        made = self.create(registry)
        assert isinstance(made, Gauge)
        return made

    def histogram(self, registry: CollectorRegistry) -> Histogram:
        """:meth:`create` for a histogram."""
        made = self.create(registry)
        assert isinstance(made, Histogram)
        return made


_HANDLERS = "every handler process"
_DISPATCHER = "dispatcher"
_MONITOR = "monitor"

CATALOGUE: tuple[MetricSpec, ...] = (
    # -- queue (each dispatcher: the jobs it holds) -----------------------------------------------
    MetricSpec(
        "valkyrie_queue_depth_jobs",
        "gauge",
        "Queued jobs this dispatcher holds, by job type, region and label set (at most 64 "
        "groups per dispatcher; the rest is one (other) group).",
        ("job_type", "region", "labels"),
        _DISPATCHER,
        "held",
    ),
    MetricSpec(
        "valkyrie_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest queued job this dispatcher holds in each group (queued since "
        "submission, or since the re-queue for a retry).",
        ("job_type", "region", "labels"),
        _DISPATCHER,
        "held",
    ),
    MetricSpec(
        "valkyrie_queue_tenant_jobs",
        "gauge",
        "Queued jobs this dispatcher holds per tenant (scheduling.tenant_key; at most 128 "
        "tenants, the rest (other)).",
        ("tenant",),
        _DISPATCHER,
        "held",
    ),
    # -- latency ----------------------------------------------------------------------------------
    MetricSpec(
        "valkyrie_job_dispatch_latency_seconds",
        "histogram",
        "Time from a job's submission (for a retry: its re-queue) to its dispatch.",
        ("job_type",),
        _DISPATCHER,
        "work",
        LATENCY_BUCKETS,
    ),
    MetricSpec(
        "valkyrie_job_start_latency_seconds",
        "histogram",
        "Time from a job's dispatch to its start on the runner, as the results handler applies it.",
        ("job_type",),
        "results",
        "work",
        LATENCY_BUCKETS,
    ),
    # -- runners (shared state: every monitor exports the same) -----------------------------------
    MetricSpec(
        "valkyrie_runners",
        "gauge",
        "Runners by state and pool (the pool is the runner's region; at most 64, the rest "
        "(other)).",
        ("state", "pool"),
        _MONITOR,
        "shared",
    ),
    MetricSpec(
        "valkyrie_runner_slots_used",
        "gauge",
        "Job slots taken on the runners of each pool (every runner, offline ones included).",
        ("pool",),
        _MONITOR,
        "shared",
    ),
    MetricSpec(
        "valkyrie_runner_slots_capacity",
        "gauge",
        "Job slots of the runners that take work (active or busy) in each pool.",
        ("pool",),
        _MONITOR,
        "shared",
    ),
    # -- things that went wrong -------------------------------------------------------------------
    MetricSpec(
        "valkyrie_runners_lost",
        "counter",
        "Runners declared lost (silent past dispatch.runner_lost_after_ms).",
        (),
        "supervisor",
        "work",
    ),
    MetricSpec(
        "valkyrie_job_retries",
        "counter",
        "Jobs re-queued as a new attempt, by the handler that re-queued them (results: a "
        "failure retried or a refusal; supervisor: lost runner or not accepted; registry: "
        "runner restarted; dispatcher: not accepted).",
        ("handler",),
        "results, supervisor, registry, dispatcher",
        "work",
    ),
    MetricSpec(
        "valkyrie_stale_updates",
        "counter",
        "Runner updates refused because the job had moved on (a runner that lost its job).",
        (),
        "results",
        "work",
    ),
    MetricSpec(
        "valkyrie_slo_breaches",
        "counter",
        "SLO breaches: dispatch_latency (a job waited past max_dispatch_latency_ms), "
        "completion_time (it ended past target_completion_time_s).",
        ("slo",),
        "dispatcher, results, supervisor, canceller",
        "work",
    ),
    MetricSpec(
        "valkyrie_fallbacks",
        "counter",
        "Automatic fallback decisions by action (activated, recovered, overridden).",
        ("action",),
        _MONITOR,
        "work",
    ),
    MetricSpec(
        "valkyrie_dead_letters",
        "counter",
        "Messages sent to the dead-letter stream.",
        ("handler",),
        "stream handlers",
        "work",
    ),
    # -- handlers ---------------------------------------------------------------------------------
    MetricSpec(
        "valkyrie_handler_messages",
        "counter",
        "Messages a handler settled, by outcome (ack, retry, dead, error); the dispatcher "
        "counts the queued jobs it placed (ack).",
        ("handler", "outcome"),
        _HANDLERS,
        "work",
    ),
    MetricSpec(
        "valkyrie_handler_duration_seconds",
        "histogram",
        "Time a handler spent on one message (the dispatcher: on one dispatch).",
        ("handler",),
        _HANDLERS,
        "work",
        _HANDLER_BUCKETS,
    ),
    MetricSpec(
        "valkyrie_handler_in_flight_messages",
        "gauge",
        "Messages a handler is processing now.",
        ("handler",),
        "stream handlers",
        "work",
    ),
    MetricSpec(
        "valkyrie_jobs",
        "counter",
        "Job lifecycle transitions recorded, by resulting state.",
        ("handler", "state"),
        "intake, dispatcher, results",
        "work",
    ),
    # -- health and configuration -----------------------------------------------------------------
    MetricSpec(
        "valkyrie_health_status",
        "gauge",
        "Health per component as the monitor sees it: 0 healthy, 1 degraded, 2 unhealthy.",
        ("component",),
        _MONITOR,
        "shared",
    ),
    MetricSpec(
        "valkyrie_consumer_pending",
        "gauge",
        "Messages waiting for a durable consumer, as the monitor last measured them (for "
        "dispatcher: queued jobs not yet delivered to any dispatcher).",
        ("consumer",),
        _MONITOR,
        "shared",
    ),
    MetricSpec(
        "valkyrie_config_revision",
        "gauge",
        "The runtime config revision this process applied (0: none written yet).",
        (),
        "every handler process and gateway",
        "process",
    ),
    MetricSpec(
        "valkyrie_mode",
        "gauge",
        "1 for the integration mode this process runs in, 0 for the others.",
        ("mode",),
        "every handler process and gateway",
        "process",
    ),
    MetricSpec(
        "valkyrie_build_info",
        "gauge",
        "Always 1; the version label is this process's Valkyrie version.",
        ("version",),
        "every handler process and gateway",
        "process",
    ),
    # -- HTTP -------------------------------------------------------------------------------------
    MetricSpec(
        "valkyrie_http_requests",
        "counter",
        "HTTP requests the gateway answered, by method, route template and status.",
        ("method", "route", "status"),
        "gateway",
        "work",
    ),
    MetricSpec(
        "valkyrie_http_request_duration_seconds",
        "histogram",
        "Time from request to the end of the response (streams: their whole life).",
        ("method", "route"),
        "gateway",
        "work",
        _HTTP_BUCKETS,
    ),
)

_BY_NAME = {s.name: s for s in CATALOGUE}
_SUMS = {
    "work": "sum",
    "held": "sum (each job held once)",
    "shared": "max (every monitor alike)",
    "process": "per process",
}
DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
BEGIN = "<!-- metrics:begin (generated: python -m valkyrie.runtime.metric_catalogue --write) -->"
END = "<!-- metrics:end -->"


def spec(name: str) -> MetricSpec:
    """The spec of metric ``name`` (its base name, as in :data:`CATALOGUE`)."""
    return _BY_NAME[name]


def exposed_names(found: MetricSpec) -> set[str]:
    """Every series name ``found`` appears under in a scrape."""
    if found.kind == "counter":
        return {found.exposed, f"{found.name}_created"}
    if found.kind == "histogram":
        return {f"{found.name}_{s}" for s in ("bucket", "sum", "count", "created")}
    return {found.name}


def render_table() -> str:
    """The Markdown table of every metric (docs/observability.md)."""
    lines = [
        "| Metric | Type | Labels | Exported by | Across instances | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for s in CATALOGUE:
        labels = ", ".join(f"`{label}`" for label in s.labels) or "-"
        lines.append(
            f"| `{s.exposed}` | {s.kind} | {labels} | {s.exporter} | {_SUMS[s.sums]} | {s.help} |"
        )
    return "\n".join(lines) + "\n"


def render_doc(text: str) -> str:
    """``text`` (docs/observability.md) with its generated block replaced by :func:`render_table`.

    Raises:
        ValueError: the markers are missing.
    """
    return replace_region(text, BEGIN, END, render_table())


def main(argv: list[str] | None = None) -> int:
    """``--write`` updates docs/observability.md; ``--check`` reports drift; else print the block."""
    return generated_doc_main(
        argv,
        prog="python -m valkyrie.runtime.metric_catalogue",
        path=DOC_PATH,
        render=render_table,
        begin=BEGIN,
        end=END,
    )


if __name__ == "__main__":
    sys.exit(main())
