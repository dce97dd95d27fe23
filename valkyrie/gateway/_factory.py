"""The app factory: every route, the auth guard, problem documents, metrics and the OpenAPI document."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Tag
from prometheus_client import CollectorRegistry

from valkyrie.bus.connection import Bus
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import (
    _routes_config,
    _routes_integration,
    _routes_jobs,
    _routes_ops,
    _routes_perf,
    _routes_runners,
    _routes_v1,
    _sse,
)
from valkyrie.gateway._auth import authorize, check_auth_setup
from valkyrie.gateway._context import Gateway
from valkyrie.gateway._middleware import GatewayMiddleware
from valkyrie.gateway._openapi import finish_openapi
from valkyrie.gateway._problems import exception_handlers
from valkyrie.gateway.console import ROUTES as CONSOLE_ROUTES

__all__ = ["build_app", "create_app"]

_TAGS = [
    Tag(name="jobs", description="Submit, read, list and cancel jobs (v2)."),
    Tag(name="runners", description="The runner pool: list, drain, register."),
    Tag(name="performance", description="Figures from the event stream, health, diagnostics."),
    Tag(name="config", description="The runtime config, changed through the config handler."),
    Tag(name="integration", description="Integration mode, capabilities, fallback."),
    Tag(name="events", description="Live events as server-sent events."),
    Tag(name="v1", description="The ancestor's legacy API."),
    Tag(name="ops", description="Probes and metrics."),
]


def _version() -> str:
    try:
        return version("valkyrie")
    except PackageNotFoundError:
        return "0"


def build_app(gateway: Gateway | None) -> Litestar:
    """The app over ``gateway`` (``None`` builds one only good for its OpenAPI document)."""

    def provide_gateway(state: State) -> Gateway:
        found = state["gateway"]
        assert isinstance(found, Gateway)
        return found

    app = Litestar(
        route_handlers=[
            *_routes_jobs.ROUTES,
            *_routes_runners.ROUTES,
            *_routes_perf.ROUTES,
            *_routes_config.ROUTES,
            *_routes_integration.ROUTES,
            *_sse.ROUTES,
            *_routes_v1.ROUTES,
            *_routes_ops.ROUTES,
            *CONSOLE_ROUTES,
        ],
        dependencies={"gateway": Provide(provide_gateway, sync_to_thread=False)},
        guards=[authorize],
        middleware=[GatewayMiddleware],
        exception_handlers=exception_handlers(),
        state=State({"gateway": gateway}),
        # bodies are read by the routes under the live http.max_body_bytes limit instead
        request_max_body_size=None,
        openapi_config=OpenAPIConfig(
            title="Valkyrie HTTP API",
            version=_version(),
            description=(
                "The HTTP bridge of the Valkyrie control plane: every call becomes bus requests "
                "and KV reads. Errors are RFC 9457 problem documents (`application/problem+json`)."
            ),
            tags=_TAGS,
            path="/schema",
        ),
        debug=False,
        # the process's logging is its own (`valkyrie up`, `valkyrie gateway` set one format):
        # Litestar's default would reconfigure the root logger with another
        logging_config=None,
    )
    finish_openapi(app)
    return app


def create_app(
    bus: Bus,
    live_config: LiveConfig,
    registry: CollectorRegistry | None = None,
    *,
    host: str = "127.0.0.1",
) -> Litestar:
    """The HTTP bridge as an ASGI app over a connected, provisioned ``bus``.

    Args:
        bus: where every call goes.
        live_config: the process's live config; run
            :func:`~valkyrie.runtime.views.watch_config` on it so that changes apply here.
        registry: metrics registry exposed at ``/metrics`` (gateway metrics are added to it).
        host: the address the app is served on: off loopback, every call must authenticate.

    Raises:
        ConfigError: authentication would be required but no token is configured.
    """
    check_auth_setup(live_config.current.http, host)
    gateway = Gateway(
        bus=bus, live=live_config, registry=registry or CollectorRegistry(), host=host
    )
    return build_app(gateway)
