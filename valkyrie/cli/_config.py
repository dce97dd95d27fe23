"""``valkyrie config …``: show, validate, set, apply, history, rollback, migrate."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import msgspec

from schemas import ConfigRevision, ConfigVerdict, FieldError
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import (
    ExitCode,
    actor,
    client_url,
    fmt_ms,
    print_table,
    run_async,
    settings_from,
    with_bus,
)
from valkyrie.cli._local import read_record
from valkyrie.client.config import ConfigClient
from valkyrie.config.load import LoadedConfig, config_for, file_layer, known_keys
from valkyrie.config.migrate import migrate_ancestor
from valkyrie.config.model import profile_overrides, unflatten
from valkyrie.config.validate import validate_dotted
from valkyrie.errors import ConfigError

__all__ = ["config"]


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _print_problems(errors: list[FieldError], warnings: list[FieldError]) -> None:
    for e in errors:
        click.echo(f"error: {e.path}: {e.reason}", err=True)
    for w in warnings:
        click.echo(f"warning: {w.path}: {w.reason}", err=True)


def _finish(verdict: ConfigVerdict) -> int:
    _print_problems(verdict.errors, verdict.warnings)
    if not verdict.accepted:
        click.echo("refused", err=True)
        return ExitCode.REJECTED
    if verdict.diff:
        for key, change in verdict.diff.items():
            click.echo(f"{key}: {json.dumps(change['old'])} -> {json.dumps(change['new'])}")
        click.echo(f"revision {verdict.revision}")
    else:
        click.echo(f"no change (revision {verdict.revision})")
    return ExitCode.OK


@click.group()
def config() -> None:
    """Inspect and change the runtime configuration (changes apply live)."""


@config.command("show")
@click.option("--effective", is_flag=True, help="Every key with its value and where it came from.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("prefix", required=False, default="")
@click.pass_context
def show(ctx: click.Context, effective: bool, as_json: bool, prefix: str) -> None:
    """Show the runtime revision, or with --effective every value and its source layer."""
    settings = settings_from(ctx)

    async def current(bus: Bus) -> ConfigRevision | None:
        return await ConfigClient(bus).current()

    async def go() -> tuple[LoadedConfig, ConfigRevision | None]:
        loaded = config_for(settings)
        return loaded, await with_bus(settings, current, config=loaded)

    loaded, revision = run_async(go)
    runtime = revision.values if revision else {}
    if not effective:
        doc = msgspec.to_builtins(revision) if revision else {"revision": 0, "values": {}}
        if as_json:
            click.echo(json.dumps(doc))
        else:
            click.echo(
                f"revision {doc['revision']}"
                + (f" by {revision.changed_by} at {fmt_ms(revision.at_ms)}" if revision else "")
            )
            for key, value in sorted(runtime.items()):
                click.echo(f"  {key} = {json.dumps(value)}")
        return
    base, base_sources = loaded.base(), dict(loaded.sources)
    number = revision.revision if revision else 0
    running = read_record(settings)
    if running is not None and running.nats_url == client_url(settings) and running.base:
        # a running `valkyrie up`: its layers, not this shell's (its environment may differ)
        base, base_sources = running.base, dict(running.sources)
        whose = f"values the running `valkyrie up` (pid {running.pid}) runs"
        click.echo(f"{whose}, with runtime revision {number}", err=True)
    else:
        click.echo(
            "values of this shell's layers (profile, file, environment) with runtime revision "
            f"{number}; other processes may run others",
            err=True,
        )
    merged = {**base, **runtime}
    sources = {**base_sources, **dict.fromkeys(runtime, "runtime")}
    rows = [
        (key, merged[key], sources.get(key, "default"))
        for key in sorted(merged)
        if key.startswith(prefix)
    ]
    if as_json:
        click.echo(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}))
        return
    print_table(["KEY", "VALUE", "SOURCE"], [(k, json.dumps(v), s) for k, v, s in rows])


@config.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def validate(ctx: click.Context, file: Path) -> None:
    """Check a TOML config file: every error with its key; exit 3 when there is one.

    The file is checked over its profile (its ``profile`` key, else VALKYRIE_PROFILE), as a
    process would load it.
    """
    try:
        values = file_layer(file)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(ExitCode.REJECTED)
    profile = str(values.get("profile") or settings_from(ctx).profile)
    result = validate_dotted({**profile_overrides(profile), **values})
    _print_problems(result.errors, result.warnings)
    if result.config is None:
        click.echo(f"{file}: {len(result.errors)} error(s)", err=True)
        sys.exit(ExitCode.REJECTED)
    click.echo(
        f"{file}: valid" + (f" ({len(result.warnings)} warning(s))" if result.warnings else "")
    )


@config.command("set")
@click.argument("key")
@click.argument("value")
@click.option("--reason", help="Why (kept in the audit event).")
@click.pass_context
def set_(ctx: click.Context, key: str, value: str, reason: str | None) -> None:
    """Set KEY to VALUE (JSON, else a string) at runtime."""

    async def go(bus: Bus) -> int:
        verdict = await ConfigClient(bus, actor=actor(bus)).change(
            set_values={key: _value(value)}, reason=reason
        )
        return _finish(verdict)

    sys.exit(run_async(lambda: with_bus(settings_from(ctx), go)))


@config.command("unset")
@click.argument("key")
@click.pass_context
def unset(ctx: click.Context, key: str) -> None:
    """Remove KEY's runtime override (the file/env/profile value applies again)."""

    async def go(bus: Bus) -> int:
        return _finish(await ConfigClient(bus, actor=actor(bus)).change(set_values={key: None}))

    sys.exit(run_async(lambda: with_bus(settings_from(ctx), go)))


@config.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reason")
@click.pass_context
def apply(ctx: click.Context, file: Path, reason: str | None) -> None:
    """Apply every key of a TOML file at runtime (keys that cannot change live are refused)."""
    try:
        values = file_layer(file)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    settings = settings_from(ctx)
    loaded = config_for(settings)
    base = loaded.base()
    changes = {k: v for k, v in values.items() if base.get(k) != v or k not in known_keys()}

    async def go(bus: Bus) -> int:
        return _finish(
            await ConfigClient(bus, actor=actor(bus)).change(set_values=changes, reason=reason)
        )

    sys.exit(run_async(lambda: with_bus(settings, go, config=loaded)))


@config.command("history")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, as_json: bool) -> None:
    """Every kept revision: who, when, what changed."""

    async def go(bus: Bus) -> list[ConfigRevision]:
        return await ConfigClient(bus).history()

    revisions = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(msgspec.json.encode(revisions).decode())
        return
    print_table(
        ["REV", "AT", "BY", "CHANGES", "REASON"],
        [
            (
                r.revision,
                fmt_ms(r.at_ms),
                r.changed_by,
                ", ".join(f"{k}={json.dumps(v['new'])}" for k, v in r.diff.items())[:80],
                r.reason or "",
            )
            for r in revisions
        ],
    )


@config.command("rollback")
@click.argument("revision", type=click.IntRange(0))
@click.pass_context
def rollback(ctx: click.Context, revision: int) -> None:
    """Restore the runtime overrides of REVISION (0 = none) as a new revision."""

    async def go(bus: Bus) -> int:
        return _finish(await ConfigClient(bus, actor=actor(bus)).change(rollback_to=revision))

    sys.exit(run_async(lambda: with_bus(settings_from(ctx), go)))


def _toml(values: dict[str, Any]) -> str:
    lines: list[str] = []
    nested = unflatten(values)
    for key, value in nested.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {json.dumps(value)}")
    for section, table in nested.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return "\n".join(lines).strip() + "\n"


@config.command("migrate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the TOML here."
)
def migrate(file: Path, output: Path | None) -> None:
    """Translate the ancestor's config (JSON or TOML) to ours, listing every change and drop."""
    text = file.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise click.ClickException(f"{file} is neither JSON nor TOML: {e}") from e
    if not isinstance(doc, dict):
        raise click.ClickException(f"{file}: expected an object at the top level")
    report = migrate_ancestor(doc)
    for step in report.steps:
        arrow = f" -> {step.target}" if step.target else ""
        click.echo(f"{step.action:8} {step.field}{arrow}: {step.reason}", err=True)
    result = validate_dotted(report.values)
    _print_problems(result.errors, result.warnings)
    toml = _toml(report.values)
    if output is not None:
        output.write_text(toml)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(toml, nl=False)
    if result.config is None:
        sys.exit(ExitCode.REJECTED)
