"""Bearer tokens and scopes, rate limits, body limits, CORS and auditing, all read live."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from tests._gateway_helpers import TOKENS, auth_environ, bearer, gateway, problem
from tests._helpers import audits_of
from valkyrie import Settings
from valkyrie.client.config import ConfigClient
from valkyrie.gateway import authenticate, hash_token
from valkyrie.gateway._routes_config import wait_applied

pytestmark = pytest.mark.nats

#: (method, path, json body, scope it needs)
ROUTES: list[tuple[str, str, object, str]] = [
    ("POST", "/api/v2/jobs", {"job_type": "build"}, "jobs:write"),
    ("DELETE", "/api/v2/jobs/nope", None, "jobs:write"),
    ("GET", "/api/v2/jobs", None, "jobs:read"),
    ("GET", "/api/v2/jobs/nope", None, "jobs:read"),
    ("GET", "/api/v2/runners", None, "jobs:read"),
    ("GET", "/api/v2/performance/health", None, "jobs:read"),
    ("PUT", "/api/v2/runners/r1/status", {"drain": True}, "runners:admin"),
    ("POST", "/api/v2/runners/register", {"runner_id": "r9"}, "runners:admin"),
    ("GET", "/api/v2/config/valkyrie", None, "config:admin"),
    ("POST", "/api/v2/config/valkyrie/validate", {}, "config:admin"),
    ("POST", "/api/v2/integration/fallback", {"enable": False}, "config:admin"),
    ("POST", "/api/v1/jobs", {"type": "build"}, "jobs:write"),
    ("GET", "/api/v1/runners", None, "jobs:read"),
]


async def test_tokens_and_scopes(settings: Settings) -> None:
    # every route is tried with a wrong token: more failures than one address may make
    # (tests/test_gateway_hardening.py checks that limit)
    environ = auth_environ(VALKYRIE_HTTP__FAILED_AUTH_BURST="1000")
    async with gateway(settings, environ=environ) as gw:
        for method, path, body, scope in ROUTES:
            anonymous = await gw.http.request(method, path, json=body)
            assert anonymous.status_code == 401, (method, path)
            assert anonymous.headers["www-authenticate"].startswith("Bearer")
            problem(anonymous)
            unknown = await gw.http.request(
                method, path, json=body, headers={"Authorization": "Bearer not-a-token"}
            )
            assert unknown.status_code == 401, (method, path)
            for name, (_token, scopes) in TOKENS.items():
                response = await gw.http.request(method, path, json=body, headers=bearer(name))
                if scope in scopes:
                    assert response.status_code not in (401, 403), (name, method, path)
                else:
                    assert response.status_code == 403, (name, method, path)
                    assert scope in problem(response)["detail"]
        # probes, metrics and the OpenAPI document stay open
        for path in ("/healthz", "/readyz", "/metrics", "/schema/openapi.json"):
            assert (await gw.http.get(path)).status_code == 200, path


async def test_auth_changes_apply_without_restart(settings: Settings) -> None:
    async with gateway(settings) as gw:
        assert (await gw.http.get("/api/v2/jobs")).status_code == 200
        tokens = [{"name": "ops", "sha256": hash_token("s3cret"), "scopes": ["jobs:read"]}]
        verdict = await ConfigClient(gw.bus).change(
            set_values={"http.auth_required": True, "http.tokens": tokens}
        )
        assert verdict.accepted, verdict.errors
        assert verdict.revision is not None
        assert await wait_applied(gw.live, verdict.revision, 5)
        assert (await gw.http.get("/api/v2/jobs")).status_code == 401
        ok = await gw.http.get("/api/v2/jobs", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # scheme names are case-insensitive
        ok = await gw.http.get("/api/v2/jobs", headers={"Authorization": "bearer s3cret"})
        assert ok.status_code == 200


def test_authenticate_matches_hashes_only() -> None:
    from valkyrie.config.model import HttpConfig, TokenConfig

    http = HttpConfig(
        tokens=[TokenConfig(name="a", sha256=hash_token("t-a"), scopes=["jobs:read"])]
    )
    identity = authenticate("Bearer t-a", http)
    assert identity is not None
    assert identity.name == "a"
    assert identity.authenticated
    assert authenticate("Bearer " + hash_token("t-a"), http) is None
    assert authenticate("Basic t-a", http) is None
    assert authenticate("Bearer", http) is None
    assert authenticate(None, http) is None


async def test_rate_limits_per_token_with_retry_after(settings: Settings) -> None:
    env = auth_environ(
        VALKYRIE_HTTP__RATE_LIMIT_PER_S="0.5",
        VALKYRIE_HTTP__RATE_LIMIT_BURST="2",
    )
    async with gateway(settings, environ=env) as gw:
        statuses = [
            (await gw.http.get("/api/v2/jobs", headers=bearer("reader"))).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]
        limited = await gw.http.get("/api/v2/jobs", headers=bearer("reader"))
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert problem(limited)["type"].endswith("/rate-limited")
        # another token has its own bucket; probes are never limited
        assert (await gw.http.get("/api/v2/jobs", headers=bearer("writer"))).status_code == 200
        assert (await gw.http.get("/healthz")).status_code == 200


async def test_per_token_rate_override(settings: Settings) -> None:
    tokens = (
        '[{"name": "fast", "sha256": "' + hash_token("f") + '", "scopes": ["jobs:read"], '
        '"rate_limit_per_s": 1000}]'
    )
    env = {
        "VALKYRIE_HTTP__AUTH_REQUIRED": "true",
        "VALKYRIE_HTTP__TOKENS": tokens,
        "VALKYRIE_HTTP__RATE_LIMIT_PER_S": "0.1",
        "VALKYRIE_HTTP__RATE_LIMIT_BURST": "3",
    }
    async with gateway(settings, environ=env) as gw:
        headers = {"Authorization": "Bearer f"}
        for _ in range(6):
            assert (await gw.http.get("/api/v2/jobs", headers=headers)).status_code == 200
            await anyio.sleep(0.002)


async def test_anonymous_callers_are_limited_too(settings: Settings) -> None:
    env = {"VALKYRIE_HTTP__RATE_LIMIT_PER_S": "0.2", "VALKYRIE_HTTP__RATE_LIMIT_BURST": "1"}
    async with gateway(settings, environ=env) as gw:
        assert (await gw.http.get("/api/v2/jobs")).status_code == 200
        limited = await gw.http.get("/api/v2/jobs")
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "5"


async def test_audit_events_name_the_caller(settings: Settings) -> None:
    async with gateway(settings, environ=auth_environ()) as gw:
        submitted = await gw.http.post(
            "/api/v2/jobs", json={"job_type": "build"}, headers=bearer("writer")
        )
        assert submitted.status_code == 201
        job_id = submitted.json()["job_id"]
        await gw.http.delete(f"/api/v2/jobs/{job_id}", headers=bearer("writer"))
        await gw.http.delete(f"/api/v2/jobs/{job_id}", headers=bearer("reader"))  # 403
        await gw.http.get("/api/v2/jobs", headers=bearer("reader"))  # not audited
        audits = await audits_of(gw.bus)
        seen = [(e.data["identity"], e.type, e.data["status"]) for e in audits]
        assert seen == [
            ("writer", "audit.job_submit", 201),
            ("writer", "audit.job_cancel", 202),
            ("reader", "audit.job_cancel", 403),
        ]
        assert audits[1].data["path_params"] == {"job_id": job_id}
        assert [e.data.get("job_id") for e in audits] == [job_id, job_id, job_id]
        assert audits[0].subject_id == "writer"
        assert audits[0].source == "gateway"
        # the cancel request carries the caller too
        record = await gw.http.get(f"/api/v2/jobs/{job_id}", headers=bearer("reader"))
        assert "writer" in (record.json()["reason"] or "")


async def test_audit_can_be_switched_off(settings: Settings) -> None:
    async with gateway(settings, environ={"VALKYRIE_SECURITY__AUDIT_ENABLED": "false"}) as gw:
        await gw.http.post("/api/v2/jobs", json={"job_type": "build"})
        assert await audits_of(gw.bus) == []


async def test_body_limit_is_live(settings: Settings) -> None:
    async with gateway(settings) as gw:
        body = {"job_type": "x", "payload": "a" * 3000}
        assert (await gw.http.post("/api/v2/jobs", json=body)).status_code == 201
        verdict = await ConfigClient(gw.bus).change(set_values={"http.max_body_bytes": 2048})
        assert verdict.accepted
        assert verdict.revision is not None
        assert await wait_applied(gw.live, verdict.revision, 5)
        too_big = await gw.http.post("/api/v2/jobs", json=body)
        assert too_big.status_code == 413
        # a chunked upload without Content-Length is measured as it arrives
        chunks = [b'{"job_type": "x", "payload": "', b"a" * 3000, b'"}']

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        chunked = await gw.http.post(
            "/api/v2/jobs", content=stream(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413


async def test_cors_is_off_unless_configured(settings: Settings) -> None:
    async with gateway(settings) as gw:
        plain = await gw.http.get("/api/v2/jobs", headers={"Origin": "https://ci.example"})
        assert "access-control-allow-origin" not in plain.headers
        verdict = await ConfigClient(gw.bus).change(
            set_values={"http.cors_origins": ["https://ci.example"]}
        )
        assert verdict.accepted
        assert verdict.revision is not None
        assert await wait_applied(gw.live, verdict.revision, 5)
        allowed = await gw.http.get("/api/v2/jobs", headers={"Origin": "https://ci.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://ci.example"
        other = await gw.http.get("/api/v2/jobs", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        preflight = await gw.http.options(
            "/api/v2/jobs",
            headers={
                "Origin": "https://ci.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
