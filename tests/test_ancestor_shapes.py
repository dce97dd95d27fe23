"""The ancestor's request shapes are converted, not dropped: its v2 submission names, its runner
registration, its config document."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas import ANCESTOR_SUBMISSION_FIELDS, JobState
from tests._gateway_helpers import auth_environ, bearer, gateway, problem
from tests._helpers import events_of, wait_until
from valkyrie import Client, Settings
from valkyrie.bus.codec import RUNNER_DECODER, now_ms
from valkyrie.domain.intake import parse_submission
from valkyrie.errors import SchemaError
from valkyrie.testing import SimulatedRunner

DATA = Path(__file__).resolve().parent / "data"
NOW = 1_795_765_891_808


def rfc3339(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def ancestor_body(**extra: Any) -> dict[str, Any]:
    """The ancestor's v2 request, with its six older names (and units)."""
    return {
        "job_type": "anc",
        "requirements": {"cpu_cores": 1, "max_execution_time": 600},
        "qos_requirements": {"max_latency": 50, "min_throughput": 1000},
        "performance_targets": {"max_dispatch_latency": 5000, "target_completion_time": 90},
        "deadline": rfc3339(NOW + 3_600_000),
        **extra,
    }


def test_the_six_fields_are_converted_with_their_units() -> None:
    parsed = parse_submission(
        json.dumps(ancestor_body()).encode(), received_at_ms=NOW, max_bytes=1 << 20
    )
    spec = parsed.spec
    assert spec.requirements.max_execution_time_s == 600
    assert spec.qos_requirements is not None
    assert spec.qos_requirements.max_latency_ms == 50
    assert spec.qos_requirements.min_throughput_bytes_per_s == 1000
    assert spec.performance_targets is not None
    assert spec.performance_targets.max_dispatch_latency_ms == 5  # microseconds there
    assert spec.performance_targets.target_completion_time_s == 90
    assert spec.deadline_at_ms == NOW + 3_600_000
    # every conversion is reported under the name sent, and none is "unknown, ignored"
    assert {w.path for w in parsed.warnings} == ANCESTOR_SUBMISSION_FIELDS
    assert all("converted to" in w.reason for w in parsed.warnings)


@pytest.mark.parametrize(
    ("body", "path", "words"),
    [
        ({"deadline": "tomorrow"}, "$.deadline", "RFC 3339"),
        ({"deadline": "2030-01-01"}, "$.deadline", "RFC 3339"),  # no time, no offset
        ({"deadline": rfc3339(NOW - 1000)}, "$.deadline", "in the past"),
        (
            {"requirements": {"max_execution_time": "long"}},
            "$.requirements.max_execution_time",
            "int",
        ),
        ({"requirements": {"max_execution_time": 0}}, "$.requirements.max_execution_time", ">= 1"),
        ({"qos_requirements": {"max_latency": -1}}, "$.qos_requirements.max_latency", ">= 0"),
    ],
)
def test_errors_name_the_ancestor_field_sent(body: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_submission(
            json.dumps({"job_type": "x", **body}).encode(), received_at_ms=NOW, max_bytes=1 << 20
        )
    assert [(e.path, words in e.reason) for e in caught.value.errors] == [(path, True)]


def test_the_new_name_wins_over_the_ancestors() -> None:
    body = {
        "job_type": "x",
        "requirements": {"max_execution_time": 5, "max_execution_time_s": 7},
        "deadline": "garbage",
        "deadline_at_ms": NOW + 1000,
    }
    parsed = parse_submission(json.dumps(body).encode(), received_at_ms=NOW, max_bytes=1 << 20)
    assert parsed.spec.requirements.max_execution_time_s == 7
    assert parsed.spec.deadline_at_ms == NOW + 1000
    assert {w.path: w.reason for w in parsed.warnings} == {
        "$.deadline": "ignored: deadline_at_ms is given",
        "$.requirements.max_execution_time": "ignored: requirements.max_execution_time_s is given",
    }


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_converted_fields_act_in_placement_and_explain(settings: Settings) -> None:
    async with gateway(settings) as gw:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(SimulatedRunner(gw.bus, "r1", job_types=["anc"]).run, stop)
            body = ancestor_body(deadline=rfc3339(now_ms() + 3_600_000))
            created = await gw.http.post("/api/v2/jobs", json=body)
            assert created.status_code == 201, created.text
            job_id = created.json()["job_id"]
            warned = {w["path"] for w in created.json()["warnings"]}
            assert warned == ANCESTOR_SUBMISSION_FIELDS
            # min_throughput became min_throughput_bytes_per_s: r1 declares none, so it waits
            with anyio.fail_after(10):
                while True:
                    explained = (await gw.http.get(f"/api/v2/jobs/{job_id}/explain")).json()
                    if explained.get("queue_position") is not None:
                        break
                    await anyio.sleep(0.1)
            assert "qos_throughput" in explained["causes"]
            assert explained["rejected"][0]["runners"] == ["r1"]
            # max_dispatch_latency (5000 µs = 5 ms) became an SLO it breached while waiting
            client = Client(gw.bus)

            async def breached() -> bool:
                return bool(await events_of(gw.bus, f"job.{job_id}.slo_breach"))

            await wait_until(breached, timeout_s=10)
            # the deadline (an RFC 3339 date-time) expires a job nobody can take
            soon = await gw.http.post(
                "/api/v2/jobs",
                json={"job_type": "nobody", "deadline": rfc3339(now_ms() + 800)},
            )
            assert soon.status_code == 201, soon.text
            expired = await client.wait_for_job(soon.json()["job_id"], timeout_s=10)
            assert expired.state == JobState.EXPIRED
            stop.set()


ANCESTOR_RUNNER: dict[str, Any] = {
    "capabilities": {
        "cpu_cores": 8,
        "memory_gb": 16,
        "storage_gb": 100,
        "gpu_count": 1,
        "gpu_type": "a100",
        "supported_job_types": ["Build", "test"],
        "supported_languages": ["rust", "python"],
        "supported_frameworks": ["cargo"],
        "container_runtime": "docker",
        "max_concurrent_jobs": 4,
        "average_job_duration": 120,
        "performance_tier": "High",
        "custom_capabilities": {"fpga": "yes"},
    },
    "endpoint": "http://runner-7.internal:9000",
    "protocol_support": {"valkyrie_supported": True, "preferred_protocol": "Auto"},
    "geographic_location": {"region": "eu-west", "zone": "eu-west-1a", "coordinates": [48.8, 2.3]},
    "metadata": {"team": "ci", "rack": 12},
}


@pytest.mark.nats
async def test_an_ancestor_registration_is_converted(settings: Settings) -> None:
    async with gateway(settings) as gw:
        response = await gw.http.post("/api/v2/runners/register", json=ANCESTOR_RUNNER)
        assert response.status_code == 200, response.text
        verdict = response.json()
        runner_id = verdict["runner_id"]
        assert runner_id.startswith("ancestor-")
        assert verdict["accepted"] is True
        warned = {w["path"] for w in verdict["warnings"]}
        assert {
            "$.runner_id",
            "$.endpoint",
            "$.protocol_support",
            "$.capabilities.average_job_duration",
            "$.geographic_location.coordinates",
        } <= warned
        record = RUNNER_DECODER.decode(
            (await (await gw.bus.kv("runners")).get(runner_id)).value or b""
        )
        reg = record.registration
        assert reg.capabilities.job_types == ["build", "test"]
        assert reg.capabilities.languages == ["rust", "python"]
        assert reg.capabilities.frameworks == ["cargo"]
        assert reg.capabilities.custom == {"fpga": "yes", "container_runtime": "docker"}
        assert (reg.resources.cpu_cores, reg.resources.memory_mb) == (8, 16384)
        assert (reg.resources.gpu_count, reg.resources.gpu_type) == (1, "a100")
        assert reg.max_concurrent_jobs == 4
        assert reg.performance_tier == "high"
        assert (reg.location.region, reg.location.zone) == ("eu-west", "eu-west-1a")
        assert reg.metadata == {"team": "ci", "rack": "12", "endpoint": ANCESTOR_RUNNER["endpoint"]}
        # the same endpoint registers the same runner again
        again = await gw.http.post("/api/v2/runners/register", json=ANCESTOR_RUNNER)
        assert again.json()["runner_id"] == runner_id
        # with its own id, the id is kept; errors name the ancestor's fields
        named = await gw.http.post(
            "/api/v2/runners/register", json={**ANCESTOR_RUNNER, "runner_id": "anc-1"}
        )
        assert named.json()["runner_id"] == "anc-1"
        bad = await gw.http.post(
            "/api/v2/runners/register",
            json={"capabilities": {"max_concurrent_jobs": 0, "memory_gb": -1}},
        )
        assert bad.status_code == 422
        assert {e["path"] for e in problem(bad)["errors"]} == {
            "$.capabilities.max_concurrent_jobs",
            "$.capabilities.memory_gb",
        }
        # a registration of this contract warns about fields it does not know
        plain = await gw.http.post(
            "/api/v2/runners/register", json={"runner_id": "plain", "colour": "blue"}
        )
        assert plain.json()["warnings"] == [
            {"path": "$.colour", "reason": "unknown field, ignored"}
        ]


@pytest.mark.nats
async def test_the_ancestors_config_document_is_migrated_on_put(settings: Settings) -> None:
    doc = json.loads((DATA / "ancestor-config.json").read_text())
    admin = bearer("admin")
    async with gateway(settings, environ=auth_environ()) as gw:
        checked = await gw.http.post("/api/v2/config/valkyrie/validate", json=doc, headers=admin)
        assert checked.status_code == 200, checked.text
        assert checked.json()["valid"] is True
        assert checked.json()["migration"]
        changed = await gw.http.put("/api/v2/config/valkyrie", json=doc, headers=admin)
        assert changed.status_code == 200, changed.text
        body = changed.json()
        assert body["accepted"] is True
        steps = {s["field"]: s for s in body["migration"]}
        assert set(steps) >= set(doc)  # every field of the document is accounted for
        assert steps["integration_mode"]["action"] == "changed"
        assert steps["integration_mode"]["target"] == "mode"
        assert steps["enable_zero_copy"]["action"] == "dropped"
        restart = {s["target"] for s in body["migration"] if s["action"] == "restart"}
        assert restart == {
            "http.host",
            "http.port",
            "security.tls_enabled",
            "observability.metrics_enabled",
        }
        assert body["diff"]["mode"] == {"old": "full", "new": "hybrid"}
        view = (await gw.http.get("/api/v2/config/valkyrie", headers=admin)).json()
        assert view["config"]["mode"] == "hybrid"
        assert view["runtime"]["observability.log_level"] == "warning"
        assert "http.port" not in view["runtime"]
        # a document mixing our keys and the ancestor's is ours: its ancestor keys are unknown
        mixed = await gw.http.put(
            "/api/v2/config/valkyrie", json={"mode": "full", "enable_tls": True}, headers=admin
        )
        assert mixed.status_code == 422
        assert problem(mixed)["errors"] == [{"path": "enable_tls", "reason": "unknown key"}]
