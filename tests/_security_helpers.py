"""A secured installation for the security tests: `valkyrie up` on a data dir of its own.

Attackers are plain nats-py clients, as the issue's were: each connects as some identity (or as
nobody) and records what the server refuses.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import msgspec
import nats
from nats.aio.client import Client as NatsClient

from tests._helpers import ROOT, free_port, kill_embedded_server
from valkyrie import Settings
from valkyrie.bus.credentials import Credentials, auth_dir
from valkyrie.security.store import AuthStore

__all__ = ["Attacker", "Secured", "cli_env", "secured_up"]

#: how long an action gets to be refused by the server
REFUSAL_S = 3.0


@dataclass
class Secured:
    """A running `valkyrie up` with generated identities."""

    settings: Settings
    store: AuthStore
    log: Path
    proc: subprocess.Popen[bytes]
    http_port: int

    @property
    def url(self) -> str:
        assert self.settings.nats_url is not None
        return self.settings.nats_url

    def creds(self, identity: str) -> Credentials:
        return Credentials(identity=identity, nkey_file=self.store.creds(identity))

    def env(self) -> dict[str, str]:
        """The environment of a CLI on this host (no NATS URL or credentials named)."""
        return cli_env(self.settings)


def cli_env(settings: Settings) -> dict[str, str]:
    """The environment of `valkyrie` on the host of the data dir of ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update(
        {
            "VALKYRIE_DATA_DIR": str(settings.data_dir),
            "VALKYRIE_EMBEDDED_PORT": str(settings.embedded_port),
            "VALKYRIE_METRICS_PORT": "0",
            "VALKYRIE_EVENTS_MAX_BYTES": str(8 * 1024 * 1024),
        }
    )
    return env


@contextmanager
def secured_up(tmp: Path, *args: str) -> Iterator[Secured]:
    """`valkyrie up ARGS` on a fresh data dir under ``tmp`` (secure by default), until exit."""
    port, http_port = free_port(), free_port()
    data = tmp / "data"
    settings = Settings.from_env(
        {},
        data_dir=str(data),
        embedded_port=port,
        nats_url=f"nats://127.0.0.1:{port}",
        events_max_bytes=8 * 1024 * 1024,
    )
    log = tmp / "up.log"
    env = cli_env(settings)
    env["VALKYRIE_HTTP__PORT"] = str(http_port)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "valkyrie", "up", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    secured = Secured(settings, AuthStore(auth_dir(settings)), log, proc, http_port)
    try:
        deadline = time.monotonic() + 60
        while "valkyrie is up" not in log.read_text(errors="replace"):
            assert secured.proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield secured
    finally:
        if secured.proc.poll() is None:
            secured.proc.terminate()
            try:
                secured.proc.wait(30)
            except subprocess.TimeoutExpired:
                secured.proc.kill()
                secured.proc.wait(10)
                kill_embedded_server(data)


@dataclass
class Attacker:
    """A plain nats-py connection that notes every error the server sends it."""

    nc: NatsClient
    errors: list[str] = field(default_factory=list)

    @classmethod
    async def connect(cls, url: str, creds: Credentials | None = None) -> Attacker:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e))

        options = creds.options() if creds is not None else {}
        nc = NatsClient()
        try:
            await nc.connect(
                url, error_cb=on_error, allow_reconnect=False, connect_timeout=5, **options
            )
        except BaseException:
            await nc.close()  # a refused connection leaves its socket open
            raise
        return cls(nc, errors)

    async def refused(self, action: Callable[[], Awaitable[object]]) -> str:
        """Run ``action`` and return the permission violation the server answers it with.

        Raises:
            AssertionError: the server did not refuse it within ``REFUSAL_S``.
        """
        seen = len(self.errors)
        with anyio.move_on_after(REFUSAL_S):
            try:
                await action()
            except (nats.errors.Error, TimeoutError):
                pass  # a refused request is not answered: the violation is the answer
        with anyio.move_on_after(REFUSAL_S):
            while True:
                fresh = [e for e in self.errors[seen:] if "permissions violation" in e]
                if fresh:
                    return fresh[0]
                await anyio.sleep(0.02)
        raise AssertionError(f"the server did not refuse it (errors: {self.errors[seen:]})")

    async def refuses_publish(self, subject: str, body: object = None) -> str:
        """The violation a core publish on ``subject`` is answered with."""
        return await self.refused(functools.partial(self.publish, subject, body))

    async def refuses_subscribe(self, subject: str) -> str:
        """The violation a subscription to ``subject`` is answered with."""
        return await self.refused(functools.partial(self.subscribe, subject))

    async def refuses_request(self, subject: str, body: bytes = b"") -> str:
        """The violation a request on ``subject`` (a JetStream API call…) is answered with."""
        return await self.refused(functools.partial(self.nc.request, subject, body, timeout=1))

    async def publish(self, subject: str, body: object = None, **kw: object) -> None:
        """Publish and flush (a refused publish is answered by an error, not an exception)."""
        data = body if isinstance(body, bytes) else msgspec.json.encode(body or {})
        await self.nc.publish(subject, data, **kw)  # type: ignore[arg-type]
        await self.nc.flush()

    async def subscribe(self, subject: str) -> None:
        await self.nc.subscribe(subject)
        await self.nc.flush()

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()
