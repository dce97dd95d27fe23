"""HTTP hardening: authentication off loopback, no start without tokens, slow token guessing, and
no credentials in health reports, status output or errors."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import anyio
import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from schemas import HealthReport
from tests._gateway_helpers import TOKENS, asgi_transport, auth_environ, bearer, problem
from tests._helpers import ROOT, config_for_test, env_for, running
from valkyrie import ConfigError, ConnectError, Settings, connect
from valkyrie.config.live import LiveConfig
from valkyrie.config.model import HttpConfig, TokenConfig
from valkyrie.config.settings import redact_url
from valkyrie.gateway import create_app, hash_token, run_gateway
from valkyrie.gateway._auth import auth_required, check_auth_setup, is_loopback

pytestmark = pytest.mark.security

PASSWORD = "hunter2-nats-password"


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "gateway.example", "192.168.1.2"):
        assert not is_loopback(host), host


def test_auth_is_required_off_loopback_and_needs_a_token() -> None:
    token = TokenConfig(name="ci", sha256=hash_token("t"), scopes=["jobs:read"])
    assert not auth_required(HttpConfig(), "127.0.0.1")
    assert auth_required(HttpConfig(), "0.0.0.0")
    assert auth_required(HttpConfig(auth_required=True), "127.0.0.1")
    check_auth_setup(HttpConfig(), "127.0.0.1")
    check_auth_setup(HttpConfig(tokens=[token]), "0.0.0.0")
    with pytest.raises(ConfigError, match=r"listens on 0\.0\.0\.0, not a loopback address"):
        check_auth_setup(HttpConfig(), "0.0.0.0")
    with pytest.raises(ConfigError, match=r"http\.auth_required is true.*http\.tokens is empty"):
        check_auth_setup(HttpConfig(auth_required=True), "127.0.0.1")


def test_urls_lose_their_credentials() -> None:
    assert redact_url(f"nats://alice:{PASSWORD}@h:4222") == "nats://***@h:4222"
    assert redact_url(f"nats://{PASSWORD}@h") == "nats://***@h"
    assert redact_url(f"tls://a:{PASSWORD}@h1:1,nats://h2:2") == "tls://***@h1:1,nats://h2:2"
    assert redact_url("nats://h:4222") == "nats://h:4222"


@pytest.mark.nats
async def test_the_gateway_does_not_start_open_off_loopback(settings: Settings) -> None:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, "-m", "valkyrie", "gateway", "--host", "0.0.0.0", "--port", "0"],
            env=env_for(settings),
            cwd=ROOT,
            check=False,
        )
    assert done.returncode == 10
    assert b"requires authentication (it listens on 0.0.0.0" in done.stderr
    assert b"http.tokens is empty" in done.stderr


@pytest.mark.nats
async def test_off_loopback_every_call_authenticates(settings: Settings) -> None:
    tokens = json.dumps(
        [{"name": "reader", "sha256": hash_token(TOKENS["reader"][0]), "scopes": ["jobs:read"]}]
    )
    # auth_required stays false: binding beyond loopback is what requires it
    live = LiveConfig(config_for_test(settings, environ={"VALKYRIE_HTTP__TOKENS": tokens}))
    assert not live.current.http.auth_required
    async with running(settings, []) as bus:
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            serve = functools.partial(run_gateway, bus, stop, live=live, host="0.0.0.0", port=0)
            port = await tg.start(serve)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                assert (await http.get("/api/v2/jobs")).status_code == 401
                ok = await http.get("/api/v2/jobs", headers=bearer("reader"))
                assert ok.status_code == 200
                capabilities = await http.get(
                    "/api/v2/integration/capabilities", headers=bearer("reader")
                )
                assert capabilities.json()["auth_required"] is True
                assert (await http.get("/healthz")).status_code == 200  # probes stay open
            stop.set()


@asynccontextmanager
async def two_clients(
    settings: Settings, environ: Mapping[str, str]
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """The gateway app (no handlers) seen from two client addresses."""
    async with running(settings, []) as bus:
        app = create_app(
            bus, LiveConfig(config_for_test(settings, environ=environ)), CollectorRegistry()
        )
        async with (
            httpx.AsyncClient(
                transport=asgi_transport(app, client=("10.0.0.1", 1)), base_url="http://gw"
            ) as one,
            httpx.AsyncClient(
                transport=asgi_transport(app, client=("10.0.0.2", 1)), base_url="http://gw"
            ) as other,
        ):
            yield one, other


@pytest.mark.nats
async def test_failed_authentication_is_rate_limited_per_address(settings: Settings) -> None:
    environ = auth_environ(
        VALKYRIE_HTTP__FAILED_AUTH_BURST="3", VALKYRIE_HTTP__FAILED_AUTH_PER_S="0.2"
    )
    async with two_clients(settings, environ) as (attacker, bystander):
        # no token at all is not a guess: it does not count
        for _ in range(5):
            assert (await attacker.get("/api/v2/jobs")).status_code == 401
        guesses = [
            (await attacker.get("/api/v2/jobs", headers={"Authorization": f"Bearer g{i}"}))
            for i in range(5)
        ]
        assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
        assert int(guesses[-1].headers["retry-after"]) >= 1
        assert "failed authentications from 10.0.0.1" in problem(guesses[-1])["detail"]
        # while over its budget, not even the right token is looked at: a guess cannot be
        # told from the answer
        right = await attacker.get("/api/v2/jobs", headers=bearer("reader"))
        assert right.status_code == 429
        # another address is not affected
        assert (await bystander.get("/api/v2/jobs", headers=bearer("reader"))).status_code == 200


@pytest.mark.nats
async def test_no_credentials_in_health_status_or_errors(settings: Settings) -> None:
    url = (settings.nats_url or "").replace("nats://", f"nats://alice:{PASSWORD}@")
    with_password = msgspec.structs.replace(settings, nats_url=url)
    reports: list[HealthReport] = []
    async with running(with_password, ["monitor"]) as bus:
        sub = await bus.nc.subscribe(bus.names.health())
        with anyio.fail_after(10):
            async for msg in sub.messages:
                reports.append(msgspec.json.decode(msg.data, type=HealthReport))
                if reports[-1].checks.get("nats"):
                    break
        await sub.unsubscribe()
        with anyio.fail_after(60):
            status = await anyio.run_process(
                [sys.executable, "-m", "valkyrie", "status", "--json"],
                env={**env_for(with_password), "VALKYRIE_NATS_URL": url},
                cwd=ROOT,
                check=False,
            )
    detail = reports[-1].checks["nats"].detail or ""
    assert detail.startswith("connected to 127.0.0.1:")
    assert PASSWORD not in json.dumps(msgspec.to_builtins(reports))
    assert status.returncode in (0, 1), status.stderr
    assert b'"component":"monitor"' in status.stdout  # it read the reports over that URL
    assert PASSWORD.encode() not in status.stdout + status.stderr
    # a URL that cannot be reached: the error names it without its password
    nowhere = msgspec.structs.replace(
        settings, nats_url=f"nats://alice:{PASSWORD}@127.0.0.1:1", connect_timeout_s=0.5
    )
    with pytest.raises(ConnectError) as caught:
        await connect(nowhere)
    assert PASSWORD not in str(caught.value)
    assert "nats://***@127.0.0.1:1" in str(caught.value)
    with anyio.fail_after(60):
        cli = await anyio.run_process(
            [sys.executable, "-m", "valkyrie", "jobs", "ls"],
            env={**env_for(settings), "VALKYRIE_NATS_URL": nowhere.nats_url or ""},
            cwd=ROOT,
            check=False,
        )
    assert cli.returncode == 5
    assert PASSWORD.encode() not in cli.stdout + cli.stderr
    assert b"***@127.0.0.1:1" in cli.stderr
