"""``valkyrie up``, ``valkyrie worker``, ``valkyrie handlers``, ``valkyrie provision``."""

from __future__ import annotations

import logging
import os
from typing import Any

import anyio
import click
import msgspec
from anyio.abc import TaskStatus

from valkyrie.bus.codec import now_ms
from valkyrie.bus.connection import Bus
from valkyrie.cli._common import client_url, run_async, settings_from, setup_logging
from valkyrie.cli._local import RECORD_NAME, UpRecord, data_dir, remove_record, write_record
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for
from valkyrie.config.settings import Settings
from valkyrie.domain.identity import runner_identity
from valkyrie.runner import default_runner_id, reference_registration, run_reference_runner
from valkyrie.runtime.app import Connector, Extra, open_bus, run_control_plane
from valkyrie.runtime.context import discover_handlers

__all__ = ["handlers_cmd", "provision", "up", "worker"]

log = logging.getLogger("valkyrie")


def _address(bus: Bus, settings: Settings) -> str:
    """The NATS URL other commands should use, without credentials (the record is a file)."""
    url = bus.nc.connected_url
    if url is None or url.hostname is None:
        return settings.nats_url or f"nats://127.0.0.1:{settings.embedded_port}"
    return f"{url.scheme}://{url.hostname}:{url.port or 4222}"


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
    setup_logging(verbose)
    settings = settings_from(ctx)
    names = [n.strip() for n in only.split(",")] if only else None
    runner_ids = [default_runner_id(f"local-{n}") for n in range(1, local_runners + 1)]
    extras: list[Extra] = [local_runner(rid) for rid in runner_ids]

    async def go() -> None:
        # --http-port is a layer of this process's config, so that whatever reads the config
        # (the gateway's config API, `config show --effective`) says where the API listens
        overrides = {"http.port": http_port} if http_port is not None else None
        loaded = config_for(settings, overrides=overrides)  # once: handlers and gateway share it
        http = loaded.config.http
        record = UpRecord(
            pid=os.getpid(),
            nats_url="",
            prefix=settings.prefix,
            started_at_ms=now_ms(),
            base=loaded.base(),
            sources=dict(loaded.sources),
        )

        def remember(**changes: str) -> None:
            nonlocal record
            record = msgspec.structs.replace(record, **changes)
            if record.nats_url:  # complete once NATS is up
                write_record(settings, record)

        if http.enabled:
            # imported here: the web stack is not worth loading for every other command
            from valkyrie.gateway import gateway_extra

            extras.append(gateway_extra(loaded, on_listening=lambda url: remember(http_url=url)))

        def ready(bus: Bus) -> None:
            remember(nats_url=_address(bus, settings))
            log.info(
                "other shells find this installation through %s",
                data_dir(settings) / RECORD_NAME,
            )
            with_runners = f" with {local_runners} local runner(s)" if local_runners else ""
            # every extra has started by now: the gateway listens and told its address
            api = f"; HTTP API on {record.http_url}" if record.http_url else ""
            click.echo(f"valkyrie is up{with_runners}{api}; Ctrl-C to stop", err=True)

        try:
            await run_control_plane(
                settings,
                config=LiveConfig(loaded),
                handlers=names,
                embed=True,
                extras=extras,
                local_runners=runner_ids,
                on_ready=ready,
            )
        finally:
            remove_record(settings, os.getpid())

    run_async(go)


@click.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def worker(ctx: click.Context, names: tuple[str, ...], verbose: bool) -> None:
    """Run the named handler(s) in this process against VALKYRIE_NATS_URL (for scale-out)."""
    setup_logging(verbose)
    settings = settings_from(ctx)
    if not settings.nats_url:
        settings = msgspec.structs.replace(settings, nats_url=client_url(settings))
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
