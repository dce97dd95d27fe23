"""``valkyrie up``, ``valkyrie worker``, ``valkyrie handlers``, ``valkyrie provision``."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import click
import msgspec
from anyio.abc import TaskStatus

from valkyrie.cli._common import run_async, settings_from
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for
from valkyrie.domain.identity import runner_identity
from valkyrie.runner import default_runner_id, reference_registration, run_reference_runner
from valkyrie.runtime.app import Connector, Extra, open_bus, run_control_plane
from valkyrie.runtime.context import discover_handlers

__all__ = ["handlers_cmd", "provision", "up", "worker"]


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


def local_runner(runner_id: str) -> Extra:
    """A reference runner in this process, connected as its own identity ``runner-<id>``."""

    async def extra(
        connector: Connector, stop: anyio.Event, *, task_status: TaskStatus[Any]
    ) -> None:
        name = f"valkyrie-runner-{runner_id}"
        async with connector.bus(runner_identity(runner_id), name=name) as bus:
            await run_reference_runner(
                bus, stop, reference_registration(runner_id), task_status=task_status
            )

    return extra


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
@click.option(
    "--http-port",
    type=click.IntRange(0, 65535),
    help="Port of the HTTP API (default: http.port; the API runs when http.enabled).",
)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def up(
    ctx: click.Context, only: str | None, local_runners: int, http_port: int | None, verbose: bool
) -> None:
    """Run the control plane and every handler in one process.

    It embeds a nats-server unless VALKYRIE_NATS_URL is set. With --runners N it also runs N
    reference runners, which execute job commands on this host. The HTTP API (docs/http-api.md)
    runs too unless http.enabled is false. Ctrl-C finishes in-flight work and stops cleanly.
    """
    _logging(verbose)
    settings = settings_from(ctx)
    names = [n.strip() for n in only.split(",")] if only else None
    runner_ids = [default_runner_id(f"local-{n}") for n in range(1, local_runners + 1)]
    extras: list[Extra] = [local_runner(rid) for rid in runner_ids]

    async def go() -> None:
        loaded = config_for(settings)  # once: the handlers and the gateway share it
        http = loaded.config.http
        api = ""
        if http.enabled:
            # imported here: the web stack is not worth loading for every other command
            from valkyrie.gateway import gateway_extra

            extras.append(gateway_extra(loaded, port=http_port))
            port = http.port if http_port is None else http_port
            api = (
                f"; HTTP API on http://{http.host}:{port}" if port else "; HTTP API on a free port"
            )

        def ready(_bus: object) -> None:
            with_runners = f" with {local_runners} local runner(s)" if local_runners else ""
            click.echo(f"valkyrie is up{with_runners}{api}; Ctrl-C to stop", err=True)

        await run_control_plane(
            settings,
            config=LiveConfig(loaded),
            handlers=names,
            embed=True,
            extras=extras,
            local_runners=runner_ids,
            on_ready=ready,
        )

    run_async(go)


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def worker(ctx: click.Context, names: tuple[str, ...], verbose: bool) -> None:
    """Run the named handler(s) in this process against VALKYRIE_NATS_URL (for scale-out)."""
    _logging(verbose)
    settings = settings_from(ctx)
    if not settings.nats_url:
        settings = msgspec.structs.replace(
            settings, nats_url=f"nats://127.0.0.1:{settings.embedded_port}"
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
