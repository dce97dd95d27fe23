"""``valkyrie auth …``: the installation's NATS identities (docs/security.md)."""

from __future__ import annotations

import dataclasses
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from valkyrie.bus.credentials import auth_dir
from valkyrie.cli._common import ExitCode, print_table, settings_from
from valkyrie.config.settings import Settings, data_dir_of
from valkyrie.errors import ConfigError, ValkyrieError
from valkyrie.security.embedded import reload_embedded
from valkyrie.security.natsconf import ClusterSpec, ServerSpec, server_conf
from valkyrie.security.store import AuthStore, write_private

__all__ = ["auth"]


def _store(settings: Settings) -> AuthStore:
    return AuthStore(auth_dir(settings))


@contextmanager
def _errors() -> Iterator[None]:
    """A Valkyrie error ends the command with its one-line message (exit 10)."""
    try:
        yield
    except ValkyrieError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(ExitCode.ERROR)


def _apply(settings: Settings) -> None:
    """Make the server read the changed identities: reload the embedded one, or say how."""
    with _errors():
        reloaded = reload_embedded(settings)
    if reloaded:
        click.echo("reloaded the embedded nats-server: the change is in force", err=True)
        return
    click.echo(
        "no embedded server runs from this data dir: `valkyrie up` applies the change when it "
        "starts. For an external server, write its configuration again "
        "(`valkyrie auth nats-config --out FILE`) and reload it "
        "(`nats-server --signal reload=<pid>`, or SIGHUP).",
        err=True,
    )


@click.group()
def auth() -> None:
    """NATS identities: who may publish and subscribe to what (docs/security.md).

    Everything lives in <data_dir>/auth: identities.json (public keys), creds/<identity>.nk
    (each identity's seed, 0600) and the generated server configuration. `valkyrie up` runs
    `init` on first start; the CLI on the same host finds the `admin` seed by itself.
    """


@auth.command("init")
@click.pass_context
def auth_init(ctx: click.Context) -> None:
    """Create the control plane's identities, the JetStream key and the server configuration.

    Safe to run again: what exists is kept.
    """
    settings = settings_from(ctx)
    store = _store(settings)
    with _errors():
        created = store.init(settings.prefix)
    click.echo(
        f"{len(created)} identities created in {store.root}"
        if created
        else f"identities already in {store.root}: nothing to do"
    )


def _issued(settings: Settings, path: Path, what: str) -> None:
    click.echo(str(path))
    click.echo(f"{what}: its credentials are {path} (keep it 0600, on that host only)", err=True)
    _apply(settings)


@auth.command("runner")
@click.argument("runner_id")
@click.pass_context
def auth_runner(ctx: click.Context, runner_id: str) -> None:
    """Issue runner RUNNER_ID's credentials (again: new ones, the old ones stop working).

    Prints the path of its seed file. On another host run it with
    `valkyrie --creds runner-RUNNER_ID.nk runner` and VALKYRIE_NATS_URL pointing here.
    """
    settings = settings_from(ctx)
    with _errors():
        path = _store(settings).add_runner(runner_id)
    _issued(settings, path, f"runner {runner_id}")
    host = socket.gethostname()
    click.echo(
        f"on the runner's host: VALKYRIE_NATS_URL=nats://{host}:{settings.embedded_port} "
        f"valkyrie --creds {path.name} runner",
        err=True,
    )


@auth.command("submitter")
@click.argument("name")
@click.pass_context
def auth_submitter(ctx: click.Context, name: str) -> None:
    """Issue submitter NAME's credentials: it may submit, cancel its own jobs and read jobs."""
    settings = settings_from(ctx)
    with _errors():
        path = _store(settings).add_submitter(name)
    _issued(settings, path, f"submitter {name}")


@auth.command("rotate")
@click.argument("identity")
@click.pass_context
def auth_rotate(ctx: click.Context, identity: str) -> None:
    """Give IDENTITY a new seed; the old one stops working at the reload."""
    settings = settings_from(ctx)
    with _errors():
        path = _store(settings).rotate(identity)
    _issued(settings, path, identity)


@auth.command("revoke")
@click.argument("identity")
@click.pass_context
def auth_revoke(ctx: click.Context, identity: str) -> None:
    """Remove IDENTITY (runner-<id>, submitter-<name>): the reload disconnects it for good."""
    settings = settings_from(ctx)
    with _errors():
        _store(settings).revoke(identity)
    click.echo(f"revoked {identity}", err=True)
    _apply(settings)


@auth.command("ls")
@click.pass_context
def auth_ls(ctx: click.Context) -> None:
    """List the identities: name, role, public key, when issued, whether the seed is here."""
    store = _store(settings_from(ctx))
    with _errors():
        identities = store.identities()
    rows = [
        (
            i.name,
            i.role,
            i.public_key,
            i.created_at,
            "yes" if store.creds(i.name).is_file() else "-",
        )
        for i in identities
    ]
    print_table(["IDENTITY", "ROLE", "PUBLIC KEY", "CREATED", "SEED HERE"], rows)


@auth.command("nats-config")
@click.option("--server-name", default="valkyrie", show_default=True, help="This node's name.")
@click.option("--listen", default="0.0.0.0:4222", show_default=True, help="Client listener.")
@click.option(
    "--store-dir", help="JetStream store (default: <data_dir>/nats/jetstream on this host)."
)
@click.option("--max-mem", default="1G", show_default=True)
@click.option("--max-file", default="20G", show_default=True)
@click.option("--monitor", help="Monitoring listener, e.g. 127.0.0.1:8222 (default: none).")
@click.option("--tls-cert", help="Server certificate (clients then need TLS).")
@click.option("--tls-key", help="Server key.")
@click.option("--tls-ca", help="CA that signed the clients' certificates (to require them).")
@click.option("--cluster", "cluster_name", help="Cluster name: this node joins a cluster.")
@click.option("--cluster-listen", default="0.0.0.0:6222", show_default=True)
@click.option(
    "--route", "routes", multiple=True, help="Another node's route URL (repeat): host:6222."
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write it to this file (0600) instead of standard output.",
)
@click.pass_context
def auth_nats_config(
    ctx: click.Context,
    server_name: str,
    listen: str,
    store_dir: str | None,
    max_mem: str,
    max_file: str,
    monitor: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    cluster_name: str | None,
    cluster_listen: str,
    routes: tuple[str, ...],
    out: str | None,
) -> None:
    """Print a whole nats-server configuration with Valkyrie's accounts and users.

    For an external server, or each node of a cluster (--cluster, --route per other node): the
    routes authenticate with a generated password. It holds the JetStream encryption key:
    keep it private. Reload the server after every `valkyrie auth` change.
    """
    settings = settings_from(ctx)
    with _errors():
        text = _server_conf(
            settings,
            ServerSpec(
                server_name=server_name,
                listen=listen,
                store_dir=store_dir or str(data_dir_of(settings) / "nats" / "jetstream"),
                jetstream_key="",
                max_mem=max_mem,
                max_file=max_file,
                monitor=monitor,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_ca=tls_ca,
            ),
            cluster_name,
            cluster_listen,
            routes,
        )
        if out is None:
            click.echo(text, nl=False)
            return
        try:
            write_private(Path(out), text.encode())
        except OSError as e:
            raise ConfigError(f"cannot write {out}: {e}") from e
    click.echo(f"wrote {out}", err=True)


def _server_conf(
    settings: Settings,
    spec: ServerSpec,
    cluster_name: str | None,
    cluster_listen: str,
    routes: tuple[str, ...],
) -> str:
    store = _store(settings)
    cluster = None
    if cluster_name:
        cluster = ClusterSpec(
            name=cluster_name,
            listen=cluster_listen,
            routes=list(routes),
            route_user="valkyrie-route",
            route_password=store.route_password(),
        )
    elif routes:
        raise click.UsageError("--route needs --cluster")
    if bool(spec.tls_cert) != bool(spec.tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    spec = dataclasses.replace(spec, jetstream_key=store.jetstream_key(), cluster=cluster)
    return server_conf(spec, store.accounts())
