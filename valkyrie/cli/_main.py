"""The root command and every sub-command, registered in one place."""

from __future__ import annotations

import click

from valkyrie.cli._admin import cancel, dead, drain, explain, undrain
from valkyrie.cli._auth import auth
from valkyrie.cli._config import config
from valkyrie.cli._gateway import gateway
from valkyrie.cli._jobs import jobs, submit
from valkyrie.cli._logs import jobs_logs
from valkyrie.cli._runner import runner
from valkyrie.cli._runners import runners
from valkyrie.cli._status import status
from valkyrie.cli._tail import tail
from valkyrie.cli._up import handlers_cmd, provision, up, worker

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--nats-url", envvar="VALKYRIE_NATS_URL", help="NATS URL (default: the local embedded server)."
)
@click.option("--prefix", envvar="VALKYRIE_PREFIX", help="Subject prefix (default: valkyrie).")
@click.option(
    "--creds",
    envvar="VALKYRIE_NATS_CREDS",
    type=click.Path(dir_okay=False),
    help="NATS credentials: an nkey seed file (<identity>.nk) or a JWT .creds file "
    "(default: the generated ones in the data dir).",
)
@click.option(
    "--identity",
    envvar="VALKYRIE_NATS_IDENTITY",
    help="Identity to speak as (default: admin; ops for read-only).",
)
@click.version_option(package_name="valkyrie")
@click.pass_context
def cli(
    ctx: click.Context,
    nats_url: str | None,
    prefix: str | None,
    creds: str | None,
    identity: str | None,
) -> None:
    """Valkyrie: dispatch CI jobs to runners over NATS JetStream."""
    ctx.obj = {
        "nats_url": nats_url,
        "prefix": prefix,
        "nats_creds": creds,
        "nats_identity": identity,
    }


for _command in (
    up,
    worker,
    provision,
    handlers_cmd,
    submit,
    jobs,
    tail,
    runner,
    runners,
    dead,
    config,
    gateway,
    status,
    auth,
):
    cli.add_command(_command)
jobs.add_command(cancel)
jobs.add_command(explain)
jobs.add_command(jobs_logs)
runners.add_command(drain)
runners.add_command(undrain)


def main() -> None:
    """Console-script entry point."""
    cli()
