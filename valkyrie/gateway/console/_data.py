"""What the console shows, read so that it stays cheap with 10,000 runners and 100,000 jobs.

* the queue: the ledger's groups (one small KV entry per dispatcher) and a page of held jobs from
  the dispatchers themselves (``<prefix>.jobs.queue``), never a scan of the jobs bucket;
* recent jobs: a window at the end of the jobs bucket's stream, read backwards in chunks (the
  bucket keeps one revision per job, so the latest sequences are the jobs that changed last), at
  most :data:`SCAN_BUDGET` records per page however large the bucket;
* runners: the runners bucket, read once and shared for :data:`RUNNERS_TTL_S` by every page view;
* a job: its record, its events (the events stream filtered on the job's subject, from its
  submission on), the first :data:`MAX_LOG_BATCHES` batches of its log lines.
"""

from __future__ import annotations

import datetime as dt
import time
import weakref
from dataclasses import dataclass

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas import (
    Event,
    JobLog,
    JobRecord,
    JobState,
    QueuedJob,
    QueueListing,
    QueueListRequest,
    QueueSnapshot,
    RunnerRecord,
)
from valkyrie.bus.codec import JOB_DECODER, RUNNER_DECODER, encode
from valkyrie.bus.connection import Bus
from valkyrie.bus.snapshot import read_stored
from valkyrie.domain.identity import attempt_runners, log_refusal
from valkyrie.domain.scheduling.listing import merge_listings
from valkyrie.errors import BusError
from valkyrie.gateway._context import Gateway
from valkyrie.gateway._kvread import bucket_values, stream_events
from valkyrie.runtime.queue_ledger import FRESH_MS, QueueLedger

__all__ = [
    "MAX_LOG_BATCHES",
    "RUNNERS_TTL_S",
    "SCAN_BUDGET",
    "JobsPage",
    "QueuePage",
    "job_events",
    "job_logs",
    "queue_page",
    "recent_jobs",
    "runners",
]

#: jobs-bucket records one page of recent jobs reads at most (filters that match rarely stop here)
SCAN_BUDGET = 5_000
_CHUNK = 500
#: how long one read of the runners bucket serves every console page
RUNNERS_TTL_S = 2.0
MAX_LOG_BATCHES = 200
MAX_EVENTS = 500
_LISTING = msgspec.json.Decoder(QueueListing)
_LOG = msgspec.json.Decoder(JobLog)


@dataclass(frozen=True)
class QueuePage:
    """The queue: the installation's ledger and one page of held jobs."""

    ledger: QueueSnapshot
    jobs: list[QueuedJob]
    matching: int
    more: bool
    answered: int
    errors: list[str]


async def _listings(
    bus: Bus, request: QueueListRequest, *, expect: int, timeout_s: float
) -> list[QueueListing]:
    """Every dispatcher's answer (stops once ``expect`` answered, or after ``timeout_s``)."""
    nc = bus.nc
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    answers: list[QueueListing] = []
    try:
        await nc.publish(bus.names.queue_list, encode(request), reply=inbox)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if 0 < expect <= len(answers):
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            if not msg.data:
                break  # no responders: no dispatcher runs
            try:
                answers.append(_LISTING.decode(msg.data))
            except msgspec.DecodeError:
                continue
            if expect <= len(answers) - 1 or expect == 0:
                # more answers than the ledger knew of: a short grace for any others
                deadline = min(deadline, time.monotonic() + 0.2)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await sub.unsubscribe()
    return answers


async def queue_page(gateway: Gateway, request: QueueListRequest) -> QueuePage:
    """The ledger and a page of the held jobs that match ``request`` (its ``limit`` jobs)."""
    ledger = QueueLedger()
    with anyio.move_on_after(min(2.0, gateway.timeout_s)):
        async with anyio.create_task_group() as tg:
            await tg.start(ledger.follow, gateway.bus)
            tg.cancel_scope.cancel()
    total = ledger.total()
    ask = msgspec.structs.replace(request, limit=request.limit + 1)
    expect = sum(1 for s in ledger.snapshots.values() if total.at_ms - s.at_ms <= FRESH_MS)
    answers = await _listings(
        gateway.bus, ask, expect=expect, timeout_s=min(3.0, gateway.timeout_s)
    )
    jobs, matching, more = merge_listings(answers, request.limit)
    return QueuePage(
        ledger=total,
        jobs=jobs,
        matching=matching,
        more=more,
        answered=len(answers),
        errors=[f"{a.instance}: {a.error}" for a in answers if a.error],
    )


@dataclass(frozen=True)
class JobsPage:
    """Recently changed jobs, newest first, and where the next (older) page starts."""

    jobs: list[JobRecord]
    before: int | None
    scanned: int


async def _window(bus: Bus, stream: str, subject: str, start: int, end: int) -> list[Msg]:
    """The messages of ``stream`` with ``start <= seq < end`` (an ephemeral pull consumer)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    out: list[Msg] = []
    psub = await bus.js.pull_subscribe(subject, stream=stream, config=config)
    consumer: str | None = None
    try:
        info = await psub.consumer_info()
        consumer = info.name
        remaining = min(int(info.num_pending or 0), end - start)
        while remaining > 0:
            try:
                msgs = await psub.fetch(batch=min(remaining, 256), timeout=5.0)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                if msg.metadata.sequence.stream >= end:
                    return out
                out.append(msg)
            remaining -= len(msgs)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            await psub.unsubscribe()
            if consumer is not None:
                await bus.js.delete_consumer(stream, consumer)
    return out


async def recent_jobs(
    bus: Bus, *, before: int | None, limit: int, states: set[JobState] | None
) -> JobsPage:
    """Up to ``limit`` jobs that changed last (before stream sequence ``before``), newest first."""
    name = bus.names.bucket("jobs")
    stream = f"KV_{name}"
    try:
        info = await bus.js.stream_info(stream)
        first, last = int(info.state.first_seq or 1), int(info.state.last_seq or 0)
        end = min(before, last + 1) if before is not None else last + 1
        found: list[tuple[int, JobRecord]] = []
        scanned = 0
        while end > first and len(found) < limit and scanned < SCAN_BUDGET:
            start = max(first, end - _CHUNK)
            msgs = await _window(bus, stream, f"$KV.{name}.>", start, end)
            scanned += end - start
            for msg in reversed(msgs):
                if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                    continue
                try:
                    record = JOB_DECODER.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                if states is None or record.state in states:
                    found.append((int(msg.metadata.sequence.stream), record))
            end = start
    except (nats.errors.Error, nats.js.errors.Error) as e:
        raise BusError(f"reading recent jobs failed: {e!r}") from e
    page = found[:limit]
    if len(found) > limit:
        next_before: int | None = page[-1][0]
    else:
        next_before = end if end > first else None
    return JobsPage(jobs=[r for _, r in page], before=next_before, scanned=scanned)


#: per connection (one per gateway): when the runners were read, and the records
_RUNNERS: weakref.WeakKeyDictionary[object, tuple[float, list[RunnerRecord]]] = (
    weakref.WeakKeyDictionary()
)


async def runners(gateway: Gateway) -> list[RunnerRecord]:
    """Every runner record, by id (one read of the bucket serves every page for a moment)."""
    cached = _RUNNERS.get(gateway.bus.nc)
    if cached is not None and time.monotonic() - cached[0] < RUNNERS_TTL_S:
        return cached[1]
    records = await bucket_values(gateway.bus, "runners", RUNNER_DECODER)
    records.sort(key=lambda r: r.registration.runner_id)
    _RUNNERS[gateway.bus.nc] = (time.monotonic(), records)
    return records


async def job_events(bus: Bus, record: JobRecord) -> tuple[list[tuple[int, Event]], bool]:
    """The job's events, oldest first (at most :data:`MAX_EVENTS`), and whether cut short."""
    since = dt.datetime.fromtimestamp(record.submitted_at_ms / 1000 - 1, tz=dt.UTC)
    return await stream_events(bus, f"job.{record.id}.>", since=since, limit=MAX_EVENTS)


async def job_logs(bus: Bus, record: JobRecord) -> tuple[list[JobLog], bool]:
    """The job's first :data:`MAX_LOG_BATCHES` log messages (batches of lines); more follow?

    Only lines of the runner each attempt was given to: any runner may publish under its own id
    for any job id, so only the subjects of the job's runners are read, and a batch counts only
    for an attempt its runner was given (``jobs logs`` applies the same rule).
    """
    runners = attempt_runners(record)
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0
    )
    found: list[tuple[int, JobLog]] = []
    truncated = False
    for runner_id in sorted(set(runners.values())):
        raw, cut = await read_stored(
            bus,
            bus.names.stream("logs"),
            bus.names.logs(runner_id, record.id),
            config,
            limit=MAX_LOG_BATCHES,
        )
        truncated = truncated or cut
        for seq, data, _headers in raw:
            try:
                batch = _LOG.decode(data)
            except msgspec.DecodeError:
                continue
            if log_refusal(runner_id, batch.runner_id, batch.attempt, runners) is None:
                found.append((seq, batch))
    found.sort(key=lambda item: item[0])
    if len(found) > MAX_LOG_BATCHES:
        found, truncated = found[:MAX_LOG_BATCHES], True
    return [batch for _, batch in found], truncated
