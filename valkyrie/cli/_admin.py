"""``valkyrie jobs cancel``, ``valkyrie dead ls|show|replay``, ``valkyrie runners drain|undrain``."""

from __future__ import annotations

import sys

import click

from schemas import TERMINAL_STATES, JobExplanation, JobState
from valkyrie.bus.codec import encode
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import (
    ExitCode,
    actor,
    fmt_ms,
    print_table,
    run_async,
    settings_from,
    with_bus,
)
from valkyrie.client.admin import Admin, StoredDeadLetter
from valkyrie.client.jobs import Client

__all__ = ["cancel", "dead", "drain", "explain", "undrain"]


@click.command()
@click.argument("job_id")
@click.option("--reason", default="cancelled by request", show_default=True)
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the job has ended."
)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True)
@click.pass_context
def cancel(ctx: click.Context, job_id: str, reason: str, wait: bool, timeout_s: float) -> None:
    """Cancel a job: a queued one at once, a running one on its runner (SIGTERM, grace, SIGKILL)."""

    async def go(bus: Bus) -> int:
        client = Client(bus)
        record = await client.get_job(job_id)
        if record.state in TERMINAL_STATES:
            click.echo(f"{job_id} already ended: {record.state}")
            return ExitCode.OK if record.state == JobState.CANCELLED else ExitCode.JOB_FAILED
        await Admin(bus, actor=actor(bus)).cancel_job(job_id, reason=reason)
        if not wait:
            click.echo(f"cancel requested for {job_id}")
            return ExitCode.OK
        final = await client.wait_for_job(job_id, timeout_s=timeout_s)
        click.echo(f"{job_id}: {final.state}" + (f" ({final.reason})" if final.reason else ""))
        return ExitCode.OK if final.state == JobState.CANCELLED else ExitCode.JOB_FAILED

    sys.exit(run_async(lambda: with_bus(settings_from(ctx), go)))


def _drain(ctx: click.Context, runner_id: str, drain: bool) -> None:
    async def go(bus: Bus) -> None:
        verdict = await Admin(bus, actor=actor(bus)).set_drain(runner_id, drain=drain)
        click.echo(f"{runner_id}: {verdict.state}")

    run_async(lambda: with_bus(settings_from(ctx), go))


@click.command()
@click.argument("runner_id")
@click.pass_context
def drain(ctx: click.Context, runner_id: str) -> None:
    """Stop giving a runner new work; its running jobs finish."""
    _drain(ctx, runner_id, True)


@click.command()
@click.argument("runner_id")
@click.pass_context
def undrain(ctx: click.Context, runner_id: str) -> None:
    """Give a drained runner work again."""
    _drain(ctx, runner_id, False)


@click.group()
def dead() -> None:
    """Messages no handler could process (kept with the reason)."""


@dead.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dead_ls(ctx: click.Context, as_json: bool) -> None:
    """List dead letters, oldest first."""

    async def go(bus: Bus) -> list[StoredDeadLetter]:
        return [d async for d in Admin(bus).dead_letters()]

    letters = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        for d in letters:
            click.echo(encode({"seq": d.seq, "letter": d.letter}).decode())
        return
    print_table(
        ["SEQ", "AT", "HANDLER", "SUBJECT", "DELIVERIES", "REASON"],
        [
            [
                d.seq,
                fmt_ms(d.letter.at_ms),
                d.letter.handler,
                d.letter.original_subject,
                d.letter.deliveries,
                d.letter.reason[:80],
            ]
            for d in letters
        ],
    )


@dead.command("show")
@click.argument("seq", type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def dead_show(ctx: click.Context, seq: int, as_json: bool) -> None:
    """Show one dead letter with its errors and payload."""

    async def go(bus: Bus) -> StoredDeadLetter:
        return await Admin(bus).dead_letter(seq)

    d = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(encode({"seq": d.seq, "letter": d.letter}).decode())
        return
    letter = d.letter
    click.echo(f"seq:         {d.seq}")
    click.echo(f"at:          {fmt_ms(letter.at_ms)}")
    click.echo(f"handler:     {letter.handler}")
    click.echo(f"subject:     {letter.original_subject}")
    click.echo(f"deliveries:  {letter.deliveries}")
    click.echo(f"reason:      {letter.reason}")
    for err in letter.errors:
        click.echo(f"  {err.path}: {err.reason}")
    click.echo(f"payload:     {letter.payload.decode(errors='replace')}")


@dead.command("replay")
@click.argument("seqs", nargs=-1, type=click.IntRange(1))
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
@click.pass_context
def dead_replay(ctx: click.Context, seqs: tuple[int, ...], replay_all: bool) -> None:
    """Publish dead letters to their original subject again (after fixing the cause)."""
    if not seqs and not replay_all:
        raise click.UsageError("give SEQ... or --all")

    async def go(bus: Bus) -> None:
        admin = Admin(bus, actor=actor(bus))
        targets = [d.seq async for d in admin.dead_letters()] if replay_all else list(seqs)
        for seq in targets:
            new_seq = await admin.replay(seq)
            click.echo(f"replayed #{seq} as #{new_seq}")

    run_async(lambda: with_bus(settings_from(ctx), go))


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def explain(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Why is this job pending (or why did it go where it went)?"""

    async def go(bus: Bus) -> JobExplanation:
        return await Client(bus).explain(job_id)

    e = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(encode(e).decode())
        if e.error:
            sys.exit(ExitCode.ERROR)
        return
    if e.error:
        click.echo(f"error: {e.error}", err=True)
        sys.exit(ExitCode.ERROR)
    click.echo(f"{e.job_id}: {e.state}")
    click.echo(f"  {e.summary}")
    if e.causes:
        click.echo(f"  causes: {', '.join(e.causes)}")
    if e.queue_position is not None:
        click.echo(
            f"  queue position {e.queue_position + 1} of {e.queue_length}"
            + (
                f", effective priority {e.effective_priority}"
                if e.effective_priority is not None
                else ""
            )
        )
    if e.estimated_start_at_ms is not None:
        click.echo(f"  estimated start {fmt_ms(e.estimated_start_at_ms)}")
    if e.predicted_finish_at_ms is not None:
        click.echo(f"  predicted finish {fmt_ms(e.predicted_finish_at_ms)}")
    for group in e.rejected:
        sample = f" (e.g. {', '.join(group.runners)})" if group.runners else ""
        click.echo(f"  {group.count} runner(s) rejected: {group.detail}{sample}")
    for hint in e.suggestions:
        click.echo(f"  hint: {hint}")
    if e.placement:
        click.echo(f"  decision: {e.placement}")
