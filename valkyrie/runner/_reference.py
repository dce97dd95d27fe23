"""The reference runner: a :class:`Runner` with the :class:`ShellHandler`, described by this host."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import msgspec
from anyio.abc import TaskStatus

from schemas import (
    RunnerCapabilities,
    RunnerLocation,
    RunnerRegistration,
    RunnerResources,
    convert_or_errors,
)
from valkyrie.bus.connection import Bus
from valkyrie.errors import ConfigError
from valkyrie.runner._runner import Runner
from valkyrie.runner._shell import ShellHandler

__all__ = ["default_runner_id", "local_resources", "reference_registration", "run_reference_runner"]

_NOT_ID = re.compile(r"[^A-Za-z0-9_\-]+")


def default_runner_id(suffix: str | None = None) -> str:
    """``<hostname>-<suffix>``; by default ``<hostname>-<6 hex digits>``, unique per start.

    ``valkyrie up --runners N`` names its local runners ``<hostname>-local-<n>``: stable, since
    each has an identity of its own.
    """
    host = _NOT_ID.sub("-", socket.gethostname().split(".")[0]).strip("-_")[:48] or "runner"
    return f"{host}-{suffix or secrets.token_hex(3)}"


def local_resources(workdir: str | Path | None = None) -> RunnerResources:
    """What this host offers: CPUs, physical memory, free disk where jobs run."""
    memory_mb = 1024
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        free_gb = shutil.disk_usage(workdir or tempfile.gettempdir()).free / 1024**3
    except OSError:
        free_gb = 10.0
    return RunnerResources(
        cpu_cores=float(os.cpu_count() or 1),
        memory_mb=memory_mb,
        storage_gb=round(free_gb, 1),
    )


def reference_registration(
    runner_id: str | None = None,
    *,
    job_types: Sequence[str] = ("shell",),
    capacity: int = 1,
    labels: Mapping[str, str] | None = None,
    region: str | None = None,
    zone: str | None = None,
    heartbeat_interval_ms: int = 1000,
    workdir: str | Path | None = None,
) -> RunnerRegistration:
    """A registration for a reference runner on this host.

    Raises:
        ConfigError: a value breaks the wire contract (the message names the field).
    """
    doc = {
        "runner_id": runner_id or default_runner_id(),
        "capabilities": RunnerCapabilities(job_types=list(job_types)),
        "resources": local_resources(workdir),
        "max_concurrent_jobs": capacity,
        "location": RunnerLocation(region=region, zone=zone),
        "labels": dict(labels or {}),
        "metadata": {"hostname": socket.gethostname(), "pid": str(os.getpid())},
        "heartbeat_interval_ms": heartbeat_interval_ms,
    }
    registration, errors = convert_or_errors(RunnerRegistration, msgspec.to_builtins(doc))
    if registration is None:
        raise ConfigError("; ".join(f"{e.path}: {e.reason}" for e in errors))
    return registration


async def run_reference_runner(
    bus: Bus,
    stop: anyio.Event,
    registration: RunnerRegistration | None = None,
    *,
    workdir: str | Path | None = None,
    drain_timeout_s: float = 300.0,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run a reference runner on ``bus`` until ``stop`` is set (then drain).

    ``task_status.started()`` is reported once the runner is registered.
    """
    runner = Runner(
        bus,
        registration or reference_registration(workdir=workdir),
        ShellHandler(workdir=workdir),
        drain_timeout_s=drain_timeout_s,
    )
    await runner.run(stop, task_status=task_status)
