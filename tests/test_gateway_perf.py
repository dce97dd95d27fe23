"""Performance figures from the event stream, health, diagnostics, probes, and 503s."""

from __future__ import annotations

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from schemas import HealthSummary, JobState
from tests._gateway_helpers import asgi_transport, gateway, problem
from tests._helpers import config_for_test
from valkyrie import Client, Settings, connect, discover_handlers
from valkyrie.bus.codec import encode, now_ms
from valkyrie.config.live import LiveConfig
from valkyrie.gateway import create_app
from valkyrie.testing import SimulatedRunner

pytestmark = pytest.mark.nats


async def test_metrics_are_computed_from_events(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        runner = SimulatedRunner(gw.bus, "r1", capacity=4)
        client = Client(gw.bus)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run, stop)
            ids = []
            for n in range(5):
                sim = {"outcome": "failed", "exit_code": 1} if n == 0 else {}
                response = await gw.http.post(
                    "/api/v2/jobs",
                    json={
                        "job_type": "shell",
                        "payload": {"sim": sim},
                        "retry_policy": {"max_attempts": 1},
                    },
                )
                ids.append(response.json()["job_id"])
            finals = [await client.wait_for_job(i, timeout_s=15) for i in ids]
            assert [r.state for r in finals].count(JobState.SUCCEEDED) == 4
            stuck = await gw.http.post("/api/v2/jobs", json={"job_type": "nobody-runs-this"})
            assert stuck.status_code == 201
            metrics = (await gw.http.get("/api/v2/performance/metrics")).json()
            stop.set()
        assert metrics["window_s"] == 300
        latency = metrics["dispatch_latency"]
        assert latency["count"] == 5
        assert 0 <= latency["p50_ms"] <= latency["p95_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert metrics["outcomes"] == {"succeeded": 4, "failed": 1}
        assert metrics["success_rate"] == 0.8
        assert metrics["throughput"]["submitted_per_s"] == round(6 / 300, 4)
        assert metrics["throughput"]["finished_per_s"] == round(5 / 300, 4)
        assert metrics["queue_depth"] == 1
        assert metrics["events_read"] >= 6
        assert metrics["truncated"] is False
        narrow = await gw.http.get("/api/v2/performance/metrics", params={"window_s": 0})
        assert narrow.status_code == 422


async def test_health_prefers_a_fresh_monitor_summary(settings: Settings) -> None:
    handlers = [name for name in discover_handlers() if name != "monitor"]
    async with gateway(settings, handlers=handlers) as gw:
        own = (await gw.http.get("/api/v2/performance/health")).json()
        assert own["source"] == "gateway"
        assert own["monitor"] is None
        assert {c["component"] for c in own["checks"]} >= {"nats", "jetstream", "runner_pool"}
        assert own["overall_status"] == "healthy"

        stats = await gw.bus.kv("stats")
        summary = HealthSummary(
            status="degraded",
            at_ms=now_ms(),
            mode="full",
            reasons=["consumer dispatcher: 9000 pending"],
            stale_after_ms=5000,
        )
        await stats.put("health", encode(summary))
        seen = (await gw.http.get("/api/v2/performance/health")).json()
        assert seen["source"] == "monitor"
        assert seen["overall_status"] == "degraded"
        assert seen["monitor"]["reasons"] == ["consumer dispatcher: 9000 pending"]
        assert "consumer dispatcher: 9000 pending" in seen["reasons"]
        status = (await gw.http.get("/api/v2/integration/status")).json()
        assert status["health"] == "degraded"

        stale = HealthSummary(status="unhealthy", at_ms=now_ms() - 60_000, mode="full")
        await stats.put("health", encode(stale))
        again = (await gw.http.get("/api/v2/performance/health")).json()
        assert again["source"] == "gateway"
        assert again["overall_status"] == "healthy"


async def test_diagnostics_probes_and_metrics(settings: Settings) -> None:
    async with gateway(settings) as gw:
        diagnostics = (await gw.http.get("/api/v2/performance/diagnostics")).json()
        assert diagnostics["config_revision"] == 0
        assert diagnostics["mode"] == "full"
        assert diagnostics["versions"]["litestar"]
        assert diagnostics["versions"]["nats-server"]
        assert diagnostics["nats"]["connected"] is True
        streams = {s["name"]: s for s in diagnostics["streams"]}
        assert gw.bus.names.stream("submit") in streams
        submit = streams[gw.bus.names.stream("submit")]
        assert submit["reachable"]
        assert "intake" in {c["name"] for c in submit["consumers"]}

        assert (await gw.http.get("/healthz")).json() == {"status": "alive"}
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        exposition = await gw.http.get("/metrics")
        assert exposition.headers["content-type"].startswith("text/plain")
        text = exposition.text
        assert 'valkyrie_http_requests_total{method="GET",route="/readyz",status="200"} 1.0' in text
        assert "valkyrie_http_request_duration_seconds_bucket" in text


async def test_nats_unavailable_is_503(settings: Settings) -> None:
    bus = await connect(settings)
    await bus.nc.close()
    live = LiveConfig(config_for_test(settings))
    app = create_app(bus, live, CollectorRegistry())
    transport = asgi_transport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        for method, path, body in [
            ("GET", "/readyz", None),
            ("GET", "/api/v2/jobs/abc", None),
            ("GET", "/api/v2/jobs", None),
            ("POST", "/api/v2/jobs", {"job_type": "build"}),
            ("GET", "/api/v2/runners", None),
            ("GET", "/api/v2/events", None),
        ]:
            response = await http.request(method, path, json=body)
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["retry-after"] == "1"
            problem(response)
        health = (await http.get("/api/v2/performance/health")).json()
        assert health["overall_status"] == "unhealthy"
        assert (await http.get("/healthz")).status_code == 200
