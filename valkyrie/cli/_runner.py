"""``valkyrie runner``, ``valkyrie runners …`` and ``valkyrie jobs logs``."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import dataclass

import anyio
import click
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas import TERMINAL_STATES, JobLog, JobState, RunnerRecord, RunnerState
from valkyrie.bus.codec import (
    HEARTBEAT_DECODER,
    JOB_DECODER,
    LOG_DECODER,
    RUNNER_DECODER,
    encode,
    now_ms,
)
from valkyrie.bus.connection import Bus, connect
from valkyrie.bus.credentials import Credentials, auth_dir, discover
from valkyrie.bus.kv import watch_kv
from valkyrie.bus.tls import tls_context
from valkyrie.cli._common import (
    ExitCode,
    client_url,
    fmt_ms,
    print_table,
    run_async,
    settings_from,
    setup_logging,
    with_bus,
)
from valkyrie.cli._jobs import jobs
from valkyrie.client.jobs import Client
from valkyrie.config.load import config_for
from valkyrie.config.settings import Settings
from valkyrie.domain.identity import (
    RUNNER_PREFIX,
    attempt_runners,
    log_refusal,
    runner_identity,
)
from valkyrie.errors import NotFoundError, ValkyrieError
from valkyrie.runner import (
    RegistrationRejected,
    Runner,
    ShellHandler,
    default_runner_id,
    reference_registration,
)
from valkyrie.security.embedded import reload_embedded
from valkyrie.security.store import AuthStore

__all__ = ["jobs_logs", "runner", "runners"]


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


@click.group()
def runners() -> None:
    """Inspect registered runners."""


async def _runner_records(bus: Bus) -> list[RunnerRecord]:
    kv = await bus.kv("runners")
    records: list[RunnerRecord] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=5.0)
            except nats.errors.TimeoutError:
                break
            if entry is None:  # the end of the stored values
                break
            try:
                records.append(RUNNER_DECODER.decode(entry.value or b""))
            except msgspec.DecodeError:
                continue
    finally:
        await watcher.stop()
    return sorted(records, key=lambda r: r.registration.runner_id)


@dataclass
class _Beats:
    """The heartbeats heard while ``runners ls`` looked: runner id -> when (monotonic)."""

    heard: dict[str, float]
    window_s: float

    def age(self, record: RunnerRecord) -> str:
        """The live heartbeat's age; the record's is up to 5 s old, so only a fallback."""
        rid = record.registration.runner_id
        if rid in self.heard:
            return f"{time.monotonic() - self.heard[rid]:.1f}s ago"
        if record.state == RunnerState.OFFLINE:
            return _age(record.last_heartbeat_at_ms)
        return f"none in {self.window_s:.1f}s"


async def _records_and_beats(bus: Bus) -> tuple[list[RunnerRecord], _Beats]:
    """The runner records, and the heartbeats of the live runners heard now.

    It waits up to one and a half heartbeat intervals (at most 3 s), or until each was heard.
    """
    heard: dict[str, float] = {}
    wanted: set[str] = set()
    all_heard = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        try:
            rid = HEARTBEAT_DECODER.decode(msg.data).runner_id
        except msgspec.DecodeError:
            return
        heard[rid] = time.monotonic()
        if wanted <= heard.keys():
            all_heard.set()

    sub = await bus.nc.subscribe(bus.names.heartbeat("*"), cb=on_beat)
    try:
        records = await _runner_records(bus)
        live = [r for r in records if r.state != RunnerState.OFFLINE]
        wanted.update(r.registration.runner_id for r in live)
        interval_ms = max((r.registration.heartbeat_interval_ms for r in live), default=0)
        # a heartbeat is due within one interval; half another covers a late one
        window = min(3.0, interval_ms * 1.5 / 1000 + 0.5) if live else 0.0
        if wanted <= heard.keys():
            all_heard.set()
        with anyio.move_on_after(window):
            await all_heard.wait()
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return records, _Beats(heard, window)


def _age(at_ms: int) -> str:
    seconds = max(0, now_ms() - at_ms) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return fmt_ms(at_ms)


@runners.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
@click.pass_context
def runners_ls(ctx: click.Context, as_json: bool) -> None:
    """List runners from the registry, with the age of each one's live heartbeat.

    The records' own heartbeat time is written at most every 5 s; the HEARTBEAT column is the
    age of the last heartbeat heard now (listening up to one heartbeat interval).
    """
    if as_json:
        records = run_async(lambda: with_bus(settings_from(ctx), _runner_records))
        click.echo(encode(records).decode())
        return
    records, beats = run_async(lambda: with_bus(settings_from(ctx), _records_and_beats))
    print_table(
        ["ID", "STATE", "LOAD", "JOBS", "TYPES", "REGION", "HEARTBEAT", "LABELS"],
        [
            [
                r.registration.runner_id,
                r.state,
                f"{r.load:.2f}",
                f"{len(r.assigned_jobs)}/{r.registration.max_concurrent_jobs}",
                ",".join(r.registration.capabilities.job_types) or "-",
                r.registration.location.region or "-",
                beats.age(r),
                ",".join(f"{k}={v}" for k, v in sorted(r.registration.labels.items())) or "-",
            ]
            for r in records
        ],
    )


def _show_runner(r: RunnerRecord) -> None:
    reg = r.registration
    res = reg.resources
    click.echo(f"id:          {reg.runner_id}")
    click.echo(f"state:       {r.state}" + (" (drain requested)" if r.drain_requested else ""))
    click.echo(f"load:        {r.load:.2f}")
    click.echo(f"capacity:    {reg.max_concurrent_jobs}")
    click.echo(f"job types:   {', '.join(reg.capabilities.job_types) or '-'}")
    click.echo(f"resources:   {res.cpu_cores:g} cpu, {res.memory_mb} MB, {res.storage_gb:g} GB")
    location = [x for x in (reg.location.region, reg.location.zone, reg.location.datacenter) if x]
    click.echo(f"location:    {'/'.join(location) or '-'}")
    labels = ", ".join(f"{k}={v}" for k, v in sorted(reg.labels.items()))
    click.echo(f"labels:      {labels or '-'}")
    click.echo(f"registered:  {fmt_ms(r.registered_at_ms)}")
    click.echo(f"heartbeat:   {fmt_ms(r.last_heartbeat_at_ms)} ({_age(r.last_heartbeat_at_ms)})")
    click.echo(f"session:     {reg.session_id or '-'}")
    s = r.stats
    click.echo(
        f"stats:       {s.jobs_completed} completed, {s.jobs_failed} failed, "
        f"success rate {s.success_rate:.2f}"
    )
    if r.assigned_jobs:
        click.echo("jobs:")
        for job_id, attempt in sorted(r.assigned_jobs.items()):
            click.echo(f"  {job_id} (attempt {attempt})")


@runners.command("show")
@click.argument("runner_id")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_context
def runners_show(ctx: click.Context, runner_id: str, as_json: bool) -> None:
    """Show one runner's record."""

    async def go(bus: Bus) -> RunnerRecord:
        kv = await bus.kv("runners")
        try:
            entry = await kv.get(runner_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as e:
            raise NotFoundError(f"no runner {runner_id!r}") from e
        return RUNNER_DECODER.decode(entry.value or b"")

    record = run_async(lambda: with_bus(settings_from(ctx), go))
    if as_json:
        click.echo(encode(record).decode())
    else:
        _show_runner(record)


# -- valkyrie jobs logs ---------------------------------------------------------------------------


class _LogPrinter:
    """Prints batches: stdout lines to stdout, stderr and system lines to stderr.

    Only lines of the runner each attempt was given to: any runner may publish lines under its
    own id for any job id, so the subject's runner is checked against the job's record.
    """

    def __init__(self, attempt: int | None, runners: dict[int, str]) -> None:
        self._only = attempt
        self._current: int | None = None
        self.runners = runners
        self._refused: set[str] = set()

    def print(self, subject: str, batch: JobLog) -> None:
        if self._only is not None and batch.attempt != self._only:
            return
        sender = subject.split(".")[-2]
        refusal = log_refusal(sender, batch.runner_id, batch.attempt, self.runners)
        if refusal is not None:
            if sender not in self._refused:
                self._refused.add(sender)
                click.echo(f"[valkyrie] lines from runner {sender} not shown: {refusal}", err=True)
            return
        if batch.attempt != self._current and (self._current is not None or batch.attempt > 1):
            click.echo(f"[valkyrie] attempt {batch.attempt} on {batch.runner_id}", err=True)
        self._current = batch.attempt
        to_stderr = batch.stream != "stdout"
        for line in batch.lines:
            click.echo(line, err=to_stderr)


async def _last_seq(bus: Bus, stream: str, subject: str) -> int:
    try:
        msg = await bus.js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int(msg.seq or 0)


@dataclass
class _Progress:
    """Where printing ends: the job's last log message (once known) and its state."""

    state: JobState | None
    end_seq: int | None = None


async def _print_logs(
    bus: Bus, job_id: str, *, follow: bool, attempt: int | None
) -> JobState | None:
    """Print the job's logs; with ``follow`` until it is terminal. Returns its last known state."""
    stream, subject = bus.names.stream("logs"), bus.names.logs("*", job_id)
    client = Client(bus)
    runners: dict[int, str] = {}
    try:
        record = await client.get_job(job_id)
        progress = _Progress(state=record.state)
        runners = attempt_runners(record)
    except NotFoundError:
        if follow:
            raise
        progress = _Progress(state=None)
    if not follow or progress.state in TERMINAL_STATES:
        progress.end_seq = await _last_seq(bus, stream, subject)
        if progress.end_seq == 0:
            if progress.state is None:
                raise NotFoundError(f"no job {job_id!r} and no logs for it") from None
            return progress.state
    sub = await bus.js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    printer = _LogPrinter(attempt, runners)
    seen = 0
    try:
        async with anyio.create_task_group() as tg:
            if progress.end_seq is None:
                tg.start_soon(_until_terminal, bus, job_id, progress)
            while progress.end_seq is None or seen < progress.end_seq:
                try:
                    msg = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    continue
                seen = int(msg.metadata.sequence.stream)
                try:
                    batch = LOG_DECODER.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                if batch.attempt not in printer.runners:  # dispatched since we last read
                    with contextlib.suppress(NotFoundError):
                        printer.runners = attempt_runners(await client.get_job(job_id))
                printer.print(msg.subject, batch)
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await sub.unsubscribe()
    return progress.state


async def _until_terminal(bus: Bus, job_id: str, progress: _Progress) -> None:
    # Runners store an attempt's logs before its JobFinished, so once the record is terminal the
    # stream's last log message for the job is the last one to print.
    changes = watch_kv(await bus.kv("jobs"), job_id)
    async with contextlib.aclosing(changes):
        async for change in changes:
            if change.value is None:
                continue
            record = JOB_DECODER.decode(change.value)
            if record.state in TERMINAL_STATES:
                progress.state = record.state
                names = bus.names
                progress.end_seq = await _last_seq(
                    bus, names.stream("logs"), names.logs("*", job_id)
                )
                return


@jobs.command("logs")
@click.argument("job_id")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing until the job ends; exit 1 unless it succeeded.",
)
@click.option("--attempt", type=click.IntRange(1), help="Only this attempt's lines.")
@click.pass_context
def jobs_logs(ctx: click.Context, job_id: str, follow: bool, attempt: int | None) -> None:
    """Print a job's log lines (stdout lines to stdout, stderr and runner notes to stderr)."""

    async def go(bus: Bus) -> JobState | None:
        return await _print_logs(bus, job_id, follow=follow, attempt=attempt)

    try:
        state = run_async(lambda: with_bus(settings_from(ctx), go))
    except KeyboardInterrupt:
        sys.exit(130)
    if follow and state != JobState.SUCCEEDED:
        sys.exit(ExitCode.JOB_FAILED)
