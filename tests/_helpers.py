"""Helpers shared by tests (never import from conftest)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import nats.js.errors
import pytest
from anyio.abc import TaskGroup
from nats.js.api import RawStreamMsg
from prometheus_client import CollectorRegistry

from schemas import DeadLetter, Event, JobRecord, JobState
from valkyrie import (
    Bus,
    BusError,
    Client,
    HandlerContext,
    HandlerMetrics,
    Settings,
    open_bus,
    run_workers,
)
from valkyrie.bus.codec import DEAD_DECODER, EVENT_DECODER
from valkyrie.bus.server import NatsServer
from valkyrie.config.doc import env_name
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import LoadedConfig, config_for
from valkyrie.domain.intake import job_id_for, parse_submission, queued_record
from valkyrie.runtime.views import SharedViews

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique_prefix() -> str:
    """A subject/stream prefix no other test uses."""
    return "t" + uuid.uuid4().hex[:10]


#: runtime-config keys every test process runs with: fast redelivery, no metrics port
TEST_CONFIG: dict[str, object] = {"performance.ack_wait_s": 5.0, "observability.metrics_port": 0}


MiB = 1024 * 1024
#: the size limits of a test prefix's streams and buckets (about 40 MiB in all)
TEST_SIZES: dict[str, int] = {
    "submit_max_bytes": 4 * MiB,
    "commands_max_bytes": 1 * MiB,
    "updates_max_bytes": 4 * MiB,
    "events_max_bytes": 8 * MiB,
    "logs_max_bytes": 4 * MiB,
    "dead_max_bytes": 2 * MiB,
    "jobs_max_bytes": 8 * MiB,
    "runners_max_bytes": 1 * MiB,
    "idempotency_max_bytes": 2 * MiB,
    "config_max_bytes": 2 * MiB,
    "stats_max_bytes": 1 * MiB,
    "secrets_max_bytes": 1 * MiB,
    "audit_max_bytes": 1 * MiB,
}


def size_env(settings: Settings) -> dict[str, str]:
    """The ``VALKYRIE_<NAME>_MAX_BYTES`` variables that give a subprocess ``settings``' limits."""
    return {
        f"VALKYRIE_{name.upper()}": str(getattr(settings, name))
        for name in (f.name for f in msgspec.structs.fields(Settings))
        if name.endswith("_max_bytes")
    }


def settings_for(url: str, prefix: str, **overrides: object) -> Settings:
    """Test settings: memory-light (the tunables are in :func:`config_for_test`)."""
    base: dict[str, object] = {
        "nats_url": url,
        "prefix": prefix,
        "connect_timeout_s": 10.0,
        # the server reserves each stream's and bucket's max_bytes: the defaults (4.75 GiB in all)
        # would exhaust the session server's store after a few test prefixes
        **TEST_SIZES,
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


def config_for_test(
    settings: Settings, *, environ: Mapping[str, str] | None = None, **overrides: object
) -> LoadedConfig:
    """The config a test process runs: the profile and file of ``settings``, ``environ`` (no
    variables by default), then :data:`TEST_CONFIG` and ``overrides`` as the ``env`` layer
    (``__`` in an argument name stands for ``.``: ``performance__ack_wait_s=10.0``)."""
    dotted = {**TEST_CONFIG, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return config_for(settings, environ=dict(environ or {}), overrides=dotted)


@asynccontextmanager
async def running(
    settings: Settings,
    handlers: Sequence[str] | None = None,
    *,
    config: LoadedConfig | None = None,
) -> AsyncIterator[Bus]:
    """Provision and run handlers in this process (with ``config``, by default
    :func:`config_for_test`); stop them cleanly on exit."""
    loaded = config if config is not None else config_for_test(settings)
    registry = CollectorRegistry()
    async with open_bus(settings, embed=False, config=loaded.config) as (bus, _):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            if handlers is None or handlers:
                workers = functools.partial(run_workers, config=LiveConfig(loaded))
                await tg.start(workers, bus, registry, stop, list(handlers or []) or None)
            try:
                yield bus
            finally:
                stop.set()


def config_env(config: LoadedConfig) -> dict[str, str]:
    """The ``VALKYRIE_<SECTION>__<KEY>`` variables that give a subprocess ``config``'s env layer."""
    return {env_name(key): json.dumps(value) for key, value in config.layers["env"].items()}


def env_for(settings: Settings, config: LoadedConfig | None = None) -> dict[str, str]:
    """Environment for a subprocess that should use ``settings`` and ``config`` (by default
    :func:`config_for_test`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update(
        {
            "VALKYRIE_NATS_URL": settings.nats_url or "",
            "VALKYRIE_PREFIX": settings.prefix,
            # provisioning from the subprocess must not grow the streams' reserved bytes (the
            # session server has room for a few hundred test prefixes, not for 1 GiB each)
            **size_env(settings),
            **config_env(config if config is not None else config_for_test(settings)),
        }
    )
    return env


def spawn(
    args: Sequence[str], settings: Settings, log: Path, config: LoadedConfig | None = None
) -> subprocess.Popen[bytes]:
    """Start ``python -m valkyrie ARGS`` with output to ``log``."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "valkyrie", *args],
            env=env_for(settings, config),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    finally:
        out.close()


def stop_process(
    proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout_s: float = 15
) -> int:
    """Signal a process and wait for it (SIGKILL if it does not exit)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def kill_embedded_server(data_dir: Path) -> None:
    """Stop the nats-server a SIGKILLed ``valkyrie up`` on ``data_dir`` left running.

    The embedded server runs in a process group of its own (so that Ctrl-C reaches the control
    plane first); a test that kills ``up`` hard must not leave it behind for the session.
    """
    NatsServer(store_dir=data_dir / "nats").stop_leftover()


async def stream_messages(bus: Bus, stream: str, subject: str) -> list[RawStreamMsg]:
    """Every message stored in ``stream`` (full name) on ``subject`` (wildcards allowed)."""
    found: list[RawStreamMsg] = []
    seq = 1
    while True:
        try:
            msg = await bus.js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return found
        found.append(msg)
        assert msg.seq is not None
        seq = msg.seq + 1


async def events_of(bus: Bus, pattern: str = ">") -> list[Event]:
    """Every stored event whose subject matches ``<prefix>.events.<pattern>``, oldest first."""
    msgs = await stream_messages(bus, bus.names.stream("events"), bus.names.events(pattern))
    return [EVENT_DECODER.decode(m.data or b"") for m in msgs]


async def audits_of(bus: Bus) -> list[Event]:
    """Every stored audit event (the audit stream), oldest first."""
    msgs = await stream_messages(bus, bus.names.stream("audit"), bus.names.audit(">"))
    return [EVENT_DECODER.decode(m.data or b"") for m in msgs]


async def dead_letters(bus: Bus, handler: str = "intake") -> list[DeadLetter]:
    """Every stored dead letter of ``handler``, oldest first."""
    msgs = await stream_messages(bus, bus.names.stream("dead"), bus.names.dead(handler))
    return [DEAD_DECODER.decode(m.data or b"") for m in msgs]


async def job_count(bus: Bus) -> int:
    """How many job records the jobs bucket holds."""
    info = await bus.js.stream_info(f"KV_{bus.names.bucket('jobs')}")
    return int(info.state.messages)


async def wait_until(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.05
) -> None:
    """Poll ``check`` until it returns true; fail (``TimeoutError``) after ``timeout_s``."""
    with anyio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await anyio.sleep(interval_s)


def env_with_settings(settings: Settings, config: LoadedConfig | None = None) -> dict[str, str]:
    """Like :func:`env_for`, but carrying every setting (a subprocess then behaves like the test)."""
    env = env_for(settings, config)
    for field in msgspec.structs.fields(Settings):
        value = getattr(settings, field.name)
        if value is not None:
            env[f"VALKYRIE_{field.name.upper()}"] = str(value)
    return env


def spawn_module(
    module: str,
    args: Sequence[str],
    settings: Settings,
    log: Path,
    config: LoadedConfig | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``python -m MODULE ARGS`` with every setting of ``settings`` (and ``config``) and
    output to ``log``."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env_with_settings(settings, config),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    finally:
        out.close()


def spawn_runner(
    runner_id: str,
    settings: Settings,
    tmp: Path,
    *,
    capacity: int = 1,
    work_s: float = 0.0,
    heartbeat_ms: int = 1000,
) -> subprocess.Popen[bytes]:
    """Start a simulated runner process journaling to ``tmp/<id>.journal`` (log: ``<id>.log``)."""
    return spawn_module(
        "valkyrie.testing",
        [
            "--id",
            runner_id,
            "--capacity",
            str(capacity),
            "--work-s",
            str(work_s),
            "--heartbeat-ms",
            str(heartbeat_ms),
            "--journal",
            str(tmp / f"{runner_id}.journal"),
        ],
        settings,
        tmp / f"{runner_id}.log",
    )


@dataclass(frozen=True)
class JournalLine:
    """One attempt a simulated runner process ran (see ``valkyrie.testing``)."""

    job_id: str
    attempt: int
    runner_id: str
    started_ns: int
    ended_ns: int
    outcome: str


def read_journals(tmp: Path) -> list[JournalLine]:
    """Every line of every ``*.journal`` file under ``tmp``."""
    lines: list[JournalLine] = []
    for path in sorted(tmp.glob("*.journal")):
        for raw in path.read_text().splitlines():
            job_id, attempt, runner_id, started, ended, outcome = raw.split()
            lines.append(
                JournalLine(job_id, int(attempt), runner_id, int(started), int(ended), outcome)
            )
    return lines


def overlaps(intervals: dict[str, list[tuple[int, int, str]]]) -> list[str]:
    """Jobs (with their intervals) whose executions overlap in time; ``[]`` when none do.

    ``intervals`` maps a job id to ``(start_ns, end_ns, label)`` of each execution.
    """
    found: list[str] = []
    for job_id, spans in intervals.items():
        ordered = sorted(spans)
        for (_s1, e1, l1), (s2, _e2, l2) in itertools.pairwise(ordered):
            if s2 < e1:
                found.append(f"{job_id}: {l1} until {e1} overlaps {l2} from {s2}")
    return found


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def spawn_with_env(
    args: Sequence[str], settings: Settings, log: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Like :func:`spawn` with every setting, plus ``env`` (config overrides such as
    ``VALKYRIE_HEALTH__REPORT_INTERVAL_MS``)."""
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "valkyrie", *args],
            env={**env_with_settings(settings), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    finally:
        out.close()


async def wait_all_succeeded(client: Client, total: int, timeout_s: float) -> dict[str, JobRecord]:
    """Wait until at least ``total`` jobs exist and all succeeded; fail with their states if not.

    A bus error while reading (a server restarting, a leader election) just means "not yet".
    """

    async def done() -> bool:
        try:
            records = await client.list_jobs()
        except BusError:
            return False
        return len(records) >= total and all(r.state == JobState.SUCCEEDED for r in records)

    try:
        await wait_until(done, timeout_s=timeout_s, interval_s=1.0)
    except TimeoutError:
        records = await client.list_jobs()
        states = Counter(r.state.value for r in records)
        stuck = [r for r in records if r.state != JobState.SUCCEEDED][:3]
        pytest.fail(
            f"not every job succeeded: {dict(states)} of {len(records)}/{total}; e.g. {stuck}"
        )
    return {r.id: r for r in await client.list_jobs()}


def queued_job(source: str, *, now_ms: int = 1_000, **spec: object) -> JobRecord:
    """A job record as intake would create it (state queued, attempt 0), not stored anywhere."""
    parsed = parse_submission(
        msgspec.json.encode({"job_type": "shell", **spec}),
        received_at_ms=now_ms,
        max_bytes=1 << 20,
        max_metadata_entries=64,
    )
    job_id = job_id_for(parsed.spec, source=source)
    return queued_record(job_id, parsed, now_ms=now_ms, source_seq=1)


def handler_context(
    bus: Bus, tg: TaskGroup, name: str, config: LoadedConfig | None = None
) -> HandlerContext:
    """What ``run_workers`` gives a handler, for driving one directly in a test."""
    registry = CollectorRegistry()
    return HandlerContext(
        bus=bus,
        registry=registry,
        metrics=HandlerMetrics.create(registry),
        name=name,
        config=LiveConfig(config if config is not None else config_for_test(bus.settings)),
        views=SharedViews(bus, tg),
    )
