"""Shared CLI plumbing: settings from options, exit codes, connecting, output formatting."""

from __future__ import annotations

import datetime as dt
import enum
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import click
import msgspec

from valkyrie.bus.connection import Bus, connect
from valkyrie.bus.credentials import Credentials, discover
from valkyrie.bus.tls import tls_context
from valkyrie.cli._local import read_record
from valkyrie.config.load import LoadedConfig, config_for
from valkyrie.config.settings import Settings, redact_url
from valkyrie.errors import ConnectError, NotFoundError, ValkyrieError

__all__ = [
    "CLI_IDENTITY",
    "ExitCode",
    "actor",
    "cli_credentials",
    "fmt_ms",
    "print_table",
    "run_async",
    "settings_from",
    "setup_logging",
    "with_bus",
]

T = TypeVar("T")
#: the root command's options that are settings
_GLOBAL_OPTIONS = ("nats_url", "prefix", "nats_creds", "nats_identity")
#: who the CLI speaks as unless told otherwise (``--identity ops`` for read-only)
CLI_IDENTITY = "admin"


class ExitCode(enum.IntEnum):
    """Exit codes scripts can rely on (documented in docs/operations.md)."""

    OK = 0
    JOB_FAILED = 1
    USAGE = 2
    REJECTED = 3
    NOT_FOUND = 4
    UNAVAILABLE = 5
    TIMEOUT = 6
    ERROR = 10


def setup_logging(verbose: bool) -> None:
    """One log format for every long-running command (the gateway leaves logging alone)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def settings_from(ctx: click.Context) -> Settings:
    """The settings for this invocation (environment plus global options)."""
    obj: dict[str, Any] = ctx.find_root().obj or {}
    return Settings.from_env(**{k: obj.get(k) for k in _GLOBAL_OPTIONS})


def actor(bus: Bus) -> str:
    """Who the CLI says asks: ``<identity>:<OS user>``, ``cli:<OS user>`` on an open installation.

    The config handler and the canceller keep it, as it refines the identity the subject proves.
    """
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        return bus.identity or "cli"
    return f"{bus.identity or 'cli'}:{user}"


def cli_credentials(settings: Settings) -> Credentials:
    """Who the CLI connects as.

    The settings' credentials, else the generated ``admin`` (or the ``--identity`` chosen) from
    the data dir, else nobody (an open server).
    """
    return discover(settings, settings.nats_identity or CLI_IDENTITY)


def client_url(settings: Settings) -> str:
    """The URL client commands use.

    The configured one (``VALKYRIE_NATS_URL``); else that of the ``valkyrie up`` running on this
    data directory, which recorded it (its port may not be this shell's); else the local embedded
    server's default port.
    """
    if settings.nats_url:
        return settings.nats_url
    record = read_record(settings)
    if record is not None:
        return record.nats_url
    return f"nats://127.0.0.1:{settings.embedded_port}"


def _backend_options() -> dict[str, object]:
    """Use uvloop when installed: a faster event loop for handlers and commands (NATS notes)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` and map Valkyrie errors to exit codes with a one-line message."""
    try:
        return anyio.run(fn, backend_options=_backend_options())
    except ConnectError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except NotFoundError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(ExitCode.NOT_FOUND)
    except TimeoutError as e:
        click.echo(f"error: timed out {e}", err=True)
        sys.exit(ExitCode.TIMEOUT)
    except ValkyrieError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(ExitCode.ERROR)


async def with_bus(
    settings: Settings, fn: Callable[[Bus], Awaitable[T]], *, config: LoadedConfig | None = None
) -> T:
    """Connect, run ``fn(bus)``, close.

    TLS comes from ``config``, the command's loaded config (loaded from ``settings`` here when
    the command has not loaded it already).
    """
    if config is None:
        config = config_for(settings)
    quick = msgspec.structs.replace(settings, nats_url=client_url(settings), connect_timeout_s=3.0)
    try:
        # connect() retries until connect_timeout_s, but a single nats-py connect attempt to an
        # unreachable server may itself never return: bound the whole of it
        with anyio.fail_after(quick.connect_timeout_s + 2):
            bus = await connect(
                quick,
                tls=tls_context(config.config.security),
                credentials=cli_credentials(quick),
            )
    except TimeoutError as e:
        raise ConnectError(
            f"cannot connect to NATS at {redact_url(quick.nats_url or '')} within "
            f"{quick.connect_timeout_s:g}s: "
            "check that the server runs and the URL (VALKYRIE_NATS_URL) is right"
        ) from e
    try:
        return await fn(bus)
    finally:
        with anyio.CancelScope(shield=True):
            await bus.close()


def fmt_ms(at_ms: int | None) -> str:
    """An epoch-ms instant as local ISO time (``-`` when absent)."""
    if at_ms is None:
        return "-"
    return dt.datetime.fromtimestamp(at_ms / 1000).isoformat(sep=" ", timespec="milliseconds")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))
