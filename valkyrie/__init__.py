"""Valkyrie: a control plane that dispatches CI jobs to runners over NATS JetStream.

The public API: :class:`Client` (submit, read and follow jobs), :class:`Admin` (cancel, drain,
dead letters), :class:`ConfigClient` (runtime config), the errors under :class:`ValkyrieError`,
``__version__``, and the handler framework's entry points. Only the errors are imported eagerly:
every other name loads its module on first use (``valkyrie._lazy``), so a runner host importing
``valkyrie.runner`` loads neither the control plane nor Prometheus. The floors are packages:
``valkyrie.domain`` (pure logic), ``config``, ``bus``, ``runtime`` (the handler framework),
``client``, ``gateway``, ``runner``, ``cli``; see docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach
from valkyrie._version import __version__
from valkyrie.errors import (
    BusError,
    ConfigError,
    ConnectError,
    GiveUp,
    HandlerOutcome,
    NotFoundError,
    NoVerdictError,
    RetryLater,
    SchemaError,
    ServerError,
    StorageFullError,
    ValkyrieError,
)

if TYPE_CHECKING:
    from valkyrie.bus.connection import BUCKETS, Bus, connect
    from valkyrie.bus.events import EventPublisher
    from valkyrie.bus.names import Names
    from valkyrie.bus.server import NatsServer, find_nats_server
    from valkyrie.bus.tls import tls_context
    from valkyrie.client.admin import Admin
    from valkyrie.client.config import ConfigClient
    from valkyrie.client.jobs import REPLY_TO_HEADER, REQUESTED_BY_HEADER, Client
    from valkyrie.config.live import LiveConfig
    from valkyrie.config.load import LoadedConfig, config_for
    from valkyrie.config.settings import Settings
    from valkyrie.runtime.app import default_data_dir, open_bus, run_control_plane, run_workers
    from valkyrie.runtime.base import HandlerBase
    from valkyrie.runtime.consumer import StreamConsumer, delivery_count, headers_of
    from valkyrie.runtime.context import (
        ENTRY_POINT_GROUP,
        HandlerContext,
        HandlerFactory,
        Worker,
        discover_handlers,
    )
    from valkyrie.runtime.metrics import HandlerMetrics, serve_metrics

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "BUCKETS",
    "ENTRY_POINT_GROUP",
    "REPLY_TO_HEADER",
    "REQUESTED_BY_HEADER",
    "Admin",
    "Bus",
    "BusError",
    "Client",
    "ConfigClient",
    "ConfigError",
    "ConnectError",
    "EventPublisher",
    "GiveUp",
    "HandlerBase",
    "HandlerContext",
    "HandlerFactory",
    "HandlerMetrics",
    "HandlerOutcome",
    "LiveConfig",
    "LoadedConfig",
    "Names",
    "NatsServer",
    "NoVerdictError",
    "NotFoundError",
    "RetryLater",
    "SchemaError",
    "ServerError",
    "Settings",
    "StorageFullError",
    "StreamConsumer",
    "ValkyrieError",
    "Worker",
    "__version__",
    "config_for",
    "connect",
    "default_data_dir",
    "delivery_count",
    "discover_handlers",
    "find_nats_server",
    "headers_of",
    "open_bus",
    "run_control_plane",
    "run_workers",
    "serve_metrics",
    "tls_context",
]
