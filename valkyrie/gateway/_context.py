"""What every route reaches: the bus, the live config, metrics, and the caller's identity."""

from __future__ import annotations

import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from prometheus_client import CollectorRegistry, Counter, Histogram

from valkyrie._version import __version__
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher
from valkyrie.client.admin import Admin
from valkyrie.client.config import ConfigClient
from valkyrie.client.jobs import Client
from valkyrie.config.live import LiveConfig
from valkyrie.config.model import ValkyrieConfig
from valkyrie.gateway._ratelimit import RateLimiter
from valkyrie.runtime.metric_catalogue import spec
from valkyrie.runtime.metrics import ProcessGauges

__all__ = [
    "ANONYMOUS",
    "AUDIT_JOB_ID",
    "Gateway",
    "GatewayDep",
    "HttpMetrics",
    "Identity",
    "gateway_of",
    "identity_of",
    "valid_id",
]

EVENT_SOURCE = "gateway"
#: where a route puts the id of the job it created (``scope["state"]``), for its audit event
AUDIT_JOB_ID = "audit_job_id"
#: job and runner ids (schemas ``Identifier``); anything else cannot exist, so it is a 404
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")


def valid_id(value: str) -> bool:
    """Whether ``value`` can be a job or runner id."""
    return _ID.fullmatch(value) is not None


@dataclass(frozen=True)
class HttpMetrics:
    """The gateway's metrics: requests and their latency, and the process's own gauges."""

    requests: Counter
    duration: Histogram
    process: ProcessGauges

    @classmethod
    def on(cls, registry: CollectorRegistry) -> HttpMetrics:
        """The collectors on ``registry``, registered on first use (a registry takes a name once)."""
        found = _METRICS.get(registry)
        if found is None:
            found = cls(
                requests=spec("valkyrie_http_requests").counter(registry),
                duration=spec("valkyrie_http_request_duration_seconds").histogram(registry),
                process=ProcessGauges(registry, __version__),
            )
            _METRICS[registry] = found
        return found


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, HttpMetrics] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Identity:
    """Who is calling: a configured token's name and scopes, or ``anonymous``."""

    name: str
    scopes: frozenset[str] = frozenset()
    authenticated: bool = False
    rate_limit_per_s: float | None = None


ANONYMOUS = Identity("anonymous")


@dataclass
class Gateway:
    """The gateway's dependencies; it holds no job or runner state, only these handles.

    Attributes:
        bus: the NATS connection every call is translated onto.
        live: the process's live config (auth, limits and mode are read from it on every request).
        registry: where the gateway's metrics are registered and what ``/metrics`` exposes.
        limiter: per-caller token buckets.
        failures: per-address token buckets of failed authentications.
        host: the address the gateway listens on (off loopback, authentication is required).
        started_at: when the gateway was created (for uptime).
        closing: set when the server shuts down, so that event streams end.
        listening: where the server listens, once it does.
    """

    bus: Bus
    live: LiveConfig
    registry: CollectorRegistry
    limiter: RateLimiter = field(default_factory=RateLimiter)
    failures: RateLimiter = field(default_factory=RateLimiter)
    host: str = "127.0.0.1"
    started_at: float = field(default_factory=time.time)
    closing: bool = False
    #: the address the server really listens on (port 0 in the config becomes a port)
    listening: tuple[str, int] | None = None
    metrics: HttpMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = HttpMetrics.on(self.registry)
        self.metrics.process.follow(self.live)

    @property
    def config(self) -> ValkyrieConfig:
        """The config in force now."""
        return self.live.current

    @property
    def timeout_s(self) -> float:
        """How long one call may wait on the bus (``http.request_timeout_s``)."""
        return self.live.current.http.request_timeout_s

    def client(self, who: Identity | None = None) -> Client:
        """A client over the bus and the live config (cheap: it is a thin wrapper).

        Its submissions name ``who`` (``http:<token name>``): the gateway's identity vouches for it.
        """
        return Client(self.bus, config=self.live, requested_by=f"http:{who.name}" if who else None)

    def admin(self, who: Identity) -> Admin:
        """Operator actions attributed to ``who``."""
        return Admin(self.bus, actor=f"http:{who.name}")

    def config_client(self, who: Identity) -> ConfigClient:
        """Config changes attributed to ``who``."""
        return ConfigClient(self.bus, actor=f"http:{who.name}")

    def events(self) -> EventPublisher:
        """An event publisher whose events name the gateway as their source."""
        return EventPublisher(self.bus, EVENT_SOURCE)


#: how routes receive the gateway (Litestar injects it by this parameter name)
GatewayDep = NamedDependency[Gateway]


def gateway_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    """The :class:`Gateway` of the app serving ``connection``."""
    gateway = connection.app.state["gateway"]
    assert isinstance(gateway, Gateway)
    return gateway


def identity_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity:
    """Who made the request (set by the auth guard; ``anonymous`` before it ran)."""
    found = connection.scope.get("state", {}).get("identity")
    return found if isinstance(found, Identity) else ANONYMOUS
