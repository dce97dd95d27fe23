"""The handler framework: what a handler is, how it consumes, holds, writes and reports.

A handler is a module with ``create(ctx: HandlerContext) -> Worker`` named under the
``valkyrie.handlers`` entry-point group. Most build on :class:`HandlerBase` (its name, connection,
event publisher and :class:`JobOps`) and consume a stream with :class:`StreamConsumer` (settling
each message by its outcome: ack, :class:`~valkyrie.errors.RetryLater`,
:class:`~valkyrie.errors.GiveUp`) or hold messages with :class:`HoldingConsumer`. A process runs
its handlers with :func:`run_workers` (or the whole control plane with
:func:`run_control_plane`); they share one runner view (:class:`SharedViews`), one live config and
one :class:`HealthReporter`. See docs/architecture.md, "Writing a handler".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
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
    from valkyrie.runtime.metrics import (
        HandlerMetrics,
        HealthGauges,
        serve_metrics,
    )
    from valkyrie.runtime.placer import (
        LocalPlacer,
    )
    from valkyrie.runtime.views import (
        RunnerView,
        SharedViews,
        watch_config,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FALLBACK_KEY",
    "HEALTH_KEY",
    "INLINE_RECORD_BYTES",
    "KEEPALIVE_S",
    "Connector",
    "Dispatched",
    "Dispatching",
    "Durable",
    "Explainer",
    "Extra",
    "HandlerBase",
    "HandlerContext",
    "HandlerFactory",
    "HandlerMetrics",
    "HealthGauges",
    "HealthReporter",
    "HealthReports",
    "HealthStore",
    "HeardHeartbeats",
    "HoldingConsumer",
    "JobOps",
    "LocalPlacer",
    "RunnerStates",
    "RunnerView",
    "SharedViews",
    "StreamConsumer",
    "Worker",
    "component_name",
    "consumer_lags",
    "default_data_dir",
    "delivery_count",
    "discover_handlers",
    "durables",
    "headers_of",
    "list_runner_states",
    "open_bus",
    "run_control_plane",
    "run_workers",
    "same_message",
    "serve_metrics",
    "serving",
    "settle",
    "terminal_ttl",
    "through_outages",
    "watch_config",
]
