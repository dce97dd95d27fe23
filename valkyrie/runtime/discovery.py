"""Service discovery: every handler process is a NATS micro service (``nats micro ls``).

A process that runs handlers (and the gateway) starts one service of nats-py's ``nats.micro``
named after the installation's prefix (``valkyrie`` by default, so installations that share a
server stay apart). It answers ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` (also per name and
per instance: the subjects are listed by :meth:`~valkyrie.bus.names.Names.srv_subjects`) with:

* metadata: its handler names, component, config revision and mode (kept current), host, pid and
  the Valkyrie version;
* one endpoint per handler (STATS): messages settled (``num_requests``), failures (``num_errors``:
  retried after an error, or dead-lettered), total and average processing time, and in ``data``
  the counts by outcome and the job transitions it recorded. The figures are read from the
  process's metrics registry when asked: nothing is counted twice.

The endpoints name the subject each handler consumes but do not subscribe to it: a handler's
input arrives through its JetStream consumer, not as requests. :func:`discover` is the client
side (``valkyrie status``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import msgspec
import nats.errors
from nats.micro.service import (
    SEMVER_REGEX,
    EndpointInfo,
    EndpointStats,
    Service,
    ServiceConfig,
    ServiceInfo,
    ServiceStats,
)
from prometheus_client import CollectorRegistry

from valkyrie._version import __version__
from valkyrie.bus.connection import Bus
from valkyrie.config.live import LiveConfig
from valkyrie.runtime.health import component_name, durables

__all__ = [
    "DiscoveredService",
    "HandlerStats",
    "ServiceAnnouncer",
    "discover",
    "handler_endpoints",
]

log = logging.getLogger("valkyrie.discovery")


class HandlerStats(msgspec.Struct, frozen=True, kw_only=True):
    """One handler of a discovered process (an endpoint of its STATS answer)."""

    name: str
    subject: str = ""
    num_requests: int = 0
    num_errors: int = 0
    average_processing_time: int = 0
    data: dict[str, Any] | None = None


class DiscoveredService(msgspec.Struct, frozen=True, kw_only=True):
    """A process's STATS answer (``io.nats.micro.v1.stats_response``), the fields we read."""

    id: str
    name: str
    version: str
    started: str = ""
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    endpoints: list[HandlerStats] = msgspec.field(default_factory=list)

    @property
    def handlers(self) -> list[str]:
        """The handler names this process runs."""
        return [h for h in self.metadata.get("handlers", "").split(",") if h]


_STATS = msgspec.json.Decoder(DiscoveredService)


def _semver(version: str) -> str:
    # micro wants semantic versions; a PEP 440 local or dev version is kept in the metadata only
    return version if SEMVER_REGEX.match(version) else "0.0.0"


def _samples(registry: CollectorRegistry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The handler metrics' samples by name (one pass over the registry)."""
    wanted = {
        "valkyrie_handler_messages_total",
        "valkyrie_handler_duration_seconds_sum",
        "valkyrie_handler_duration_seconds_count",
        "valkyrie_handler_in_flight_messages",
        "valkyrie_jobs_total",
    }
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return found


def handler_endpoints(
    registry: CollectorRegistry, handlers: Sequence[str], subjects: Mapping[str, str]
) -> list[EndpointStats]:
    """Each handler's figures as a micro endpoint's stats."""
    samples = _samples(registry)
    out: list[EndpointStats] = []
    for name in handlers:
        outcomes: dict[str, int] = {}
        for labels, count in samples["valkyrie_handler_messages_total"].items():
            found = dict(labels)
            if found.get("handler") == name:
                outcomes[found["outcome"]] = int(count)
        jobs = {
            dict(labels)["state"]: int(count)
            for labels, count in samples["valkyrie_jobs_total"].items()
            if dict(labels).get("handler") == name
        }
        key = (("handler", name),)
        seconds = samples["valkyrie_handler_duration_seconds_sum"].get(key, 0.0)
        count = samples["valkyrie_handler_duration_seconds_count"].get(key, 0.0)
        total_ns = int(seconds * 1e9)
        out.append(
            EndpointStats(
                name=name,
                subject=subjects.get(name, ""),
                queue_group=name,
                num_requests=sum(outcomes.values()),
                num_errors=outcomes.get("error", 0) + outcomes.get("dead", 0),
                processing_time=total_ns,
                average_processing_time=int(total_ns / count) if count else 0,
                data={
                    "outcomes": outcomes,
                    "jobs": jobs,
                    "in_flight": int(samples["valkyrie_handler_in_flight_messages"].get(key, 0.0)),
                },
            )
        )
    return out


class _ProcessService(Service):
    """A micro service whose endpoints are this process's handlers (figures read when asked)."""

    def __init__(self, announcer: ServiceAnnouncer, bus: Bus, config: ServiceConfig) -> None:
        super().__init__(bus.nc, config)
        self._announcer = announcer

    def info(self) -> ServiceInfo:
        info: ServiceInfo = super().info()
        info.endpoints = [
            EndpointInfo(name=e.name, subject=e.subject, queue_group=e.queue_group, metadata={})
            for e in self._announcer.endpoints()
        ]
        return info

    def stats(self) -> ServiceStats:
        stats: ServiceStats = super().stats()
        stats.endpoints = self._announcer.endpoints()
        return stats


class ServiceAnnouncer:
    """This process as a micro service, from :meth:`start` until :meth:`stop`.

    Args:
        bus: the connection the service answers on.
        live: the process's live config (its revision and mode are in the metadata).
        handlers: the handler names this process runs (``["gateway"]`` for the gateway).
        registry: the process's metrics registry, read for the STATS figures.
    """

    def __init__(
        self,
        bus: Bus,
        live: LiveConfig,
        handlers: Sequence[str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._bus = bus
        self._live = live
        self._handlers = list(handlers)
        self._registry = registry
        self._subjects = {d.name: ",".join(d.filter_subjects) for d in durables(bus.names)}
        self.metadata: dict[str, str] = {
            "handlers": ",".join(self._handlers),
            "component": component_name(self._handlers),
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "valkyrie_version": __version__,
        }
        self._service: _ProcessService | None = None
        self._refresh()
        live.on_change(lambda _old, _new: self._refresh())

    def _refresh(self) -> None:
        # the dict is the service's own: PING, INFO and STATS answers read it as they are asked
        self.metadata["config_revision"] = str(self._live.revision)
        self.metadata["mode"] = self._live.current.mode.value

    def endpoints(self) -> list[EndpointStats]:
        """Each handler's figures now (empty figures without a registry)."""
        registry = self._registry or CollectorRegistry()
        return handler_endpoints(registry, self._handlers, self._subjects)

    @property
    def id(self) -> str | None:
        """The service instance id (``None`` until started)."""
        return self._service.id if self._service is not None else None

    async def start(self) -> None:
        """Answer ``$SRV.*`` from now on (failures are logged: discovery is not essential)."""
        config = ServiceConfig(
            name=self._bus.names.service_name,
            version=_semver(__version__),
            description=f"Valkyrie {component_name(self._handlers)}",
            metadata=self.metadata,
        )
        service = _ProcessService(self, self._bus, config)
        try:
            with anyio.fail_after(5):
                await service.start()
        except (nats.errors.Error, TimeoutError, OSError) as e:
            log.warning("service discovery not started (%r)", e)
            return
        self._service = service

    async def stop(self) -> None:
        """Stop answering (bounded: a process that is stopping must not wait on it)."""
        service, self._service = self._service, None
        if service is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            try:
                await service.stop()
            except (nats.errors.Error, OSError) as e:
                log.debug("service discovery stop: %r", e)


async def discover(
    bus: Bus, *, timeout_s: float = 1.0, quiet_s: float = 0.25
) -> list[DiscoveredService]:
    """Every running process of this installation (``$SRV.STATS.<name>``), by handlers.

    Collects answers until ``quiet_s`` passes without one, at most ``timeout_s``.
    """
    nc = bus.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: list[DiscoveredService] = []
    try:
        await nc.publish(bus.names.srv_subject("STATS"), b"", reply=inbox)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(left, quiet_s) if found else left)
            except nats.errors.TimeoutError:
                break
            try:
                found.append(_STATS.decode(msg.data))
            except msgspec.DecodeError:
                log.debug("unreadable STATS answer: %r", msg.data[:200])
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await sub.unsubscribe()
    return sorted(found, key=lambda s: (s.metadata.get("component", ""), s.id))
