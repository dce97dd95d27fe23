"""``valkyrie submit`` and ``valkyrie jobs …``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from schemas import TERMINAL_STATES, JobRecord, JobState
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
from valkyrie.client.jobs import Client
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for

__all__ = ["jobs", "submit"]


def _show(record: JobRecord) -> None:
    click.echo(f"id:          {record.id}")
    click.echo(f"state:       {record.state}")
    click.echo(f"type:        {record.spec.job_type} (api {record.api_version})")
    click.echo(f"priority:    {record.spec.priority}")
    click.echo(f"submitted:   {fmt_ms(record.submitted_at_ms)}")
    click.echo(f"updated:     {fmt_ms(record.updated_at_ms)}")
    click.echo(f"attempt:     {record.attempt}")
    if record.runner_id:
        click.echo(f"runner:      {record.runner_id}")
    if record.reason:
        click.echo(f"reason:      {record.reason}")
    if record.result is not None:
        code = record.result.exit_code
        click.echo(f"exit code:   {code if code is not None else '-'}")
        if record.result.error and record.result.error != record.reason:
            click.echo(f"error:       {record.result.error}")
        click.echo(f"duration:    {record.result.duration_ms} ms")
        if record.result.output_tail:
            click.echo("output:")
            for line in record.result.output_tail.splitlines():
                click.echo(f"  {line}")
    click.echo(f"payload:     {json.dumps(record.spec.payload)}")
    if record.spec.secret_env:  # the record holds the names only
        click.echo(f"secret env:  {', '.join(sorted(record.spec.secret_env))} (values hidden)")


@click.command()
@click.option(
    "--file",
    "file_",
    type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path),
    help="JSON body (v2 or v1); '-' reads stdin.",
)
@click.option("--type", "job_type", default="shell", show_default=True, help="Job type.")
@click.option("--priority", type=click.IntRange(0, 4), default=2, show_default=True)
@click.option("--payload", help="Payload as JSON (instead of a command).")
@click.option("--timeout", "timeout_s", type=click.IntRange(1), help="max_execution_time_s.")
@click.option(
    "--label", "labels", multiple=True, help="Required runner label KEY=VALUE (repeatable)."
)
@click.option("--meta", multiple=True, help="Metadata KEY=VALUE (repeatable).")
@click.option(
    "--secret-env",
    "secret_names",
    multiple=True,
    metavar="NAME",
    help="Give the job this shell's variable NAME as a secret: only its runner sees the value, "
    "every view shows *** (repeatable).",
)
@click.option("--job-id", help="Choose the job id.")
@click.option("--idempotency-key", help="Resubmissions with this key return the first job.")
@click.option(
    "--wait", is_flag=True, help="Follow the job to its end; exit 1 if it did not succeed."
)
@click.option("--wait-timeout", type=float, default=3600.0, show_default=True)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse fields the contract does not know (a --file with a typo) instead of warning.",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.argument("command", nargs=-1)
@click.pass_context
def submit(
    ctx: click.Context,
    file_: Path | None,
    job_type: str,
    priority: int,
    payload: str | None,
    timeout_s: int | None,
    labels: tuple[str, ...],
    meta: tuple[str, ...],
    secret_names: tuple[str, ...],
    job_id: str | None,
    idempotency_key: str | None,
    wait: bool,
    wait_timeout: float,
    strict: bool,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Submit a job: from --file, or flags, or a COMMAND after `--`; prints the job id."""
    if file_ is not None:
        if secret_names:
            raise click.UsageError("--secret-env goes with flags; with --file, use secret_env")
        body: bytes = sys.stdin.buffer.read() if str(file_) == "-" else file_.read_bytes()
    else:
        body = _body_from_flags(
            job_type=job_type,
            priority=priority,
            payload=payload,
            command=command,
            timeout_s=timeout_s,
            labels=labels,
            meta=meta,
            job_id=job_id,
            idempotency_key=idempotency_key,
            secret_names=secret_names,
        )
    settings = settings_from(ctx)

    async def go() -> int:
        loaded = config_for(settings)

        async def submit_with(bus: Bus) -> int:
            client = Client(bus, config=LiveConfig(loaded), requested_by=actor(bus))
            return await _submit(
                client, body, wait=wait, wait_timeout=wait_timeout, as_json=as_json, strict=strict
            )

        return await with_bus(settings, submit_with, config=loaded)

    sys.exit(run_async(go))


def _body_from_flags(
    *,
    job_type: str,
    priority: int,
    payload: str | None,
    command: tuple[str, ...],
    timeout_s: int | None,
    labels: tuple[str, ...],
    meta: tuple[str, ...],
    job_id: str | None,
    idempotency_key: str | None,
    secret_names: tuple[str, ...] = (),
) -> bytes:
    """The submission the flags describe (the v2 body a --file would hold)."""
    doc: dict[str, Any] = {"job_type": job_type, "priority": priority}
    if payload is not None:
        try:
            doc["payload"] = json.loads(payload)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not JSON: {e}", param_hint="--payload") from e
    elif command:
        doc["payload"] = {"command": list(command)}
    if timeout_s:
        doc["requirements"] = {"max_execution_time_s": timeout_s}
    for opt, key, values in (("--label", "labels", labels), ("--meta", "metadata", meta)):
        pairs = _pairs(opt, values)
        if pairs:
            doc[key] = pairs
    missing = [name for name in secret_names if name not in os.environ]
    if missing:
        raise click.BadParameter(
            f"not set in this shell: {', '.join(missing)}", param_hint="--secret-env"
        )
    if secret_names:
        # taken from the environment, never from the command line (other users see that)
        doc["secret_env"] = {name: os.environ[name] for name in secret_names}
    if job_id:
        doc["job_id"] = job_id
    if idempotency_key:
        doc["idempotency_key"] = idempotency_key
    return encode(doc)


def _pairs(opt: str, items: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=opt)
        pairs[k] = v
    return pairs


async def _submit(
    client: Client, body: bytes, *, wait: bool, wait_timeout: float, as_json: bool, strict: bool
) -> int:
    """Submit ``body``; print the verdict, or follow the job to its end with ``wait``."""
    verdict = await client.submit(body, strict=strict)
    assert verdict is not None
    if not verdict.accepted:
        if as_json:
            click.echo(encode(verdict).decode())
        for err in verdict.errors:
            click.echo(f"rejected: {err.path}: {err.reason}", err=True)
        return ExitCode.REJECTED
    for warning in verdict.warnings:
        click.echo(f"warning: {warning.path}: {warning.reason}", err=True)
    if not wait:
        click.echo(encode(verdict).decode() if as_json else verdict.job_id)
        return ExitCode.OK
    assert verdict.job_id is not None
    if not as_json:
        click.echo(verdict.job_id)
    record = await client.wait_for_job(verdict.job_id, timeout_s=wait_timeout)
    if as_json:
        click.echo(encode(record).decode())
    else:
        _print_outcome(record)
    return ExitCode.OK if record.state == JobState.SUCCEEDED else ExitCode.JOB_FAILED


def _print_outcome(record: JobRecord) -> None:
    """The output tail, then the end state with its exit code (and a reason that adds to it)."""
    tail = record.result.output_tail if record.result else ""
    if tail:
        click.echo(tail.rstrip("\n"))
    code = record.result.exit_code if record.result else None
    click.echo(
        f"{record.state} (exit code {code if code is not None else '-'})"
        + (f": {record.reason}" if record.reason and record.reason != f"exit code {code}" else "")
    )


@click.group()
def jobs() -> None:
    """Inspect jobs."""


@jobs.command("ls")
@click.option("--state", "states", multiple=True, type=click.Choice([s.value for s in JobState]))
@click.option("--active", is_flag=True, help="Only jobs not yet finished.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_ls(
    ctx: click.Context, states: tuple[str, ...], active: bool, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    wanted = {JobState(s) for s in states} or None
    if active:
        wanted = set(JobState) - set(TERMINAL_STATES)

    async def go(bus: Bus) -> list[JobRecord]:
        return await Client(bus).list_jobs(states=wanted, limit=limit)

    records = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(msgspec.json.encode(records).decode())
        return
    print_table(
        ["ID", "STATE", "TYPE", "PRIO", "ATTEMPT", "RUNNER", "SUBMITTED"],
        [
            [
                r.id,
                r.state,
                r.spec.job_type,
                r.spec.priority,
                r.attempt,
                r.runner_id or "-",
                fmt_ms(r.submitted_at_ms),
            ]
            for r in records
        ],
    )


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs_show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show one job's record."""

    async def go(bus: Bus) -> JobRecord:
        return await Client(bus).get_job(job_id)

    record = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(encode(record).decode())
    else:
        _show(record)
