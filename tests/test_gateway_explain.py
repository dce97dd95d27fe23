"""``GET /api/v2/jobs/{id}/explain`` against a real server, with the handlers in-process."""

from __future__ import annotations

import anyio
import pytest

from tests._gateway_helpers import gateway, problem
from valkyrie import Client, Settings
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


@pytest.mark.timeout(60)
async def test_explain_says_why_a_job_waits_and_why_a_placed_job_went_there(
    settings: Settings,
) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(SimulatedRunner(gw.bus, "r1", labels={"os": "linux"}).run, stop)
            waiting = await gw.http.post(
                "/api/v2/jobs", json={"job_type": "shell", "labels": {"os": "macos"}}
            )
            assert waiting.status_code == 201, waiting.text
            job_id = waiting.json()["job_id"]
            with anyio.fail_after(10):
                while True:
                    response = await gw.http.get(f"/api/v2/jobs/{job_id}/explain")
                    if (
                        response.status_code == 200
                        and response.json()["queue_position"] is not None
                    ):
                        break
                    await anyio.sleep(0.1)
            body = response.json()
            assert body["state"] == "queued"
            assert "labels" in body["causes"]
            assert body["rejected"][0]["constraint"] == "labels"
            assert body["rejected"][0]["runners"] == ["r1"]
            assert any("without labels" in hint for hint in body["suggestions"])

            placed = await gw.http.post("/api/v2/jobs", json={"job_type": "shell"})
            placed_id = placed.json()["job_id"]
            await Client(gw.bus).wait_for_job(placed_id, timeout_s=10)
            done = (await gw.http.get(f"/api/v2/jobs/{placed_id}/explain")).json()
            assert done["placement"]["runner_id"] == "r1"
            assert done["summary"].startswith("placed on r1")
            stop.set()

        missing = await gw.http.get("/api/v2/jobs/nope/explain")
        assert missing.status_code == 404
        assert problem(missing)["status"] == 404
