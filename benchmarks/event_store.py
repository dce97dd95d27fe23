"""Where a job's lifecycle events are stored: published by the client, derived by the server from
the job record's KV writes, or published as atomic batches; per job cost of each, in one run.

Against one nats-server started for the run (JetStream, a temporary store, a monitoring port), on
uvloop, rounds alternate between the ways (``benchmarks/_event_ways.py`` says what each does); every
round runs ``--jobs`` whole lifecycles (four compare-and-sets of the job record and four events)
with ``--concurrency`` jobs in flight. Per job: throughput, client CPU (this process), server CPU
(``/proc/<pid>/stat``), stored messages (``last_seq`` over every stream, ``/jsz``), messages into and
out of the server (``/varz``) and acked round trips. The server-derived stream is then read back
and checked (one event per write, in order, headers kept), and one more round measures how long
after a KV write's ack its derived event reaches a consumer. Table on stdout, JSON to a file.
Exit status 2 when a job failed or a way that must keep every event did not (the server-derived
way over a bucket of history 1 may lose some: that is reported, as a result).

Run from the repository root::

    .venv/bin/python benchmarks/event_store.py            # 3 rounds x 2,000 jobs each way
    .venv/bin/python benchmarks/event_store.py --quick    # smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import nats  # noqa: E402
from nats.js import JetStreamContext  # noqa: E402

from benchmarks._costs import free_port  # noqa: E402
from benchmarks._event_ways import (  # noqa: E402
    DEFAULT_WAYS,
    KINDS,
    WAYS,
    Way,
    Wire,
    derived_lag,
    provision,
    read_derived,
    run_jobs,
    source_start,
)
from benchmarks._procs import cpu_seconds  # noqa: E402
from benchmarks._report import (  # noqa: E402
    environment,
    ratio,
    render_table,
    summarize_ms,
    timestamp,
    write_json,
)
from valkyrie import NatsServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: per-job figures of a round, in table order: (key, column title)
FIGURES = (
    ("jobs_per_s", "jobs/s"),
    ("client_cpu_us", "client µs/job"),
    ("server_cpu_us", "server µs/job"),
    ("stored_msgs", "stored/job"),
    ("server_in_msgs", "in msgs/job"),
    ("server_out_msgs", "out msgs/job"),
    ("round_trips", "acked RT/job"),
    ("client_publishes", "publishes/job"),
)
SETTLE_TIMEOUT_S = 10.0


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class MonitoredServer(NatsServer):
    """A nats-server that also serves its monitoring endpoints (``/varz``, ``/jsz``)."""

    http_port: int = 0

    def _config(self) -> str:
        if not self.http_port:
            self.http_port = free_port()
        return super()._config() + f"http: {self.host}:{self.http_port}\n"

    def monitor(self, path: str) -> dict[str, Any]:
        """One monitoring endpoint's JSON."""
        url = f"http://{self.host}:{self.http_port}/{path}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            doc: dict[str, Any] = json.load(answer)
        return doc


@dataclass(frozen=True)
class Counters:
    """Cumulative counters at one instant."""

    in_msgs: int
    out_msgs: int
    last_seqs: dict[str, int]

    @staticmethod
    def read(server: MonitoredServer) -> Counters:
        """``/varz`` message counts and every stream's last sequence from ``/jsz``."""
        varz = server.monitor("varz")
        jsz = server.monitor("jsz?streams=true")
        seqs = {
            stream["name"]: int(stream["state"]["last_seq"])
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
        }
        return Counters(int(varz["in_msgs"]), int(varz["out_msgs"]), seqs)


async def _settle(js: JetStreamContext, way: Way, target: int) -> None:
    """Wait until the derived stream holds ``target`` messages or its source has no lag left."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        info = await js.stream_info(way.events_stream)
        caught_up = bool(info.sources) and all(s.lag == 0 for s in info.sources or [])
        if info.state.last_seq >= target or caught_up:
            return
        await asyncio.sleep(0.002)


async def _round(
    nc: Any, server: MonitoredServer, way: Way, jobs: list[str], concurrency: int
) -> dict[str, Any]:
    js = nc.jetstream()
    before = Counters.read(server)
    events_before = before.last_seqs.get(way.events_stream, 0)
    wire = Wire(nc)
    cpu, server_cpu, wall = time.process_time(), cpu_seconds(server.pid), time.perf_counter()
    done = await run_jobs(wire, way, jobs, concurrency)
    client_s = time.perf_counter() - wall
    if way.derived:  # the work is done when the events are stored, not when the client is
        await _settle(js, way, events_before + len(KINDS) * len(jobs))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    server_after = cpu_seconds(server.pid)
    after = Counters.read(server)
    n = max(done, 1)
    stored = sum(seq - before.last_seqs.get(name, 0) for name, seq in after.last_seqs.items())
    return {
        "jobs": len(jobs),
        "completed": done,
        "errors": wire.errors,
        "wall_s": round(wall, 4),
        "settle_ms": round((wall - client_s) * 1000, 2),
        "jobs_per_s": round(done / wall, 1),
        "client_cpu_us": round(cpu / n * 1e6, 1),
        "server_cpu_us": (
            round((server_after - server_cpu) / n * 1e6, 1)
            if server_after is not None and server_cpu is not None
            else None
        ),
        "stored_msgs": round(stored / n, 3),
        "events_stored": after.last_seqs.get(way.events_stream, 0) - events_before,
        "server_in_msgs": round((after.in_msgs - before.in_msgs) / n, 3),
        "server_out_msgs": round((after.out_msgs - before.out_msgs) / n, 3),
        "round_trips": round(wire.round_trips / n, 3),
        "client_publishes": round(wire.publishes / n, 3),
    }


def _medians(rounds: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, _title in FIGURES:
        values = [r[key] for r in rounds if r[key] is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    return out


async def run(server: MonitoredServer, a: argparse.Namespace) -> dict[str, Any]:
    """Provision, warm up, alternate rounds, then check and time the derived streams."""
    nc = await nats.connect(server.url, name="bench-event-store")
    try:
        js = nc.jetstream()
        ways = [WAYS[name] for name in a.ways]
        doc: dict[str, Any] = {"medians": {}, "events_stored": {}, "derived": {}}
        for way in ways:
            await provision(js, way)
            if way.derived:  # the source starts some time after the stream: see the docs
                start = await source_start(js, Wire(nc), way)
                doc["derived"][way.name] = {"source_start": start}
                log(f"{way.name}: source ran after {start}")
        ran: dict[str, list[str]] = {way.name: [] for way in ways}

        def ids(way: Way, tag: str, count: int) -> list[str]:
            jobs = [f"{way.key}-{tag}-{i:06d}" for i in range(count)]
            ran[way.name] += jobs
            return jobs

        for way in ways:  # warm-up: connections, streams, caches; not measured
            await run_jobs(Wire(nc), way, ids(way, "w", a.warmup), a.concurrency)
        rounds: dict[str, list[dict[str, Any]]] = {way.name: [] for way in ways}
        for r in range(a.rounds):
            # rotate the order too, so that no way always runs right after another
            for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                figures = await _round(nc, server, way, ids(way, f"r{r}", a.jobs), a.concurrency)
                rounds[way.name].append(figures)
                log(
                    f"round {r + 1}/{a.rounds} {way.name}: {figures['jobs_per_s']:,.0f} jobs/s, "
                    f"client {figures['client_cpu_us']} µs/job, server "
                    f"{figures['server_cpu_us']} µs/job"
                )
        doc["rounds"] = rounds
        for way in ways:
            doc["medians"][way.name] = _medians(rounds[way.name])
        for way in (w for w in ways if w.derived):
            lags, arrived, wire = await derived_lag(nc, way, ids(way, "lag", a.jobs), a.concurrency)
            await _settle(js, way, len(KINDS) * len(ran[way.name]))
            check = await read_derived(js, way, ran[way.name])
            doc["derived"][way.name] |= {
                "lag_ms": {name: summarize_ms(v) for name, v in lags.items()}
                | {"events_arrived": arrived, "errors": wire.errors},
                "check": asdict(check) | {"ok": check.ok},
                "kv_history": way.kv_history,
            }
        for way in ways:
            stored = (await js.stream_info(way.events_stream)).state.messages
            derived = doc["derived"].get(way.name)
            probes = derived["check"]["probe_events"] if derived else 0
            doc["events_stored"][way.name] = {
                "stored": stored,
                "expected": len(KINDS) * len(ran[way.name]) + probes,
                # a bucket keeping fewer revisions than a job's writes can lose derived events
                # whenever the source lags: that is measured, not a failure of the run
                "must_be_complete": not way.derived or way.kv_history >= len(KINDS),
            }
        return doc
    finally:
        await nc.close()


def _table(doc: dict[str, Any]) -> str:
    medians: dict[str, dict[str, float | None]] = doc["medians"]
    rows: list[list[object]] = [
        [name, *(m[key] for key, _ in FIGURES)] for name, m in medians.items()
    ]
    baseline = next(iter(medians))  # the first way of the run
    base = medians[baseline]
    for name, m in medians.items():
        if name != baseline:
            rows.append([f"{name}/{baseline}", *(ratio(m[k], base[k]) for k, _ in FIGURES)])
    return render_table(["way", *(title for _, title in FIGURES)], rows)


def _ratios(medians: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    baseline = next(iter(medians))  # the first way of the run
    return {
        f"{name}/{baseline}": {key: ratio(m[key], medians[baseline][key]) for key, _ in FIGURES}
        for name, m in medians.items()
        if name != baseline
    }


def _print_derived(name: str, derived: dict[str, Any]) -> None:
    check, lag, start = derived["check"], derived["lag_ms"], derived["source_start"]
    by_part = f" {check['incomplete_by_part']}" if check["incomplete_by_part"] else ""
    print(
        f"\n{name} (KV history {derived['kv_history']}): {check['stored']} events stored of "
        f"{check['expected']} expected; jobs complete {check['jobs_complete']}, incomplete "
        f"{check['jobs_incomplete']}{by_part}, out of order "
        f"{check['out_of_order']}, headers missing {check['missing_headers']}: "
        f"{'OK' if check['ok'] else 'NOT OK'}"
    )
    for key, title in (
        ("write_to_ack", "KV write sent -> its ack"),
        ("write_to_event", "KV write sent -> derived event delivered"),
        ("ack_to_event", "ack -> derived event delivered"),
    ):
        s = lag[key]
        print(f"  {title} (ms): p50 {s['p50']}, p99 {s['p99']}, max {s['max']} ({s['count']})")
    print(
        f"  source start: first derived event after {start['ms_until_first_event']} ms and "
        f"{start['probe_writes']} probe writes to one key; events kept {start['probe_events_kept']}"
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per round and way")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per way (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured jobs per way first")
    parser.add_argument(
        "--ways",
        default=",".join(DEFAULT_WAYS),
        help=f"comma-separated, the first is the baseline of the ratios; of: {', '.join(WAYS)}",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 jobs, 1 round")
    parser.add_argument("--json", type=Path, default=None, help="where to write JSON")
    parser.add_argument("--keep", action="store_true", help="keep the server's store directory")
    a = parser.parse_args(argv)
    if a.quick:
        a.jobs, a.rounds, a.warmup = min(a.jobs, 300), 1, min(a.warmup, 50)
    a.ways = [name.strip() for name in a.ways.split(",") if name.strip()]
    unknown = [name for name in a.ways if name not in WAYS]
    if unknown or not a.ways:
        parser.error(f"unknown ways {unknown}: choose from {', '.join(WAYS)}")
    if a.json is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        a.json = RESULTS / f"event-store-{stamp}.json"
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every job completed and every events stream that must be complete
    holds its events (2 otherwise)."""
    a = _parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="valkyrie-bench-events-"))
    server = MonitoredServer(store_dir=tmp / "nats", port=0, name="bench-event-store")
    server.start()
    log(f"nats-server pid {server.pid} at {server.url}, monitoring port {server.http_port}")
    try:
        # on uvloop, as Valkyrie's worker processes run
        doc = anyio.run(run, server, a, backend_options={"use_uvloop": True})
    finally:
        server.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = [e for rounds in doc["rounds"].values() for r in rounds for e in r["errors"]]
    incomplete = sum(r["jobs"] - r["completed"] for rs in doc["rounds"].values() for r in rs)
    streams_ok = all(
        s["stored"] == s["expected"] for s in doc["events_stored"].values() if s["must_be_complete"]
    ) and all(
        d["check"]["ok"]
        for name, d in doc["derived"].items()
        if doc["events_stored"][name]["must_be_complete"]
    )
    print(
        f"State and events per job, {a.jobs} jobs x {a.rounds} rounds per way, "
        f"{a.concurrency} in flight, uvloop (medians)\n"
    )
    print(_table(doc))
    for name, derived in doc["derived"].items():
        _print_derived(name, derived)
    print()
    for name, s in doc["events_stored"].items():
        per_round = [r["events_stored"] for r in doc["rounds"][name]]
        print(f"events stored, {name}: {s['stored']} of {s['expected']} (rounds: {per_round})")
    if errors:
        print(f"\n{len(errors)} errors, first: {errors[0]}")
    write_json(
        a.json,
        {
            "benchmark": "event_store",
            "timestamp": timestamp(),
            "parameters": vars(a) | {"json": str(a.json)},
            "environment": environment(repo=ROOT),
            "results": doc["medians"],
            "ratios": _ratios(doc["medians"]),
            "rounds": doc["rounds"],
            "derived": doc["derived"],
            "events_stored": doc["events_stored"],
            "incomplete_jobs": incomplete,
            "errors": errors,
        },
    )
    print(f"\nJSON: {a.json}")
    return 0 if not errors and incomplete == 0 and streams_ok else 2


if __name__ == "__main__":
    sys.exit(main())
