"""Phases of the dispatch benchmark: parameters, one system under test, warm-up, paced, saturating."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from benchmarks._costs import CostMeter
from benchmarks._fleet import Recorder
from benchmarks._procs import Child, Children, CpuClock
from benchmarks._profile import (
    find_py_spy,
    summarize_collapsed,
    write_cprofile_summary,
)
from benchmarks._report import (
    summarize_ns,
)
from schemas import JobSubmission
from valkyrie.cli._common import _backend_options as backend_options

ROOT = Path(__file__).resolve().parent.parent

#: full runs land here, one file per run, to be committed when docs/benchmarks.md quotes them
RESULTS_DIR = ROOT / "benchmarks" / "results"
#: ``--quick`` runs land here (git-ignored): smoke runs are never quoted
SCRATCH_DIR = RESULTS_DIR / "scratch"
#: default worker processes: the submit->dispatch path in one, runner upkeep and results in the other
PROCESSES = "intake+dispatcher,registry+results"
#: events and logs streams reserve their max_bytes on the server: keep it modest but far above what
#: a run stores (about 2 KB of events per job), since old events are discarded when it is reached
EVENTS_MAX_BYTES = 256 * 1024 * 1024


PHASES = ("paced", "saturating")


def valkyrie_loop() -> str:
    """The event loop ``python -m valkyrie worker`` runs on in this environment."""
    return "uvloop" if backend_options().get("use_uvloop") else "asyncio"


async def nats_error(e: Exception) -> None:
    """Error callback of the benchmark's own connections: logged, the run goes on."""
    log(f"NATS error: {e!r}")


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
    #: the embedded server's monitoring endpoint (``/jsz``, ``/varz``), when this run started it
    monitor_url: str | None = None
    #: event loop of the raw baselines' workers (``--raw-loop``)
    raw_loop: str = "asyncio"
    #: ``--scale-out``: the pipeline again with one and with two copies of the worker layout
    scale_out: bool = False

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
    #: reads the server's counters around each phase (per-job stored messages, round trips)
    meter: CostMeter | None = None
    #: streams this system feeds with core publishes (stored, but nobody waits for a PubAck)
    unacked_streams: frozenset[str] = frozenset()


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
    meter = target.meter
    counted = await meter.start() if meter else None
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
    if meter and counted:
        result["costs"] = meter.per_job(
            counted, await meter.end(), dispatched, target.unacked_streams
        )
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
        counted = await target.meter.start() if target.meter else None
        clock = CpuClock(target.cpu_pids)
        before = clock.sample()
        idle_started = time.perf_counter()
        await anyio.sleep(p.idle_s)
        out["idle_cpu_cores"] = CpuClock.usage(before, clock.sample())
        if target.meter and counted:
            out["idle_costs"] = target.meter.per_second(
                counted, await target.meter.end(), time.perf_counter() - idle_started
            )
    if p.paced_jobs:
        log(f"{target.name}: paced, {p.paced_jobs} jobs at {p.rate:g}/s")
        out["paced"] = await run_phase(target, "p", p.paced_jobs, rate=p.rate, p=p)
    if p.jobs:
        log(f"{target.name}: saturating, {p.jobs} jobs")
        out["saturating"] = await run_phase(target, "s", p.jobs, rate=None, p=p)
    out["duplicate_receipts"] = target.recorder.duplicates
    out.update(target.extra())
    return out


async def until(
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


def all_alive(workers: Sequence[Child]) -> Callable[[], str | None]:
    """A check that says which worker process exited (with its log tail), or ``None``."""

    def alive() -> str | None:
        for child in workers:
            code = child.proc.poll()
            if code is not None:
                return f"{child.name} exited with {code}; log tail:\n{child.tail(2000)}"
        return None

    return alive


async def stop_workers(
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


async def stop_started(children: Children, workers: Sequence[Child]) -> None:
    for worker in workers:
        if worker in children.started:
            await anyio.to_thread.run_sync(children.stop, worker)


def profiled(name: str, p: Params, argv: list[str]) -> list[str]:
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


def start_spy(
    children: Children, name: str, pid: int | None, p: Params, workdir: Path
) -> Child | None:
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
