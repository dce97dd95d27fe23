"""Property-based fuzzing of every route from the gateway's OpenAPI document (schemathesis).

The gateway runs under uvicorn, with all handlers, against the session's nats-server, in a thread
of its own (schemathesis calls it synchronously). Every response must be a documented status with
a documented content type and body, and never a 5xx. Routes that change the runtime config are
fuzzed too; the config is reset after each of their cases, so that one generated document (say, a
tiny ``http.request_timeout_s``) cannot spoil the cases after it. The event stream never ends, so
it is left to tests/test_gateway_sse.py.

Every operation is fuzzed twice: with authentication off, and with it on and an admin token (all
scopes), so that the scoped routes run their whole code behind the auth guard too. Each case is
its own test id (``test_…[GET /api/v2/jobs][admin]``), so every one runs under pytest-xdist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests._gateway_helpers import Served, auth_environ, bearer, served
from tests._helpers import settings_for, unique_prefix
from valkyrie.client.config import ConfigClient
from valkyrie.gateway import build_app, openapi_json
from valkyrie.gateway._routes_config import wait_applied

pytestmark = [pytest.mark.nats, pytest.mark.slow]

# the document the app generates (what it serves); test_gateway_openapi.py keeps docs/ equal to it
SCHEMA = schemathesis.openapi.from_dict(json.loads(openapi_json(build_app(None)))).exclude(
    path="/api/v2/events"
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
#: operations whose accepted cases change the runtime config
MUTATING = {
    ("PUT", "/api/v2/config/valkyrie"),
    ("POST", "/api/v2/integration/fallback"),
}


#: the fuzzer is one caller sending as fast as it can: rate limits would answer most of it
UNLIMITED = {
    "VALKYRIE_HTTP__RATE_LIMIT_PER_S": "1000000",
    "VALKYRIE_HTTP__RATE_LIMIT_BURST": "1000000",
}


@dataclass
class Stack:
    served: Served
    portal: BlockingPortal
    headers: dict[str, str]

    def reset_config(self) -> None:
        async def reset() -> None:
            verdict = await ConfigClient(self.served.bus).change(replace={})
            assert verdict.accepted, verdict.errors
            if verdict.revision is not None:
                assert await wait_applied(self.served.live, verdict.revision, 10)

        self.portal.call(reset)


#: how the gateway is run: without authentication, or requiring it (the cases send the admin token)
AUTH_MODES = ["open", "admin"]


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, nats_url: str) -> Iterator[Stack]:
    admin = request.param == "admin"
    environ = {**UNLIMITED, **(auth_environ() if admin else {})}
    config = settings_for(nats_url, unique_prefix())
    with (
        start_blocking_portal(backend="asyncio") as portal,
        portal.wrap_async_context_manager(served(config, environ=environ)) as gateway,
    ):
        yield Stack(gateway, portal, bearer("admin") if admin else {})


@pytest.mark.parametrize("stack", AUTH_MODES, indirect=True)
@SCHEMA.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_no_schema_violations(
    case: schemathesis.Case[Any], stack: Stack
) -> None:
    response = case.call(base_url=stack.served.url, timeout=30, headers=stack.headers)
    try:
        case.validate_response(response, checks=CHECKS)
    finally:
        if (case.method.upper(), case.path) in MUTATING and response.status_code < 300:
            stack.reset_config()
