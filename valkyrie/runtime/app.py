"""Running the control plane in a process: embedded server (optional), provisioning, handlers."""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import platformdirs
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client import CollectorRegistry

from valkyrie._version import __version__
from valkyrie.bus.connection import Bus, connect
from valkyrie.bus.server import NatsServer
from valkyrie.bus.tls import tls_context
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.settings import Settings
from valkyrie.errors import ConfigError
from valkyrie.runtime.context import HandlerContext, discover_handlers
from valkyrie.runtime.discovery import ServiceAnnouncer
from valkyrie.runtime.health import HealthReporter
from valkyrie.runtime.metrics import HandlerMetrics, ProcessGauges, serve_metrics
from valkyrie.runtime.views import SharedViews, watch_config

__all__ = ["default_data_dir", "open_bus", "run_control_plane", "run_workers"]

log = logging.getLogger("valkyrie")
handlers_log = logging.getLogger("valkyrie.handlers")


def default_data_dir() -> Path:
    """Where the embedded server keeps its JetStream store unless ``VALKYRIE_DATA_DIR`` is set."""
    return Path(platformdirs.user_data_dir("valkyrie", appauthor=False))


@asynccontextmanager
async def open_bus(
    settings: Settings,
    *,
    embed: bool,
    config: ValkyrieConfig | None = None,
    name: str = "valkyrie",
) -> AsyncIterator[tuple[Bus, NatsServer | None]]:
    """Connect (starting an embedded server first when ``embed``), provision, and clean up after.

    ``config`` is the process's config: TLS comes from its ``security`` section and the events
    stream's retention from ``observability.events_max_age_s``. Without it, it is loaded from
    ``settings`` (:func:`~valkyrie.config.load.config_for`) here.
    """
    server: NatsServer | None = None
    if config is None:
        config = config_for(settings).config
    url = settings.nats_url
    if embed and not url:
        store = Path(settings.data_dir) if settings.data_dir else default_data_dir()
        server = NatsServer(store_dir=store / "nats", port=settings.embedded_port)
        await server.astart()
        url = server.url
        log.info("embedded nats-server on %s (store %s)", url, server.store_dir)
    try:
        bus = await connect(settings, url=url, name=name, tls=tls_context(config.security))
        try:
            await bus.provision(config)
            yield bus, server
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()
    finally:
        if server is not None:
            with anyio.CancelScope(shield=True):
                await server.astop()


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


async def run_control_plane(
    settings: Settings,
    *,
    config: LiveConfig | None = None,
    handlers: Sequence[str] | None = None,
    embed: bool = True,
    extras: Sequence[Callable[[Bus, anyio.Event], object]] = (),
    on_ready: Callable[[Bus], None] | None = None,
) -> None:
    """Run handlers (all registered by default) until SIGINT/SIGTERM, then shut down cleanly.

    ``config`` is the process's live config (loaded from ``settings`` when omitted): it sizes the
    handlers, the metrics endpoint and TLS, and follows the config bucket while they run.
    ``extras`` are further coroutine functions ``f(bus, stop)`` run alongside (e.g. local runners).
    """
    registry = CollectorRegistry()
    live = config if config is not None else LiveConfig(config_for(settings))
    observability = live.current.observability
    async with open_bus(settings, embed=embed, config=live.current) as (bus, _server):
        if observability.metrics_enabled and observability.metrics_port:
            port = serve_metrics(registry, observability.metrics_host, observability.metrics_port)
            log.info("metrics on http://%s:%d/metrics", observability.metrics_host, port)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_watch_signals, stop, tg)
            async with anyio.create_task_group() as workers:
                await workers.start(
                    functools.partial(run_workers, config=live),
                    bus,
                    registry,
                    stop,
                    list(handlers or []) or None,
                )
                for extra in extras:
                    workers.start_soon(extra, bus, stop)  # type: ignore[arg-type]
                if on_ready is not None:
                    on_ready(bus)
            tg.cancel_scope.cancel()


async def run_workers(
    bus: Bus,
    registry: CollectorRegistry,
    stop: anyio.Event,
    names: list[str] | None = None,
    *,
    config: LiveConfig,
    task_status: TaskStatus[list[str]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the named handlers (all registered ones by default) until ``stop`` is set.

    ``config`` is the process's live config (built once at start from its loaded config); it is
    kept current from the config bucket here while the handlers run.
    """
    available = discover_handlers()
    wanted = names or list(available)
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise ConfigError(
            f"unknown handler(s) {', '.join(unknown)}; registered: {', '.join(available) or 'none'}"
        )
    metrics = HandlerMetrics.create(registry)
    ProcessGauges(registry, __version__).follow(config)
    reporter = HealthReporter(bus, config, wanted, stop)
    service = ServiceAnnouncer(bus, config, wanted, registry)
    async with anyio.create_task_group() as tg:
        views = SharedViews(bus, tg)
        workers = [
            available[n](
                HandlerContext(
                    bus=bus, registry=registry, metrics=metrics, name=n, config=config, views=views
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
