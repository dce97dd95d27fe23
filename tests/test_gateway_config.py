"""Config routes (read, change, reload, validate) and integration routes (status, fallback)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests._gateway_helpers import gateway, problem
from valkyrie import Settings
from valkyrie.client.config import ConfigClient

pytestmark = pytest.mark.nats


async def test_read_and_change_the_config(settings: Settings) -> None:
    async with gateway(settings) as gw:
        view = (await gw.http.get("/api/v2/config/valkyrie")).json()
        assert view["revision"] == 0
        assert view["config"]["mode"] == "full"
        assert view["sources"]["dispatch.accept_timeout_ms"] == "default"
        assert view["sources"]["profile"] == "profile"

        merged = await gw.http.put(
            "/api/v2/config/valkyrie",
            params={"merge": "true"},
            json={"dispatch": {"accept_timeout_ms": 3000}, "scheduling.aging_step_s": 10.0},
        )
        assert merged.status_code == 200, merged.text
        change = merged.json()
        assert change["accepted"]
        assert change["revision"] == 1
        assert change["applied_here"]
        assert change["diff"]["dispatch.accept_timeout_ms"] == {"old": 5000, "new": 3000}
        view = (await gw.http.get("/api/v2/config/valkyrie")).json()
        assert view["revision"] == 1
        assert view["config"]["dispatch"]["accept_timeout_ms"] == 3000
        assert view["sources"]["dispatch.accept_timeout_ms"] == "runtime"
        assert view["runtime"] == {
            "dispatch.accept_timeout_ms": 3000,
            "scheduling.aging_step_s": 10.0,
        }

        # without merge the document becomes the whole runtime layer
        replaced = await gw.http.put(
            "/api/v2/config/valkyrie", json={"dispatch": {"accept_timeout_ms": 4000}}
        )
        assert replaced.status_code == 200, replaced.text
        view = (await gw.http.get("/api/v2/config/valkyrie")).json()
        assert view["runtime"] == {"dispatch.accept_timeout_ms": 4000}

        # GET -> PUT round-trips (the ancestor's could not)
        roundtrip = await gw.http.put("/api/v2/config/valkyrie", json=view["config"])
        assert roundtrip.status_code == 200, roundtrip.text
        history = await ConfigClient(gw.bus).history()
        assert history[-1].changed_by == "http:anonymous"


async def test_config_changes_are_refused_with_every_error(settings: Settings) -> None:
    async with gateway(settings) as gw:
        invalid = await gw.http.put(
            "/api/v2/config/valkyrie",
            json={
                "dispatch": {"accept_timeout_ms": 1, "bogus": 1},
                "mode": "turbo",
                "nonsense.key": 2,
            },
        )
        assert invalid.status_code == 422
        paths = {e["path"] for e in problem(invalid)["errors"]}
        assert {"nonsense.key"} <= paths
        invalid = await gw.http.put(
            "/api/v2/config/valkyrie", json={"dispatch": {"accept_timeout_ms": 1, "bogus": 1}}
        )
        paths = {e["path"] for e in problem(invalid)["errors"]}
        assert {"dispatch.accept_timeout_ms", "dispatch.bogus"} <= paths
        not_live = await gw.http.put("/api/v2/config/valkyrie", json={"http": {"port": 9999}})
        assert not_live.status_code == 422
        assert problem(not_live)["errors"][0]["path"] == "http.port"
        assert "restart" in problem(not_live)["errors"][0]["reason"]
        assert (await gw.http.put("/api/v2/config/valkyrie", json=[1])).status_code == 422
        assert (await gw.http.put("/api/v2/config/valkyrie", content=b"{")).status_code == 400
        assert (await gw.http.get("/api/v2/config/valkyrie")).json()["revision"] == 0


async def test_validate_never_fails_on_odd_documents(settings: Settings) -> None:
    async with gateway(settings) as gw:

        async def validate(doc: object, **params: str) -> dict[str, Any]:
            response = await gw.http.post(
                "/api/v2/config/valkyrie/validate",
                content=json.dumps(doc),
                headers={"content-type": "application/json"},
                params=params,
            )
            assert response.status_code == 200, response.text
            result: dict[str, Any] = response.json()
            return result

        assert await validate({"dispatch": {"accept_timeout_ms": 2000}}) == {
            "valid": True,
            "errors": [],
            "warnings": [],
            "migration": None,
        }
        partial = await validate({"health.consumer_lag_degraded": 10**9})
        assert partial["valid"] is False
        assert partial["errors"] == [
            {
                "path": "health.consumer_lag_degraded",
                "reason": "must be below health.consumer_lag_unhealthy",
            }
        ]
        restart = await validate({"http": {"port": 1234}})
        assert restart["valid"] is True
        assert any(w["path"] == "http.port" for w in restart["warnings"])
        odd: object
        for odd in (
            [],
            "text",
            None,
            {"dispatch": 5},
            {"dispatch": 5, "dispatch.accept_timeout_ms": 1},
            {"a.b.c": 1},
            {"dispatch": {"x.y": 1}},
            {"mode": 3},
        ):
            assert (await validate(odd))["valid"] is False, odd
        assert (await validate({"mode": None}))["valid"] is True  # null removes an override
        production = await validate({"profile": "production"})
        assert production["valid"] is True
        assert production["warnings"]


async def test_reload_reports_the_revision_in_force(settings: Settings) -> None:
    async with gateway(settings) as gw:
        verdict = await ConfigClient(gw.bus).change(set_values={"dispatch.max_queue_scan": 100})
        assert verdict.accepted
        reloaded = await gw.http.post("/api/v2/config/valkyrie/reload")
        assert reloaded.status_code == 200
        assert reloaded.json() == {
            "revision": 1,
            "latest_revision": 1,
            "applied": True,
            "errors": [],
        }
        assert gw.live.current.dispatch.max_queue_scan == 100


async def test_integration_status_capabilities_and_fallback(settings: Settings) -> None:
    async with gateway(settings) as gw:
        status = (await gw.http.get("/api/v2/integration/status")).json()
        assert status["integration_mode"] == "full"
        assert status["fallback_mode"] is False
        assert status["health"] in ("healthy", "degraded", "unhealthy")
        caps = (await gw.http.get("/api/v2/integration/capabilities")).json()
        assert caps["api_versions"] == ["v1", "v2"]
        assert "fallback" in caps["modes"]
        assert caps["features"]["legacy_v1_api"] is True

        hybrid = await gw.http.put(
            "/api/v2/config/valkyrie", params={"merge": "true"}, json={"mode": "hybrid"}
        )
        assert hybrid.status_code == 200
        on = await gw.http.post("/api/v2/integration/fallback", json={"enable": True})
        assert on.status_code == 200, on.text
        assert on.json()["fallback_mode"] is True
        assert on.json()["previous_mode"] == "hybrid"
        assert gw.live.current.mode == "fallback"
        status = (await gw.http.get("/api/v2/integration/status")).json()
        assert status["integration_mode"] == "fallback"
        assert status["fallback_mode"] is True
        again = await gw.http.post("/api/v2/integration/fallback", json={"enable": True})
        assert again.json()["revision"] == on.json()["revision"]  # nothing changed

        off = await gw.http.post("/api/v2/integration/fallback", json={"enable": False})
        assert off.status_code == 200
        assert off.json()["integration_mode"] == "hybrid"  # back to the mode before it
        assert gw.live.current.mode == "hybrid"

        bad = await gw.http.post("/api/v2/integration/fallback", json={"enable": "yes"})
        assert bad.status_code == 422
        assert problem(bad)["errors"][0]["path"] == "$.enable"
        # an empty body means {"enable": false}
        assert (await gw.http.post("/api/v2/integration/fallback")).status_code == 200
