"""KV compare-and-set cost in the client: nats-py's ``KeyValue.update`` against Valkyrie's path.

Valkyrie writes job and runner records with ``valkyrie.bus.kv.kv_write``: a publish whose ack
comes back on one shared reply subscription (``valkyrie.bus.acked``). This program measures, in one
run against one nats-server, the client CPU per write and the writes per second of both, with
``--concurrency`` writes in flight, and prints the ratio. Table on stdout, JSON to a file.

Run from the repository root::

    .venv/bin/python benchmarks/kv_write.py              # 4 rounds of 4,000 writes each way
    .venv/bin/python benchmarks/kv_write.py --writes 1000 --rounds 2
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import anyio  # noqa: E402
import nats  # noqa: E402
from nats.js.api import KeyValueConfig, StorageType  # noqa: E402
from nats.js.kv import KeyValue  # noqa: E402

from benchmarks._report import environment, ratio, render_table, timestamp, write_json  # noqa: E402
from valkyrie import NatsServer  # noqa: E402
from valkyrie.bus.kv import kv_write  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "kv_write.json"
VALUE = b"x" * 300

Write = Callable[[KeyValue, str, bytes, int], Awaitable[int]]


async def _nats_py(kv: KeyValue, key: str, value: bytes, last: int) -> int:
    return int(await kv.update(key, value, last=last))


async def _valkyrie(kv: KeyValue, key: str, value: bytes, last: int) -> int:
    return await kv_write(kv, key, value, last=last, ttl=None)


async def _round(
    kv: KeyValue, write: Write, keys: list[str], revs: dict[str, int], n: int
) -> dict[str, float]:
    """``n`` compare-and-sets spread over ``keys``, ``len(keys)`` in flight; CPU and wall time."""
    per_key = n // len(keys)

    async def worker(key: str) -> None:
        for _ in range(per_key):
            revs[key] = await write(kv, key, VALUE, revs[key])

    cpu, wall = time.process_time(), time.perf_counter()
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(worker, key)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    done = per_key * len(keys)
    return {"client_us_per_write": cpu / done * 1e6, "writes_per_s": done / wall}


async def run(url: str, writes: int, rounds: int, concurrency: int) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(
            KeyValueConfig(bucket="bench_kv_write", history=1, storage=StorageType.FILE)
        )
        keys = [f"k{i}" for i in range(concurrency)]
        revs = {key: int(await kv.put(key, VALUE)) for key in keys}
        samples: dict[str, list[dict[str, float]]] = {"nats-py": [], "valkyrie": []}
        for _ in range(rounds):  # alternate, so that machine noise falls on both alike
            samples["nats-py"].append(await _round(kv, _nats_py, keys, revs, writes))
            samples["valkyrie"].append(await _round(kv, _valkyrie, keys, revs, writes))
        return {
            name: {
                field: statistics.median(s[field] for s in rows)
                for field in ("client_us_per_write", "writes_per_s")
            }
            for name, rows in samples.items()
        }
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 0 when it completed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=4000, help="writes per round and path")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per path (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="writes in flight")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="valkyrie-bench-kv-") as tmp:
        server = NatsServer(store_dir=Path(tmp) / "nats", port=0, name="bench-kv-write")
        server.start()
        try:
            # on uvloop, as the worker processes run
            figures = anyio.run(
                run,
                server.url,
                a.writes,
                a.rounds,
                a.concurrency,
                backend_options={"use_uvloop": True},
            )
        finally:
            server.stop()
    raw, ours = figures["nats-py"], figures["valkyrie"]
    ratios = {
        "client_cpu": ratio(ours["client_us_per_write"], raw["client_us_per_write"]),
        "throughput": ratio(ours["writes_per_s"], raw["writes_per_s"]),
    }
    rows = [[name, f["client_us_per_write"], f["writes_per_s"]] for name, f in figures.items()]
    rows.append(["valkyrie/nats-py", ratios["client_cpu"], ratios["throughput"]])
    print(
        f"KV compare-and-set, {a.concurrency} in flight, {a.writes} writes x {a.rounds} rounds "
        "per path (medians)\n"
    )
    print(render_table(["path", "client µs/write", "writes/s"], rows))
    write_json(
        a.json,
        {
            "benchmark": "kv_write",
            "timestamp": timestamp(),
            "parameters": vars(a) | {"json": str(a.json)},
            "environment": environment(repo=ROOT),
            "results": figures,
            "ratios": ratios,
        },
    )
    print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
