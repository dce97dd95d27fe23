"""``valkyrie jobs logs``: a job's output lines, and following them until it ends."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import anyio
import click
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas import TERMINAL_STATES, JobLog, JobState
from valkyrie.bus.codec import (
    JOB_DECODER,
    LOG_DECODER,
)
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import watch_kv
from valkyrie.cli._common import (
    ExitCode,
    run_async,
    settings_from,
    with_bus,
)
from valkyrie.client.jobs import Client
from valkyrie.domain.identity import (
    attempt_runners,
    log_refusal,
)
from valkyrie.errors import NotFoundError

__all__ = ["jobs_logs"]


class _LogPrinter:
    """Prints batches: stdout lines to stdout, stderr and system lines to stderr.

    Only lines of the runner each attempt was given to: any runner may publish lines under its
    own id for any job id, so the subject's runner is checked against the job's record.
    """

    def __init__(self, attempt: int | None, runners: dict[int, str]) -> None:
        self._only = attempt
        self._current: int | None = None
        self.runners = runners
        self._refused: set[str] = set()

    def print(self, subject: str, batch: JobLog) -> None:
        if self._only is not None and batch.attempt != self._only:
            return
        sender = subject.split(".")[-2]
        refusal = log_refusal(sender, batch.runner_id, batch.attempt, self.runners)
        if refusal is not None:
            if sender not in self._refused:
                self._refused.add(sender)
                click.echo(f"[valkyrie] lines from runner {sender} not shown: {refusal}", err=True)
            return
        if batch.attempt != self._current and (self._current is not None or batch.attempt > 1):
            click.echo(f"[valkyrie] attempt {batch.attempt} on {batch.runner_id}", err=True)
        self._current = batch.attempt
        to_stderr = batch.stream != "stdout"
        for line in batch.lines:
            click.echo(line, err=to_stderr)


async def _last_seq(bus: Bus, stream: str, subject: str) -> int:
    try:
        msg = await bus.js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msg.seq or 0)


@dataclass
class _Progress:
    """Where printing ends: the job's last log message (once known) and its state."""

    state: JobState | None
    end_seq: int | None = None


async def _print_logs(
    bus: Bus, job_id: str, *, follow: bool, attempt: int | None
) -> JobState | None:
    """Print the job's logs; with ``follow`` until it is terminal. Returns its last known state."""
    stream, subject = bus.names.stream("logs"), bus.names.logs("*", job_id)
    client = Client(bus)
    runners: dict[int, str] = {}
    try:
        record = await client.get_job(job_id)
        progress = _Progress(state=record.state)
        runners = attempt_runners(record)
    except NotFoundError:
        if follow:
            raise
        progress = _Progress(state=None)
    if not follow or progress.state in TERMINAL_STATES:
        progress.end_seq = await _last_seq(bus, stream, subject)
        if progress.end_seq == 0:
            if progress.state is None:
                raise NotFoundError(f"no job {job_id!r} and no logs for it") from None
            return progress.state
    sub = await bus.js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    printer = _LogPrinter(attempt, runners)
    seen = 0
    try:
        async with anyio.create_task_group() as tg:
            if progress.end_seq is None:
                tg.start_soon(_until_terminal, bus, job_id, progress)
            while progress.end_seq is None or seen < progress.end_seq:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    continue
                seen = int(msg.metadata.sequence.stream)
                try:
                    batch = LOG_DECODER.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                if batch.attempt not in printer.runners:  # dispatched since we last read
                    with contextlib.suppress(NotFoundError):
                        printer.runners = attempt_runners(await client.get_job(job_id))
                printer.print(msg.subject, batch)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await sub.unsubscribe()
    return progress.state


async def _until_terminal(bus: Bus, job_id: str, progress: _Progress) -> None:
    # Runners store an attempt's logs before its JobFinished, so once the record is terminal the
    # stream's last log message for the job is the last one to print.
    changes = watch_kv(await bus.kv("jobs"), job_id)
    async with contextlib.aclosing(changes):
        async for change in changes:
            if change.value is None:
                continue
            record = JOB_DECODER.decode(change.value)
            if record.state in TERMINAL_STATES:
                progress.state = record.state
                names = bus.names
                progress.end_seq = await _last_seq(
                    bus, names.stream("logs"), names.logs("*", job_id)
                )
                return


@click.command("logs")
@click.argument("job_id")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing until the job ends; exit 1 unless it succeeded.",
)
@click.option("--attempt", type=click.IntRange(1), help="Only this attempt's lines.")
@click.pass_context
def jobs_logs(ctx: click.Context, job_id: str, follow: bool, attempt: int | None) -> None:
    """Print a job's log lines (stdout lines to stdout, stderr and runner notes to stderr)."""

    async def go(bus: Bus) -> JobState | None:
        return await _print_logs(bus, job_id, follow=follow, attempt=attempt)

    try:
        state = run_async(lambda: with_bus(settings_from(ctx), go))
    except KeyboardInterrupt:
        sys.exit(130)
    if follow and state != JobState.SUCCEEDED:
        sys.exit(ExitCode.JOB_FAILED)
