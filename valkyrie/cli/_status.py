"""``valkyrie status``: the installation's health at a glance.

The monitor's summary (stats bucket, key ``health``) is shown when it is fresh. When no monitor
is running, the command listens to the health reports itself for a moment and evaluates them with
the same rules, so it still answers; when nothing reports at all, it exits with code 5.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import anyio
import click
import msgspec

from schemas import HealthSummary
from valkyrie.bus.codec import encode, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import ExitCode, fmt_ms, print_table, run_async, settings_from, with_bus
from valkyrie.client.config import ConfigClient
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import LoadedConfig, config_for
from valkyrie.domain.health import Seen, runner_pool, summarize
from valkyrie.errors import BusError
from valkyrie.runtime.discovery import DiscoveredService, discover
from valkyrie.runtime.health import HealthReports, consumer_lags, list_runner_states
from valkyrie.runtime.healthstore import HealthStore

__all__ = ["Gathered", "gather", "gather_health", "render", "service_rows", "status"]


class Gathered(msgspec.Struct, frozen=True, kw_only=True):
    """What ``status`` found: a summary (``None`` when nothing answered) and where it came from."""

    summary: HealthSummary | None
    source: str  # "monitor", "local" (evaluated here) or "none"
    reports: int = 0
    stale_summary_at_ms: int | None = None
    #: the processes that answered ``$SRV.STATS`` (service discovery)
    services: list[DiscoveredService] = msgspec.field(default_factory=list)


async def _listen(bus: Bus, wait_s: float) -> dict[str, Seen]:
    reports = HealthReports(bus)
    async with reports.listening():
        await anyio.sleep(wait_s)
    return reports.seen


async def gather(bus: Bus, config: LoadedConfig, wait_s: float | None) -> Gathered:
    """The health summary (:func:`gather_health`) and the processes service discovery finds."""
    async with anyio.create_task_group() as tg:
        found: list[DiscoveredService] = []

        async def services() -> None:
            found.extend(await discover(bus))

        tg.start_soon(services)
        gathered = await gather_health(bus, config, wait_s)
    return msgspec.structs.replace(gathered, services=found)


async def gather_health(bus: Bus, config: LoadedConfig, wait_s: float | None) -> Gathered:
    """The monitor's summary if it is fresh, else one evaluated here from live reports.

    ``config`` is the command's loaded config; the revision in force is applied over it.
    """
    live = LiveConfig(config)
    try:
        store = await HealthStore.open(bus)
        _, stored = await store.summary()
        current = await ConfigClient(bus).current()
    except BusError:
        return Gathered(summary=None, source="none")  # not provisioned: nothing ever ran here
    if current is not None:
        live.apply(current)
    stale_at: int | None = None
    if stored is not None:
        # the monitor writes every interval: two missed writes mean it is gone
        fresh_ms = max(stored.stale_after_ms, 2 * stored.report_interval_ms)
        if now_ms() - stored.at_ms <= fresh_ms:
            return Gathered(summary=stored, source="monitor")
        stale_at = stored.at_ms
    health = live.current.health
    listen_s = wait_s if wait_s is not None else 2 * health.report_interval_ms / 1000 + 0.25
    seen = await _listen(bus, listen_s)
    if not seen:
        return Gathered(summary=None, source="none", stale_summary_at_ms=stale_at)
    record = await store.fallback()
    summary = summarize(
        seen,
        now_ms=now_ms(),
        health=health,
        mode=live.current.mode.value,
        config_revision=live.revision,
        revision_settled=(time.time() - live.applied_at) * 1000 > health.stale_after_ms,
        consumers=await consumer_lags(bus),
        pool=runner_pool(await list_runner_states(bus), health.min_active_runners),
        fallback=record,
    )
    return Gathered(
        summary=summary, source="local", reports=len(seen), stale_summary_at_ms=stale_at
    )


def _age(ms: int) -> str:
    return f"{ms / 1000:.1f}s"


def render(gathered: Gathered, now: int) -> list[str]:
    """The human-readable status (tables are printed separately by :func:`_print`)."""
    summary = gathered.summary
    assert summary is not None
    lines = [f"status:   {summary.status}"]
    mode = summary.mode
    record = summary.fallback
    if record is not None and record.state == "active":
        mode += f" (automatic since {fmt_ms(record.at_ms)}; previous mode {record.previous_mode})"
    elif record is not None:
        mode += f" (automatic fallback overridden by hand; previous mode {record.previous_mode})"
    lines.append(f"mode:     {mode}")
    lines.append(f"config:   revision {summary.config_revision}")
    if gathered.source == "monitor":
        lines.append(
            f"checked:  {_age(max(0, now - summary.at_ms))} ago by monitor {summary.monitor}"
        )
    else:
        lines.append(
            f"checked:  here, from {gathered.reports} live report(s): no monitor is running"
        )
    if summary.reasons:
        lines.append("reasons:")
        lines.extend(f"  - {reason}" for reason in summary.reasons)
    return lines


def _component_rows(summary: HealthSummary, now: int) -> list[Sequence[object]]:
    rows: list[Sequence[object]] = []
    skew = max(0, now - summary.at_ms)
    for c in summary.components:
        failing = "; ".join(
            f"{name}: {check.detail or check.status}" for name, check in c.failing.items()
        )
        rows.append(
            (
                c.component,
                c.instance,
                c.status,
                c.config_revision,
                _age(c.age_ms + skew),
                failing or "-",
            )
        )
    return rows


def service_rows(services: Sequence[DiscoveredService]) -> list[Sequence[object]]:
    """One row per process that answered service discovery."""
    rows: list[Sequence[object]] = []
    for svc in services:
        meta = svc.metadata
        rows.append(
            (
                svc.id,
                ",".join(svc.handlers) or "-",
                meta.get("valkyrie_version", svc.version),
                meta.get("config_revision", "-"),
                meta.get("mode", "-"),
                f"{meta.get('host', '?')}:{meta.get('pid', '?')}",
                sum(e.num_requests for e in svc.endpoints),
                sum(e.num_errors for e in svc.endpoints),
            )
        )
    return rows


def _print(gathered: Gathered) -> None:
    summary = gathered.summary
    assert summary is not None
    now = now_ms()
    for line in render(gathered, now):
        click.echo(line)
    click.echo("")
    if summary.components:
        print_table(
            ["COMPONENT", "INSTANCE", "STATUS", "REV", "AGE", "FAILING"],
            _component_rows(summary, now),
        )
    else:
        click.echo("no component is reporting")
    click.echo("")
    pool = summary.runner_pool
    click.echo(
        f"runners:  {pool.available} available of {pool.total} (active {pool.active}, busy "
        f"{pool.busy}, draining {pool.draining}, offline {pool.offline}); minimum "
        f"{pool.min_active}: {pool.status}"
    )
    click.echo("")
    if gathered.services:
        print_table(
            ["PROCESS", "HANDLERS", "VERSION", "REV", "MODE", "HOST:PID", "MESSAGES", "ERRORS"],
            service_rows(gathered.services),
        )
    else:
        click.echo("no process answers service discovery ($SRV.STATS)")
    click.echo("")
    print_table(
        ["CONSUMER", "STREAM", "PENDING", "STATUS", "DETAIL"],
        [
            (
                lag.durable,
                lag.stream,
                "-" if lag.pending is None else lag.pending,
                lag.status,
                lag.detail or "-",
            )
            for lag in summary.consumers
        ],
    )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the health summary as JSON.")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0, 60),
    default=None,
    help="Without a running monitor, listen this long for reports [default: 2 report intervals].",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, wait_s: float | None) -> None:
    """Show the installation's health: status, mode, components, processes, runners, consumer lag.

    Exit code 0 when healthy, 1 when degraded or unhealthy, 5 when nothing answers.
    """
    settings = settings_from(ctx)

    async def go() -> Gathered:
        loaded = config_for(settings)
        return await with_bus(settings, lambda bus: gather(bus, loaded, wait_s), config=loaded)

    gathered = run_async(go)
    if gathered.summary is None:
        hint = (
            f"; the last monitor summary is from {fmt_ms(gathered.stale_summary_at_ms)}"
            if gathered.stale_summary_at_ms is not None
            else ""
        )
        click.echo(
            f"error: nothing answers: no monitor summary and no health reports{hint} "
            "(is the control plane running, with this --prefix?)",
            err=True,
        )
        sys.exit(ExitCode.UNAVAILABLE)
    if as_json:
        click.echo(encode(gathered.summary).decode())
    else:
        _print(gathered)
    # 1 is "not all is well" here as for jobs: scripts test for zero
    sys.exit(ExitCode.OK if gathered.summary.status == "healthy" else ExitCode.JOB_FAILED)
