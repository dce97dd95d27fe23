"""What one job stores when the runner SDK runs it: `valkyrie up` with real reference runners.

The dispatch benchmark's simulated runners answer each dispatch with two updates; a runner built
on the SDK (``valkyrie.runner``, what ``valkyrie runner`` and ``up --runners`` run) sends what the
SDK sends, and really executes the job. This program starts ``valkyrie up --runners R`` (open
embedded server, no HTTP API) on a temporary data directory, submits ``--jobs`` jobs running
``true`` with ``--concurrency`` in flight, waits for every one to succeed, and reports per job the
messages stored in each stream (``last_seq`` deltas: KV buckets are streams too), jobs/s, and the
CPU of the ``up`` process (handlers and runners) and of its nats-server. Beside it, the same run
measures raw NATS's floor for the same jobs: a JetStream publish and a KV create per job
(two stored messages), so every figure has its baseline from the same minute.

Run from the repository root::

    .venv/bin/python benchmarks/sdk_lifecycle.py             # 500 jobs, 2 runners
    .venv/bin/python benchmarks/sdk_lifecycle.py --quick     # smoke run (50 jobs)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks._costs import free_port  # noqa: E402
from benchmarks._procs import cpu_seconds  # noqa: E402
from benchmarks._report import environment, ratio, render_table, timestamp, write_json  # noqa: E402
from valkyrie import Client, Settings, connect  # noqa: E402
from valkyrie.bus.connection import Bus  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
UP_TIMEOUT_S = 60.0


async def _last_seqs(bus: Bus) -> dict[str, int]:
    return {str(info.config.name): info.state.last_seq for info in await bus.js.streams_info()}


def _server_pid(data: Path) -> int:
    pid_file = next((data / "nats").glob("*.pid"))
    return int(pid_file.read_text().strip())


async def _valkyrie(bus: Bus, jobs: int, concurrency: int) -> dict[str, Any]:
    client = Client(bus)
    body = {"job_type": "shell", "payload": {"command": ["true"]}}
    warm = await client.submit(body)
    assert warm is not None
    assert warm.job_id is not None
    await client.wait_for_job(warm.job_id, timeout_s=60)
    await asyncio.sleep(1.0)  # let the warm-up's last writes land before counting
    before = await _last_seqs(bus)
    gate = asyncio.Semaphore(concurrency)
    states: list[str] = []

    async def one() -> None:
        async with gate:
            verdict = await client.submit(body)
            assert verdict is not None
            assert verdict.job_id is not None, verdict
            done = await client.wait_for_job(verdict.job_id, timeout_s=120)
            states.append(str(done.state))

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(jobs)))
    elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)
    after = await _last_seqs(bus)
    per_stream = {
        name: round((seq - before.get(name, 0)) / jobs, 2)
        for name, seq in sorted(after.items())
        if seq != before.get(name, 0)
    }
    return {
        "jobs": jobs,
        "succeeded": states.count("succeeded"),
        "jobs_per_s": round(jobs / elapsed, 1),
        "stored_per_job": round(sum(per_stream.values()), 2),
        "stored_per_job_by_stream": per_stream,
        "elapsed_s": round(elapsed, 2),
    }


async def _raw(bus: Bus, jobs: int, concurrency: int, prefix: str) -> dict[str, Any]:
    """The floor: one JetStream publish and one KV create per job."""
    stream, bucket = f"{prefix}_RAW", f"{prefix}_raw"
    await bus.js.add_stream(name=stream, subjects=[f"{prefix}.raw.>"])
    kv = await bus.js.create_key_value(bucket=bucket)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await bus.js.publish(f"{prefix}.raw.{i}", b'{"job_type":"shell"}')
            await kv.create(f"j{i}", b'{"state":"queued"}')

    before = await _last_seqs(bus)
    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    elapsed = time.monotonic() - started
    after = await _last_seqs(bus)
    stored = sum(seq - before.get(name, 0) for name, seq in after.items()) / jobs
    await bus.js.delete_stream(stream)
    await bus.js.delete_key_value(bucket)
    return {"jobs": jobs, "jobs_per_s": round(jobs / elapsed, 1), "stored_per_job": stored}


async def _measure(args: argparse.Namespace, data: Path, port: int, up_pid: int) -> dict[str, Any]:
    settings = Settings.from_env({}, nats_url=f"nats://127.0.0.1:{port}")
    bus = await connect(settings, name="sdk-lifecycle-bench")
    try:
        server = _server_pid(data)
        cpu0 = (cpu_seconds(up_pid) or 0.0, cpu_seconds(server) or 0.0)
        valkyrie = await _valkyrie(bus, args.jobs, args.concurrency)
        cpu1 = (cpu_seconds(up_pid) or 0.0, cpu_seconds(server) or 0.0)
        for i, name in enumerate(("up_cpu_ms_per_job", "server_cpu_ms_per_job")):
            valkyrie[name] = round((cpu1[i] - cpu0[i]) * 1000 / args.jobs, 3)
        raw = await _raw(bus, args.jobs, args.concurrency, "skraw")
        return {"valkyrie": valkyrie, "raw": raw}
    finally:
        await bus.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8, help="jobs in flight (default 8)")
    parser.add_argument("--quick", action="store_true", help="50 jobs, for a smoke run")
    parser.add_argument("--json", type=Path, help="where to write the JSON figures")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs = min(args.jobs, 50)
    tmp = Path(tempfile.mkdtemp(prefix="valkyrie-bench-sdk-"))
    port = free_port()
    env = {
        **os.environ,
        "VALKYRIE_DATA_DIR": str(tmp),
        "VALKYRIE_EMBEDDED_PORT": str(port),
        "VALKYRIE_EMBEDDED_AUTH": "false",
        "VALKYRIE_HTTP__ENABLED": "false",
        "VALKYRIE_OBSERVABILITY__METRICS_PORT": "0",
    }
    log_path = tmp / "up.log"
    with log_path.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "valkyrie", "up", "--runners", str(args.runners)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "valkyrie is up" not in log_path.read_text(errors="replace"):
            if up.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.1)
        figures = asyncio.run(_measure(args, tmp, port, up.pid))
    finally:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    v, r = figures["valkyrie"], figures["raw"]
    rows = [
        ["valkyrie (SDK runners)", v["jobs_per_s"], v["stored_per_job"], v["up_cpu_ms_per_job"]],
        ["raw (publish + kv create)", r["jobs_per_s"], r["stored_per_job"], None],
        [
            "valkyrie / raw",
            ratio(v["jobs_per_s"], r["jobs_per_s"]),
            ratio(v["stored_per_job"], r["stored_per_job"]),
            None,
        ],
    ]
    print(render_table(["system", "jobs/s", "stored/job", "up CPU ms/job"], rows))
    print(
        "stored per job by stream:",
        ", ".join(f"{k} {n}" for k, n in v["stored_per_job_by_stream"].items()),
    )
    document = {
        "benchmark": "sdk_lifecycle",
        "at": timestamp(),
        "params": {"jobs": args.jobs, "runners": args.runners, "concurrency": args.concurrency},
        "environment": environment(repo=ROOT),
        "results": figures,
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = args.json or (
        RESULTS / ("scratch" if args.quick else "") / f"sdk-lifecycle-{stamp}.json"
    )
    write_json(path, document)
    print(f"JSON: {path}")
    return 0 if v["succeeded"] == args.jobs else 2


if __name__ == "__main__":
    sys.exit(main())
