"""``valkyrie runner``: run the reference runner on this host, with its own identity."""

from __future__ import annotations

import signal
import sys

import anyio
import click
from anyio.abc import TaskGroup

from valkyrie.bus.connection import connect
from valkyrie.bus.credentials import Credentials, auth_dir, discover
from valkyrie.bus.tls import tls_context
from valkyrie.cli._common import (
    ExitCode,
    client_url,
    run_async,
    settings_from,
    setup_logging,
)
from valkyrie.config.load import config_for
from valkyrie.config.settings import Settings
from valkyrie.domain.identity import (
    RUNNER_PREFIX,
    runner_identity,
)
from valkyrie.errors import ValkyrieError
from valkyrie.runner import (
    RegistrationRejected,
    Runner,
    ShellHandler,
    default_runner_id,
    reference_registration,
)
from valkyrie.security.embedded import reload_embedded
from valkyrie.security.store import AuthStore

__all__ = ["runner"]


def _pairs(value: str | None, option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in (value or "").split(","):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        pairs[key.strip()] = val.strip()
    return pairs


# -- valkyrie runner ----------------------------------------------------------------------------


@click.command()
@click.option("--id", "runner_id", help="Runner id (default: <hostname>-<random>).")
@click.option("--labels", help="Labels as k=v,k2=v2 (matched by affinity rules).")
@click.option(
    "--capacity", type=click.IntRange(1, 10_000), default=1, show_default=True, help="Jobs at once."
)
@click.option(
    "--job-types", default="shell", show_default=True, help="Job types taken, comma separated."
)
@click.option("--region", help="Region the runner is in.")
@click.option("--zone", help="Zone the runner is in.")
@click.option("--heartbeat-ms", type=click.IntRange(50, 60_000), default=1000, show_default=True)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0),
    default=300.0,
    show_default=True,
    help="Seconds running jobs get to finish on SIGTERM.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True),
    help="Parent of per-job temporary directories.",
)
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def runner(
    ctx: click.Context,
    runner_id: str | None,
    labels: str | None,
    capacity: int,
    job_types: str,
    region: str | None,
    zone: str | None,
    heartbeat_ms: int,
    drain_timeout: float,
    workdir: str | None,
    verbose: bool,
) -> None:
    """Run a reference runner: it executes the commands of the jobs it is sent.

    SIGTERM or Ctrl-C drains: no new jobs, running ones finish (up to --drain-timeout), then it
    exits 0; a second signal stops at once (exit 10). WARNING: it runs whatever it is sent; use it
    only with a NATS server you control, as an unprivileged user.
    """
    setup_logging(verbose)
    settings = settings_from(ctx)
    credentials, runner_id = _runner_credentials(settings, runner_id)
    registration = reference_registration(
        runner_id,
        job_types=[t.strip() for t in job_types.split(",") if t.strip()],
        capacity=capacity,
        labels=_pairs(labels, "--labels"),
        region=region,
        zone=zone,
        heartbeat_interval_ms=heartbeat_ms,
        workdir=workdir,
    )

    async def go() -> int:
        name = f"valkyrie-runner-{registration.runner_id}"
        tls = tls_context(config_for(settings).config.security)
        bus = await connect(
            settings, url=client_url(settings), name=name, tls=tls, credentials=credentials
        )
        try:
            the_runner = Runner(
                bus, registration, ShellHandler(workdir=workdir), drain_timeout_s=drain_timeout
            )
            return await _serve(the_runner)
        finally:
            with anyio.CancelScope(shield=True):
                await bus.close()

    try:
        code = run_async(go)
    except KeyboardInterrupt:  # Ctrl-C while still connecting
        code = 130
    sys.exit(code)


def _runner_credentials(
    settings: Settings, runner_id: str | None
) -> tuple[Credentials, str | None]:
    """The runner's credentials and its id: a runner's credentials name its id.

    Given credentials (``--creds runner-r1.nk``) set the id when ``--id`` is not given, and must
    agree with it when it is. Otherwise the runner uses the seed ``valkyrie auth runner ID``
    generated in the data dir, if there is one (a runner on the host of ``valkyrie up``).
    """
    explicit = Credentials.from_settings(settings)
    if explicit.authenticated:
        own = explicit.identity or ""
        if own.startswith(RUNNER_PREFIX):
            own = own.removeprefix(RUNNER_PREFIX)
            if runner_id is not None and runner_id != own:
                raise click.UsageError(
                    f"--id {runner_id} does not match the credentials, which are runner {own}'s"
                )
            return explicit, own
        return explicit, runner_id
    store = AuthStore(auth_dir(settings))
    if not store.exists():
        return explicit, runner_id  # an open installation
    runner_id = runner_id or default_runner_id()
    if not store.creds(runner_identity(runner_id)).is_file():
        _issue_here(settings, store, runner_id)
    return discover(settings, runner_identity(runner_id)), runner_id


def _issue_here(settings: Settings, store: AuthStore, runner_id: str) -> None:
    """Issue a runner's identity on the host of ``valkyrie up``, as ``auth runner`` would.

    Whoever can write this data dir can read every seed in it already: issuing one more for a
    runner on the same host grants nothing new. The embedded server is reloaded so it applies.
    """
    try:
        store.add_runner(runner_id)
        reloaded = reload_embedded(settings)
    except (OSError, ValkyrieError) as e:
        raise click.ClickException(
            f"runner {runner_id} has no credentials and they could not be issued here ({e}): "
            f"run `valkyrie auth runner {runner_id}` and pass --creds"
        ) from e
    where = "the embedded server reloaded" if reloaded else "reload the server to apply it"
    click.echo(f"issued runner {runner_id}'s identity in {store.root} ({where})", err=True)


async def _serve(the_runner: Runner) -> int:
    click.echo(f"runner {the_runner.runner_id} starting; Ctrl-C drains", err=True)
    forced = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, the_runner, tg, forced)
        try:
            await the_runner.run()
        except RegistrationRejected as e:
            click.echo(f"error: {e}", err=True)
            return ExitCode.REJECTED
        finally:
            tg.cancel_scope.cancel()
    return ExitCode.ERROR if forced.is_set() else ExitCode.OK


async def _watch_signals(the_runner: Runner, tg: TaskGroup, forced: anyio.Event) -> None:
    draining = False
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if draining:
                click.echo(f"{name} again: stopping now, killing running jobs", err=True)
                forced.set()
                tg.cancel_scope.cancel()
                return
            draining = True
            click.echo(f"{name}: draining (again to stop at once)", err=True)
            the_runner.drain()


# -- valkyrie runners ls/show ---------------------------------------------------------------------
