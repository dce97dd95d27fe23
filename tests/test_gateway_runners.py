"""The v2 runner routes: list and filters, read, drain/undrain, registration over HTTP."""

from __future__ import annotations

import anyio
import pytest

from schemas import RunnerState
from tests._gateway_helpers import gateway, problem
from valkyrie import Settings
from valkyrie.bus.codec import RUNNER_DECODER
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


async def test_list_filter_and_read_runners(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        runners = [
            SimulatedRunner(gw.bus, "r-eu", capacity=2, job_types=["build", "test"], region="eu"),
            SimulatedRunner(gw.bus, "r-us", capacity=4, job_types=["build"], region="us"),
        ]
        async with anyio.create_task_group() as tg:
            for runner in runners:
                await tg.start(runner.run, stop)
            listed = (await gw.http.get("/api/v2/runners")).json()
            assert [r["registration"]["runner_id"] for r in listed["runners"]] == ["r-eu", "r-us"]
            assert listed["total_count"] == 2
            assert listed["healthy_count"] == 2
            assert listed["total_capacity"] == 6
            assert listed["current_utilization"] == 0.0

            eu = (await gw.http.get("/api/v2/runners", params={"region": "eu"})).json()
            assert [r["registration"]["runner_id"] for r in eu["runners"]] == ["r-eu"]
            assert eu["total_capacity"] == 2
            assert eu["total_count"] == 2
            tests = await gw.http.get("/api/v2/runners", params={"capabilities": "build,test"})
            assert tests.json()["filtered_count"] == 1
            none = await gw.http.get("/api/v2/runners", params={"capabilities": "gpu"})
            assert none.json()["filtered_count"] == 0
            active = await gw.http.get("/api/v2/runners", params={"status": "active,busy"})
            assert active.json()["filtered_count"] == 2
            paged = (await gw.http.get("/api/v2/runners", params={"limit": 1})).json()
            assert len(paged["runners"]) == 1
            assert paged["pagination"]["has_more"] is True
            bad = await gw.http.get("/api/v2/runners", params={"status": "asleep"})
            assert bad.status_code == 422
            assert problem(bad)["errors"][0]["path"] == "query.status"

            one = await gw.http.get("/api/v2/runners/r-us")
            assert one.status_code == 200
            assert one.json()["registration"]["max_concurrent_jobs"] == 4
            assert (await gw.http.get("/api/v2/runners/ghost")).status_code == 404
            stop.set()


async def test_drain_and_undrain(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        runner = SimulatedRunner(gw.bus, "r1")
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            kv = await gw.bus.kv("runners")

            async def record_state() -> tuple[RunnerState, bool]:
                record = RUNNER_DECODER.decode((await kv.get("r1")).value or b"")
                return record.state, record.drain_requested

            drained = await gw.http.put("/api/v2/runners/r1/status", json={"status": "draining"})
            assert drained.status_code == 200, drained.text
            assert drained.json() == {
                "runner_id": "r1",
                "state": "draining",
                "drain_requested": True,
            }
            assert await record_state() == (RunnerState.DRAINING, True)
            back = await gw.http.put("/api/v2/runners/r1/status", json={"drain": False})
            assert back.status_code == 200
            assert back.json()["drain_requested"] is False
            assert (await record_state())[1] is False
            active = await gw.http.put("/api/v2/runners/r1/status", json={"status": "active"})
            assert active.status_code == 200

            for body in ({}, {"status": "gone"}, {"status": "active", "drain": True}, {"x": 1}):
                response = await gw.http.put("/api/v2/runners/r1/status", json=body)
                assert response.status_code == 422, body
                assert problem(response)["errors"], body
            missing = await gw.http.put("/api/v2/runners/ghost/status", json={"drain": True})
            assert missing.status_code == 404
            stop.set()


async def test_register_over_http(settings: Settings) -> None:
    async with gateway(settings) as gw:
        registration = {
            "runner_id": "http-runner",
            "capabilities": {"job_types": ["build"], "languages": ["rust"]},
            "max_concurrent_jobs": 3,
            "location": {"region": "ap"},
        }
        response = await gw.http.post("/api/v2/runners/register", json=registration)
        assert response.status_code == 200, response.text
        verdict = response.json()
        assert verdict["accepted"] is True
        assert verdict["runner_id"] == "http-runner"
        assert verdict["state"] == "active"
        record = (await gw.http.get("/api/v2/runners/http-runner")).json()
        assert record["registration"]["capabilities"]["languages"] == ["rust"]

        invalid = await gw.http.post(
            "/api/v2/runners/register",
            json={"runner_id": "bad id!", "max_concurrent_jobs": 0},
        )
        assert invalid.status_code == 422
        paths = {e["path"] for e in problem(invalid)["errors"]}
        assert {"$.runner_id", "$.max_concurrent_jobs"} <= paths


async def test_no_registry_is_503(settings: Settings) -> None:
    async with gateway(settings, handlers=["intake"]) as gw:
        response = await gw.http.post("/api/v2/runners/register", json={"runner_id": "r1"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "registry" in problem(response)["detail"]
        drain = await gw.http.put("/api/v2/runners/r1/status", json={"drain": True})
        assert drain.status_code == 503
