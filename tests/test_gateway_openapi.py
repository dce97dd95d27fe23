"""The OpenAPI document: served by the gateway and checked in (docs/openapi.json) without drift."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests._gateway_helpers import asgi_transport
from tests._helpers import ROOT, config_for_test
from valkyrie import Settings, connect
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import build_app, create_app, openapi_json

CHECKED_IN = ROOT / "docs" / "openapi.json"
REGENERATE = "python -m valkyrie.gateway --write-openapi docs/openapi.json"


def test_checked_in_document_is_current() -> None:
    assert CHECKED_IN.read_text() == openapi_json(build_app(None)), (
        f"docs/openapi.json is stale: run `{REGENERATE}`"
    )


def test_check_command_reports_drift(tmp_path: object) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "valkyrie.gateway", "--check", str(CHECKED_IN)],
        capture_output=True,
        cwd=ROOT,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


def test_document_covers_every_route_and_body() -> None:
    document = json.loads(CHECKED_IN.read_text())
    operations = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete")
    }
    # the ancestor's 18 v2 routes, the event stream, and explain
    assert len([o for o in operations if o[1].startswith("/api/v2/")]) == 20
    assert len([o for o in operations if o[1].startswith("/api/v1/")]) == 4
    assert {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")} <= operations
    body = document["paths"]["/api/v2/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["anyOf"] == [
        {"$ref": "#/components/schemas/JobSubmission"},
        {"$ref": "#/components/schemas/LegacyJobV1"},
    ]
    job_schema = document["components"]["schemas"]["JobSubmission"]
    assert job_schema["required"] == ["job_type"]
    problem_response = document["paths"]["/api/v2/jobs"]["post"]["responses"]["422"]
    assert "application/problem+json" in problem_response["content"]
    secured = document["paths"]["/api/v2/jobs"]["post"]["security"]
    assert secured == [{"bearerAuth": []}]


@pytest.mark.nats
async def test_gateway_serves_the_same_document(settings: Settings) -> None:
    bus = await connect(settings)
    try:
        live = LiveConfig(config_for_test(settings))
        app = create_app(bus, live, CollectorRegistry())
        transport = asgi_transport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            served = (await http.get("/schema/openapi.json")).json()
        assert served == json.loads(CHECKED_IN.read_text())
    finally:
        await bus.close()
