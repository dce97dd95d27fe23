"""Valkyrie: a control plane that dispatches CI jobs to runners over NATS JetStream.

The runtime library: bus connection and provisioning, subject names, the embedded nats-server, the
handler framework, domain logic, the client API and the CLI. Handlers live in the ``handlers``
package and are found through the ``valkyrie.handlers`` entry-point group.
"""

from valkyrie.bus.connection import BUCKETS, Bus, connect
from valkyrie.bus.events import EventPublisher
from valkyrie.bus.names import Names
from valkyrie.bus.server import NatsServer, find_nats_server
from valkyrie.bus.tls import tls_context
from valkyrie.client.jobs import REPLY_TO_HEADER, Client
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import LoadedConfig, config_for
from valkyrie.config.settings import Settings
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
    ValkyrieError,
)
from valkyrie.runtime.app import default_data_dir, open_bus, run_control_plane
from valkyrie.runtime.base import HandlerBase
from valkyrie.runtime.consumer import StreamConsumer, delivery_count, headers_of
from valkyrie.runtime.metrics import HandlerMetrics, serve_metrics
from valkyrie.runtime.workers import (
    ENTRY_POINT_GROUP,
    HandlerContext,
    HandlerFactory,
    Worker,
    discover_handlers,
    run_workers,
)

__all__ = [
    "BUCKETS",
    "ENTRY_POINT_GROUP",
    "REPLY_TO_HEADER",
    "Bus",
    "BusError",
    "Client",
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
    "StreamConsumer",
    "ValkyrieError",
    "Worker",
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
