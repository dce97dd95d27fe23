"""``valkyrie gateway``: the HTTP bridge as its own process, against a running control plane."""

from __future__ import annotations

import functools
import logging
import signal

import anyio
import click
import msgspec

from valkyrie.cli._common import client_url, run_async, settings_from, setup_logging
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import config_for
from valkyrie.domain.identity import GATEWAY
from valkyrie.runtime.app import open_bus

__all__ = ["gateway"]

log = logging.getLogger("valkyrie.gateway")


@click.command()
@click.option("--host", help="Address to bind (default: http.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: http.port, 8080).")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def gateway(ctx: click.Context, host: str | None, port: int | None, verbose: bool) -> None:
    """Serve the HTTP API (docs/http-api.md) against VALKYRIE_NATS_URL.

    It translates every call into bus requests and KV reads, so it can run anywhere the bus is
    reachable and as many times as needed. Ctrl-C stops it.
    """
    setup_logging(verbose)
    settings = settings_from(ctx)
    if not settings.nats_url:
        settings = msgspec.structs.replace(settings, nats_url=client_url(settings))

    async def serve() -> None:
        # imported here: the web stack is not worth loading for every other command
        from valkyrie.gateway import check_auth_setup, run_gateway

        loaded = config_for(settings)
        # before connecting: a gateway that would refuse every call must not start at all
        check_auth_setup(loaded.config.http, host or loaded.config.http.host)
        live = LiveConfig(loaded)
        async with open_bus(
            settings, embed=False, config=loaded.config, name="valkyrie-gateway", identity=GATEWAY
        ) as (bus, _):
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:

                async def on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for signum in signals:
                            if stop.is_set():
                                tg.cancel_scope.cancel()
                                return
                            log.info("%s: stopping", signal.Signals(signum).name)
                            stop.set()

                tg.start_soon(on_signal)
                async with anyio.create_task_group() as serving:
                    bound = await serving.start(
                        functools.partial(run_gateway, bus, stop, live=live, host=host, port=port)
                    )
                    click.echo(f"valkyrie gateway on port {bound}; Ctrl-C to stop", err=True)
                tg.cancel_scope.cancel()

    run_async(serve)
