"""``valkyrie runners ls`` and ``valkyrie runners show``: the runner records, with live heartbeats."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import anyio
import click
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from schemas import RunnerRecord, RunnerState
from valkyrie.bus.codec import (
    HEARTBEAT_DECODER,
    RUNNER_DECODER,
    encode,
    now_ms,
)
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import (
    fmt_ms,
    print_table,
    run_async,
    settings_from,
    with_bus,
)
from valkyrie.errors import NotFoundError

__all__ = ["runners"]


@click.group()
def runners() -> None:
    """Inspect registered runners."""


async def _runner_records(bus: Bus) -> list[RunnerRecord]:
    kv = await bus.kv("runners")
    records: list[RunnerRecord] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=5.0)
            except nats.errors.TimeoutError:
                break
            if entry is None:  # the end of the stored values
                break
            try:
                records.append(RUNNER_DECODER.decode(entry.value or b""))
            except msgspec.DecodeError:
                continue
    finally:
        await watcher.stop()
    return sorted(records, key=lambda r: r.registration.runner_id)


@dataclass
class _Beats:
    """The heartbeats heard while ``runners ls`` looked: runner id -> when (monotonic)."""

    heard: dict[str, float]
    window_s: float

    def age(self, record: RunnerRecord) -> str:
        """The live heartbeat's age; the record's is up to 5 s old, so only a fallback."""
        rid = record.registration.runner_id
        if rid in self.heard:
            return f"{time.monotonic() - self.heard[rid]:.1f}s ago"
        if record.state == RunnerState.OFFLINE:
            return _age(record.last_heartbeat_at_ms)
        return f"none in {self.window_s:.1f}s"


async def _records_and_beats(bus: Bus) -> tuple[list[RunnerRecord], _Beats]:
    """The runner records, and the heartbeats of the live runners heard now.

    It waits up to one and a half heartbeat intervals (at most 3 s), or until each was heard.
    """
    heard: dict[str, float] = {}
    wanted: set[str] = set()
    all_heard = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        try:
            rid = HEARTBEAT_DECODER.decode(msg.data).runner_id
        except msgspec.DecodeError:
            return
        heard[rid] = time.monotonic()
        if wanted <= heard.keys():
            all_heard.set()

    sub = await bus.nc.subscribe(bus.names.heartbeat("*"), cb=on_beat)
    try:
        records = await _runner_records(bus)
        live = [r for r in records if r.state != RunnerState.OFFLINE]
        wanted.update(r.registration.runner_id for r in live)
        interval_ms = max((r.registration.heartbeat_interval_ms for r in live), default=0)
        # a heartbeat is due within one interval; half another covers a late one
        window = min(3.0, interval_ms * 1.5 / 1000 + 0.5) if live else 0.0
        if wanted <= heard.keys():
            all_heard.set()
        with anyio.move_on_after(window):
            await all_heard.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return records, _Beats(heard, window)


def _age(at_ms: int) -> str:
    seconds = max(0, now_ms() - at_ms) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return fmt_ms(at_ms)


@runners.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
@click.pass_context
def runners_ls(ctx: click.Context, as_json: bool) -> None:
    """List runners from the registry, with the age of each one's live heartbeat.

    The records' own heartbeat time is written at most every 5 s; the HEARTBEAT column is the
    age of the last heartbeat heard now (listening up to one heartbeat interval).
    """
    if as_json:
        records = run_async(lambda: with_bus(settings_from(ctx), _runner_records))
        click.echo(encode(records).decode())
        return
    records, beats = run_async(lambda: with_bus(settings_from(ctx), _records_and_beats))
    print_table(
        ["ID", "STATE", "LOAD", "JOBS", "TYPES", "REGION", "HEARTBEAT", "LABELS"],
        [
            [
                r.registration.runner_id,
                r.state,
                f"{r.load:.2f}",
                f"{len(r.assigned_jobs)}/{r.registration.max_concurrent_jobs}",
                ",".join(r.registration.capabilities.job_types) or "-",
                r.registration.location.region or "-",
                beats.age(r),
                ",".join(f"{k}={v}" for k, v in sorted(r.registration.labels.items())) or "-",
            ]
            for r in records
        ],
    )


def _show_runner(r: RunnerRecord) -> None:
    reg = r.registration
    res = reg.resources
    click.echo(f"id:          {reg.runner_id}")
    click.echo(f"state:       {r.state}" + (" (drain requested)" if r.drain_requested else ""))
    click.echo(f"load:        {r.load:.2f}")
    click.echo(f"capacity:    {reg.max_concurrent_jobs}")
    click.echo(f"job types:   {', '.join(reg.capabilities.job_types) or '-'}")
    click.echo(f"resources:   {res.cpu_cores:g} cpu, {res.memory_mb} MB, {res.storage_gb:g} GB")
    location = [x for x in (reg.location.region, reg.location.zone, reg.location.datacenter) if x]
    click.echo(f"location:    {'/'.join(location) or '-'}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(reg.labels.items()))
    click.echo(f"labels:      {labels or '-'}")
    click.echo(f"registered:  {fmt_ms(r.registered_at_ms)}")
    click.echo(f"heartbeat:   {fmt_ms(r.last_heartbeat_at_ms)} ({_age(r.last_heartbeat_at_ms)})")
    click.echo(f"session:     {reg.session_id or '-'}")
    s = r.stats
    click.echo(
        f"stats:       {s.jobs_completed} completed, {s.jobs_failed} failed, "
        f"success rate {s.success_rate:.2f}"
    )
    if r.assigned_jobs:
        click.echo("jobs:")
        for job_id, attempt in sorted(r.assigned_jobs.items()):
            click.echo(f"  {job_id} (attempt {attempt})")


@runners.command("show")
@click.argument("runner_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def runners_show(ctx: click.Context, runner_id: str, as_json: bool) -> None:
    """Show one runner's record."""

    async def go(bus: Bus) -> RunnerRecord:
        kv = await bus.kv("runners")
        try:
            entry = await kv.get(runner_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as e:
            raise NotFoundError(f"no runner {runner_id!r}") from e
        return RUNNER_DECODER.decode(entry.value or b"")

    record = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(encode(record).decode())
    else:
        _show_runner(record)


# -- valkyrie jobs logs ---------------------------------------------------------------------------
