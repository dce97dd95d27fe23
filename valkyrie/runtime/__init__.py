"""The handler framework: what a handler is, how it consumes, holds, writes and reports.

A handler is a module with ``create(ctx: HandlerContext) -> Worker`` named under the
``valkyrie.handlers`` entry-point group. Most build on :class:`HandlerBase` (its name, connection,
event publisher and :class:`JobOps`) and consume a stream with :class:`StreamConsumer` (settling
each message by its outcome: ack, :class:`~valkyrie.errors.RetryLater`,
:class:`~valkyrie.errors.GiveUp`) or hold messages with :class:`HoldingConsumer`. A process runs
its handlers with :func:`run_workers` (or the whole control plane with
:func:`run_control_plane`); they share one runner view (:class:`SharedViews`), one live config and
one :class:`HealthReporter`. docs/architecture.md, "The map", says where a new handler goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
    from valkyrie.runtime.admission import (
        RECORD_OVERHEAD,
        Admission,
        AdmissionRefusal,
    )
    from valkyrie.runtime.app import (
        Connector,
        Extra,
        default_data_dir,
        open_bus,
        run_control_plane,
        run_workers,
        serving,
    )
    from valkyrie.runtime.base import (
        HandlerBase,
    )
    from valkyrie.runtime.committing import (
        COMMIT_CONCURRENCY,
        DECLINED_WAIT_S,
        Commits,
    )
    from valkyrie.runtime.consumer import (
        StreamConsumer,
        delivery_count,
        headers_of,
    )
    from valkyrie.runtime.context import (
        ENTRY_POINT_GROUP,
        HandlerContext,
        HandlerFactory,
        Worker,
        discover_handlers,
    )
    from valkyrie.runtime.discovery import (
        DiscoveredService,
        HandlerStats,
        ServiceAnnouncer,
        discover,
        handler_endpoints,
    )
    from valkyrie.runtime.dispatching import (
        Dispatched,
        Dispatching,
    )
    from valkyrie.runtime.explaining import (
        Explainer,
    )
    from valkyrie.runtime.health import (
        Durable,
        HealthReporter,
        HealthReports,
        RunnerStates,
        component_name,
        consumer_lags,
        durables,
        list_runner_states,
    )
    from valkyrie.runtime.healthstore import (
        FALLBACK_KEY,
        HEALTH_KEY,
        HealthStore,
    )
    from valkyrie.runtime.heartbeats import (
        HeardHeartbeats,
    )
    from valkyrie.runtime.holding import (
        KEEPALIVE_S,
        HoldingConsumer,
        same_message,
        settle,
    )
    from valkyrie.runtime.jobops import (
        INLINE_RECORD_BYTES,
        JobOps,
        terminal_ttl,
        through_outages,
    )
    from valkyrie.runtime.metric_catalogue import (
        CATALOGUE,
        LATENCY_BUCKETS,
        MetricSpec,
        exposed_names,
        main,
        render_table,
        spec,
    )
    from valkyrie.runtime.metrics import (
        BoundedLabel,
        HandlerMetrics,
        HealthGauges,
        ProcessGauges,
        serve_metrics,
    )
    from valkyrie.runtime.placer import (
        LocalPlacer,
    )
    from valkyrie.runtime.queue_ledger import (
        FRESH_MS,
        LEDGER_PREFIX,
        QueueLedger,
        publish_queue,
    )
    from valkyrie.runtime.room import (
        BucketRoom,
    )
    from valkyrie.runtime.runner_records import (
        HeartbeatRecorded,
        RegisteredRunner,
        RunnerRecords,
    )
    from valkyrie.runtime.secrets import (
        SecretStore,
    )
    from valkyrie.runtime.state_metrics import (
        MAX_POOLS,
        QueueCollector,
        RunnerGauges,
        runner_pool_of,
    )
    from valkyrie.runtime.verdicts import (
        SubmitVerdicts,
    )
    from valkyrie.runtime.views import (
        RunnerView,
        SharedViews,
        watch_config,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "CATALOGUE",
    "COMMIT_CONCURRENCY",
    "DECLINED_WAIT_S",
    "ENTRY_POINT_GROUP",
    "FALLBACK_KEY",
    "FRESH_MS",
    "HEALTH_KEY",
    "INLINE_RECORD_BYTES",
    "KEEPALIVE_S",
    "LATENCY_BUCKETS",
    "LEDGER_PREFIX",
    "MAX_POOLS",
    "RECORD_OVERHEAD",
    "Admission",
    "AdmissionRefusal",
    "BoundedLabel",
    "BucketRoom",
    "Commits",
    "Connector",
    "DiscoveredService",
    "Dispatched",
    "Dispatching",
    "Durable",
    "Explainer",
    "Extra",
    "HandlerBase",
    "HandlerContext",
    "HandlerFactory",
    "HandlerMetrics",
    "HandlerStats",
    "HealthGauges",
    "HealthReporter",
    "HealthReports",
    "HealthStore",
    "HeardHeartbeats",
    "HeartbeatRecorded",
    "HoldingConsumer",
    "JobOps",
    "LocalPlacer",
    "MetricSpec",
    "ProcessGauges",
    "QueueCollector",
    "QueueLedger",
    "RegisteredRunner",
    "RunnerGauges",
    "RunnerRecords",
    "RunnerStates",
    "RunnerView",
    "SecretStore",
    "ServiceAnnouncer",
    "SharedViews",
    "StreamConsumer",
    "SubmitVerdicts",
    "Worker",
    "component_name",
    "consumer_lags",
    "default_data_dir",
    "delivery_count",
    "discover",
    "discover_handlers",
    "durables",
    "exposed_names",
    "handler_endpoints",
    "headers_of",
    "list_runner_states",
    "main",
    "open_bus",
    "publish_queue",
    "render_table",
    "run_control_plane",
    "run_workers",
    "runner_pool_of",
    "same_message",
    "serve_metrics",
    "serving",
    "settle",
    "spec",
    "terminal_ttl",
    "through_outages",
    "watch_config",
]
