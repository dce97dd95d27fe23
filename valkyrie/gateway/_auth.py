"""Bearer-token authentication, scopes, and per-caller rate limits, read live from ``http.*``.

Tokens are never stored: the config holds each token's SHA-256, and a presented token is hashed
and compared with every configured hash in constant time (no early exit reveals which one matched).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Literal

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from schemas import AUDIT_EVENTS
from valkyrie.config.model import HttpConfig
from valkyrie.gateway._context import ANONYMOUS, Identity, gateway_of
from valkyrie.gateway._problems import ProblemError
from valkyrie.gateway._ratelimit import retry_after_header

__all__ = ["SCOPES", "Scope", "authenticate", "authorize", "hash_token", "route_opt"]

Scope = Literal["jobs:write", "jobs:read", "runners:admin", "config:admin"]
SCOPES: tuple[Scope, ...] = ("jobs:write", "jobs:read", "runners:admin", "config:admin")


def hash_token(token: str) -> str:
    """The value to put in ``http.tokens[].sha256`` for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def route_opt(scope: Scope, *, audit: str | None = None) -> dict[str, Any]:
    """A route's ``opt``: the scope it needs and, for mutating routes, its audit action name."""
    opt: dict[str, Any] = {"scope": scope}
    if audit is not None:
        if audit not in AUDIT_EVENTS:  # every audit event is a typed one: add it to the catalogue
            raise ValueError(f"audit action {audit!r} has no event in schemas.AUDIT_EVENTS")
        opt["audit"] = audit
    return opt


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(authorization: str | None, http: HttpConfig) -> Identity | None:
    """The identity a presented ``Authorization`` header proves, or ``None``."""
    token = _bearer(authorization)
    if token is None:
        return None
    digest = hash_token(token).encode()
    match = None
    for configured in http.tokens:
        # compare against every hash: the time taken does not depend on which one matched
        if hmac.compare_digest(digest, configured.sha256.encode()) and match is None:
            match = configured
    if match is None:
        return None
    return Identity(
        name=match.name,
        scopes=frozenset(match.scopes),
        authenticated=True,
        rate_limit_per_s=match.rate_limit_per_s,
    )


def authorize(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard on every route: authenticate, check the route's scope, then the caller's rate limit.

    Routes without a ``scope`` in their ``opt`` (health probes, metrics, the OpenAPI document) are
    open and not rate limited.

    Raises:
        ProblemError: 401 (no or unknown token), 403 (scope missing) or 429 (rate limited).
    """
    needed = handler.opt.get("scope")
    if needed is None:
        return
    gateway = gateway_of(connection)
    http = gateway.config.http
    identity = authenticate(connection.headers.get("authorization"), http)
    state = connection.scope.setdefault("state", {})
    if identity is not None:
        state["identity"] = identity  # known before a 403, so that the refusal is audited by name
    if http.auth_required:
        if identity is None:
            raise ProblemError(
                401,
                "a bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="valkyrie"'},
            )
        if needed not in identity.scopes:
            raise ProblemError(
                403,
                f"token {identity.name!r} lacks the scope {needed!r}",
                headers={
                    "WWW-Authenticate": f'Bearer realm="valkyrie", error="insufficient_scope", scope="{needed}"'
                },
            )
    elif identity is None:
        identity = ANONYMOUS
    state["identity"] = identity
    if identity.authenticated:
        key = f"token:{identity.name}"
    else:
        client = connection.client
        key = f"anonymous:{client.host if client else '?'}"
    rate = identity.rate_limit_per_s or http.rate_limit_per_s
    wait = gateway.limiter.acquire(key, rate=rate, burst=http.rate_limit_burst)
    if wait > 0:
        raise ProblemError(
            429,
            f"rate limit of {rate:g}/s (burst {http.rate_limit_burst}) exceeded for "
            f"{identity.name!r}; retry in {wait:.2f}s",
            headers={"Retry-After": retry_after_header(wait)},
        )
