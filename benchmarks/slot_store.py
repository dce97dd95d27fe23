"""Where a runner's slots are kept: the whole runner record, a small slot record, a counter, or a key
per slot index; per job (one claim and one release) cost of each, in one run.

Against one nats-server started for the run (JetStream, a temporary store, a monitoring port), on
uvloop, rounds alternate between the ways (``benchmarks/_slot_ways.py`` says what each does). Each
way has its own KV bucket (history 1, file storage, as Valkyrie's runners bucket) holding
``--runners`` runners of ``--capacity`` slots, ``--held`` of each runner's capacity taken by
long-running jobs for the whole run (so the runner record carries a realistic ``assigned_jobs``);
a round claims and releases a slot for ``--jobs`` jobs, ``--concurrency`` in flight. ``--watchers``
processes (``benchmarks/_slot_watcher.py``) follow every bucket and decode every change, as each
Valkyrie worker process's runner view does. Per job: claims+releases/s, CPU of this process, of
the watchers (summed) and of the server (``/proc/<pid>/stat``), value bytes written, bytes into
and out of the server (``/varz``: out includes the deliveries to watchers), stored messages
(``last_seq``), compare-and-set conflicts and reads. Then the held jobs are released and the end
state checked: no slot held anywhere, and no watcher ever saw a runner above its capacity or
below zero. Table on stdout, JSON to a file; exit status 2 when a check failed.

Run from the repository root::

    .venv/bin/python benchmarks/slot_store.py            # 3 rounds x 3,000 jobs each way
    .venv/bin/python benchmarks/slot_store.py --quick    # smoke run: 8 runners of 6 slots, full
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
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from dataclasses import replace  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import nats  # noqa: E402
from nats.js.api import KeyValueConfig, StorageType  # noqa: E402

from benchmarks._procs import Child, Children, cpu_seconds  # noqa: E402
from benchmarks._report import environment, ratio, render_table, timestamp, write_json  # noqa: E402
from benchmarks._slot_ways import (  # noqa: E402
    WAYS,
    Store,
    Tally,
    claim_many,
    read_used,
    release_many,
    run_jobs,
)
from benchmarks.event_store import MonitoredServer, log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: per-job figures of a round, in table order: (key, column title)
FIGURES = (
    ("jobs_per_s", "jobs/s"),
    ("client_cpu_us", "client µs"),
    ("watchers_cpu_us", "watchers µs"),
    ("server_cpu_us", "server µs"),
    ("value_bytes", "value B"),
    ("server_in_bytes", "in B"),
    ("server_out_bytes", "out B"),
    ("stored_msgs", "stored"),
    ("conflicts", "conflicts"),
    ("reads", "reads"),
)
SETTLE_TIMEOUT_S = 30.0
_TALLIED = ("writes", "conflicts", "reads", "refusals")


def bucket(way: str) -> str:
    """The way's KV bucket."""
    return "slots_" + way.replace("-", "_")


class Watchers:
    """The watcher processes and their answers."""

    def __init__(self, nc: Any, children: list[Child]) -> None:
        self.nc, self.children = nc, children

    async def figures(self) -> list[dict[str, dict[str, Any]]]:
        """Each watcher's figures by way."""
        out = []
        for i, _ in enumerate(self.children):
            answer = await self.nc.request(f"bench.slots.watcher.{i}", b"", timeout=5)
            out.append(json.loads(answer.data))
        return out

    def cpu(self) -> float | None:
        """CPU seconds of every watcher together."""
        each = [cpu_seconds(child.pid) for child in self.children]
        return None if any(v is None for v in each) else sum(v for v in each if v is not None)

    async def settle(self, way: str, revision: int) -> bool:
        """Wait until every watcher has seen ``way``'s bucket up to ``revision``."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(f[way]["last_revision"] >= revision for f in await self.figures()):
                return True
            await asyncio.sleep(0.005)
        return False

    async def started(self) -> None:
        """Wait until every watcher has loaded every bucket."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if all(f["started"] for w in await self.figures() for f in w.values()):
                    return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise RuntimeError("the watchers did not start")


Hold = Callable[[str, str], Awaitable[None]]


def _holder(hold_ms: float) -> Hold | None:
    """What a job does between its claim and its release: nothing, or sleep ``hold_ms``."""
    if hold_ms <= 0:
        return None

    async def hold(_job: str, _runner: str) -> None:
        await asyncio.sleep(hold_ms / 1000)

    return hold


def _varz(server: MonitoredServer) -> dict[str, int]:
    varz = server.monitor("varz")
    return {k: int(varz[k]) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}


async def _last_seq(js: Any, way: str) -> int:
    return int((await js.stream_info(f"KV_{bucket(way)}")).state.last_seq)


async def _round(
    nc: Any,
    server: MonitoredServer,
    watchers: Watchers,
    store: Store,
    runners: list[str],
    jobs: list[str],
    concurrency: int,
    hold: Hold | None,
) -> dict[str, Any]:
    js, way, tally = nc.jetstream(), store.way, store.tally
    seq0 = await _last_seq(js, way)
    delivered0 = sum(f[way]["changes"] for f in await watchers.figures())
    varz0, tallied0 = _varz(server), {k: getattr(tally, k) for k in _TALLIED}
    errors0 = len(tally.errors)
    server0, watchers0 = cpu_seconds(server.pid), watchers.cpu()
    cpu, wall = time.process_time(), time.perf_counter()
    done = await run_jobs(store, runners, jobs, concurrency, hold=hold)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seq1 = await _last_seq(js, way)
    stored = seq1 - seq0
    settled = await watchers.settle(way, seq1)
    server1, watchers1, varz1 = cpu_seconds(server.pid), watchers.cpu(), _varz(server)
    delivered = sum(f[way]["changes"] for f in await watchers.figures()) - delivered0
    n = max(done, 1)

    def per_job(before: float | None, after: float | None, scale: float = 1.0) -> float | None:
        return None if before is None or after is None else round((after - before) / n * scale, 3)

    figures: dict[str, Any] = {
        "jobs": len(jobs),
        "completed": done,
        "settled": settled,
        "errors": tally.errors[errors0:],
        "wall_s": round(wall, 4),
        "jobs_per_s": round(done / wall, 1),
        "client_cpu_us": round(cpu / n * 1e6, 1),
        "watchers_cpu_us": per_job(watchers0, watchers1, 1e6),
        "server_cpu_us": per_job(server0, server1, 1e6),
        "stored_msgs": round(stored / n, 3),
        # changes delivered to (and decoded by) one watcher, on average
        "delivered_per_watcher": round(delivered / n / max(len(watchers.children), 1), 3),
    }
    for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes"):
        figures[f"server_{key}"] = per_job(varz0[key], varz1[key])
    for key in _TALLIED:
        figures[key] = per_job(tallied0[key], getattr(tally, key))
    return figures


def _medians(rounds: list[dict[str, Any]], bytes_per_write: float) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, _title in FIGURES:
        if key == "value_bytes":
            continue
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = round(statistics.median(values), 3) if values else None
    for key in ("writes", "delivered_per_watcher"):
        out[key] = round(statistics.median(r[key] for r in rounds), 3)
    out["refusals"] = round(statistics.median(r["refusals"] for r in rounds), 3)
    out["value_bytes"] = round(bytes_per_write * (out["writes"] or 0), 1)
    return out


async def _checks(
    nc: Any, watchers: Watchers, stores: dict[str, Store], runners: list[str], capacity: int
) -> dict[str, Any]:
    """The end state: nothing held on the server or in any watcher's view; never over capacity."""
    js = nc.jetstream()
    out: dict[str, Any] = {}
    for way, store in stores.items():
        seq = await _last_seq(js, way)
        settled = await watchers.settle(way, seq)
        used = await read_used(store.kv, way, runners)
        seen = [w[way] for w in await watchers.figures()]
        check = {
            "settled": settled,
            "bucket_last_seq": seq,
            "watcher_changes": [f["changes"] for f in seen],
            # revisions superseded before they reached a watcher (history 1): not decoded there
            "watchers_skipped": [f["skipped"] for f in seen],
            "slots_held_at_end": sum(used.values()),
            "watchers_used_at_end": [f["used_now"] for f in seen],
            "watchers_most_used": max(f["most_used"] for f in seen),
            "watchers_over_capacity": sum(f["over_capacity"] for f in seen),
            "watchers_negative": sum(f["negative"] for f in seen),
            "watchers_undecodable": sum(f["undecodable"] for f in seen),
            "client_most_held": store.tally.most_held,
            "refusals": store.tally.refusals,
            "errors": store.tally.errors[:5],
        }
        check["ok"] = (
            settled
            and check["slots_held_at_end"] == 0
            and not any(check["watchers_used_at_end"])
            and check["watchers_most_used"] <= capacity
            and check["client_most_held"] <= capacity
            and check["watchers_over_capacity"] == check["watchers_negative"] == 0
            and check["watchers_undecodable"] == 0
            and not store.tally.errors
        )
        out[way] = check
    return out


async def run(server: MonitoredServer, children: Children, a: argparse.Namespace) -> dict[str, Any]:
    """Provision, start the watchers, hold slots, warm up, alternate rounds, release, check."""
    nc = await nats.connect(server.url, name="bench-slot-store")
    try:
        js = nc.jetstream()
        runners = [f"runner-{i:05d}" for i in range(a.runners)]
        stores: dict[str, Store] = {}
        for way in a.ways:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=bucket(way), history=1, storage=StorageType.FILE, direct=True)
            )
            stores[way] = store = Store(way, nc, kv, bucket(way), a.capacity, Tally())
            for runner in runners:
                await store.create(runner)
        argv = [sys.executable, "-m", "benchmarks._slot_watcher", "--url", server.url]
        argv += ["--capacity", str(a.capacity)]
        for way in a.ways:
            argv += ["--bucket", f"{way}={bucket(way)}"]
        started = [
            children.spawn(
                f"watcher-{i}",
                [*argv, "--subject", f"bench.slots.watcher.{i}"],
                env=os.environ,
                log=a.logs / f"watcher-{i}.log",
                cwd=ROOT,
            )
            for i in range(a.watchers)
        ]
        watchers = Watchers(nc, started)
        await watchers.started()
        log(f"{a.watchers} watchers following {len(a.ways)} buckets")
        held_per_runner = round(a.capacity * a.held)
        held = {r: [f"held-{r}-{k}" for k in range(held_per_runner)] for r in runners}
        doc: dict[str, Any] = {"held_per_runner": held_per_runner, "bytes_per_write": {}}
        held_ok = True
        for way, store in stores.items():
            for runner, jobs in held.items():
                held_ok &= await claim_many(store, runner, jobs) == len(jobs)
            # warm-up (not measured) also sizes the values: one extra encode per write
            store.count_bytes = True
            before = replace(store.tally)
            jobs = [f"{way}-w-{i:06d}" for i in range(a.warmup)]
            await run_jobs(store, runners, jobs, a.concurrency, hold=_holder(a.hold_ms))
            store.count_bytes = False
            writes = store.tally.writes - before.writes
            doc["bytes_per_write"][way] = round(store.tally.value_bytes / max(writes, 1), 1)
        rounds: dict[str, list[dict[str, Any]]] = {way: [] for way in a.ways}
        ways = list(a.ways)
        hold = _holder(a.hold_ms)
        for r in range(a.rounds):
            # rotate the order too, so that no way always runs right after another
            for way in ways[r % len(ways) :] + ways[: r % len(ways)]:
                jobs = [f"{way}-r{r}-{i:06d}" for i in range(a.jobs)]
                figures = await _round(
                    nc, server, watchers, stores[way], runners, jobs, a.concurrency, hold
                )
                rounds[way].append(figures)
                log(
                    f"round {r + 1}/{a.rounds} {way}: {figures['jobs_per_s']:,.0f} jobs/s, client "
                    f"{figures['client_cpu_us']} µs/job, watchers {figures['watchers_cpu_us']}, "
                    f"server {figures['server_cpu_us']}, conflicts {figures['conflicts']}"
                )
        for store in stores.values():
            for runner, jobs in held.items():
                held_ok &= await release_many(store, runner, jobs) == len(jobs)
        doc["rounds"] = rounds
        doc["medians"] = {way: _medians(rounds[way], doc["bytes_per_write"][way]) for way in a.ways}
        doc["checks"] = await _checks(nc, watchers, stores, runners, a.capacity)
        doc["held_ok"] = held_ok
        return doc
    finally:
        await nc.close()


def _table(medians: dict[str, dict[str, float | None]]) -> str:
    rows: list[list[object]] = [
        [name, *(m[key] for key, _ in FIGURES)] for name, m in medians.items()
    ]
    baseline = next(iter(medians))
    for name, m in medians.items():
        if name != baseline:
            rows.append(
                [f"{name}/{baseline}", *(ratio(m[k], medians[baseline][k]) for k, _ in FIGURES)]
            )
    return render_table(["way", *(title for _, title in FIGURES)], rows)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=100, help="runners per way")
    parser.add_argument("--capacity", type=int, default=50, help="slots per runner")
    parser.add_argument(
        "--held", type=float, default=0.5, help="share of each runner's slots held all run"
    )
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per round and way")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per way (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight")
    parser.add_argument(
        "--hold-ms",
        type=float,
        default=0.0,
        help="how long a job holds its slot (0: released at once)",
    )
    parser.add_argument("--watchers", type=int, default=2, help="watcher processes")
    parser.add_argument("--warmup", type=int, default=300, help="unmeasured jobs per way first")
    parser.add_argument(
        "--ways",
        default=",".join(WAYS),
        help=f"comma-separated, the first is the baseline of the ratios; of: {', '.join(WAYS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 runners of 6 slots held 5 ms (full), 1 round",
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write JSON")
    parser.add_argument("--keep", action="store_true", help="keep the server's store directory")
    a = parser.parse_args(argv)
    if a.quick:
        # few slots, held a while: runners fill up, so the bound is exercised
        a.runners, a.capacity, a.jobs, a.rounds = 8, 6, min(a.jobs, 400), 1
        a.warmup, a.hold_ms = min(a.warmup, 50), a.hold_ms or 5.0
    a.ways = [name.strip() for name in a.ways.split(",") if name.strip()]
    unknown = [name for name in a.ways if name not in WAYS]
    if unknown or not a.ways:
        parser.error(f"unknown ways {unknown}: choose from {', '.join(WAYS)}")
    if not 0 <= a.held < 1 or a.capacity < 1 or a.runners < 1 or a.watchers < 0:
        parser.error("need --runners >= 1, --capacity >= 1, 0 <= --held < 1, --watchers >= 0")
    if a.json is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        where = RESULTS / "scratch" if a.quick else RESULTS
        a.json = where / f"slot-store-{stamp}.json"
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every job completed and every check held (2 otherwise)."""
    a = _parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="valkyrie-bench-slots-"))
    a.logs = tmp / "logs"
    server = MonitoredServer(store_dir=tmp / "nats", port=0, name="bench-slot-store")
    server.start()
    children = Children()
    log(f"nats-server pid {server.pid} at {server.url}, monitoring port {server.http_port}")
    try:
        # on uvloop, as Valkyrie's worker processes run
        doc = anyio.run(run, server, children, a, backend_options={"use_uvloop": True})
    finally:
        children.stop_all()
        server.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    incomplete = sum(r["jobs"] - r["completed"] for rs in doc["rounds"].values() for r in rs)
    unsettled = sum(not r["settled"] for rs in doc["rounds"].values() for r in rs)
    ok = incomplete == unsettled == 0 and doc["held_ok"]
    ok = ok and all(c["ok"] for c in doc["checks"].values())
    print(
        f"Slot claim + release per job, {a.runners} runners x {a.capacity} slots "
        f"({doc['held_per_runner']} held by long jobs), {a.jobs} jobs x {a.rounds} rounds per way, "
        f"{a.concurrency} in flight, {a.watchers} watcher processes, uvloop (medians)\n"
    )
    print(_table(doc["medians"]))
    print()
    for way, check in doc["checks"].items():
        print(
            f"{way}: slots held at end {check['slots_held_at_end']}, in watchers' views "
            f"{check['watchers_used_at_end']}; most used at once {check['watchers_most_used']} "
            f"(capacity {a.capacity}), over capacity {check['watchers_over_capacity']}, below 0 "
            f"{check['watchers_negative']}; refusals {check['refusals']}: "
            f"{'OK' if check['ok'] else 'NOT OK'}"
        )
    if not ok:
        print(
            f"\nincomplete jobs {incomplete}, unsettled rounds {unsettled}, held {doc['held_ok']}"
        )
    write_json(
        a.json,
        {
            "benchmark": "slot_store",
            "timestamp": timestamp(),
            "parameters": vars(a) | {"json": str(a.json), "logs": str(a.logs)},
            "environment": environment(repo=ROOT),
            "results": doc["medians"],
            "ratios": {
                f"{name}/{a.ways[0]}": {
                    k: ratio(m[k], doc["medians"][a.ways[0]][k]) for k, _ in FIGURES
                }
                for name, m in doc["medians"].items()
                if name != a.ways[0]
            },
            "bytes_per_write": doc["bytes_per_write"],
            "rounds": doc["rounds"],
            "checks": doc["checks"],
            "incomplete_jobs": incomplete,
            "ok": ok,
        },
    )
    print(f"\nJSON: {a.json}")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
