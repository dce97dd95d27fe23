"""Running the control plane in a process: embedded server (optional), provisioning, handlers.

Each handler runs on a connection of its own, as its own identity (least privilege inside one
process too); so do the gateway and local runners (:class:`Connector`). The parts a process
shares (config watch, runner view, health reporter) use one more connection, whose identity is
the first handler's: every handler role has the permissions they need.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client import CollectorRegistry

from valkyrie._version import __version__
from valkyrie.bus.connection import Bus, connect
from valkyrie.bus.credentials import Credentials, auth_dir, discover
from valkyrie.bus.server import NatsServer
from valkyrie.bus.tls import tls_context
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.settings import Settings, data_dir_of
from valkyrie.errors import ConfigError, ConnectError
from valkyrie.runtime.context import HandlerContext, discover_handlers
from valkyrie.runtime.discovery import ServiceAnnouncer
from valkyrie.runtime.health import HealthReporter
from valkyrie.runtime.metrics import HandlerMetrics, ProcessGauges, serve_metrics
from valkyrie.runtime.views import SharedViews, watch_config
from valkyrie.security.embedded import embedded_server, secured_server
from valkyrie.security.store import AuthStore

__all__ = [
    "Connector",
    "Extra",
    "default_data_dir",
    "open_bus",
    "run_control_plane",
    "run_workers",
    "serving",
]

log = logging.getLogger("valkyrie")
handlers_log = logging.getLogger("valkyrie.handlers")
PROVISIONER = "provisioner"


def default_data_dir() -> Path:
    """Where the embedded server keeps its JetStream store unless ``VALKYRIE_DATA_DIR`` is set."""
    return data_dir_of(Settings.from_env({}))


class Connector:
    """Opens a process's connections to one server, each as the identity it is asked for.

    Credentials come from :func:`~valkyrie.bus.credentials.discover`: the settings' explicit
    ones, else the identity's generated seed in the data dir, else none (an open server).
    """

    def __init__(self, settings: Settings, url: str, tls: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.url = url
        self.tls = tls

    def credentials(self, identity: str) -> Credentials:
        """Who a connection asked for as ``identity`` authenticates as."""
        return discover(self.settings, identity)

    @asynccontextmanager
    async def bus(self, identity: str, *, name: str | None = None) -> AsyncIterator[Bus]:
        """A connection as ``identity``, closed (drained) on the way out."""
        bus = await connect(
            self.settings,
            url=self.url,
            name=name or f"valkyrie-{identity}",
            tls=self.tls,
            credentials=self.credentials(identity),
        )
        try:
            yield bus
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()

    def may_provision(self) -> bool:
        """Whether this process can provision: as ``provisioner``, or on an open server.

        A handler host that was given only its own credentials leaves it to the host of
        ``valkyrie up`` (or ``valkyrie provision``): its requests would only be refused.
        """
        explicit = Credentials.from_settings(self.settings)
        if explicit.authenticated:
            return explicit.identity in (None, PROVISIONER)
        if self.credentials(PROVISIONER).authenticated:
            return True
        return not AuthStore(auth_dir(self.settings)).exists()


class Extra(Protocol):
    """Something run alongside the handlers (the gateway, local runners).

    It reports ``task_status.started()`` once it serves (the gateway listens, a runner is
    registered): ``on_ready`` waits for every extra, so "up" means usable.
    """

    def __call__(
        self, connector: Connector, stop: anyio.Event, *, task_status: TaskStatus[Any]
    ) -> Coroutine[Any, Any, None]:
        """Serve until ``stop`` is set, after reporting ``task_status.started()``."""
        ...


def _refuse_open_production(config: ValkyrieConfig, secured: bool) -> None:
    """The production profile runs only on an authenticated, encrypted (TLS) bus.

    The embedded server serves no TLS: in production the bus is an external server (or cluster)
    configured with ``valkyrie auth nats-config --tls-cert …``.
    """
    if config.profile != "production":
        return
    missing = []
    if not secured:
        missing.append(
            "NATS authentication (set VALKYRIE_NATS_CREDS, or let `valkyrie up` secure its "
            "embedded server: VALKYRIE_EMBEDDED_AUTH=true)"
        )
    if not config.security.tls_enabled:
        missing.append("TLS to NATS (security.tls_enabled with tls_cert_file/tls_key_file)")
    if missing:
        raise ConfigError(
            "the production profile refuses to start without " + " and ".join(missing)
        )


@asynccontextmanager
async def serving(
    settings: Settings,
    *,
    embed: bool,
    config: ValkyrieConfig,
    local_runners: Sequence[str] = (),
) -> AsyncIterator[tuple[Connector, NatsServer | None]]:
    """The server (embedded and secured when ``embed`` and no URL is set) and a connector to it.

    ``local_runners`` are runner ids that get an identity in the embedded server's setup.

    Raises:
        ConfigError: the production profile without NATS auth or TLS.
    """
    server: NatsServer | None = None
    url = settings.nats_url
    if embed and not url:
        server = (
            secured_server(settings, runners=local_runners)
            if settings.embedded_auth
            else embedded_server(settings)
        )
        _refuse_open_production(config, server.auth_conf is not None)
    else:
        explicit = Credentials.from_settings(settings).authenticated
        store = AuthStore(auth_dir(settings)).exists()
        _refuse_open_production(config, explicit or store)
    if server is not None:
        await server.astart()
        url = server.url
        secured = "secured, " if server.auth_conf is not None else ""
        log.info("embedded nats-server on %s (%sstore %s)", url, secured, server.store_dir)
    if not url:
        raise ConnectError("no NATS URL: set VALKYRIE_NATS_URL or let `valkyrie up` embed a server")
    try:
        yield Connector(settings, url, tls_context(config.security)), server
    finally:
        if server is not None:
            with anyio.CancelScope(shield=True):
                await server.astop()


@asynccontextmanager
async def open_bus(
    settings: Settings,
    *,
    embed: bool,
    config: ValkyrieConfig | None = None,
    name: str = "valkyrie",
    identity: str = PROVISIONER,
) -> AsyncIterator[tuple[Bus, NatsServer | None]]:
    """Connect (starting an embedded server first when ``embed``), provision, and clean up after.

    ``config`` is the process's config: TLS comes from its ``security`` section and the events
    stream's retention from ``observability.events_max_age_s``. Without it, it is loaded from
    ``settings`` (:func:`~valkyrie.config.load.config_for`) here. The connection speaks as
    ``identity``; it provisions when it may (:meth:`Connector.may_provision`): as
    ``provisioner``, or as anyone on an open server.
    """
    if config is None:
        config = config_for(settings).config
    async with (
        serving(settings, embed=embed, config=config) as (connector, server),
        connector.bus(identity, name=name) as bus,
    ):
        # on an open server anyone provisions (as before identities); else only the provisioner
        anyone = not bus.identity and not connector.credentials(identity).authenticated
        if (identity == PROVISIONER or anyone) and connector.may_provision():
            await bus.provision(config)
        yield bus, server


async def _watch_signals(stop: anyio.Event, tg: TaskGroup) -> None:
    # SIGHUP too: a closed terminal must stop the installation cleanly, embedded server included
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            if stop.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                tg.cancel_scope.cancel()
                return
            log.info("%s: finishing in-flight work (again to force)", signal.Signals(signum).name)
            stop.set()


def _wanted(names: list[str] | None) -> list[str]:
    """The handlers to run: ``names``, else every registered one.

    Raises:
        ConfigError: a name no handler is registered under.
    """
    available = discover_handlers()
    wanted = names or list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(
            f"unknown handler(s) {', '.join(unknown)}; registered: {', '.join(available) or 'none'}"
        )
    return wanted


async def run_control_plane(
    settings: Settings,
    *,
    config: LiveConfig | None = None,
    handlers: Sequence[str] | None = None,
    embed: bool = True,
    extras: Sequence[Extra] = (),
    local_runners: Sequence[str] = (),
    on_ready: Callable[[Bus], None] | None = None,
) -> None:
    """Run handlers (all registered by default) until SIGINT/SIGTERM, then shut down cleanly.

    ``config`` is the process's live config (loaded from ``settings`` when omitted): it sizes the
    handlers, the metrics endpoint and TLS, and follows the config bucket while they run.
    ``extras`` are further coroutine functions ``f(connector, stop)`` run alongside (the gateway,
    local runners), each connecting as its own identity; ``local_runners`` are the runner ids
    the embedded server's setup must know.
    """
    registry = CollectorRegistry()
    live = config if config is not None else LiveConfig(config_for(settings))
    observability = live.current.observability
    async with serving(settings, embed=embed, config=live.current, local_runners=local_runners) as (
        connector,
        _server,
    ):
        if connector.may_provision():
            async with connector.bus(PROVISIONER, name="valkyrie-provisioner") as provisioner:
                await provisioner.provision(live.current)
        else:
            log.info("not provisioning: no provisioner credentials here (streams must exist)")
        if observability.metrics_enabled and observability.metrics_port:
            port = serve_metrics(registry, observability.metrics_host, observability.metrics_port)
            log.info("metrics on http://%s:%d/metrics", observability.metrics_host, port)
        wanted = _wanted(list(handlers or []) or None)
        stop = anyio.Event()
        async with (
            connector.bus(wanted[0], name="valkyrie") as shared,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_watch_signals, stop, tg)
            async with anyio.create_task_group() as workers:
                await workers.start(
                    functools.partial(run_workers, config=live, connector=connector),
                    shared,
                    registry,
                    stop,
                    wanted,
                )
                for extra in extras:
                    await workers.start(extra, connector, stop)
                if on_ready is not None:
                    on_ready(shared)
            tg.cancel_scope.cancel()


async def run_workers(
    bus: Bus,
    registry: CollectorRegistry,
    stop: anyio.Event,
    names: list[str] | None = None,
    *,
    config: LiveConfig,
    connector: Connector | None = None,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the named handlers (all registered ones by default) until ``stop`` is set.

    ``config`` is the process's live config (built once at start from its loaded config); it is
    kept current from the config bucket here while the handlers run. With a ``connector`` each
    handler connects as its own identity (its name); without, they all use ``bus``, which the
    process's shared parts (views, config watch, health) use either way.
    """
    available = discover_handlers()
    wanted = _wanted(names)
    metrics = HandlerMetrics.create(registry)
    ProcessGauges(registry, __version__).follow(config)
    reporter = HealthReporter(bus, config, wanted, stop)
    service = ServiceAnnouncer(bus, config, wanted, registry)
    async with contextlib.AsyncExitStack() as connections, anyio.create_task_group() as tg:
        own = {
            n: await connections.enter_async_context(connector.bus(n)) if connector else bus
            for n in wanted
        }
        views = SharedViews(bus, tg)
        workers = [
            available[n](
                HandlerContext(
                    bus=own[n],
                    registry=registry,
                    metrics=metrics,
                    name=n,
                    config=config,
                    views=views,
                )
            )
            for n in wanted
        ]
        await tg.start(watch_config, bus, config)
        await tg.start(reporter.run)
        async with anyio.create_task_group() as running:
            for name, worker in zip(wanted, workers, strict=True):
                await running.start(reporter.track(name, worker.run), stop)
            reporter.started()
            await service.start()  # `nats micro ls` lists this process once its handlers run
            handlers_log.info(
                "handlers running: %s (config revision %d)", ", ".join(wanted), config.revision
            )
            task_status.started(wanted)
        # a deliberate stop is not a stall: tell the monitor before going quiet
        await service.stop()
        await reporter.goodbye()
        tg.cancel_scope.cancel()
