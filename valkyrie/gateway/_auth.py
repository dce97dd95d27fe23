"""Bearer-token authentication, scopes, and per-caller rate limits, read live from ``http.*``.

Tokens are never stored: the config holds each token's SHA-256, and a presented token is hashed
and compared with every configured hash in constant time (no early exit reveals which one matched).
Authentication is required when ``http.auth_required`` says so and whenever the gateway listens
on an address other than loopback; a gateway that requires it without any token does not start.
Failed authentications are rate limited per client address before they are answered, so that
guessing tokens is slow.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any, Literal

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from schemas import AUDIT_EVENTS
from valkyrie.config.model import HttpConfig
from valkyrie.errors import ConfigError
from valkyrie.gateway._context import ANONYMOUS, Gateway, Identity, gateway_of
from valkyrie.gateway._problems import ProblemError
from valkyrie.gateway._ratelimit import retry_after_header

__all__ = [
    "SCOPES",
    "Scope",
    "auth_required",
    "authenticate",
    "authorize",
    "check_auth_setup",
    "hash_token",
    "is_loopback",
    "route_opt",
]

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


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name the gateway binds) is reachable from this host only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def auth_required(http: HttpConfig, host: str) -> bool:
    """Whether calls must authenticate: ``http.auth_required``, or a non-loopback ``host``."""
    return http.auth_required or not is_loopback(host)


def check_auth_setup(http: HttpConfig, host: str) -> None:
    """Refuse a gateway on ``host`` that would require authentication but knows no token.

    Raises:
        ConfigError: saying why authentication is required and what to do.
    """
    if http.tokens or not auth_required(http, host):
        return
    why = (
        "http.auth_required is true"
        if http.auth_required
        else f"it listens on {host}, not a loopback address"
    )
    raise ConfigError(
        f"the HTTP gateway requires authentication ({why}) but http.tokens is empty: every call "
        "would be refused. Add a token (docs/http-api.md#authentication-and-scopes), bind "
        "127.0.0.1, or set http.enabled=false"
    )


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
        ProblemError: 401 (no or unknown token), 403 (scope missing) or 429 (rate limited, or
            too many failed authentications from the client's address).
    """
    needed = handler.opt.get("scope")
    if needed is None:
        return
    gateway = gateway_of(connection)
    http = gateway.config.http
    client = connection.client
    address = client.host if client else "?"
    presented = connection.headers.get("authorization")
    required = auth_required(http, gateway.host)
    if presented is not None or required:
        # no token is even looked at while this address has used up its failures: a guess
        # cannot be told right from wrong until the bucket refills
        _refuse_while_failing(gateway, address, http)
    identity = authenticate(presented, http)
    if identity is None and presented is not None:
        gateway.failures.acquire(address, rate=http.failed_auth_per_s, burst=http.failed_auth_burst)
    state = connection.scope.setdefault("state", {})
    if identity is not None:
        state["identity"] = identity  # known before a 403, so that the refusal is audited by name
    if required:
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
    key = f"token:{identity.name}" if identity.authenticated else f"anonymous:{address}"
    rate = identity.rate_limit_per_s or http.rate_limit_per_s
    wait = gateway.limiter.acquire(key, rate=rate, burst=http.rate_limit_burst)
    if wait > 0:
        raise ProblemError(
            429,
            f"rate limit of {rate:g}/s (burst {http.rate_limit_burst}) exceeded for "
            f"{identity.name!r}; retry in {wait:.2f}s",
            headers={"Retry-After": retry_after_header(wait)},
        )


def _refuse_while_failing(gateway: Gateway, address: str, http: HttpConfig) -> None:
    """429 while ``address`` has no failed authentication left (``http.failed_auth_*``)."""
    wait = gateway.failures.wait(address, rate=http.failed_auth_per_s, burst=http.failed_auth_burst)
    if wait > 0:
        raise ProblemError(
            429,
            f"too many failed authentications from {address}: retry in {wait:.2f}s",
            headers={"Retry-After": retry_after_header(wait)},
        )
