"""Around every matched route: request metrics, CORS (live from ``http.cors_origins``), auditing."""

from __future__ import annotations

import logging
import re
import time

import anyio
import nats.errors
from litestar.enums import ScopeType
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from schemas import AUDIT_EVENTS
from valkyrie.gateway._context import AUDIT_JOB_ID, Gateway, Identity

__all__ = ["GatewayMiddleware"]

log = logging.getLogger("valkyrie.gateway")

_SAFE = re.compile(r"[^A-Za-z0-9_\-]")
_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_ALLOW_METHODS = b"GET, POST, PUT, DELETE, OPTIONS"
_ALLOW_HEADERS = b"Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
_EXPOSE_HEADERS = b"Location, Retry-After, WWW-Authenticate"


def _header(scope: HTTPScope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _allowed(scope: HTTPScope) -> bytes | None:
    """Every method the matched path takes, for the ``Allow`` header of an OPTIONS answer.

    Litestar's own answer names only the methods of one of the path's handlers.
    """
    template = scope.get("path_template")
    for route in scope["app"].routes:
        if isinstance(route, HTTPRoute) and template in (route.path, route.path_format):
            return ", ".join(sorted(route.methods)).encode()
    return None


def _allowed_origin(origins: list[str], origin: str | None) -> str | None:
    if origin is None or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


class GatewayMiddleware:
    """One pass around each route: count and time it, add CORS headers, audit mutations.

    Litestar runs route middleware only for matched routes, which is what is counted: unmatched
    paths would make the ``route`` label unbounded.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send)

    async def _http(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        gateway = scope["app"].state["gateway"]
        assert isinstance(gateway, Gateway)
        http = gateway.config.http
        method = scope["method"]
        origin = _allowed_origin(http.cors_origins, _header(scope, b"origin"))
        if (
            origin is not None
            and method == "OPTIONS"
            and _header(scope, b"access-control-request-method") is not None
        ):
            await self._preflight(send, origin)
            return
        started = time.perf_counter()
        status = 500

        allow = _allowed(scope) if method == "OPTIONS" else None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if allow is not None:
                    kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                    message["headers"] = [*kept, (b"allow", allow)]
                if origin is not None:
                    headers = list(message.get("headers", []))
                    headers += [
                        (b"access-control-allow-origin", origin.encode()),
                        (b"access-control-expose-headers", _EXPOSE_HEADERS),
                        (b"vary", b"Origin"),
                    ]
                    message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = str(scope.get("path_template") or "unmatched")
            gateway.metrics.requests.labels(method, route, str(status)).inc()
            gateway.metrics.duration.labels(method, route).observe(time.perf_counter() - started)
            handler = scope.get("route_handler")
            action = handler.opt.get("audit") if handler is not None else None
            if action and method in _MUTATING and gateway.config.security.audit_enabled:
                await self._audit(gateway, scope, str(action), route, status)

    async def _preflight(self, send: Send, origin: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [
                    (b"access-control-allow-origin", origin.encode()),
                    (b"access-control-allow-methods", _ALLOW_METHODS),
                    (b"access-control-allow-headers", _ALLOW_HEADERS),
                    (b"access-control-max-age", b"600"),
                    (b"vary", b"Origin"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _audit(
        self, gateway: Gateway, scope: HTTPScope, action: str, route: str, status: int
    ) -> None:
        state = scope.get("state", {})
        identity = state.get("identity")
        who = identity.name if isinstance(identity, Identity) else "unauthenticated"
        client = scope.get("client")
        path_params = {k: str(v) for k, v in (scope.get("path_params") or {}).items()}
        job_id = path_params.get("job_id") or state.get(AUDIT_JOB_ID)
        event = AUDIT_EVENTS[action](
            subject_id=_SAFE.sub("_", who)[:64] or "unknown",
            identity=who,
            authenticated=isinstance(identity, Identity) and identity.authenticated,
            action=action,
            method=scope["method"],
            path=scope["path"],
            route=route,
            status=status,
            outcome="ok" if status < 400 else "refused" if status < 500 else "error",
            path_params=path_params,
            client=client[0] if client else None,
            bus_identity=gateway.bus.identity,
            job_id=str(job_id) if job_id else None,
        )
        # the response is out already; a slow or failed audit write must not hold the task long
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            try:
                await gateway.events().emit(event)
            except (nats.errors.Error, OSError) as e:  # the bus refused or lost it
                log.warning("audit event for %s by %s not stored: %r", action, who, e)
