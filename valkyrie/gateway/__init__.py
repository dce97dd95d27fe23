"""The HTTP bridge: Litestar routes translated into bus requests and KV reads (no state of its own).

``create_app`` builds the ASGI app; ``serve_gateway`` runs it with uvicorn inside an anyio task
group. ``python -m valkyrie.gateway --write-openapi docs/openapi.json`` regenerates the checked-in
OpenAPI document.
"""

from valkyrie.gateway._auth import SCOPES, authenticate, check_auth_setup, hash_token
from valkyrie.gateway._context import ANONYMOUS, Gateway, Identity
from valkyrie.gateway._factory import build_app, create_app
from valkyrie.gateway._openapi import openapi_json, write_openapi
from valkyrie.gateway._problems import PROBLEM_MEDIA_TYPE, Problem, ProblemError
from valkyrie.gateway._ratelimit import RateLimiter
from valkyrie.gateway._uvicorn import gateway_extra, run_gateway, serve_gateway

__all__ = [
    "ANONYMOUS",
    "PROBLEM_MEDIA_TYPE",
    "SCOPES",
    "Gateway",
    "Identity",
    "Problem",
    "ProblemError",
    "RateLimiter",
    "authenticate",
    "build_app",
    "check_auth_setup",
    "create_app",
    "gateway_extra",
    "hash_token",
    "openapi_json",
    "run_gateway",
    "serve_gateway",
    "write_openapi",
]
