"""The v2 and v1 job routes against a real server, with the handlers running in-process."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from schemas import JobState
from tests._gateway_helpers import gateway, problem
from valkyrie import Client, Settings
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats

FULL_BODY: dict[str, Any] = {
    "job_type": "build",
    "priority": 1,
    "payload": {"command": ["make", "test"], "env": {"CI": "1"}},
    "requirements": {
        "cpu_cores": 2,
        "memory_mb": 2048,
        "max_execution_time_s": 600,
        "required_capabilities": ["python"],
        "preferred_regions": ["eu-west"],
    },
    "metadata": {"project_id": "p1", "pipeline_id": "pl-9", "user_id": "u1"},
    "qos_requirements": {"max_latency_ms": 50, "priority_class": "gold"},
    "routing_hints": {
        "excluded_runners": ["r-bad"],
        "affinity_rules": [{"rule_type": "preferred", "key": "arch", "values": ["arm64"]}],
    },
    "performance_targets": {"max_dispatch_latency_ms": 5},
    "correlation_id": "corr-1",
    "retry_policy": {"max_attempts": 2},
    "labels": {"team": "infra"},
}


async def test_http_and_nats_submissions_give_identical_records(settings: Settings) -> None:
    body = {**FULL_BODY, "deadline_at_ms": int(time.time() * 1000) + 3_600_000}
    async with gateway(settings) as gw:
        response = await gw.http.post("/api/v2/jobs", json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["duplicate"] is False
        assert created["state"] == "queued"
        assert response.headers["location"] == f"/api/v2/jobs/{created['job_id']}"
        client = Client(gw.bus)
        verdict = await client.submit(body)
        assert verdict is not None
        assert verdict.accepted
        assert verdict.job_id
        over_nats = await client.get_job(verdict.job_id)
        over_http = await client.get_job(created["job_id"])
        assert over_http.id != over_nats.id
        assert over_http.spec == over_nats.spec
        assert (over_http.api_version, over_http.state) == (over_nats.api_version, over_nats.state)
        fetched = await gw.http.get(f"/api/v2/jobs/{over_http.id}")
        assert fetched.status_code == 200
        assert fetched.json()["spec"] == created["job"]["spec"]


async def test_v1_and_ancestor_shaped_bodies(settings: Settings) -> None:
    async with gateway(settings) as gw:
        client = Client(gw.bus)
        v1 = {"type": "Build", "payload": {"repo": "x"}, "pipeline": "pl-1", "priority": 0}
        # the v1 body on the v2 route, exactly as the bus takes it
        response = await gw.http.post("/api/v2/jobs", json=v1)
        assert response.status_code == 201, response.text
        assert response.json()["api_version"] == "v1"
        verdict = await client.submit(v1)
        assert verdict is not None
        assert verdict.job_id
        record = await client.get_job(response.json()["job_id"])
        assert record.spec == (await client.get_job(verdict.job_id)).spec
        assert record.spec.job_type == "build"
        assert record.spec.metadata["pipeline_id"] == "pl-1"
        # the ancestor's v2 request: its older names are converted, each conversion named
        ancestor = {
            "job_type": "test",
            "priority": 3,
            "payload": {"suite": "unit"},
            "requirements": {"cpu_cores": 1, "memory_mb": 512, "max_execution_time": 60},
            "metadata": {"user_id": "u"},
            "deadline": "2030-01-01T00:00:00Z",
        }
        response = await gw.http.post("/api/v2/jobs", json=ancestor)
        assert response.status_code == 201, response.text
        created = response.json()
        assert created["job"]["spec"]["requirements"]["memory_mb"] == 512
        assert created["job"]["spec"]["requirements"]["max_execution_time_s"] == 60
        assert created["job"]["spec"]["deadline_at_ms"] == 1_893_456_000_000
        warnings = {w["path"]: w["reason"] for w in created["warnings"]}
        assert "deadline_at_ms" in warnings["$.deadline"]
        assert "max_execution_time_s" in warnings["$.requirements.max_execution_time"]
        # the legacy route answers in the ancestor's shape
        response = await gw.http.post("/api/v1/jobs", json={"type": "deploy", "payload": {}})
        assert response.status_code == 201
        legacy = response.json()
        assert legacy["status"] == "submitted"
        assert legacy["message"]
        status = await gw.http.get(f"/api/v1/jobs/{legacy['job_id']}")
        assert status.status_code == 200
        assert status.json()["status"] == "queued"
        assert status.json()["created_at"].isdigit()


async def test_idempotent_retries_return_the_original_job(settings: Settings) -> None:
    async with gateway(settings) as gw:
        headers = {"Idempotency-Key": "order-42"}
        first = await gw.http.post("/api/v2/jobs", json={"job_type": "build"}, headers=headers)
        assert first.status_code == 201, first.text
        again = await gw.http.post("/api/v2/jobs", json={"job_type": "build"}, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["duplicate"] is True
        assert again.json()["job_id"] == first.json()["job_id"]
        assert again.json()["job"]["spec"]["idempotency_key"] == "order-42"
        # the same key in the body is the same submission (v1 route too)
        in_body = await gw.http.post(
            "/api/v1/jobs", json={"job_type": "build", "idempotency_key": "order-42"}
        )
        assert in_body.status_code == 200
        assert in_body.json()["job_id"] == first.json()["job_id"]
        clash = await gw.http.post(
            "/api/v2/jobs",
            json={"job_type": "build", "idempotency_key": "other"},
            headers=headers,
        )
        assert clash.status_code == 422
        assert problem(clash)["errors"][0]["path"] == "$.idempotency_key"
        assert len((await gw.http.get("/api/v2/jobs")).json()["jobs"]) == 1


async def test_submission_errors(settings: Settings) -> None:
    env = {"VALKYRIE_HTTP__MAX_BODY_BYTES": "2048"}
    async with gateway(settings, environ=env) as gw:
        broken = await gw.http.post(
            "/api/v2/jobs", content=b'{"job_type": ', headers={"content-type": "application/json"}
        )
        assert broken.status_code == 400
        assert problem(broken)["type"].endswith("/invalid-json")
        empty = await gw.http.post("/api/v2/jobs", content=b"")
        assert empty.status_code == 400
        form = await gw.http.post(
            "/api/v2/jobs", content=b"job_type=build", headers={"content-type": "text/plain"}
        )
        assert form.status_code == 415
        big = await gw.http.post("/api/v2/jobs", json={"job_type": "x", "payload": "a" * 4096})
        assert big.status_code == 413
        assert "http.max_body_bytes" in problem(big)["detail"]
        invalid = await gw.http.post(
            "/api/v2/jobs",
            json={
                "job_type": "",
                "priority": 9,
                "requirements": {"cpu_cores": -1, "memory_mb": "lots"},
                "routing_hints": {"preferred_runners": ["a"], "excluded_runners": ["a"]},
            },
        )
        assert invalid.status_code == 422
        paths = {e["path"] for e in problem(invalid)["errors"]}
        assert {
            "$.job_type",
            "$.priority",
            "$.requirements.cpu_cores",
            "$.requirements.memory_mb",
        } <= paths
        not_object = await gw.http.post("/api/v2/jobs", json=[1, 2])
        assert not_object.status_code == 422
        past = await gw.http.post("/api/v2/jobs", json={"job_type": "x", "deadline_at_ms": 1})
        assert past.status_code == 422
        assert problem(past)["errors"][0]["path"] == "$.deadline_at_ms"
        assert (await gw.http.get("/api/v2/jobs")).json()["total_count"] == 0


async def test_read_cancel_and_conflicts(settings: Settings) -> None:
    async with gateway(settings) as gw:
        missing = await gw.http.get("/api/v2/jobs/nope")
        assert missing.status_code == 404
        assert problem(missing)["detail"]
        assert (await gw.http.get("/api/v2/jobs/not.a*valid>id")).status_code == 404
        assert (await gw.http.delete("/api/v2/jobs/nope")).status_code == 404
        job_id = (await gw.http.post("/api/v2/jobs", json={"job_type": "build"})).json()["job_id"]
        cancel = await gw.http.delete(f"/api/v2/jobs/{job_id}")
        assert cancel.status_code == 202
        assert cancel.json()["cancel_requested"] is True
        record = await Client(gw.bus).wait_for_job(job_id, timeout_s=10)
        assert record.state == JobState.CANCELLED
        again = await gw.http.delete(f"/api/v2/jobs/{job_id}")
        assert again.status_code == 409
        assert "cancelled" in problem(again)["detail"]
        v1 = await gw.http.delete(f"/api/v1/jobs/{job_id}")
        assert v1.status_code == 409
        status = await gw.http.get(f"/api/v1/jobs/{job_id}")
        assert status.json()["status"] == "cancelled"
        assert status.json()["completed_at"]
        assert (await gw.http.get("/api/v1/jobs/nope")).status_code == 404


async def test_list_filters_sorting_and_pagination(settings: Settings) -> None:
    async with gateway(settings) as gw:
        ids = []
        for priority in (3, 0, 2, 1):
            response = await gw.http.post(
                "/api/v2/jobs", json={"job_type": "build", "priority": priority}
            )
            ids.append(response.json()["job_id"])
            await anyio.sleep(0.005)  # distinct submission instants
        await gw.http.delete(f"/api/v2/jobs/{ids[0]}")
        await Client(gw.bus).wait_for_job(ids[0], timeout_s=10)

        page = (await gw.http.get("/api/v2/jobs", params={"limit": 2})).json()
        assert page["total_count"] == 4
        assert page["filtered_count"] == 4
        assert [j["id"] for j in page["jobs"]] == [ids[3], ids[2]]  # newest first
        assert page["pagination"] == {"limit": 2, "offset": 0, "has_more": True}
        rest = (await gw.http.get("/api/v2/jobs", params={"limit": 2, "offset": 2})).json()
        assert [j["id"] for j in rest["jobs"]] == [ids[1], ids[0]]
        assert rest["pagination"]["has_more"] is False

        by_priority = await gw.http.get(
            "/api/v2/jobs", params={"sort_by": "priority", "sort_order": "asc"}
        )
        assert [j["spec"]["priority"] for j in by_priority.json()["jobs"]] == [0, 1, 2, 3]
        by_state = await gw.http.get("/api/v2/jobs", params={"sort_by": "state"})
        assert by_state.json()["jobs"][0]["state"] == "cancelled"

        queued = (await gw.http.get("/api/v2/jobs", params={"status": "queued"})).json()
        assert queued["filtered_count"] == 3
        assert queued["total_count"] == 4
        both = await gw.http.get("/api/v2/jobs", params={"status": "queued,cancelled"})
        assert both.json()["filtered_count"] == 4
        none = await gw.http.get("/api/v2/jobs", params={"runner_id": "r-none"})
        assert none.json()["filtered_count"] == 0

        bad = await gw.http.get("/api/v2/jobs", params={"status": "sleeping"})
        assert bad.status_code == 422
        assert problem(bad)["errors"][0]["path"] == "query.status"
        for params in ({"limit": 0}, {"limit": "x"}, {"offset": -1}, {"sort_by": "name"}):
            response = await gw.http.get("/api/v2/jobs", params=params)
            assert response.status_code == 422, params
            assert problem(response)["errors"], params


async def test_runner_filter_and_v1_runner_list(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        runner = SimulatedRunner(gw.bus, "r1", job_types=["build"], region="eu")
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            job_id = (
                await gw.http.post(
                    "/api/v2/jobs", json={"job_type": "build", "payload": {"sim": {"work_s": 0}}}
                )
            ).json()["job_id"]
            record = await Client(gw.bus).wait_for_job(job_id, timeout_s=10)
            assert record.state == JobState.SUCCEEDED
            ran = await gw.http.get("/api/v2/jobs", params={"runner_id": "r1"})
            assert [j["id"] for j in ran.json()["jobs"]] == [job_id]
            status = (await gw.http.get(f"/api/v1/jobs/{job_id}")).json()
            assert status["status"] == "completed"
            assert status["runner_id"] == "r1"
            assert status["exit_code"] == 0
            legacy = (await gw.http.get("/api/v1/runners")).json()
            assert legacy["count"] == 1
            assert legacy["runners"][0]["runner_id"] == "r1"
            assert legacy["runners"][0]["capabilities"] == ["build"]
            stop.set()


async def test_legacy_api_switched_off(settings: Settings) -> None:
    env = {"VALKYRIE_FEATURES__LEGACY_V1_API": "false"}
    async with gateway(settings, environ=env) as gw:
        response = await gw.http.post("/api/v1/jobs", json={"type": "build"})
        assert response.status_code == 404
        assert problem(response)["type"].endswith("/legacy-api-disabled")
        assert (await gw.http.get("/api/v1/runners")).status_code == 404


async def test_a_stored_submission_without_a_verdict_is_504_not_503(settings: Settings) -> None:
    """503 invites a retry; this submission is stored and will be taken in, so it must not be
    retried as if nothing happened (a second job, without an Idempotency-Key)."""
    environ = {"VALKYRIE_HTTP__REQUEST_TIMEOUT_S": "0.5"}
    async with gateway(settings, handlers=[], environ=environ) as gw:
        response = await gw.http.post("/api/v2/jobs", json={"job_type": "shell"})
        assert response.status_code == 504, response.text
        detail = problem(response)["detail"]
        assert "stored (stream sequence" in detail
        assert "Idempotency-Key" in detail
        assert "retry-after" not in response.headers
