"""Ways of keeping a runner's slots, for ``benchmarks/slot_store.py``.

Every way claims a slot for a job on a runner (never more than the runner's capacity) and frees
it again, each a write to a KV bucket of history 1 that every watcher process is delivered:

* ``record`` (Valkyrie today): compare-and-set of the runner's whole ``RunnerRecord``
  (registration, state, stats and ``assigned_jobs``), with the domain's ``assign_slot`` and
  ``release_slot`` (which also folds the outcome into the runner's stats) through
  ``valkyrie.bus.kv.cas_update``, as ``claim_slot`` and ``JobOps.release`` do.
* ``slot-record``: the same compare-and-set of a small per-runner record holding only
  ``{job_id: attempt}``: the registration, state and stats stay in the runners bucket.
* ``counter``: compare-and-set of a per-runner count of used slots. Which job holds a slot is
  not kept, so a release cannot be made idempotent (a redelivered completion frees twice) and the
  supervisor's orphan repair and take-back have nothing to check against.
* ``slot-keys``: one key per slot *index*, ``<runner>.<n>`` for ``n < capacity``, created
  (compare-and-set on the revision the index last had: 0, or its delete marker's) holding the job
  and attempt, and deleted on release. The bound holds by construction, without any shared key.
  One key per *job* (``<runner>.<job>``) cannot keep it: two claimers that both see
  ``capacity - 1`` live keys both create theirs; counting from a watch cannot close that race.

Claims take a per-runner lock of this process (as ``claim_slot`` does), releases do not (as
``JobOps.release``); claims and releases share one cache of the latest revisions this process
wrote or read (``known``), like one worker process's ``RunnerView``. A conflict is a write that
lost its compare-and-set: the way reads the key again and retries.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import Header
from nats.js.kv import KeyValue

from schemas import (
    RunnerCapabilities,
    RunnerLocation,
    RunnerRecord,
    RunnerRegistration,
    RunnerResources,
    RunnerState,
    RunnerStats,
    SafeDecoder,
)
from valkyrie.bus.acked import acked_publisher
from valkyrie.bus.codec import RUNNER_DECODER, encode, now_ms
from valkyrie.bus.kv import Versioned, cas_update, get_versioned, kv_write
from valkyrie.domain.lifecycle import assign_slot, release_slot
from valkyrie.errors import BusError

__all__ = [
    "DECODERS",
    "WAYS",
    "SlotCount",
    "SlotHolder",
    "SlotRecord",
    "Store",
    "Tally",
    "claim_many",
    "read_used",
    "release_many",
    "run_jobs",
    "runner_record",
    "slot_index",
]


class SlotRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A runner's slots alone (``slot-record``): job id -> attempt."""

    jobs: dict[str, int] = msgspec.field(default_factory=dict)


class SlotCount(msgspec.Struct, frozen=True, kw_only=True):
    """How many of a runner's slots are used (``counter``)."""

    used: int = 0


class SlotHolder(msgspec.Struct, frozen=True, kw_only=True):
    """Who holds one slot index (``slot-keys``)."""

    job_id: str
    attempt: int


#: the decoder a watcher uses for each way's values
DECODERS: dict[str, SafeDecoder[Any]] = {
    "record": RUNNER_DECODER,
    "slot-record": SafeDecoder(SlotRecord),
    "counter": SafeDecoder(SlotCount),
    "slot-keys": SafeDecoder(SlotHolder),
}
WAYS = tuple(DECODERS)
_KV_OPERATION = "KV-Operation"


def slot_index(key: str) -> tuple[str, int]:
    """``<runner>.<n>`` -> (runner, n) for ``slot-keys``."""
    runner, _, n = key.rpartition(".")
    return runner, int(n)


def runner_record(runner_id: str, capacity: int) -> RunnerRecord:
    """A registered runner's record about as big as a real one (before any slot is taken)."""
    now = now_ms()
    registration = RunnerRegistration(
        runner_id=runner_id,
        capabilities=RunnerCapabilities(
            job_types=["build", "test", "lint"],
            languages=["python", "go", "rust"],
            frameworks=["pytest", "cargo"],
            custom={"cache": "warm"},
        ),
        resources=RunnerResources(cpu_cores=16.0, memory_mb=65536, storage_gb=500.0),
        max_concurrent_jobs=capacity,
        location=RunnerLocation(region="eu-west", zone="eu-west-1b", datacenter="dc3"),
        labels={"os": "linux", "arch": "x64", "pool": "ci"},
        metadata={"hostname": f"{runner_id}.ci.example", "version": "1.4.2"},
        heartbeat_interval_ms=1000,
        session_id=f"s{runner_id[-4:]}0001",
    )
    return RunnerRecord(
        registration=registration,
        state=RunnerState.ACTIVE,
        registered_at_ms=now,
        last_heartbeat_at_ms=now,
        load=0.25,
        stats=RunnerStats(jobs_completed=1200, jobs_failed=31, success_rate=0.97),
    )


@dataclass
class Tally:
    """What the client did: writes, value bytes, conflicts, reads, refusals; the slots it holds."""

    writes: int = 0
    value_bytes: int = 0
    conflicts: int = 0
    reads: int = 0
    refusals: int = 0
    errors: list[str] = field(default_factory=list)
    #: slots held per runner as this client sees them, and the most ever held at once
    held: dict[str, int] = field(default_factory=dict)
    most_held: int = 0


class Store:
    """One way's claim and release over its bucket, with the process's cache of revisions."""

    def __init__(
        self, way: str, nc: NatsClient, kv: KeyValue, bucket: str, capacity: int, tally: Tally
    ) -> None:
        self.way, self.kv, self.capacity, self.tally = way, kv, capacity, tally
        self._nc, self._prefix = nc, f"$KV.{bucket}."
        #: add each value's encoded size to ``tally.value_bytes`` (an extra encode: unmeasured
        #: rounds only)
        self.count_bytes = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._known: dict[str, Versioned[Any]] = {}
        #: slot-keys: runner -> index -> (revision, holder or None when free)
        self._slots: dict[str, dict[int, tuple[int, SlotHolder | None]]] = {}

    async def create(self, runner: str) -> None:
        """The runner's initial state (a registered runner with every slot free)."""
        initial: msgspec.Struct | None = {
            "record": runner_record(runner, self.capacity),
            "slot-record": SlotRecord(),
            "counter": SlotCount(),
        }.get(self.way)
        if initial is None:  # slot-keys: no key until a slot is taken
            self._slots[runner] = dict.fromkeys(range(self.capacity), (0, None))
            return
        revision = await kv_write(self.kv, runner, encode(initial), last=0, ttl=None)
        self._known[runner] = Versioned(initial, revision)

    async def _cas(
        self, runner: str, decoder: SafeDecoder[Any], decide: Callable[[Any], Any]
    ) -> tuple[Versioned[Any] | None, bool]:
        attempts = decisions = 0

        def counted(current: Any) -> Any:
            nonlocal attempts, decisions
            decisions += 1
            new = decide(current)
            if new is not None:
                attempts += 1
                if self.count_bytes:
                    self.tally.value_bytes += len(encode(new))
            return new

        known = self._known.get(runner)
        latest, written = await cas_update(self.kv, runner, decoder, counted, known=known)
        self.tally.writes += attempts
        self.tally.conflicts += attempts - (1 if written else 0)
        # every decision but the one on ``known`` was on a record read from the server
        self.tally.reads += decisions - (1 if known is not None else 0)
        if latest is not None:
            current = self._known.get(runner)
            if current is None or current.revision < latest.revision:
                self._known[runner] = latest
        return latest, written

    async def claim(self, runner: str, job_id: str, attempt: int) -> bool:
        """Take a slot on ``runner`` for the job; ``False`` when the runner is full."""
        lock = self._locks.setdefault(runner, asyncio.Lock())
        async with lock:
            if self.way == "slot-keys":
                return await self._claim_key(runner, job_id, attempt)
            decide, decoder = self._claimer(job_id, attempt)
            latest, written = await self._cas(runner, decoder, decide)
        if self.way == "counter":  # nothing else says the slot is ours
            return written
        return latest is not None and _holds(self.way, latest.value, job_id, attempt)

    def _claimer(self, job_id: str, attempt: int) -> tuple[Callable[[Any], Any], SafeDecoder[Any]]:
        capacity = self.capacity
        if self.way == "record":
            return (
                lambda r: (
                    None
                    if r.assigned_jobs.get(job_id) == attempt
                    else assign_slot(r, job_id, attempt)
                )
            ), RUNNER_DECODER
        if self.way == "slot-record":

            def take(r: SlotRecord) -> SlotRecord | None:
                if job_id in r.jobs or len(r.jobs) >= capacity:
                    return None
                return SlotRecord(jobs={**r.jobs, job_id: attempt})

            return take, DECODERS[self.way]
        # counter: nothing says whether this job holds a slot already
        return (lambda c: SlotCount(used=c.used + 1) if c.used < capacity else None), DECODERS[
            self.way
        ]

    async def release(self, runner: str, job_id: str, attempt: int) -> bool:
        """Free the job's slot on ``runner``; whether this call freed it."""
        if self.way == "slot-keys":
            return await self._release_key(runner, job_id, attempt)
        decide: Callable[[Any], Any]
        if self.way == "record":
            decide = lambda r: release_slot(  # noqa: E731 - as JobOps.release calls it
                r, job_id, attempt, succeeded=True, accept_latency_ms=12.5
            )
        elif self.way == "slot-record":
            decide = lambda r: (  # noqa: E731
                SlotRecord(jobs={k: v for k, v in r.jobs.items() if k != job_id})
                if r.jobs.get(job_id) == attempt
                else None
            )
        else:  # counter: a second release of the same job would free someone else's slot
            decide = lambda c: SlotCount(used=c.used - 1) if c.used > 0 else None  # noqa: E731
        decoder = RUNNER_DECODER if self.way == "record" else DECODERS[self.way]
        _, written = await self._cas(runner, decoder, decide)
        return written

    # -- slot-keys ----------------------------------------------------------------------------------

    async def _claim_key(self, runner: str, job_id: str, attempt: int) -> bool:
        slots = self._slots[runner]
        if any(h == SlotHolder(job_id=job_id, attempt=attempt) for _, h in slots.values()):
            return True
        for n, (revision, holder) in sorted(slots.items()):
            if holder is not None:
                continue
            new = SlotHolder(job_id=job_id, attempt=attempt)
            payload = encode(new)
            self.tally.writes += 1
            if self.count_bytes:
                self.tally.value_bytes += len(payload)
            try:
                written = await kv_write(self.kv, f"{runner}.{n}", payload, last=revision, ttl=None)
            except nats.js.errors.KeyWrongLastSequenceError:
                self.tally.conflicts += 1
                slots[n] = await self._read_key(f"{runner}.{n}")
                continue
            slots[n] = (written, new)
            return True
        return False

    async def _read_key(self, key: str) -> tuple[int, SlotHolder | None]:
        self.tally.reads += 1
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyDeletedError as e:
            return int(getattr(e.entry, "revision", 0) or 0), None
        except nats.js.errors.KeyNotFoundError:
            return 0, None
        if not entry.value:
            return int(entry.revision or 0), None
        holder: SlotHolder = DECODERS["slot-keys"].decode(entry.value)
        return int(entry.revision or 0), holder

    async def _release_key(self, runner: str, job_id: str, attempt: int) -> bool:
        slots = self._slots[runner]
        mine = SlotHolder(job_id=job_id, attempt=attempt)
        for n, (revision, holder) in slots.items():
            if holder != mine:
                continue
            key = f"{runner}.{n}"
            # a delete marker written only if the slot is still the one this job took
            headers = {
                _KV_OPERATION: "DEL",
                Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(revision),
            }
            self.tally.writes += 1
            try:
                ack = await acked_publisher(self._nc).publish(self._prefix + key, b"", headers)
            except nats.js.errors.APIError as e:
                self.tally.conflicts += 1
                self.tally.errors.append(f"release {key}: {e}")
                slots[n] = await self._read_key(key)
                return False
            slots[n] = (int(ack.seq), None)
            return True
        return False


def _holds(way: str, value: Any, job_id: str, attempt: int) -> bool:
    slots = value.assigned_jobs if way == "record" else value.jobs
    return bool(slots.get(job_id) == attempt)


#: how often a claim or release that lost every compare-and-set to other writers is tried again
PATIENCE = 50


async def _patiently(step: Callable[[], Awaitable[bool]]) -> bool:
    """``step()``, tried again when it gave up on a key that kept changing (``BusError``).

    Valkyrie's handlers get the same from redelivery: a release that lost its compare-and-sets
    to a burst of claims on the same runner is retried, never dropped (a quick run's eight runners
    and 64 jobs in flight make such bursts common).
    """
    for attempt in range(PATIENCE):
        try:
            return await step()
        except BusError:
            if attempt == PATIENCE - 1:
                raise
            await asyncio.sleep(0.001 * (attempt + 1))
    return False  # not reached: the last attempt raises


async def _place(store: Store, runners: list[str], start: int, job_id: str) -> str:
    """Claim a slot on the first runner from ``start`` on that has one, waiting if all are full."""
    tally = store.tally
    while True:
        for k in range(len(runners)):
            runner = runners[(start + k) % len(runners)]
            if await _patiently(functools.partial(store.claim, runner, job_id, 1)):
                held = tally.held.get(runner, 0) + 1
                tally.held[runner] = held
                tally.most_held = max(tally.most_held, held)
                return runner
            tally.refusals += 1
        await asyncio.sleep(0.001)


async def run_jobs(
    store: Store,
    runners: list[str],
    jobs: list[str],
    concurrency: int,
    *,
    hold: Callable[[str, str], Awaitable[None]] | None = None,
) -> int:
    """Claim then release a slot for each job, ``concurrency`` jobs in flight; how many did both.

    ``hold(job, runner)``: called between claim and release (default: release at once).
    """
    cursor = itertools.count()
    done = 0
    tally = store.tally

    async def worker() -> None:
        nonlocal done
        while (i := next(cursor)) < len(jobs):
            job = jobs[i]
            try:
                runner = await _place(store, runners, i, job)
                if hold is not None:
                    await hold(job, runner)
                tally.held[runner] -= 1
                if not await _patiently(functools.partial(store.release, runner, job, 1)):
                    raise RuntimeError(f"the slot of {job} on {runner} was not held")
                done += 1
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                if len(tally.errors) < 20:
                    tally.errors.append(f"{store.way} {job}: {type(e).__name__}: {e}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def claim_many(store: Store, runner: str, jobs: list[str]) -> int:
    """Claim a slot for each of ``jobs`` on ``runner`` (the long-running ones); how many got one."""
    got = 0
    for job in jobs:
        got += await store.claim(runner, job, 1)
    return got


async def release_many(store: Store, runner: str, jobs: list[str]) -> int:
    """Release each of ``jobs`` on ``runner``; how many were released."""
    freed = 0
    for job in jobs:
        freed += await store.release(runner, job, 1)
    return freed


async def read_used(kv: KeyValue, way: str, runners: list[str]) -> dict[str, int]:
    """Slots used per runner as the server holds them now (the final invariant check)."""
    used = dict.fromkeys(runners, 0)
    if way == "slot-keys":
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return used
        for key in keys:
            runner, _ = slot_index(key)
            used[runner] = used.get(runner, 0) + 1
        return used
    decoder = RUNNER_DECODER if way == "record" else DECODERS[way]
    for runner in runners:
        got = await get_versioned(kv, runner, decoder)
        value = got.value if got is not None else None
        if isinstance(value, RunnerRecord):
            used[runner] = len(value.assigned_jobs)
        elif isinstance(value, SlotRecord):
            used[runner] = len(value.jobs)
        elif isinstance(value, SlotCount):
            used[runner] = value.used
    return used
