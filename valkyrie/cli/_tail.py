"""``valkyrie tail``: follow the event stream."""

from __future__ import annotations

import datetime as dt
import json

import click

from schemas import Event
from valkyrie.bus.codec import encode
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import fmt_ms, run_async, settings_from, with_bus
from valkyrie.client.jobs import Client

__all__ = ["tail"]


def _line(seq: int, event: Event) -> str:
    # the record a queued event may carry is for dispatchers, not for reading
    data = " ".join(f"{k}={json.dumps(v)}" for k, v in event.data.items() if k != "record")
    attempt = f" attempt={event.attempt}" if event.attempt else ""
    return f"{fmt_ms(event.at_ms)}  #{seq:<6} {event.type:<22} {event.subject_id or '-'}{attempt}  {data}".rstrip()


def _since(value: str) -> dt.datetime:
    if value.endswith(("s", "m", "h")) and value[:-1].isdigit():
        seconds = int(value[:-1]) * {"s": 1, "m": 60, "h": 3600}[value[-1]]
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    parsed = dt.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.astimezone()


@click.command()
@click.argument("filter_", metavar="[FILTER]", default=">")
@click.option("--since", help="Start at a time: ISO 8601, or an age such as 10m, 2h.")
@click.option("--seq", "start_seq", type=click.IntRange(1), help="Start at a stream sequence.")
@click.option("--all", "from_start", is_flag=True, help="Start at the oldest event kept.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--idle-exit", type=float, help="Exit after this many seconds without events.")
@click.pass_context
def tail(
    ctx: click.Context,
    filter_: str,
    since: str | None,
    start_seq: int | None,
    from_start: bool,
    as_json: bool,
    idle_exit: float | None,
) -> None:
    """Follow events live.

    FILTER is a subject pattern after `<prefix>.events.`, e.g. `job.>`, `job.<id>.>`,
    `*.*.rejected`; a bare job id means `job.<id>.>`.
    """
    pattern = filter_
    if "." not in pattern and pattern not in (">", "*"):
        pattern = f"job.{pattern}.>"
    try:
        start = _since(since) if since else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from e

    async def go(bus: Bus) -> None:
        async for seq, event in Client(bus).events(
            pattern,
            start_seq=start_seq,
            since=start,
            deliver_all=from_start,
            idle_timeout_s=idle_exit,
        ):
            if as_json:
                click.echo(encode({"seq": seq, "event": event}).decode())
            else:
                click.echo(_line(seq, event))

    try:
        run_async(lambda: with_bus(settings_from(ctx), go))
    except KeyboardInterrupt:
        pass
