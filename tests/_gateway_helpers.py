"""Helpers for the HTTP gateway tests: handlers in-process, the app driven in-process or by uvicorn."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import anyio
import httpx
from litestar import Litestar
from prometheus_client import CollectorRegistry

from tests._helpers import config_for_test, running
from valkyrie import Bus, Settings
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import create_app, hash_token, run_gateway
from valkyrie.runtime.views import watch_config

#: tokens the auth tests configure: name -> (token, scopes)
TOKENS: dict[str, tuple[str, list[str]]] = {
    "writer": ("tok-writer-0123456789", ["jobs:write", "jobs:read"]),
    "reader": ("tok-reader-0123456789", ["jobs:read"]),
    "admin": (
        "tok-admin-0123456789",
        ["jobs:write", "jobs:read", "runners:admin", "config:admin"],
    ),
}


def auth_environ(**extra: str) -> dict[str, str]:
    """An environment layer that requires auth and configures :data:`TOKENS`."""
    tokens = [
        {"name": name, "sha256": hash_token(token), "scopes": scopes}
        for name, (token, scopes) in TOKENS.items()
    ]
    return {
        "VALKYRIE_HTTP__AUTH_REQUIRED": "true",
        "VALKYRIE_HTTP__TOKENS": json.dumps(tokens),
        **extra,
    }


def bearer(name: str) -> dict[str, str]:
    """The Authorization header of token ``name``."""
    return {"Authorization": f"Bearer {TOKENS[name][0]}"}


def asgi_transport(app: Litestar, **kwargs: Any) -> httpx.ASGITransport:
    """httpx's in-process transport over ``app`` (its ASGI types are looser than Litestar's)."""
    return httpx.ASGITransport(app=cast(Any, app), **kwargs)


@dataclass
class Gw:
    """An in-process gateway: its HTTP client, the bus behind it and its live config."""

    http: httpx.AsyncClient
    bus: Bus
    live: LiveConfig
    registry: CollectorRegistry


@asynccontextmanager
async def gateway(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    handlers: Sequence[str] | None = None,
) -> AsyncIterator[Gw]:
    """Handlers (all by default) and the gateway app, driven through httpx's ASGI transport; both
    run the config of ``environ``."""
    loaded = config_for_test(settings, environ=environ)
    async with running(settings, handlers, config=loaded) as bus:
        live = LiveConfig(loaded)
        registry = CollectorRegistry()
        async with anyio.create_task_group() as tg:
            await tg.start(watch_config, bus, live)
            app = create_app(bus, live, registry)
            transport = asgi_transport(app, client=("10.0.0.1", 40000))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gateway", timeout=30
            ) as client:
                yield Gw(client, bus, live, registry)
            tg.cancel_scope.cancel()


@dataclass
class Served:
    """A gateway served by uvicorn: its base URL, the bus behind it and its live config."""

    url: str
    bus: Bus
    live: LiveConfig


@asynccontextmanager
async def served(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    handlers: Sequence[str] | None = None,
) -> AsyncIterator[Served]:
    """Handlers and the gateway served by uvicorn on a free port."""
    async with running(settings, handlers) as bus:
        live = LiveConfig(config_for_test(settings, environ=environ))
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                functools.partial(run_gateway, bus, stop, host="127.0.0.1", port=0, live=live)
            )
            try:
                yield Served(f"http://127.0.0.1:{port}", bus, live)
            finally:
                stop.set()


def problem(response: httpx.Response) -> dict[str, Any]:
    """The problem document of an error response (checks the media type and members)."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == response.status_code
    assert {"type", "title", "status"} <= set(body)
    return body
