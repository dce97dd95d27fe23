"""``valkyrie up``, ``valkyrie worker``, ``valkyrie handlers``, ``valkyrie provision``."""

from __future__ import annotations

import logging

import click

from valkyrie._app import open_bus, run_control_plane
from valkyrie._handlers import discover_handlers
from valkyrie.cli._common import run_async, settings_from
from valkyrie.runner import run_reference_runner

__all__ = ["handlers_cmd", "provision", "up", "worker"]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@click.command()
@click.option(
    "--handlers", "only", help="Comma-separated handlers to run (default: all registered)."
)
@click.option(
    "--runners",
    "local_runners",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Also run this many reference runners in this process (they execute job commands).",
)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def up(ctx: click.Context, only: str | None, local_runners: int, verbose: bool) -> None:
    """Run the control plane and every handler in one process.

    It embeds a nats-server unless VALKYRIE_NATS_URL is set. With --runners N it also runs N
    reference runners, which execute job commands on this host. Ctrl-C finishes in-flight work and
    stops cleanly.
    """
    _logging(verbose)
    settings = settings_from(ctx)
    names = [n.strip() for n in only.split(",")] if only else None
    extras = [run_reference_runner] * local_runners

    def ready(_bus: object) -> None:
        with_runners = f" with {local_runners} local runner(s)" if local_runners else ""
        click.echo(f"valkyrie is up{with_runners}; Ctrl-C to stop", err=True)

    run_async(
        lambda: run_control_plane(
            settings, handlers=names, embed=True, extras=extras, on_ready=ready
        )
    )


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def worker(ctx: click.Context, names: tuple[str, ...], verbose: bool) -> None:
    """Run the named handler(s) in this process against VALKYRIE_NATS_URL (for scale-out)."""
    _logging(verbose)
    settings = settings_from(ctx)
    if not settings.nats_url:
        settings = type(settings).from_env(
            nats_url=f"nats://127.0.0.1:{settings.embedded_port}", prefix=settings.prefix
        )
    run_async(lambda: run_control_plane(settings, handlers=list(names), embed=False))


@click.command("handlers")
def handlers_cmd() -> None:
    """List the registered handlers."""
    for name, factory in discover_handlers().items():
        click.echo(f"{name}\t{factory.__module__}")


@click.command()
@click.pass_context
def provision(ctx: click.Context) -> None:
    """Create or update every stream and KV bucket, then exit."""
    settings = settings_from(ctx)

    async def go() -> None:
        async with open_bus(settings, embed=False):
            pass

    run_async(go)
    click.echo("provisioned")
