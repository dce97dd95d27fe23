"""Raw-NATS dispatcher baseline: the least a JetStream dispatcher can do per job.

Run by ``benchmarks/dispatch.py`` as a subprocess (``python benchmarks/_raw_worker.py ...``). It binds
to a durable pull consumer on a work-queue stream the benchmark created and, per message: decodes the
job id, picks a runner round-robin, records the job with one KV compare-and-set (``kv.create``),
publishes the dispatch with one core publish on ``<prefix>.dispatch.<runner>``, and acks. Up to
``--concurrency`` messages are processed at once; each fetch asks for no more than the backlog
(the last message's ``num_pending`` + 1) and the free slots, with a short timeout, so a paced
trickle is fetched one message at a time and a backlog in large batches.

With ``--done-subject`` it does the least a durable lifecycle with capacity accounting can do (the
``raw-lifecycle`` baseline): before the job record it takes a slot on the runner's counter
(``slots.<runner>`` in the same bucket, one KV compare-and-set, re-read and retried on conflict,
never above ``--capacity``; with ``--partition i/N`` only on its share of the runners, so
several workers never contend for one counter); the dispatch carries the job record's revision; the receiving runner
reports completion with one core publish that a second work-queue stream captures; a second durable
pull consumer here moves the record to done (one compare-and-set on that revision), frees the slot
(one more) and acks. No events, no validation, no redelivery bookkeeping beyond the
compare-and-sets: a floor under a control plane that keeps the issue's guarantees, not a competitor.

With ``--events-subject`` it also keeps an event stream the way Valkyrie does: four events per job
(``queued`` and ``dispatched`` before the submission is acked, ``accepted`` and ``finished`` before
the completion is acked), each a JetStream publish with a ``Nats-Msg-Id`` (so a redelivery stores
no duplicate) whose ack comes back on one shared reply subscription (the cheapest acked publish in
Python we know: cheaper than nats-py's ``publish`` and ``publish_async``), both acks awaited before
the message's own ack.

``--loop uvloop`` runs it on uvloop, the loop Valkyrie's workers use when it is installed.
It answers core requests on ``<prefix>.ping`` once ready (with the name of its event loop), and stops cleanly on SIGTERM/SIGINT.
Self-contained on purpose: only nats-py, msgspec and anyio.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

_Work = Callable[[Msg], Awaitable[None]]


class _Job(msgspec.Struct):
    job_id: str


class _Dispatch(msgspec.Struct):
    job_id: str
    attempt: int
    runner_id: str
    spec: msgspec.Raw
    revision: int = 0


class _Done(msgspec.Struct):
    job_id: str
    revision: int
    runner_id: str


class _PubAck(msgspec.Struct):
    seq: int = 0
    error: dict[str, object] | None = None


class _Event(msgspec.Struct):
    kind: str
    job_id: str
    attempt: int
    runner_id: str
    at_ms: int


_FINAL = b'{"state":"done"}'


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--runners", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256, help="largest fetch")
    parser.add_argument("--fetch-timeout", type=float, default=0.25)
    parser.add_argument("--done-subject", default=None, help="completions to consume (lifecycle)")
    parser.add_argument("--done-stream", default=None)
    parser.add_argument("--done-durable", default=None)
    parser.add_argument("--capacity", type=int, default=50, help="slots per runner (lifecycle)")
    parser.add_argument(
        "--events-subject", default=None, help="publish four events per job under this prefix"
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (uvloop: as `python -m valkyrie worker` picks when installed)",
    )
    parser.add_argument(
        "--partition", default="0/1", help="INDEX/COUNT: the share of runners this worker places on"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    stop = anyio.Event()
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        if not stop.is_set():
            print(f"raw-worker: NATS error: {e!r}", file=sys.stderr, flush=True)

    nc = await nats.connect(
        args.url, name="raw-worker", error_cb=on_error, max_reconnect_attempts=-1, drain_timeout=5
    )
    js = nc.jetstream()
    kv = await js.key_value(args.bucket)
    psub = await js.pull_subscribe(args.subject, durable=args.durable, stream=args.stream)
    done_sub = (
        # bound, not subscribed by subject: a partition's consumer filters on its runners only
        await js.pull_subscribe_bind(durable=args.done_durable, stream=args.done_stream)
        if args.done_subject
        else None
    )
    index, count = (int(x) for x in args.partition.split("/"))
    # with several lifecycle workers each owns the runners whose number is its index modulo the
    # count: only it counts their slots, so the workers never contend for one counter
    runners = [f"r{i:04d}" for i in range(args.runners) if i % count == index]
    subjects = [f"{args.prefix}.dispatch.{r}" for r in runners]
    decoder = msgspec.json.Decoder(_Job)
    done_decoder = msgspec.json.Decoder(_Done)
    encoder = msgspec.json.Encoder()
    counters = {
        "next": 0,
        "processed": 0,
        "existed": 0,
        "finished": 0,
        "refinished": 0,
        "slot_conflicts": 0,
        "failed": 0,
    }

    lifecycle = done_sub is not None
    counts: dict[str, tuple[int, int]] = {}  # runner -> (jobs held, revision of slots.<runner>)

    async def adjust(runner: str, delta: int) -> bool:
        """Move the runner's slot counter by ``delta``; ``False`` if it is full."""
        key = f"slots.{runner}"
        while True:
            held, revision = counts.get(runner, (0, 0))
            if held + delta > args.capacity:
                return False
            value = str(held + delta).encode()
            try:
                if revision:
                    revision = await kv.update(key, value, last=revision)
                else:
                    revision = await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                counters["slot_conflicts"] += 1
                entry = await kv.get(key)
                counts[runner] = (int(entry.value or b"0"), entry.revision or 0)
                continue
            counts[runner] = (held + delta, revision)
            return True

    def failed(e: Exception) -> None:
        counters["failed"] += 1
        if len(errors) < 10:
            errors.append(repr(e))

    async def pong(msg: Msg) -> None:
        # the reply names the event loop it runs on, so the report states what was measured
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        await msg.respond(loop.encode())

    ping = await nc.subscribe(f"{args.prefix}.ping", cb=pong)

    ack_decoder = msgspec.json.Decoder(_PubAck)
    acks_prefix = nc.new_inbox() + "."
    waiting: dict[str, asyncio.Future[_PubAck]] = {}
    tokens = itertools.count()

    async def on_ack(msg: Msg) -> None:
        future = waiting.pop(msg.subject[len(acks_prefix) :], None)
        if future is not None and not future.done():
            future.set_result(ack_decoder.decode(msg.data))

    acks_sub = await nc.subscribe(acks_prefix + "*", cb=on_ack)

    async def emit(job_id: str, runner: str, *kinds: str) -> None:
        """Store events, deduplicated by id, and wait until the stream has them all."""
        if args.events_subject is None:
            return
        at_ms = time.time_ns() // 1_000_000
        loop = asyncio.get_running_loop()
        acks, sent = [], []
        for kind in kinds:
            token = str(next(tokens))
            sent.append(token)
            acks.append(waiting.setdefault(token, loop.create_future()))
            await nc.publish(
                f"{args.events_subject}.job.{job_id}.{kind}",
                encoder.encode(
                    _Event(kind=kind, job_id=job_id, attempt=1, runner_id=runner, at_ms=at_ms)
                ),
                reply=acks_prefix + token,
                headers={"Nats-Msg-Id": f"{job_id}.{kind}.1"},
            )
        try:
            with anyio.fail_after(10):
                for ack in acks:
                    if (await ack).error is not None:
                        raise RuntimeError(f"event not stored: {ack.result().error}")
        finally:
            for token in sent:
                waiting.pop(token, None)  # answered ones are gone already; lost ones go now

    async def handle(msg: Msg) -> None:
        try:
            job_id = decoder.decode(msg.data).job_id
            n = counters["next"]
            counters["next"] = n + 1
            index = n % len(runners)
            while lifecycle and not await adjust(runners[index], +1):
                n = counters["next"]  # full: the next runner in turn
                counters["next"] = n + 1
                index = n % len(runners)
            try:
                revision = await kv.create(job_id, msg.data)
            except nats.js.errors.KeyWrongLastSequenceError:
                counters["existed"] += 1  # a redelivery: the job is recorded, dispatch again
                if lifecycle:
                    await adjust(runners[index], -1)  # its slot was taken the first time
                entry = await kv.get(job_id)
                revision = entry.revision or 0
            body = encoder.encode(
                _Dispatch(
                    job_id=job_id,
                    attempt=1,
                    runner_id=runners[index],
                    spec=msgspec.Raw(msg.data),
                    revision=revision,
                )
            )
            await nc.publish(subjects[index], body)
            await emit(job_id, runners[index], "queued", "dispatched")
            await msg.ack()
            counters["processed"] += 1
        except Exception as e:  # noqa: BLE001 - counted; the message is redelivered
            failed(e)

    async def finish(msg: Msg) -> None:
        try:
            done = done_decoder.decode(msg.data)
            try:
                await kv.update(done.job_id, _FINAL, last=done.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                counters["refinished"] += 1  # a redelivery: the record already moved on
            else:
                await adjust(done.runner_id, -1)
            await emit(done.job_id, done.runner_id, "accepted", "finished")
            await msg.ack()
            counters["finished"] += 1
        except Exception as e:  # noqa: BLE001 - counted; the message is redelivered
            failed(e)

    async def consume(sub: JetStreamContext.PullSubscription, work: _Work) -> None:
        """Fetch as much as the backlog and free slots allow; run ``work`` on each message."""
        slots = anyio.Semaphore(args.concurrency)

        async def run(msg: Msg) -> None:
            try:
                await work(msg)
            finally:
                slots.release()

        backlog = 0
        async with anyio.create_task_group() as tg:
            while not stop.is_set():
                free = slots.value
                if free == 0:
                    await slots.acquire()
                    slots.release()
                    continue
                batch = max(1, min(free, args.batch, backlog + 1))
                try:
                    msgs = await sub.fetch(batch=batch, timeout=args.fetch_timeout)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    backlog = 0
                    continue
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    print(f"raw-worker: fetch failed: {e!r}", file=sys.stderr, flush=True)
                    await anyio.sleep(0.1)
                    continue
                for msg in msgs:
                    await slots.acquire()
                    tg.start_soon(run, msg)
                try:
                    backlog = int(msgs[-1].metadata.num_pending) if msgs else 0
                except (AttributeError, TypeError, ValueError, nats.errors.Error):
                    backlog = 0

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                stop.set()
                return

    async with anyio.create_task_group() as outer:
        outer.start_soon(watch_signals)
        print("raw-worker: ready", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, psub, handle)
            if done_sub is not None:
                tg.start_soon(consume, done_sub, finish)
        outer.cancel_scope.cancel()
    await ping.unsubscribe()
    await acks_sub.unsubscribe()
    await nc.drain()
    print(f"raw-worker: stopped {counters} errors={errors}", flush=True)
    return 0 if counters["failed"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; exit 0 when no message failed."""
    args = _parse(argv)
    options = {"use_uvloop": True} if args.loop == "uvloop" else {}
    return anyio.run(_serve, args, backend_options=options)


if __name__ == "__main__":
    sys.exit(main())
