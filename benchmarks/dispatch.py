"""Dispatch benchmark: submit -> dispatch-received latency and saturating throughput.

Four systems, measured in the same run against the same nats-server:

* **valkyrie**: the control-plane handlers, by default in two worker subprocesses, one per core:
  ``intake dispatcher`` (so intake hands new jobs straight to its dispatcher) and ``registry
  results`` (``python -m valkyrie worker ...``; ``--processes`` changes the layout) and, in this
  process, ``--runners`` simulated runners
  (:class:`benchmarks._fleet.LeanFleet`) that accept and complete every dispatch at once.
* **raw**: the minimal equivalent in plain nats-py: JetStream publish to a work-queue stream -> a
  worker subprocess (``benchmarks/_raw_worker.py``) with a durable pull consumer doing one KV create
  and one core publish per job -> subscribers here.
* **raw-lifecycle** (unless ``--skip-raw-lifecycle``): the same worker also counting runner slots
  and closing each job: a slot taken by compare-and-set before the job record, the subscribers
  report the job done at once (captured by a second work-queue stream), the worker records it done
  and frees the slot. The least plain NATS can do for the whole lifecycle with the issue's capacity
  guarantee: the floor the valkyrie pipeline (which also publishes events, validates, and keeps
  runner health) is judged against.
* **raw-lifecycle-events** (unless ``--skip-raw-events``): raw-lifecycle that also keeps an event
  stream as Valkyrie does: four events per job (queued, dispatched, accepted, finished), each stored
  with a ``Nats-Msg-Id`` before the message that caused it is acked. The floor for a pipeline whose
  event stream is part of its contract (the issue checks capacity "from the event stream").

Each system gets a unique prefix, a warm-up (excluded), a PACED phase (``--paced-jobs`` at
``--rate`` jobs/s: latency percentiles) and a SATURATING phase (``--jobs`` published as fast as
``--publish-concurrency`` publishers allow: throughput = jobs dispatched / (last dispatch received -
first submit), and latency percentiles). Submit time is taken just before each JetStream publish,
receipt time on arrival of the dispatch message; both with ``time.perf_counter_ns`` in this process.

Run from the repository root::

    .venv/bin/python benchmarks/dispatch.py            # full run (about a minute or two)
    .venv/bin/python benchmarks/dispatch.py --quick    # smoke run (~15 s)

Exit status: 0 when every scenario ran and every submitted job was dispatched; 2 when jobs went
missing (figures are still printed and written); 1 when a scenario failed; 130 when interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import msgspec  # noqa: E402
import nats  # noqa: E402
import nats.errors  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client as NatsClient  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402
from nats.js.api import (  # noqa: E402
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from benchmarks._fleet import LeanFleet, RawReceivers, Recorder, runner_ids  # noqa: E402
from benchmarks._procs import Child, Children, CpuClock  # noqa: E402
from benchmarks._profile import (  # noqa: E402
    find_py_spy,
    summarize_collapsed,
    write_cprofile_summary,
)
from benchmarks._report import (  # noqa: E402
    environment,
    ratio,
    render_table,
    summarize_ns,
    timestamp,
    write_json,
)
from schemas import JobSubmission  # noqa: E402
from valkyrie import BUCKETS, Bus, Names, NatsServer, Settings, connect  # noqa: E402
from valkyrie.bus.credentials import discover  # noqa: E402
from valkyrie.config.model import ValkyrieConfig  # noqa: E402
from valkyrie.security import AuthStore, Permissions, new_seed, permissions  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "dispatch.json"
#: default worker processes: the submit->dispatch path in one, runner upkeep and results in the other
PROCESSES = "intake+dispatcher,registry+results"
#: events and logs streams reserve their max_bytes on the server: keep it modest but far above what
#: a run stores (about 2 KB of events per job), since old events are discarded when it is reached
EVENTS_MAX_BYTES = 256 * 1024 * 1024
TARGET_THROUGHPUT = 2000.0
TARGET_PACED_P50_MS = 3.0


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Params:
    """What to run."""

    runners: int
    runner_capacity: int
    jobs: int
    paced_jobs: int
    rate: float
    warmup: int
    publish_concurrency: int
    heartbeat_ms: int
    raw_concurrency: int
    raw_batch: int
    wait_idle_s: float
    idle_s: float
    quick: bool
    skip_raw: bool
    skip_valkyrie: bool
    nats_url: str | None
    profile: str | None
    py_spy: str | None
    samples: bool
    breakdown: bool
    scale_runners: int = 0
    scale_heartbeat_ms: int = 30_000
    processes: str = PROCESSES
    raw_processes: int = 1
    raw_lifecycle: bool = True
    raw_events: bool = True
    #: ``--secure``: NATS auth on (generated identities, each handler its own), prefix and data
    #: dir of the identities (set by main once they are generated)
    secure: bool = False
    secure_prefix: str | None = None
    secure_dir: str | None = None

    def process_groups(self) -> list[list[str]]:
        """The handlers of each worker process (``--processes``)."""
        return [group.split("+") for group in self.processes.split(",")]


# -- phases -------------------------------------------------------------------------------------


@dataclass
class Target:
    """One system under test, as the phase code sees it."""

    name: str
    js: JetStreamContext
    subject: str
    recorder: Recorder
    alive: Callable[[], str | None]
    settle: Callable[[], Awaitable[float | None]]
    cpu_pids: dict[str, int | tuple[int, ...] | None]
    tag: str
    extra: Callable[[], dict[str, Any]] = field(default=lambda: {})
    #: name of an intermediate step the recorder marks (``Recorder.milestones``), if any
    milestone: str | None = None


def _bodies(tag: str, phase: str, count: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(count):
        job_id = f"{tag}-{phase}-{i:06d}"
        spec = JobSubmission(job_type="shell", job_id=job_id, metadata={"benchmark": "dispatch"})
        out.append((job_id, msgspec.json.encode(spec)))
    return out


async def _publish(target: Target, job_id: str, body: bytes) -> None:
    rec = target.recorder
    rec.submitted[job_id] = time.perf_counter_ns()
    try:
        await target.js.publish(target.subject, body, timeout=10)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as e:
        rec.submit_errors += 1
        rec.submitted.pop(job_id, None)
        rec.forget(job_id)
        if rec.submit_errors <= 3:
            log(f"{target.name}: publish of {job_id} failed: {e!r}")


def _wait_budget(jobs: int) -> float:
    return 60.0 + jobs / 50.0


async def run_phase(
    target: Target, phase: str, count: int, *, rate: float | None, p: Params
) -> dict[str, Any]:
    """Submit ``count`` jobs (paced at ``rate``, or saturating when ``None``) and wait for them."""
    jobs = _bodies(target.tag, phase, count)
    ids = [j for j, _ in jobs]
    rec = target.recorder
    rec.expect(ids)
    clock = CpuClock(target.cpu_pids)
    before = clock.sample()
    started = time.perf_counter()
    if rate is not None:
        async with anyio.create_task_group() as tg:
            interval = 1.0 / rate
            for i, (job_id, body) in enumerate(jobs):
                delay = started + i * interval - time.perf_counter()
                if delay > 0:
                    await anyio.sleep(delay)
                tg.start_soon(_publish, target, job_id, body)
    else:
        queue = iter(jobs)

        async def publisher() -> None:
            for job_id, body in queue:  # shared iterator: each job is taken once
                await _publish(target, job_id, body)

        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(p.publish_concurrency, count))):
                tg.start_soon(publisher)
    published_s = time.perf_counter() - started
    problem = await rec.wait(
        timeout_s=_wait_budget(count), idle_s=p.wait_idle_s, alive=target.alive
    )
    dispatched_at = clock.sample()
    if problem:
        log(f"{target.name} {phase}: {problem}")

    submit_ns = [rec.submitted[j] for j in ids if j in rec.submitted]
    done = [j for j in ids if j in rec.submitted and j in rec.received]
    latencies = [rec.received[j] - rec.submitted[j] for j in done]
    submitted = len(submit_ns)
    dispatched = len(done)
    first_submit = min(submit_ns) if submit_ns else None
    last_submit = max(submit_ns) if submit_ns else None
    last_recv = max((rec.received[j] for j in done), default=None)
    span_s = (
        (last_recv - first_submit) / 1e9
        if last_recv is not None and first_submit is not None
        else None
    )
    submit_span_s = (
        (last_submit - first_submit) / 1e9
        if last_submit is not None and first_submit is not None
        else None
    )
    result: dict[str, Any] = {
        "mode": "paced" if rate is not None else "saturating",
        "requested": count,
        "target_rate_per_s": rate,
        "publish_concurrency": None if rate is not None else p.publish_concurrency,
        "submitted": submitted,
        "submit_errors": count - submitted,
        "dispatched": dispatched,
        "missing": submitted - dispatched,
        "submit_rate_per_s": round((submitted - 1) / submit_span_s, 1) if submit_span_s else None,
        "publish_wall_s": round(published_s, 3),
        "dispatch_span_s": round(span_s, 3) if span_s is not None else None,
        "throughput_per_s": round(dispatched / span_s, 1) if span_s else None,
        "latency_ms": summarize_ns(latencies),
        "cpu_cores": CpuClock.usage(before, dispatched_at),
        "wait_problem": problem,
    }
    if target.milestone:
        # where the time goes: submit -> milestone seen here -> dispatch received
        marked = [j for j in done if j in rec.milestones]
        result["breakdown_ms"] = {
            "milestone": target.milestone,
            f"submit_to_{target.milestone}": summarize_ns(
                [rec.milestones[j] - rec.submitted[j] for j in marked]
            ),
            f"{target.milestone}_to_dispatch": summarize_ns(
                [rec.received[j] - rec.milestones[j] for j in marked]
            ),
        }
    if p.samples and first_submit is not None:
        # per job: [submit offset from the phase's first submit, latency], both in ms
        result["samples_ms"] = [
            [
                round((rec.submitted[j] - first_submit) / 1e6, 3),
                round((rec.received[j] - rec.submitted[j]) / 1e6, 3),
            ]
            for j in done
        ]
    settle_s = await target.settle()
    settled = clock.sample()
    result["settle_s"] = round(settle_s, 3) if settle_s is not None else None
    if settle_s is None:
        log(f"{target.name} {phase}: the pipeline did not go idle in time")
    # CPU per job, from the first submit until the pipeline is idle again (completion included)
    result["cpu_ms_per_job"] = {
        name: round(sec * 1000 / dispatched, 3) if sec is not None and dispatched else None
        for name, sec in CpuClock.seconds(before, settled).items()
    }
    return result


async def run_all_phases(target: Target, p: Params) -> dict[str, Any]:
    """Warm-up, paced, saturating."""
    out: dict[str, Any] = {}
    if p.warmup:
        log(f"{target.name}: warm-up, {p.warmup} jobs")
        out["warmup"] = await run_phase(target, "w", p.warmup, rate=None, p=p)
    if p.idle_s > 0:
        # background load with no jobs (heartbeats, timers): the floor under every phase's CPU
        clock = CpuClock(target.cpu_pids)
        before = clock.sample()
        await anyio.sleep(p.idle_s)
        out["idle_cpu_cores"] = CpuClock.usage(before, clock.sample())
    if p.paced_jobs:
        log(f"{target.name}: paced, {p.paced_jobs} jobs at {p.rate:g}/s")
        out["paced"] = await run_phase(target, "p", p.paced_jobs, rate=p.rate, p=p)
    if p.jobs:
        log(f"{target.name}: saturating, {p.jobs} jobs")
        out["saturating"] = await run_phase(target, "s", p.jobs, rate=None, p=p)
    out["duplicate_receipts"] = target.recorder.duplicates
    out.update(target.extra())
    return out


async def _until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.05
) -> float | None:
    """Poll ``check`` until true; seconds taken, or ``None`` on timeout."""
    started = time.perf_counter()
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                if await check():
                    return time.perf_counter() - started
            except (nats.errors.Error, nats.js.errors.Error):
                pass
            await anyio.sleep(interval_s)
    return None


def _all_alive(workers: Sequence[Child]) -> Callable[[], str | None]:
    """A check that says which worker process exited (with its log tail), or ``None``."""

    def alive() -> str | None:
        for child in workers:
            code = child.proc.poll()
            if code is not None:
                return f"{child.name} exited with {code}; log tail:\n{child.tail(2000)}"
        return None

    return alive


async def _stop_workers(
    children: Children, workers: Sequence[Child], spies: Sequence[Child | None], p: Params
) -> int:
    """Stop the worker processes, summarize their profiles; the first non-zero exit code, or 0."""
    codes = []
    for worker, spy in zip(workers, spies, strict=True):
        code = await anyio.to_thread.run_sync(children.stop, worker)
        codes.append(code)
        if code != 0:
            log(f"{worker.name} exited with {code}; log tail:\n{worker.tail()}")
        _profile_summary(worker.name, p)
        await _spy_finish(children, spy, worker.name, p)
    return next((c for c in codes if c != 0), 0)


async def _stop_started(children: Children, workers: Sequence[Child]) -> None:
    for worker in workers:
        if worker in children.started:
            await anyio.to_thread.run_sync(children.stop, worker)


def _profiled(name: str, p: Params, argv: list[str]) -> list[str]:
    """``argv`` (``python ...``) wrapped in cProfile when ``--profile DIR`` is set."""
    if not p.profile:
        return argv
    out = Path(p.profile) / f"{name}.prof"
    return [argv[0], "-m", "cProfile", "-o", str(out), *argv[1:]]


def _profile_summary(name: str, p: Params) -> None:
    if not p.profile:
        return
    prof = Path(p.profile) / f"{name}.prof"
    if not prof.exists():
        log(f"no profile written for {name}")
        return
    text = Path(p.profile) / f"{name}.txt"
    write_cprofile_summary(prof, text)
    log(f"profile of {name}: {text}")


def _spy(children: Children, name: str, pid: int | None, p: Params, workdir: Path) -> Child | None:
    """Attach py-spy to ``pid`` when ``--py-spy DIR`` is set (it stops when the process exits)."""
    if not p.py_spy or pid is None:
        return None
    exe = find_py_spy()
    if exe is None:
        log("--py-spy: py-spy not found (pip install py-spy into the venv); not sampling")
        return None
    out = Path(p.py_spy) / f"{name}.collapsed"
    argv = [exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw", "-o", str(out)]
    return children.spawn(
        f"py-spy-{name}", argv, env=os.environ, log=workdir / f"py-spy-{name}.log", cwd=ROOT
    )


async def _spy_finish(children: Children, spy: Child | None, name: str, p: Params) -> None:
    if spy is None or not p.py_spy:
        return

    def wait() -> None:
        try:
            spy.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass

    await anyio.to_thread.run_sync(wait)
    await anyio.to_thread.run_sync(children.stop, spy)
    collapsed = Path(p.py_spy) / f"{name}.collapsed"
    if not collapsed.exists():
        log(f"py-spy wrote nothing for {name}: {spy.tail(500)}")
        return
    summary = Path(p.py_spy) / f"{name}.txt"
    summary.write_text(summarize_collapsed(collapsed))
    log(f"py-spy summary of {name}: {summary}")


# -- valkyrie ------------------------------------------------------------------------------------


def _env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update(
        {
            "VALKYRIE_NATS_URL": settings.nats_url or "",
            "VALKYRIE_PREFIX": settings.prefix,
            "VALKYRIE_METRICS_PORT": "0",
            "VALKYRIE_EVENTS_MAX_BYTES": str(settings.events_max_bytes),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.data_dir:  # --secure: each worker finds its handlers' seeds there
        env["VALKYRIE_DATA_DIR"] = settings.data_dir
    return env


FLEET_IDENTITY = "fleet"


def secure_setup(p: Params, workdir: Path) -> tuple[Params, Path]:
    """Generate the identities of a ``--secure`` run; returns the params and the auth include.

    The simulated runners share one connection here, so they share one user: the union of every
    runner's permissions (an extra user the role table does not know), which makes the server
    check each publish against a longer list than a real runner's.
    """
    prefix = "bv" + uuid.uuid4().hex[:8]
    data = workdir / "secure"
    store = AuthStore(data / "auth")
    store.init(prefix)
    seed, public = new_seed()
    (data / "fleet.nk").write_bytes(seed + b"\n")
    (data / "fleet.nk").chmod(0o600)
    names = Names(prefix)
    publish: dict[str, None] = {}
    subscribe: dict[str, None] = {f"_INBOX_{FLEET_IDENTITY}.>": None}
    for rid in runner_ids(max(p.runners, p.scale_runners)):
        perms = permissions(f"runner-{rid}", names)
        publish.update(dict.fromkeys(perms.publish))
        subscribe.update(dict.fromkeys(s for s in perms.subscribe if not s.startswith("_INBOX")))
    fleet = Permissions(publish=tuple(publish), subscribe=tuple(subscribe))
    conf = workdir / "bench-auth.conf"
    conf.write_text(store.accounts(extra_users={public: fleet}))
    return replace(p, secure_prefix=prefix, secure_dir=str(data)), conf


async def _delete_valkyrie(bus: Bus) -> None:
    for config in bus.stream_configs(ValkyrieConfig()):
        try:
            await bus.js.delete_stream(config.name or "")
        except (nats.errors.Error, nats.js.errors.Error):
            pass
    for name in BUCKETS:
        try:
            await bus.js.delete_key_value(bus.names.bucket(name))
        except (nats.errors.Error, nats.js.errors.Error):
            pass


async def valkyrie_scale_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The same pipeline with ``--scale-runners`` registered runners (same total slots).

    Heartbeats are slowed (``--scale-heartbeat-ms``, and the loss window with them) because ten
    thousand runners beating every second would measure heartbeat handling, not placement.
    """
    capacity = max(1, p.runners * p.runner_capacity // p.scale_runners)
    scaled = replace(
        p,
        runners=p.scale_runners,
        runner_capacity=capacity,
        heartbeat_ms=p.scale_heartbeat_ms,
        py_spy=None,
        profile=None,
    )
    lost_after = str(max(4 * p.scale_heartbeat_ms, 10_000))
    return await valkyrie_scenario(
        scaled,
        url,
        server_pid,
        children,
        workdir,
        extra_env={"VALKYRIE_DISPATCH__RUNNER_LOST_AFTER_MS": lost_after},
        register_timeout_s=600,
        label="valkyrie-scale",
    )


async def valkyrie_scenario(
    p: Params,
    url: str,
    server_pid: int | None,
    children: Children,
    workdir: Path,
    *,
    extra_env: dict[str, str] | None = None,
    register_timeout_s: float = 60,
    label: str = "valkyrie",
) -> dict[str, Any]:
    """The Valkyrie pipeline: handlers in one subprocess, lean runners here."""
    prefix = p.secure_prefix or "bv" + uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {},
        nats_url=url,
        prefix=prefix,
        events_max_bytes=EVENTS_MAX_BYTES,
        data_dir=p.secure_dir,
    )
    names = settings.prefix
    secured = " (secure: NATS auth, one identity per handler)" if p.secure else ""
    log(f"valkyrie: prefix {names}, {p.runners} runners x capacity {p.runner_capacity}{secured}")
    # --secure: the benchmark submits and reads as admin, and provisions as provisioner
    bus = await connect(
        settings, name="bench-valkyrie-submit", credentials=discover(settings, "admin")
    )
    fleet_nc: NatsClient | None = None
    workers: list[Child] = []
    try:
        # the model's defaults: the worker processes (no config variables) provision the same
        provisioner = await connect(settings, credentials=discover(settings, "provisioner"))
        try:
            await provisioner.provision(ValkyrieConfig())
        finally:
            await provisioner.close()
        groups = p.process_groups()
        for i, group in enumerate(groups, 1):
            name = "valkyrie-worker" if len(groups) == 1 else f"valkyrie-worker-{i}"
            argv = _profiled(name, p, [sys.executable, "-m", "valkyrie", "worker", *group])
            workers.append(
                children.spawn(
                    name,
                    argv,
                    env={**_env_for(settings), **(extra_env or {})},
                    log=workdir / f"{label}-{name.removeprefix('valkyrie-')}.log",
                    cwd=ROOT,
                )
            )
        alive = _all_alive(workers)

        fleet_auth: dict[str, Any] = {}
        if p.secure_dir:
            fleet_auth = {
                "nkeys_seed": str(Path(p.secure_dir) / "fleet.nk"),
                "inbox_prefix": f"_INBOX_{FLEET_IDENTITY}",
            }
        fleet_nc = await nats.connect(
            url, name="bench-valkyrie-fleet", error_cb=_nats_error, **fleet_auth
        )
        recorder = Recorder()
        fleet = LeanFleet(
            fleet_nc,
            bus.names,
            runner_ids(p.runners),
            recorder,
            capacity=p.runner_capacity,
            heartbeat_ms=p.heartbeat_ms,
        )
        await fleet.subscribe()
        setup_started = time.perf_counter()
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            try:
                await fleet.register_all(timeout_s=register_timeout_s, alive=alive)
            except TimeoutError as e:
                raise RuntimeError(
                    f"runners not registered within {register_timeout_s:g}s; "
                    f"{alive() or 'worker running'}"
                ) from e
            tg.start_soon(fleet.heartbeats, stop)
            runners_kv = await bus.kv("runners")
            wanted = set(fleet.ids)

            async def all_registered() -> bool:
                try:
                    keys = await runners_kv.keys()
                except nats.js.errors.NoKeysError:
                    return False
                return wanted <= set(keys)

            if await _until(all_registered, register_timeout_s, 0.5) is None:
                raise RuntimeError("the runners bucket does not list every runner in time")
            setup_s = time.perf_counter() - setup_started
            log(f"valkyrie: {p.runners} runners registered in {setup_s:.1f}s")
            spies = [_spy(children, w.name, w.pid, p, workdir) for w in workers]

            if p.breakdown:
                # the queued event (intake done) as a milestone: splits latency into intake and
                # dispatcher parts; the job id is the subject's second-to-last token
                async def on_queued(msg: Msg) -> None:
                    recorder.mark(msg.subject.rsplit(".", 2)[-2], time.perf_counter_ns())

                await bus.nc.subscribe(bus.names.event("job", "*", "queued"), cb=on_queued)
                await bus.nc.flush()

            submit_info = bus.names.stream("submit")
            updates_info = bus.names.stream("updates")
            events_info = bus.names.stream("events")

            async def idle() -> bool:
                await bus.nc.flush()
                await fleet.nc.flush()
                for stream in (submit_info, updates_info):
                    if (await bus.js.stream_info(stream)).state.messages:
                        return False
                consumer = await bus.js.consumer_info(events_info, "dispatcher")
                return not consumer.num_pending and not consumer.num_ack_pending

            async def settle() -> float | None:
                return await _until(idle, 120, 0.05)

            def extra() -> dict[str, Any]:
                return {
                    "redispatches": fleet.redispatches,
                    "updates_sent": fleet.updates_sent,
                    "update_errors": fleet.update_errors,
                    "setup_s": round(setup_s, 3),
                }

            target = Target(
                name="valkyrie",
                js=bus.js,
                subject=bus.names.submit_as(bus.identity),
                recorder=recorder,
                alive=alive,
                settle=settle,
                cpu_pids={
                    "benchmark": os.getpid(),
                    "worker": tuple(w.pid for w in workers if w.pid is not None),
                    "nats_server": server_pid,
                },
                tag="v",
                extra=extra,
                milestone="queued_event" if p.breakdown else None,
            )
            results = await run_all_phases(target, p)
            stop.set()
            await fleet.close()
        results["worker_processes"] = [" ".join(g) for g in groups]
        results["worker_exit_code"] = await _stop_workers(children, workers, spies, p)
        return results
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(20):
            await _stop_started(children, workers)
            if not p.secure:  # a secured run's server store is thrown away: nobody may delete
                await _delete_valkyrie(bus)
            if fleet_nc is not None:
                await fleet_nc.close()
            await bus.close()


# -- raw -----------------------------------------------------------------------------------------


async def _nats_error(e: Exception) -> None:
    log(f"NATS error: {e!r}")


def _work_queue(name: str, subject: str) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=1,
        duplicate_window=120.0,
    )


async def raw_lifecycle_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The raw baseline that also closes each job: receivers report done, the worker records it."""
    return await raw_scenario(p, url, server_pid, children, workdir, lifecycle=True)


async def raw_events_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The lifecycle baseline that also stores four events per job, as Valkyrie's contract has."""
    return await raw_scenario(p, url, server_pid, children, workdir, lifecycle=True, events=True)


async def raw_scenario(
    p: Params,
    url: str,
    server_pid: int | None,
    children: Children,
    workdir: Path,
    *,
    lifecycle: bool = False,
    events: bool = False,
) -> dict[str, Any]:
    """The raw-NATS baseline: work-queue stream -> pull worker (KV create + core publish) -> subscribers.

    With ``lifecycle`` the subscribers report each job done (captured by a second work-queue stream)
    and the worker records the end with one KV compare-and-set per job. With ``events`` (lifecycle
    only) the worker also stores four events per job in an events stream.
    """
    events = events and lifecycle
    name = "raw-lifecycle-events" if events else "raw-lifecycle" if lifecycle else "raw"
    prefix = ("be" if events else "bl" if lifecycle else "br") + uuid.uuid4().hex[:8]
    stream, subject, bucket, durable = (
        f"{prefix.upper()}_WORK",
        f"{prefix}.jobs.submit",
        f"{prefix}_jobs",
        "worker",
    )
    done_stream, done_subject, done_durable = (
        f"{prefix.upper()}_DONE",
        f"{prefix}.done.*",
        "finisher",
    )
    events_stream, events_subject = f"{prefix.upper()}_EVENTS", f"{prefix}.events"
    log(f"{name}: prefix {prefix}, {p.runners} receivers, worker concurrency {p.raw_concurrency}")
    nc = await nats.connect(url, name=f"bench-{name}-submit", error_cb=_nats_error)
    recv_nc: NatsClient | None = None
    raw_workers: list[Child] = []
    js = nc.jetstream()
    try:
        await js.add_stream(_work_queue(stream, subject))
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=1, storage=StorageType.FILE, replicas=1, direct=True
            )
        )
        consumers: list[tuple[str, list[str], str]] = [(stream, [subject], durable)]
        if lifecycle:
            await js.add_stream(_work_queue(done_stream, done_subject))
            # one finisher per worker, each on the completions of the runners it owns
            ids = runner_ids(p.runners)
            for i in range(p.raw_processes):
                owned = [
                    f"{prefix}.done.{r}" for n, r in enumerate(ids) if n % p.raw_processes == i
                ]
                consumers.append((done_stream, owned, f"{done_durable}-{i}"))
        if events:  # configured like Valkyrie's events stream (limits, deduplicated by id)
            await js.add_stream(
                StreamConfig(
                    name=events_stream,
                    subjects=[f"{events_subject}.>"],
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    storage=StorageType.FILE,
                    num_replicas=1,
                    duplicate_window=120.0,
                )
            )
        for on_stream, filtered, durable_name in consumers:
            await js.add_consumer(
                on_stream,
                ConsumerConfig(
                    durable_name=durable_name,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_ack_pending=100_000,
                    **(
                        {"filter_subject": filtered[0]}
                        if len(filtered) == 1
                        else {"filter_subjects": filtered}
                    ),
                ),
            )
        lifecycle_args = (
            [
                f"--done-subject={done_subject}",
                f"--done-stream={done_stream}",
                f"--capacity={p.runner_capacity}",
                *([f"--events-subject={events_subject}"] if events else []),
            ]
            if lifecycle
            else []
        )
        argv = _profiled(
            f"{name}-worker",
            p,
            [
                sys.executable,
                str(ROOT / "benchmarks" / "_raw_worker.py"),
                f"--url={url}",
                f"--prefix={prefix}",
                f"--stream={stream}",
                f"--subject={subject}",
                f"--durable={durable}",
                f"--bucket={bucket}",
                f"--runners={p.runners}",
                f"--concurrency={p.raw_concurrency}",
                f"--batch={p.raw_batch}",
                *lifecycle_args,
            ],
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i in range(p.raw_processes):
            child_name = f"{name}-worker" if p.raw_processes == 1 else f"{name}-worker-{i + 1}"
            partition = (
                [f"--partition={i}/{p.raw_processes}", f"--done-durable={done_durable}-{i}"]
                if lifecycle
                else []
            )
            raw_workers.append(
                children.spawn(
                    child_name,
                    [*argv, *partition],
                    env=env,
                    log=workdir / f"{child_name}.log",
                    cwd=ROOT,
                )
            )
        child = raw_workers[0]
        alive = _all_alive(raw_workers)

        async def ready() -> bool:
            if alive():
                raise RuntimeError(alive())
            try:
                await nc.request(f"{prefix}.ping", b"", timeout=0.5)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
                return False
            return True

        if await _until(ready, 30, 0.05) is None:
            raise RuntimeError(f"{name} worker not ready within 30s: {alive() or child.tail(2000)}")
        recv_nc = await nats.connect(url, name=f"bench-{name}-receivers", error_cb=_nats_error)
        spies = [_spy(children, w.name, w.pid, p, workdir) for w in raw_workers]
        recorder = Recorder()
        receivers = RawReceivers(
            recv_nc, prefix, runner_ids(p.runners), recorder, complete=lifecycle
        )
        await receivers.subscribe()

        async def idle() -> bool:
            await nc.flush()
            await recv_nc.flush()
            for on_stream, _, durable_name in consumers:
                info = await js.consumer_info(on_stream, durable_name)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        async def settle() -> float | None:
            return await _until(idle, 120, 0.05)

        target = Target(
            name=name,
            js=js,
            subject=subject,
            recorder=recorder,
            alive=alive,
            settle=settle,
            cpu_pids={
                "benchmark": os.getpid(),
                "worker": tuple(w.pid for w in raw_workers if w.pid is not None),
                "nats_server": server_pid,
            },
            tag="e" if events else "l" if lifecycle else "r",
        )
        results = await run_all_phases(target, p)
        await receivers.close()
        if lifecycle:
            results["completions_sent"] = receivers.completions_sent
            results["completion_errors"] = receivers.completion_errors
            results["records_done"] = await _records_done(js, bucket)
        if events:
            results["events_stored"] = (await js.stream_info(events_stream)).state.messages
        results["worker_processes"] = len(raw_workers)
        results["worker_exit_code"] = await _stop_workers(children, raw_workers, spies, p)
        return results
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(20):
            await _stop_started(children, raw_workers)
            streams = (stream, done_stream) if lifecycle else (stream,)
            for on_stream in (*streams, events_stream) if events else streams:
                try:
                    await js.delete_stream(on_stream)
                except (nats.errors.Error, nats.js.errors.Error):
                    pass
            try:
                await js.delete_key_value(bucket)
            except (nats.errors.Error, nats.js.errors.Error):
                pass
            if recv_nc is not None:
                await recv_nc.close()
            await nc.close()


async def _records_done(js: JetStreamContext, bucket: str) -> dict[str, int]:
    """Job records of the lifecycle baseline that reached their end, and slots still held at the end
    (proof the loop closed: every record done, no slot held)."""
    kv = await js.key_value(bucket)
    counts = {"records": 0, "done": 0, "slots_held": 0}
    limiter = anyio.Semaphore(64)

    async def one(key: str) -> None:
        async with limiter:
            entry = await kv.get(key)
        if key.startswith("slots."):
            counts["slots_held"] += int(entry.value or b"0")
            return
        counts["records"] += 1
        counts["done"] += entry.value == b'{"state":"done"}'

    async with anyio.create_task_group() as tg:
        for key in await kv.keys():
            tg.start_soon(one, key)
    return counts


# -- report --------------------------------------------------------------------------------------

PHASES = ("paced", "saturating")


def _row(system: str, phase: str, r: dict[str, Any]) -> list[object]:
    lat = r["latency_ms"]
    return [
        system,
        phase,
        r["submitted"],
        r["dispatched"],
        r["missing"],
        r["submit_rate_per_s"],
        r["throughput_per_s"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        lat["max"],
    ]


def ratios(results: dict[str, Any], baseline: str = "raw") -> dict[str, Any]:
    """valkyrie/``baseline`` for throughput and latency percentiles, per phase."""
    v, r = results.get("valkyrie") or {}, results.get(baseline) or {}
    out: dict[str, Any] = {}
    for phase in PHASES:
        vp, rp = v.get(phase), r.get(phase)
        if not vp or not rp:
            continue
        out[phase] = {
            "throughput": ratio(vp["throughput_per_s"], rp["throughput_per_s"]),
            **{
                f"latency_{k}": ratio(vp["latency_ms"][k], rp["latency_ms"][k])
                for k in ("p50", "p95", "p99")
            },
        }
    return out


def _scale_ratio(results: dict[str, Any]) -> float | None:
    """Saturating throughput with many runners over that with the usual count (same run)."""
    big = ((results.get("valkyrie_scale") or {}).get("saturating") or {}).get("throughput_per_s")
    base = ((results.get("valkyrie") or {}).get("saturating") or {}).get("throughput_per_s")
    return ratio(big, base) if big and base else None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the pipeline is judged against, and whether they were met."""
    v = results.get("valkyrie") or {}
    sat = (v.get("saturating") or {}).get("throughput_per_s")
    p50 = ((v.get("paced") or {}).get("latency_ms") or {}).get("p50")
    floor = ((results.get("raw_lifecycle") or {}).get("saturating") or {}).get("throughput_per_s")
    with_events = ((results.get("raw_lifecycle_events") or {}).get("saturating") or {}).get(
        "throughput_per_s"
    )
    return {
        # not a target: how far the least durable lifecycle in plain NATS gets on this machine
        "raw_lifecycle_saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": floor,
            "met": floor is not None and floor >= TARGET_THROUGHPUT,
        },
        # not a target either: the same floor with the event stream Valkyrie's contract has
        "raw_lifecycle_events_saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": with_events,
            "met": with_events is not None and with_events >= TARGET_THROUGHPUT,
        },
        "saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": sat,
            "met": sat is not None and sat >= TARGET_THROUGHPUT,
        },
        "paced_p50_ms": {
            "target": f"<= {TARGET_PACED_P50_MS:g}",
            "measured": p50,
            "met": p50 is not None and p50 <= TARGET_PACED_P50_MS,
        },
    }


def _display(system: str, p: dict[str, Any]) -> str:
    if system == "valkyrie_scale":
        return f"valkyrie@{p['scale_runners']}"
    return system.replace("_", "-")


def render(doc: dict[str, Any]) -> str:
    """The stdout report."""
    results, rat, p = doc["results"], doc["ratios"], doc["parameters"]
    rows: list[list[object]] = []
    for system in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events", "valkyrie_scale"):
        for phase in PHASES:
            r = (results.get(system) or {}).get(phase)
            if r:
                rows.append(_row(_display(system, p), phase, r))
    scale = _scale_ratio(results)
    if scale is not None:
        rows.append(
            [
                f"@{p['scale_runners']}/@{p['runners']}",
                "saturating",
                None,
                None,
                None,
                None,
                scale,
                None,
                None,
                None,
                None,
            ]
        )
    for label, by_phase in (
        ("valkyrie/raw", rat),
        ("valkyrie/raw-lifecycle", rat.get("lifecycle")),
        ("valkyrie/raw-lifecycle-events", rat.get("lifecycle_events")),
    ):
        for phase in PHASES:
            q = (by_phase or {}).get(phase)
            if not q:
                continue
            rows.append(
                [
                    label,
                    phase,
                    None,
                    None,
                    None,
                    None,
                    q["throughput"],
                    q["latency_p50"],
                    q["latency_p95"],
                    q["latency_p99"],
                    None,
                ]
            )
    headers = [
        "system",
        "phase",
        "submitted",
        "dispatched",
        "missing",
        "submit/s",
        "dispatch/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
    ]
    lines = [
        f"dispatch benchmark: {p['runners']} runners x capacity {p['runner_capacity']}, "
        f"paced {p['paced_jobs']} jobs at {p['rate']:g}/s, saturating {p['jobs']} jobs "
        f"({p['publish_concurrency']} publishers), nproc {doc['environment']['machine']['nproc']}",
        "",
        render_table(headers, rows),
        "",
        "ratio rows: dispatch/s column = valkyrie/baseline throughput, latency columns = "
        "valkyrie/baseline latency; raw-lifecycle = raw plus a runner slot taken and freed and "
        "each job recorded done (runner report captured by a stream): 3 more KV "
        "compare-and-sets, no events; raw-lifecycle-events = raw-lifecycle plus 4 events per "
        "job stored (deduplicated by id) before the ack",
    ]
    cpu_rows = []
    for system in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events"):
        idle = (results.get(system) or {}).get("idle_cpu_cores")
        if idle:
            cpu_rows.append(
                [
                    _display(system, p),
                    "idle (no jobs)",
                    idle.get("benchmark"),
                    idle.get("worker"),
                    idle.get("nats_server"),
                    idle.get("others"),
                    idle.get("cpu_pressure"),
                    None,
                    None,
                    None,
                ]
            )
        for phase in PHASES:
            r = (results.get(system) or {}).get(phase)
            if r:
                c, per_job = r["cpu_cores"], r.get("cpu_ms_per_job") or {}
                cpu_rows.append(
                    [
                        _display(system, p),
                        phase,
                        c.get("benchmark"),
                        c.get("worker"),
                        c.get("nats_server"),
                        c.get("others"),
                        c.get("cpu_pressure"),
                        per_job.get("worker"),
                        per_job.get("nats_server"),
                        per_job.get("benchmark"),
                    ]
                )
    if cpu_rows:
        lines += [
            "",
            "CPU while dispatching, in cores (1.0 = one core busy); others = other users of the "
            "machine; pressure = share of time some task waited for a CPU; ms/job = CPU per job "
            "from first submit until idle (completion included):",
            render_table(
                [
                    "system",
                    "phase",
                    "bench",
                    "worker",
                    "server",
                    "others",
                    "pressure",
                    "worker ms/job",
                    "server ms/job",
                    "bench ms/job",
                ],
                cpu_rows,
                digits=3,
            ),
        ]
    split_rows = []
    for phase in PHASES:
        r = (results.get("valkyrie") or {}).get(phase) or {}
        b = r.get("breakdown_ms")
        if b:
            m = b["milestone"]
            for label, key in (
                (f"submit -> {m}", f"submit_to_{m}"),
                (f"{m} -> dispatch", f"{m}_to_dispatch"),
            ):
                x = b[key]
                split_rows.append([phase, label, x["count"], x["p50"], x["p95"], x["p99"]])
    if split_rows:
        lines += [
            "",
            "valkyrie latency split at the queued event (intake done; seen by a subscriber here):",
            render_table(["phase", "segment", "jobs", "p50 ms", "p95 ms", "p99 ms"], split_rows),
        ]
    t = doc["targets"]
    if results.get("valkyrie"):
        lines += [
            "",
            "targets: saturating throughput {} jobs/s: {} ({}); paced p50 {} ms: {} ({})".format(
                t["saturating_throughput_per_s"]["target"],
                "MET" if t["saturating_throughput_per_s"]["met"] else "NOT MET",
                t["saturating_throughput_per_s"]["measured"],
                t["paced_p50_ms"]["target"],
                "MET" if t["paced_p50_ms"]["met"] else "NOT MET",
                t["paced_p50_ms"]["measured"],
            ),
        ]
    floor = t.get("raw_lifecycle_saturating_throughput_per_s") or {}
    if floor.get("measured") is not None:
        lines.append(
            "floor on this machine: raw-lifecycle (plain NATS: slots counted, job recorded "
            f"dispatched and done, no events) saturating {floor['measured']} jobs/s"
        )
    with_events = t.get("raw_lifecycle_events_saturating_throughput_per_s") or {}
    if with_events.get("measured") is not None:
        lines.append(
            "the same with the event stream (raw-lifecycle-events, 4 events per job) saturating "
            f"{with_events['measured']} jobs/s"
        )
    if doc["errors"]:
        lines += ["", "ERRORS:", *doc["errors"]]
    if doc["missing_total"]:
        lines += ["", f"WARNING: {doc['missing_total']} submitted job(s) were never dispatched"]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


async def run(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """Every scenario; errors are recorded, not raised, so the other scenario still runs."""
    results: dict[str, Any] = {}
    errors: list[str] = []
    scenarios: list[tuple[str, Callable[..., Awaitable[dict[str, Any]]]]] = []
    if not p.skip_valkyrie:
        scenarios.append(("valkyrie", valkyrie_scenario))
    if not p.skip_raw:
        scenarios.append(("raw", raw_scenario))
        if p.raw_lifecycle:
            scenarios.append(("raw_lifecycle", raw_lifecycle_scenario))
        if p.raw_events:
            scenarios.append(("raw_lifecycle_events", raw_events_scenario))
    if p.scale_runners and not p.skip_valkyrie:
        scenarios.append(("valkyrie_scale", valkyrie_scale_scenario))
    for name, scenario in scenarios:
        try:
            results[name] = await scenario(p, url, server_pid, children, workdir)
        except Exception as e:  # noqa: BLE001 - reported (traceback too); the others still run
            log(f"{name} scenario failed: {e!r}")
            traceback.print_exc(file=sys.stderr)
            errors.append(f"{name}: {e!r}")
    missing = sum(
        (results.get(s) or {}).get(ph, {}).get("missing", 0)
        for s in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events")
        for ph in ("warmup", *PHASES)
    )
    return {
        "benchmark": "dispatch",
        "timestamp": timestamp(),
        "parameters": asdict(p),
        "nats_url": url if p.nats_url else "embedded (temporary nats-server)",
        "environment": environment(repo=ROOT),
        "results": results,
        "ratios": {
            **ratios(results),
            "lifecycle": ratios(results, baseline="raw_lifecycle"),
            "lifecycle_events": ratios(results, baseline="raw_lifecycle_events"),
            "scale_throughput": _scale_ratio(results),
        },
        "targets": targets(results),
        "errors": errors,
        "missing_total": missing,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[Params, Path, bool]:
    """Command-line options; ``--quick`` sets small defaults that explicit options override."""
    parser = argparse.ArgumentParser(
        description="Valkyrie dispatch benchmark vs a raw-NATS baseline.",
    )
    parser.add_argument(
        "--runners", type=int, default=None, help="simulated runners (default 100; quick 10)"
    )
    parser.add_argument(
        "--runner-capacity",
        type=int,
        default=50,
        help="max concurrent jobs per runner (default %(default)s)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="saturating-phase jobs (default 5000; quick 500)"
    )
    parser.add_argument(
        "--paced-jobs", type=int, default=None, help="paced-phase jobs (default 1000; quick 100)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="paced-phase jobs per second (default %(default)s)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up jobs, excluded (default 100; quick 20)"
    )
    parser.add_argument(
        "--publish-concurrency",
        type=int,
        default=64,
        help="concurrent publishers when saturating (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-ms",
        type=int,
        default=1000,
        help="runner heartbeat interval (default %(default)s)",
    )
    parser.add_argument(
        "--raw-concurrency",
        type=int,
        default=256,
        help="messages the raw worker processes at once (default %(default)s)",
    )
    parser.add_argument(
        "--raw-batch",
        type=int,
        default=256,
        help="largest fetch of the raw worker (default %(default)s)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=20.0,
        help="give up waiting after this many seconds without a dispatch (default %(default)s)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=None,
        help="seconds of CPU measurement with no jobs after the warm-up (default 3; quick 1)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the JSON figures (default %(default)s)",
    )
    parser.add_argument("--nats-url", default=None, help="use this server instead of starting one")
    parser.add_argument("--skip-raw", action="store_true", help="do not run the raw-NATS baseline")
    parser.add_argument(
        "--skip-valkyrie", action="store_true", help="do not run the Valkyrie pipeline"
    )
    parser.add_argument(
        "--skip-raw-lifecycle",
        action="store_true",
        help="do not run the raw baseline that also records each job done (the lifecycle floor)",
    )
    parser.add_argument(
        "--skip-raw-events",
        action="store_true",
        help="do not run the lifecycle floor that also stores four events per job",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers for a smoke run")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="run the workers under cProfile, write DIR/*.prof and *.txt",
    )
    parser.add_argument(
        "--py-spy",
        metavar="DIR",
        default=None,
        help="sample the workers with py-spy (if installed), write DIR/*.collapsed and *.txt",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="subscribe to queued events to split valkyrie latency into intake and dispatcher "
        "parts (off by default: the subscriber loads the system under test, which the raw "
        "baselines do not have)",
    )
    parser.add_argument(
        "--no-breakdown",
        action="store_true",
        help="the default; kept so that older command lines still work",
    )
    parser.add_argument(
        "--samples",
        action="store_true",
        help="also write every job's submit offset and latency to the JSON",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, server store)"
    )
    parser.add_argument(
        "--scale-runners",
        type=int,
        default=0,
        help="also run the pipeline with this many runners (e.g. 10000) and report the ratio",
    )
    parser.add_argument(
        "--scale-heartbeat-ms",
        type=int,
        default=30_000,
        help="runner heartbeat interval in the scale scenario (default 30000)",
    )
    parser.add_argument(
        "--processes",
        default=PROCESSES,
        help="worker processes and their handlers: ',' between processes, '+' between handlers "
        "(default %(default)s; 'intake+registry+dispatcher+results' runs all in one)",
    )
    parser.add_argument(
        "--secure",
        action="store_true",
        help="run Valkyrie with NATS auth: generated identities, each handler on its own "
        "connection with its permissions (the raw baselines, which have none, are skipped)",
    )
    parser.add_argument(
        "--raw-processes",
        type=int,
        default=1,
        help="raw baseline worker processes sharing its durable consumer (default %(default)s)",
    )
    a = parser.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if a.quick else full)

    params = Params(
        runners=pick(a.runners, 100, 10),
        runner_capacity=a.runner_capacity,
        jobs=pick(a.jobs, 5000, 500),
        paced_jobs=pick(a.paced_jobs, 1000, 100),
        rate=a.rate,
        warmup=pick(a.warmup, 100, 20),
        publish_concurrency=a.publish_concurrency,
        heartbeat_ms=a.heartbeat_ms,
        raw_concurrency=a.raw_concurrency,
        raw_batch=a.raw_batch,
        wait_idle_s=a.wait_idle,
        idle_s=a.idle if a.idle is not None else (1.0 if a.quick else 3.0),
        quick=a.quick,
        skip_raw=a.skip_raw,
        skip_valkyrie=a.skip_valkyrie,
        nats_url=a.nats_url,
        profile=str(Path(a.profile).resolve()) if a.profile else None,
        py_spy=str(Path(a.py_spy).resolve()) if a.py_spy else None,
        samples=a.samples,
        breakdown=a.breakdown and not a.no_breakdown,
        scale_runners=a.scale_runners,
        scale_heartbeat_ms=a.scale_heartbeat_ms,
        processes=a.processes,
        raw_processes=a.raw_processes,
        raw_lifecycle=not a.skip_raw_lifecycle,
        raw_events=not a.skip_raw_events,
        secure=a.secure,
    )
    problems = [
        name
        for name, value in (
            ("--runners", params.runners),
            ("--runner-capacity", params.runner_capacity),
            ("--rate", params.rate),
            ("--publish-concurrency", params.publish_concurrency),
            ("--raw-concurrency", params.raw_concurrency),
            ("--raw-batch", params.raw_batch),
        )
        if value <= 0
    ]
    problems += [
        n
        for n, v in (
            ("--jobs", params.jobs),
            ("--paced-jobs", params.paced_jobs),
            ("--warmup", params.warmup),
        )
        if v < 0
    ]
    if problems:
        parser.error(f"{', '.join(problems)} must be positive")
    if params.skip_raw and params.skip_valkyrie:
        parser.error("--skip-raw and --skip-valkyrie together leave nothing to run")
    if params.secure:
        if params.nats_url or params.breakdown:
            parser.error("--secure starts its own server, and has no --breakdown subscriber")
        params = replace(params, skip_raw=True)
    return params, a.json, a.keep


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM behaves like Ctrl-C: asyncio's SIGINT handler cancels the main task (so every
    # cleanup runs in order), and outside the event loop SIGINT raises KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring for the exit status."""
    params, json_path, keep = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="valkyrie-bench-dispatch-"))
    children = Children()
    server: NatsServer | None = None
    try:
        for directory in (params.profile, params.py_spy):
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
        url = params.nats_url
        auth_conf = None
        if params.secure:
            params, auth_conf = secure_setup(params, workdir)
        if not url:
            server = NatsServer(
                store_dir=workdir / "nats",
                port=0,
                name="bench-dispatch",
                max_mem="2G",
                auth_conf=auth_conf,
            )
            server.start()
            url = server.url
            log(f"nats-server on {url} (pid {server.pid}, store {server.store_dir})")
        doc = anyio.run(run, params, url, server.pid if server else None, children, workdir)
        write_json(json_path, doc)
        print(render(doc), flush=True)
        print(f"\nJSON: {json_path}", flush=True)
        if doc["errors"]:
            return 1
        return 2 if doc["missing_total"] else 0
    except KeyboardInterrupt:
        log("interrupted: stopping subprocesses and the server")
        return 130
    finally:
        try:
            children.stop_all()
        finally:
            if server is not None:
                server.stop()
            if keep:
                log(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
