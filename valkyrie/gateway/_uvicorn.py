"""Serving the app with uvicorn inside an anyio task group, stopped by an event, not by signals."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from schemas import CheckResult
from valkyrie.bus.connection import Bus
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import LoadedConfig
from valkyrie.domain.identity import GATEWAY
from valkyrie.errors import ConfigError
from valkyrie.gateway._auth import check_auth_setup
from valkyrie.gateway._context import Gateway
from valkyrie.gateway._factory import build_app
from valkyrie.runtime.app import Connector, Extra
from valkyrie.runtime.discovery import ServiceAnnouncer
from valkyrie.runtime.health import HealthReporter
from valkyrie.runtime.views import watch_config

__all__ = ["gateway_extra", "run_gateway", "serve_gateway"]

log = logging.getLogger("valkyrie.gateway")

#: how long open responses (event streams) get to finish when the gateway stops
SHUTDOWN_GRACE_S = 5.0
#: the component the gateway reports its health as (``<prefix>.health.gateway``)
COMPONENT = "gateway"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own handler owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (bound here so that port 0 resolves before the server reports ready)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"cannot serve the HTTP API on {host}:{port} ({e.strerror or e}): choose another "
            "http.port (or --http-port / --port), or set http.enabled=false"
        ) from e
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve_gateway(
    bus: Bus,
    live: LiveConfig,
    stop: anyio.Event,
    *,
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the HTTP bridge on ``host:port`` until ``stop`` is set; report the bound port.

    ``live`` is not watched here: whoever owns it runs
    :func:`~valkyrie.runtime.views.watch_config` (see :func:`run_gateway`).

    Raises:
        ConfigError: authentication would be required (``http.auth_required``, or ``host`` is
            not loopback) but no token is configured; or the address cannot be bound.
    """
    check_auth_setup(live.current.http, host)
    gateway = Gateway(bus=bus, live=live, registry=registry or CollectorRegistry(), host=host)
    app = build_app(gateway)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
    )
    server = _Server(config)
    sock = _bind(host, port)
    bound = int(sock.getsockname()[1])
    gateway.listening = (host, bound)
    address = f"http://{host}:{bound}"

    def http_check() -> CheckResult:
        if gateway.closing:
            return CheckResult(status="degraded", detail=f"{address}: stopping")
        if not server.started:
            return CheckResult(status="unhealthy", detail=f"{address}: not serving")
        return CheckResult(status="healthy", detail=address)

    # the gateway is a component like any worker process: the monitor and `valkyrie status` see it
    reporter = HealthReporter(bus, live, [COMPONENT], stop, checks={"http": http_check})
    service = ServiceAnnouncer(bus, live, [COMPONENT], gateway.registry)
    reporting = anyio.CancelScope()
    async with anyio.create_task_group() as tg:

        async def stopper() -> None:
            await stop.wait()
            gateway.closing = True  # event streams end at their next poll
            server.should_exit = True

        async def serve() -> None:
            try:
                await server.serve([sock])
            finally:
                reporting.cancel()

        async def report() -> None:
            with reporting:
                await service.start()
                await reporter.run()
            with anyio.CancelScope(shield=True):
                await service.stop()
                await reporter.goodbye()

        tg.start_soon(stopper)
        tg.start_soon(serve)
        with anyio.fail_after(10):
            while not server.started:
                if server.should_exit:
                    break
                await anyio.sleep(0.01)
        log.info("HTTP gateway on %s", address)
        reporter.started()
        tg.start_soon(report)
        task_status.started(bound)
    sock.close()


async def run_gateway(
    bus: Bus,
    stop: anyio.Event,
    *,
    live: LiveConfig,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Watch the live config and serve the gateway (host and port default to ``http.*``).

    Raises:
        ConfigError: authentication would be required but no token is configured (before
            anything starts).
    """
    http = live.current.http
    host = host if host is not None else http.host
    check_auth_setup(http, host)
    serve = functools.partial(
        serve_gateway,
        bus,
        live,
        stop,
        host=host,
        port=port if port is not None else http.port,
        registry=registry,
    )
    async with anyio.create_task_group() as watching:
        await watching.start(watch_config, bus, live)
        async with anyio.create_task_group() as serving:
            bound = await serving.start(serve)
            task_status.started(bound)
        watching.cancel_scope.cancel()


def gateway_extra(
    config: LoadedConfig,
    *,
    port: int | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> Extra:
    """An ``extras`` entry for ``run_control_plane``: the gateway alongside the handlers.

    The gateway connects as its own identity (``gateway``) and gets a live config of its own,
    built from the process's loaded ``config``. ``on_listening`` is told the URL once the server
    listens (its port is known only then when the config says 0).

    Raises:
        ConfigError: the gateway would require authentication but knows no token (checked here,
            before anything starts).
    """
    check_auth_setup(config.config.http, config.config.http.host)

    async def extra(
        connector: Connector, stop: anyio.Event, *, task_status: TaskStatus[Any]
    ) -> None:
        live = LiveConfig(config)
        async with (
            connector.bus(GATEWAY, name="valkyrie-gateway") as bus,
            anyio.create_task_group() as tg,
        ):
            serve = functools.partial(run_gateway, bus, stop, live=live, port=port)
            bound = await tg.start(serve)
            if on_listening is not None:
                on_listening(f"http://{live.current.http.host}:{bound}")
            task_status.started(bound)

    return extra
