"""Ways of storing a job's state and its lifecycle events, for ``benchmarks/event_store.py``.

Every way writes the same job record four times to a KV bucket by compare-and-set (created
``queued``, then ``dispatched``, ``accepted``, ``succeeded``: each write carries the revision of the
previous one) and leaves four durable events behind. They differ in how the events get stored:

* ``client-events``: Valkyrie's contract today: the client publishes each event with a
  ``Nats-Msg-Id`` to a limits stream and confirms a step's events together before the step ends
  (``valkyrie.bus.outbox.Outbox``), on the shared reply subscription of ``valkyrie.bus.acked``.
* ``server-derived``: the KV writes carry the event kind and id in headers; an events stream
  *sources* the bucket's stream with a subject transform, so the server stores the event.
* ``atomic-batch``: a step's two events go as one JetStream atomic batch (ADR-50): the first
  without a reply, the commit acked.

``server-derived-h4`` is the derived way over a bucket that keeps every revision of a job (history
4 instead of Valkyrie's 1); the ``-memory`` ways keep bucket and events in memory (not durable)
to show what share of a cost is the file store.

A step is what one Valkyrie handler does for one message: intake with its dispatcher (created and
dispatched) and the results handler (accepted and succeeded).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)

from valkyrie.bus.acked import AckedPublisher, PubAck, acked_publisher

__all__ = [
    "DEFAULT_WAYS",
    "KINDS",
    "WAYS",
    "Way",
    "Wire",
    "derived_lag",
    "provision",
    "read_derived",
    "run_jobs",
    "source_start",
]

#: the lifecycle, one KV write and one event each
KINDS = ("queued", "dispatched", "accepted", "succeeded")
#: the header that names the event a KV write stands for (server-derived)
EVENT_HEADER = "Valkyrie-Event"
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
#: the key, and event kind, of the writes that wait for the source to run
PROBE = "probe"
#: events streams are limits streams like Valkyrie's EVENTS; modest size, far above a run's needs
EVENTS_MAX_BYTES = 256 * 1024 * 1024
ACK_TIMEOUT_S = 10.0


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """About the size and shape of Valkyrie's job record."""

    id: str
    state: str
    runner: str = "runner-0007"
    labels: dict[str, str] = msgspec.field(default_factory=lambda: {"os": "linux", "arch": "x64"})
    image: str = "registry.example/ci/python:3.11"
    command: list[str] = msgspec.field(default_factory=lambda: ["pytest", "-q", "tests/"])
    attempt: int = 1
    submitted_ms: int = 0
    updated_ms: int = 0


class EventEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """About the size and shape of Valkyrie's event envelope."""

    id: str
    kind: str
    at_ms: int
    source: str
    data: dict[str, Any]


_ENCODE = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class Way:
    """One way of storing state and events: its names and whether events are derived."""

    name: str
    key: str  # short token for stream, bucket and subject names
    derived: bool = False
    batch: bool = False
    kv_history: int = 1
    #: memory storage for the bucket and the events (not durable: only to show where costs are)
    memory: bool = False

    @property
    def bucket(self) -> str:
        """The KV bucket of job records."""
        return f"es_{self.key}"

    @property
    def kv_stream(self) -> str:
        """The stream under the bucket."""
        return f"KV_{self.bucket}"

    @property
    def events_stream(self) -> str:
        """The stream holding the events."""
        return f"ES_{self.key.upper()}_EVENTS"

    def event_subject(self, job: str, kind: str) -> str:
        """Where an event is stored (derived events have no kind token: see the module doc)."""
        base = f"es.{self.key}.events.job.{job}"
        return base if self.derived else f"{base}.{kind}"


WAYS: dict[str, Way] = {
    w.name: w
    for w in (
        Way("client-events", "client"),
        Way("server-derived", "derived", derived=True),
        # the bucket keeps all four revisions of a job: the source can lag without missing one
        Way("server-derived-h4", "derivedh4", derived=True, kv_history=len(KINDS)),
        Way("atomic-batch", "batch", batch=True),
        # not run by default: memory storage, to show what the file store's share is
        Way("client-events-memory", "clientmem", memory=True),
        Way("atomic-batch-memory", "batchmem", batch=True, memory=True),
    )
}
#: what a run does unless told otherwise (the durable ways)
DEFAULT_WAYS = ("client-events", "server-derived", "server-derived-h4", "atomic-batch")


@dataclass
class Wire:
    """The client's side of the wire: acked publishes (round trips) and plain ones, counted."""

    nc: NatsClient
    acked: AckedPublisher = field(init=False)
    round_trips: int = 0
    publishes: int = 0
    errors: list[str] = field(default_factory=list)
    #: with a dict, when each KV write was sent and its ack seen, by event id (lag measurement)
    timing: dict[str, tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        self.acked = acked_publisher(self.nc)

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        """An acked publish, not awaited yet."""
        self.round_trips += 1
        self.publishes += 1
        return await self.acked.send(subject, payload, headers)

    async def fire(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        """A publish nobody answers."""
        self.publishes += 1
        await self.nc.publish(subject, payload, headers=headers)

    async def kv_write(
        self, way: Way, job: str, kind: str, last: int, headers: dict[str, str] | None = None
    ) -> int:
        """Compare-and-set of the job record; the new revision."""
        now = time.time_ns() // 1_000_000
        record = JobRecord(id=job, state=kind, submitted_ms=now, updated_ms=now)
        sent = time.perf_counter()
        future = await self.send(
            f"$KV.{way.bucket}.{job}",
            _ENCODE(record),
            {EXPECTED_LAST: str(last), **(headers or {})},
        )
        ack = await asyncio.wait_for(future, ACK_TIMEOUT_S)
        if self.timing is not None:
            self.timing[event_id(job, kind)] = (sent, time.perf_counter())
        return ack.seq


def event_id(job: str, kind: str) -> str:
    """The event's id, derived from what happened (as Valkyrie's are), so retries de-duplicate."""
    return f"{job}.{kind}.1"


def _envelope(job: str, kind: str) -> bytes:
    return _ENCODE(
        EventEnvelope(
            id=event_id(job, kind),
            kind=f"job.{kind}",
            at_ms=time.time_ns() // 1_000_000,
            source="bench",
            data={"job_id": job, "runner": "runner-0007", "attempt": 1},
        )
    )


async def _confirm(futures: list[asyncio.Future[PubAck]]) -> None:
    await asyncio.wait_for(asyncio.gather(*futures), ACK_TIMEOUT_S)


async def _client_events(wire: Wire, way: Way, job: str) -> None:
    rev = 0
    for step in (KINDS[:2], KINDS[2:]):
        pending = []
        for kind in step:
            rev = await wire.kv_write(way, job, kind, rev)
            subject = way.event_subject(job, kind)
            headers = {"Nats-Msg-Id": event_id(job, kind)}
            pending.append(await wire.send(subject, _envelope(job, kind), headers))
        await _confirm(pending)  # the step's events are stored before its message would be acked


async def _server_derived(wire: Wire, way: Way, job: str) -> None:
    rev = 0
    for kind in KINDS:
        headers = {EVENT_HEADER: kind, "Nats-Msg-Id": event_id(job, kind)}
        rev = await wire.kv_write(way, job, kind, rev, headers)


async def _atomic_batch(wire: Wire, way: Way, job: str) -> None:
    rev = 0
    for n, step in enumerate((KINDS[:2], KINDS[2:])):
        for kind in step:
            rev = await wire.kv_write(way, job, kind, rev)
        # the batch's messages go back to back, so a connection holds at most one batch open
        # (the server allows 50 per stream)
        batch = f"{job}.{n}"
        last = len(step)
        future = None
        for seq, kind in enumerate(step, 1):
            headers = {
                "Nats-Batch-Id": batch,
                "Nats-Batch-Sequence": str(seq),
                "Nats-Msg-Id": event_id(job, kind),
            }
            subject, payload = way.event_subject(job, kind), _envelope(job, kind)
            if seq < last:
                await wire.fire(subject, payload, headers)
            else:
                headers["Nats-Batch-Commit"] = "1"
                future = await wire.send(subject, payload, headers)
        assert future is not None
        await _confirm([future])


def _lifecycle(way: Way) -> Callable[[Wire, Way, str], Awaitable[None]]:
    if way.derived:
        return _server_derived
    return _atomic_batch if way.batch else _client_events


async def run_jobs(wire: Wire, way: Way, jobs: list[str], concurrency: int) -> int:
    """Each job's whole lifecycle, ``concurrency`` jobs in flight; how many completed."""
    lifecycle = _lifecycle(way)
    cursor = itertools.count()
    done = 0

    async def worker() -> None:
        nonlocal done
        while (i := next(cursor)) < len(jobs):
            try:
                await lifecycle(wire, way, jobs[i])
                done += 1
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                if len(wire.errors) < 20:
                    wire.errors.append(f"{way.name} {jobs[i]}: {type(e).__name__}: {e}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


async def provision(js: JetStreamContext, way: Way) -> None:
    """The way's bucket and events stream."""
    storage = StorageType.MEMORY if way.memory else StorageType.FILE
    await js.create_key_value(
        KeyValueConfig(bucket=way.bucket, history=way.kv_history, storage=storage, direct=True)
    )
    common: dict[str, Any] = {
        "name": way.events_stream,
        "retention": RetentionPolicy.LIMITS,
        "discard": DiscardPolicy.OLD,
        "storage": storage,
        "num_replicas": 1,
        "duplicate_window": 120.0,
        "max_bytes": EVENTS_MAX_BYTES,
    }
    if way.derived:
        transform = SubjectTransform(
            src=f"$KV.{way.bucket}.*", dest=way.event_subject("{{wildcard(1)}}", "")
        )
        source = StreamSource(name=way.kv_stream, subject_transforms=[transform])
        await js.add_stream(StreamConfig(sources=[source], **common))
    else:
        await js.add_stream(
            StreamConfig(subjects=[f"es.{way.key}.events.>"], allow_atomic=way.batch, **common)
        )


@dataclass
class DerivedCheck:
    """What the derived events stream holds, against what the KV writes should have left."""

    expected: int
    stored: int = 0
    jobs_complete: int = 0
    jobs_incomplete: int = 0
    out_of_order: int = 0
    missing_headers: int = 0
    wrong_subject: int = 0
    probe_events: int = 0  # written by source_start, not counted in ``stored``
    #: jobs with events missing, by the part of the run (``w`` warm-up, ``r0``.. rounds, ``lag``)
    incomplete_by_part: dict[str, int] = field(default_factory=dict)
    first_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exactly one event per write, every job's in order, headers kept."""
        return (
            self.stored == self.expected
            and self.jobs_incomplete == self.out_of_order == 0
            and self.missing_headers == self.wrong_subject == 0
        )


async def read_derived(js: JetStreamContext, way: Way, jobs: list[str]) -> DerivedCheck:
    """Read the whole derived stream and check it event by event (``jobs``: every job run)."""
    check = DerivedCheck(expected=len(KINDS) * len(jobs))
    seen: dict[str, list[str]] = {}
    sub = await js.pull_subscribe(
        way.event_subject("*", ""),
        durable=None,
        stream=way.events_stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE),
    )
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except TimeoutError:
                break
            for msg in msgs:
                headers = msg.headers or {}
                kind, eid = headers.get(EVENT_HEADER), headers.get("Nats-Msg-Id")
                job = msg.subject.rsplit(".", 1)[-1]
                if kind == PROBE:
                    check.probe_events += 1
                    continue
                check.stored += 1
                if kind is None or eid != event_id(job, kind):
                    check.missing_headers += 1
                    continue
                if msg.subject != way.event_subject(job, ""):
                    check.wrong_subject += 1
                seen.setdefault(job, []).append(kind)
    finally:
        await sub.unsubscribe()
    for job in jobs:
        kinds = seen.get(job, [])
        if tuple(kinds) == KINDS:
            check.jobs_complete += 1
        elif sorted(kinds) == sorted(KINDS):
            check.out_of_order += 1
        else:
            check.jobs_incomplete += 1
            part = job.split("-")[1]
            check.incomplete_by_part[part] = check.incomplete_by_part.get(part, 0) + 1
            if len(check.first_problems) < 5:
                check.first_problems.append(f"{job}: {kinds}")
    return check


async def derived_lag(
    nc: NatsClient, way: Way, jobs: list[str], concurrency: int
) -> tuple[dict[str, list[float]], int, Wire]:
    """Run ``jobs`` the server-derived way while a consumer follows the derived stream.

    For each write, in ms: ``write_to_ack`` (sent -> its ack seen by the writer),
    ``write_to_event`` (sent -> its derived event delivered to the consumer: an upper bound on
    when it became readable) and ``ack_to_event`` (their difference; negative when the event
    reached the consumer before the writer saw its ack). Also how many events arrived.
    """
    js = nc.jetstream()
    arrived: dict[str, float] = {}
    done = asyncio.Event()
    expected = len(KINDS) * len(jobs)

    async def on_event(msg: Any) -> None:
        eid = (msg.headers or {}).get("Nats-Msg-Id")
        if eid is not None:
            arrived[eid] = time.perf_counter()
        if len(arrived) >= expected:
            done.set()

    sub = await js.subscribe(
        way.event_subject("*", ""),
        stream=way.events_stream,
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    wire = Wire(nc, timing={})
    try:
        await run_jobs(wire, way, jobs, concurrency)
        try:
            await asyncio.wait_for(done.wait(), 10.0)
        except TimeoutError:
            pass
    finally:
        await sub.unsubscribe()
    lags: dict[str, list[float]] = {"write_to_ack": [], "write_to_event": [], "ack_to_event": []}
    for eid, (sent, acked) in (wire.timing or {}).items():
        lags["write_to_ack"].append((acked - sent) * 1000)
        if eid in arrived:
            lags["write_to_event"].append((arrived[eid] - sent) * 1000)
            lags["ack_to_event"].append((arrived[eid] - acked) * 1000)
    return lags, len(arrived), wire


async def source_start(js: JetStreamContext, wire: Wire, way: Way) -> dict[str, float]:
    """Write a probe key until its first event shows up in the derived stream (right after the
    stream was created); how many writes that took, how many events the stream kept, and ms."""
    start, writes, rev = time.perf_counter(), 0, 0
    deadline = start + 10.0
    while time.perf_counter() < deadline:
        headers = {EVENT_HEADER: PROBE, "Nats-Msg-Id": f"{PROBE}.{writes}"}
        rev = await wire.kv_write(way, PROBE, PROBE, rev, headers)
        writes += 1
        if (await js.stream_info(way.events_stream)).state.messages:
            break
        await asyncio.sleep(0.001)
    ran_after_ms = (time.perf_counter() - start) * 1000
    await asyncio.sleep(0.2)  # let the source deliver what it still can
    kept = (await js.stream_info(way.events_stream)).state.messages
    return {
        "probe_writes": writes,
        "probe_events_kept": kept,
        "ms_until_first_event": round(ran_after_ms, 2),
    }
