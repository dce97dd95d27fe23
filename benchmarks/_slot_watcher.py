"""A watcher process for ``benchmarks/slot_store.py``: what every worker process's runner view does.

It follows each way's bucket with ``valkyrie.bus.kv.watch_kv`` (as ``RunnerView.watch`` does),
decodes every value with the way's decoder and keeps the latest per key by revision. From what it
decodes it also checks the capacity bound independently of the writer: the slots each runner
uses after every change (``assigned_jobs``, the slot record's jobs, the count, the live slot-index
keys) never above ``--capacity`` and never below 0. It answers ``<subject>`` requests with its
figures as JSON, per bucket: changes seen, slots used now, the most used at once, violations.

    python -m benchmarks._slot_watcher --url URL --subject S --capacity C --bucket WAY=BUCKET ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
import nats
import uvloop

from benchmarks._slot_ways import DECODERS, SlotCount, SlotRecord, slot_index
from schemas import RunnerRecord
from valkyrie.bus.kv import watch_kv


@dataclass
class Follow:
    """One bucket as this watcher sees it."""

    way: str
    capacity: int
    started: bool = False
    changes: int = 0
    #: the highest revision seen, and revisions never delivered: a bucket of history 1 drops a
    #: key's revision when the next is written, so a watcher that lags skips it (its view still
    #: ends at the latest value, but did not decode, or check, that state)
    last_revision: int = 0
    skipped: int = 0
    undecodable: int = 0
    most_used: int = 0
    over_capacity: int = 0
    negative: int = 0
    revisions: dict[str, int] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    #: slot-keys: the indices held per runner
    live: dict[str, set[int]] = field(default_factory=dict)

    def apply(self, key: str, value: bytes | None, revision: int) -> None:
        """One change: decoded, kept if newer, the runner's used slots checked."""
        self.changes += 1
        if self.started and revision > self.last_revision + 1:
            self.skipped += revision - self.last_revision - 1
        self.last_revision = max(self.last_revision, revision)
        if self.revisions.get(key, 0) >= revision:
            return
        self.revisions[key] = revision
        decoded: Any = None
        if value is not None:
            try:
                decoded = DECODERS[self.way].decode(value)
            except msgspec.DecodeError:
                self.undecodable += 1
                return
        self.values[key] = decoded
        if self.way == "slot-keys":
            runner, n = slot_index(key)
            live = self.live.setdefault(runner, set())
            if decoded is None:
                live.discard(n)
            else:
                live.add(n)
            if n >= self.capacity:
                self.over_capacity += 1
            self._used(runner, len(live))
            return
        if isinstance(decoded, RunnerRecord):
            self._used(key, len(decoded.assigned_jobs))
        elif isinstance(decoded, SlotRecord):
            self._used(key, len(decoded.jobs))
        elif isinstance(decoded, SlotCount):
            self._used(key, decoded.used)

    def _used(self, runner: str, used: int) -> None:
        self.used[runner] = used
        self.most_used = max(self.most_used, used)
        if used > self.capacity:
            self.over_capacity += 1
        if used < 0:
            self.negative += 1

    def figures(self) -> dict[str, Any]:
        """What the benchmark asks for."""
        out = asdict(self)
        for bulky in ("revisions", "values", "used", "live"):
            del out[bulky]
        out["used_now"] = sum(self.used.values())
        return out


async def _follow(nc: Any, follow: Follow, bucket: str) -> None:
    kv = await nc.jetstream().key_value(bucket)

    def started() -> None:
        follow.started = True

    changes = watch_kv(kv, started=started)
    async with contextlib.aclosing(changes):
        async for change in changes:
            follow.apply(change.key, change.value, change.revision)


async def main(a: argparse.Namespace) -> None:
    """Follow every bucket and answer requests until SIGTERM."""
    nc = await nats.connect(a.url, name=a.subject)
    follows: dict[str, Follow] = {}
    tasks = []
    for spec in a.bucket:
        way, bucket = spec.split("=", 1)
        follows[way] = Follow(way, a.capacity)
        tasks.append(asyncio.create_task(_follow(nc, follows[way], bucket)))

    async def answer(msg: Any) -> None:
        body = {way: f.figures() for way, f in follows.items()}
        await msg.respond(json.dumps(body).encode())

    await nc.subscribe(a.subject, cb=answer)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--capacity", type=int, required=True)
    parser.add_argument("--bucket", action="append", default=[], help="WAY=BUCKET, repeated")
    uvloop.run(main(parser.parse_args()))
