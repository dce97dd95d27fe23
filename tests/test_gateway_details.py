"""Small things a client meets: empty filters, parameter names in errors, OPTIONS, and an OpenAPI
document that does not allow what the routes refuse."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import jsonschema_rs
import pytest

from tests._gateway_helpers import gateway, problem, served
from valkyrie import Settings
from valkyrie.gateway import build_app, openapi_json
from valkyrie.testing import SimulatedRunner

DOCUMENT: dict[str, Any] = json.loads(openapi_json(build_app(None)))


def body_validator(path: str, method: str) -> Any:
    """A validator of an operation's request body, with the document's components."""
    schema = DOCUMENT["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema_rs.validator_for({**schema, "components": DOCUMENT["components"]})


def parameter(path: str, method: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        p for p in DOCUMENT["paths"][path][method]["parameters"] if p["name"] == name
    )
    return found


def test_the_runner_status_body_needs_exactly_one_of_status_and_drain() -> None:
    valid = body_validator("/api/v2/runners/{runner_id}/status", "put")
    assert valid.is_valid({"status": "draining"})
    assert valid.is_valid({"drain": False})
    assert valid.is_valid({"status": "active", "drain": None})
    for refused in ({}, {"status": None}, {"status": "draining", "drain": True}, {"drain": None}):
        assert not valid.is_valid(refused), refused


def test_state_filters_list_their_states() -> None:
    jobs = jsonschema_rs.validator_for(parameter("/api/v2/jobs", "get", "status")["schema"])
    assert jobs.is_valid("queued,running")
    assert jobs.is_valid("")
    assert not jobs.is_valid("queued,asleep")
    runners = jsonschema_rs.validator_for(parameter("/api/v2/runners", "get", "status")["schema"])
    assert runners.is_valid("active,busy")
    assert not runners.is_valid("running")


def test_response_statuses_are_enums_and_the_deadline_says_it_is_in_the_future() -> None:
    schemas = DOCUMENT["components"]["schemas"]
    assert "timeout" in schemas["V1JobStatus"]["properties"]["status"]["enum"]
    assert schemas["Readiness"]["properties"]["status"]["const"] == "ready"
    deadline = json.dumps(schemas["JobSubmission"]["properties"]["deadline_at_ms"])
    assert "must be in the future" in deadline


@pytest.mark.nats
async def test_what_the_document_allows_the_routes_take(settings: Settings) -> None:
    async with gateway(settings) as gw:
        # JSON Schema counts 1.0 as an integer, and so does the bridge
        made = await gw.http.post(
            "/api/v2/jobs",
            content=b'{"job_type": "x", "priority": 1.0, "payload": {"v": 1.0}, '
            b'"requirements": {"memory_mb": 512.0}}',
            headers={"content-type": "application/json"},
        )
        assert made.status_code == 201, made.text
        spec = made.json()["job"]["spec"]
        assert (spec["priority"], spec["requirements"]["memory_mb"]) == (1, 512)
        assert spec["payload"] == {"v": 1.0}  # a payload is kept exactly as sent
        half = await gw.http.post("/api/v2/jobs", json={"job_type": "x", "priority": 1.5})
        assert half.status_code == 422
        config = await gw.http.put(
            "/api/v2/config/valkyrie",
            params={"merge": "true"},
            json={"dispatch": {"accept_timeout_ms": 3000.0}},
        )
        assert config.status_code == 200, config.text
        view = (await gw.http.get("/api/v2/config/valkyrie")).json()
        assert view["config"]["dispatch"]["accept_timeout_ms"] == 3000


@pytest.mark.nats
async def test_empty_filters_filter_nothing(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(SimulatedRunner(gw.bus, "r1", region="eu").run, stop)
            assert (
                await gw.http.post("/api/v2/jobs", json={"job_type": "nobody"})
            ).status_code == 201
            for path, params, key in (
                ("/api/v2/jobs", {"runner_id": ""}, "jobs"),
                ("/api/v2/jobs", {"status": ""}, "jobs"),
                ("/api/v2/runners", {"region": ""}, "runners"),
                ("/api/v2/runners", {"capabilities": ""}, "runners"),
                ("/api/v2/runners", {"status": ""}, "runners"),
                ("/api/v1/runners", {"status": ""}, "runners"),
            ):
                response = await gw.http.get(path, params=params)
                assert response.status_code == 200, (path, params, response.text)
                assert len(response.json()[key]) == 1, (path, params)
            stop.set()


@pytest.mark.nats
async def test_errors_name_parameters_as_the_client_sent_them(settings: Settings) -> None:
    async with gateway(settings) as gw:
        events = await gw.http.get("/api/v2/events", params={"last_event_id": "x"})
        assert events.status_code == 422
        assert problem(events)["errors"][0]["path"] == "query.last_event_id"
        long_key = await gw.http.post(
            "/api/v2/jobs", json={"job_type": "x"}, headers={"Idempotency-Key": "k" * 600}
        )
        assert long_key.status_code == 422
        assert problem(long_key)["errors"][0]["path"] == "header.Idempotency-Key"
        limit = await gw.http.get("/api/v2/jobs", params={"limit": "0"})
        assert problem(limit)["errors"][0]["path"] == "query.limit"


@pytest.mark.nats
async def test_options_lists_every_method_of_the_path(settings: Settings) -> None:
    async with gateway(settings) as gw:
        for path, methods in (
            ("/api/v2/jobs", "GET, OPTIONS, POST"),
            ("/api/v2/jobs/abc", "DELETE, GET, OPTIONS"),
            ("/api/v2/config/valkyrie", "GET, OPTIONS, PUT"),
            ("/api/v2/runners/r1/status", "OPTIONS, PUT"),
        ):
            response = await gw.http.options(path)
            assert response.status_code == 204, path
            assert response.headers["allow"] == methods, path
            # the same as a 405 says
            wrong = await gw.http.patch(path)
            assert wrong.status_code == 405
            assert sorted(wrong.headers["allow"].split(", ")) == methods.split(", ")


@pytest.mark.nats
async def test_the_config_api_reports_where_the_gateway_really_listens(settings: Settings) -> None:
    """`served` binds port 0 whatever http.port says (8080): the API says the port it got."""
    async with served(settings) as gw, httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        view = (await http.get("/api/v2/config/valkyrie")).json()
    port = int(gw.url.rsplit(":", 1)[1])
    assert view["config"]["http"]["port"] == port != 8080
    assert view["sources"]["http.port"] == "listening"
