"""Securing the embedded server: the generated identities, included and reloaded.

``valkyrie up`` calls :func:`secured_server` for the server it embeds: on a fresh data dir it
creates the identities first (``valkyrie auth init``), so the server never runs open. The
``valkyrie auth`` commands call :func:`reload_embedded` after each change, so a new runner's
credentials work (and a revoked runner is disconnected) without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from valkyrie.bus.credentials import auth_dir
from valkyrie.bus.server import NatsServer, reload_running
from valkyrie.config.settings import Settings, data_dir_of
from valkyrie.security.store import AuthStore

__all__ = ["embedded_server", "reload_embedded", "secured_server"]

log = logging.getLogger("valkyrie.security")


def embedded_server(settings: Settings) -> NatsServer:
    """The embedded server of these settings' data dir, open (not secured) and not started."""
    return NatsServer(
        store_dir=data_dir_of(settings) / "nats",
        host=settings.embedded_host,
        port=settings.embedded_port,
    )


def secured_server(settings: Settings, *, runners: Sequence[str] = ()) -> NatsServer:
    """The embedded server with the generated accounts and an encrypted store (not started).

    Creates what is missing first: the fixed identities on a fresh data dir, and an identity for
    each of ``runners`` (the local runners of ``valkyrie up --runners``) that has none.
    """
    store = AuthStore(auth_dir(settings))
    created = store.init(settings.prefix)
    if created:
        log.info("secured the embedded server: %d identities in %s", len(created), store.root)
    known = set(store.runner_ids())
    for runner_id in runners:
        if runner_id not in known:
            store.add_runner(runner_id)
    server = embedded_server(settings)
    server.auth_conf = store.conf_file
    server.jetstream_key = store.jetstream_key()
    return server


def reload_embedded(settings: Settings) -> bool:
    """Reload the embedded server of this data dir if it runs; ``False`` when none runs.

    Raises:
        ServerError: it refused the new configuration or did not confirm the reload.
    """
    server = embedded_server(settings)
    return reload_running(server.store_dir, server.name)
