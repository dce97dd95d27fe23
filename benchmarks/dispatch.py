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

Per job, each phase also reports stored messages, round trips and server messages
(``benchmarks._costs``) next to the CPU; issue 17's targets are judged every run
(``benchmarks._targets``); ``--scale-out`` adds the layout run once and twice. The systems live in
``_valkyrie_system`` and ``_raw_systems``, the phases in ``_phases``, the report in
``_dispatch_report``; this module holds the command line and the run.

Run from the repository root::

    .venv/bin/python benchmarks/dispatch.py            # full run (about a minute or two)
    .venv/bin/python benchmarks/dispatch.py --quick    # smoke run (~15 s), to results/scratch/

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
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402

from benchmarks._costs import MonitoredServer, free_port  # noqa: E402
from benchmarks._dispatch_report import ratios, render, scale_ratio  # noqa: E402
from benchmarks._phases import (  # noqa: E402
    PHASES,
    PROCESSES,
    RESULTS_DIR,
    SCRATCH_DIR,
    Params,
    log,
    valkyrie_loop,
)
from benchmarks._procs import Children  # noqa: E402
from benchmarks._raw_systems import (  # noqa: E402
    raw_events_scenario,
    raw_lifecycle_scenario,
    raw_scenario,
)
from benchmarks._report import (  # noqa: E402
    environment,
    timestamp,
    write_json,
)
from benchmarks._targets import scale_out, targets  # noqa: E402
from benchmarks._valkyrie_system import (  # noqa: E402
    scale_out_scenario,
    secure_setup,
    valkyrie_scale_scenario,
    valkyrie_scenario,
)
from valkyrie import NatsServer  # noqa: E402


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
    if p.scale_out and not p.skip_valkyrie:
        scenarios.append(("scale_out", scale_out_scenario))
    for name, scenario in scenarios:
        try:
            results[name] = await scenario(p, url, server_pid, children, workdir)
        except Exception as e:  # noqa: BLE001 - reported (traceback too); the others still run
            log(f"{name} scenario failed: {e!r}")
            traceback.print_exc(file=sys.stderr)
            errors.append(f"{name}: {e!r}")
    measured = [
        results.get(s) or {} for s in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events")
    ]
    measured += list((results.get("scale_out") or {}).values())
    missing = sum(r.get(ph, {}).get("missing", 0) for r in measured for ph in ("warmup", *PHASES))
    return {
        "benchmark": "dispatch",
        "timestamp": timestamp(),
        "parameters": asdict(p),
        "nats_url": url if p.nats_url else "embedded (temporary nats-server)",
        "environment": environment(repo=ROOT),
        "event_loops": {
            "benchmark": "asyncio",
            "valkyrie": valkyrie_loop(),
            "raw": p.raw_loop,
        },
        "results": results,
        "ratios": {
            **ratios(results),
            "lifecycle": ratios(results, baseline="raw_lifecycle"),
            "lifecycle_events": ratios(results, baseline="raw_lifecycle_events"),
            "scale_throughput": scale_ratio(results),
        },
        "targets": targets(results),
        "scale_out": scale_out(results),
        "errors": errors,
        "missing_total": missing,
    }


def parse_args(argv: Sequence[str] | None = None) -> tuple[Params, Path | None, bool]:
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
        default=None,
        help="where to write the JSON figures (default benchmarks/results/"
        "dispatch-<UTC time>-<commit>.json; with --quick under benchmarks/results/scratch/)",
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
    parser.add_argument(
        "--raw-loop",
        choices=("asyncio", "uvloop"),
        default=valkyrie_loop(),
        help="event loop of the raw baselines' workers (default %(default)s: the loop "
        "`python -m valkyrie worker` runs on here)",
    )
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="also run the pipeline with one and with two copies of the default worker layout "
        "(saturating only) and predict 8 and 16 cores from the CPU per job",
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
        raw_loop=a.raw_loop,
        scale_out=a.scale_out,
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
    if params.raw_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--raw-loop uvloop: uvloop is not installed")
    if params.skip_raw and params.skip_valkyrie:
        parser.error("--skip-raw and --skip-valkyrie together leave nothing to run")
    if params.secure:
        if params.nats_url or params.breakdown:
            parser.error("--secure starts its own server, and has no --breakdown subscriber")
        params = replace(params, skip_raw=True)
    return params, a.json, a.keep


def results_path(doc: dict[str, Any]) -> Path:
    """``dispatch-<UTC time>-<short commit>.json`` in the results folder (scratch when quick).

    The commit gets ``-dirty`` when files differed from it: such a run measured no commit.
    """
    when = doc["timestamp"].replace("-", "").replace(":", "").replace("+0000", "Z")
    source = doc["environment"].get("source") or {}
    commit = (source.get("commit") or "nogit")[:7]
    if source.get("uncommitted_changes"):
        commit += "-dirty"
    folder = SCRATCH_DIR if doc["parameters"]["quick"] else RESULTS_DIR
    return folder / f"dispatch-{when}-{commit}.json"


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
            server = MonitoredServer(
                store_dir=workdir / "nats",
                port=0,
                name="bench-dispatch",
                max_mem="2G",
                auth_conf=auth_conf,
                monitor_port=free_port(),
            )
            server.start()
            url = server.url
            params = replace(params, monitor_url=server.monitor_url)
            log(
                f"nats-server on {url} (pid {server.pid}, store {server.store_dir}, "
                f"monitoring {server.monitor_url})"
            )
        doc = anyio.run(run, params, url, server.pid if server else None, children, workdir)
        json_path = json_path or results_path(doc)
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
