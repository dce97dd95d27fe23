"""The raw-NATS baselines: raw, raw-lifecycle and raw-lifecycle-events."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import nats.errors
import nats.js.errors
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
)

from benchmarks._costs import CostMeter
from benchmarks._fleet import RawReceivers, Recorder, runner_ids
from benchmarks._phases import (
    ROOT,
    Params,
    Target,
    all_alive,
    log,
    nats_error,
    profiled,
    run_all_phases,
    start_spy,
    stop_started,
    stop_workers,
    until,
)
from benchmarks._procs import Child, Children


def _work_queue(name: str, subject: str) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=1,
        duplicate_window=120.0,
    )


async def raw_lifecycle_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The raw baseline that also closes each job: receivers report done, the worker records it."""
    return await raw_scenario(p, url, server_pid, children, workdir, lifecycle=True)


async def raw_events_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The lifecycle baseline that also stores four events per job, as Valkyrie's contract has."""
    return await raw_scenario(p, url, server_pid, children, workdir, lifecycle=True, events=True)


async def raw_scenario(
    p: Params,
    url: str,
    server_pid: int | None,
    children: Children,
    workdir: Path,
    *,
    lifecycle: bool = False,
    events: bool = False,
) -> dict[str, Any]:
    """The raw-NATS baseline: work-queue stream -> pull worker (KV create + core publish) -> subscribers.

    With ``lifecycle`` the subscribers report each job done (captured by a second work-queue stream)
    and the worker records the end with one KV compare-and-set per job. With ``events`` (lifecycle
    only) the worker also stores four events per job in an events stream.
    """
    events = events and lifecycle
    name = "raw-lifecycle-events" if events else "raw-lifecycle" if lifecycle else "raw"
    prefix = ("be" if events else "bl" if lifecycle else "br") + uuid.uuid4().hex[:8]
    stream, subject, bucket, durable = (
        f"{prefix.upper()}_WORK",
        f"{prefix}.jobs.submit",
        f"{prefix}_jobs",
        "worker",
    )
    done_stream, done_subject, done_durable = (
        f"{prefix.upper()}_DONE",
        f"{prefix}.done.*",
        "finisher",
    )
    events_stream, events_subject = f"{prefix.upper()}_EVENTS", f"{prefix}.events"
    log(f"{name}: prefix {prefix}, {p.runners} receivers, worker concurrency {p.raw_concurrency}")
    nc = await nats.connect(url, name=f"bench-{name}-submit", error_cb=nats_error)
    recv_nc: NatsClient | None = None
    raw_workers: list[Child] = []
    js = nc.jetstream()
    try:
        await js.add_stream(_work_queue(stream, subject))
        await js.create_key_value(
            KeyValueConfig(
                bucket=bucket, history=1, storage=StorageType.FILE, replicas=1, direct=True
            )
        )
        consumers: list[tuple[str, list[str], str]] = [(stream, [subject], durable)]
        if lifecycle:
            await js.add_stream(_work_queue(done_stream, done_subject))
            # one finisher per worker, each on the completions of the runners it owns
            ids = runner_ids(p.runners)
            for i in range(p.raw_processes):
                owned = [
                    f"{prefix}.done.{r}" for n, r in enumerate(ids) if n % p.raw_processes == i
                ]
                consumers.append((done_stream, owned, f"{done_durable}-{i}"))
        if events:  # configured like Valkyrie's events stream (limits, deduplicated by id)
            await js.add_stream(
                StreamConfig(
                    name=events_stream,
                    subjects=[f"{events_subject}.>"],
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    storage=StorageType.FILE,
                    num_replicas=1,
                    duplicate_window=120.0,
                )
            )
        for on_stream, filtered, durable_name in consumers:
            await js.add_consumer(
                on_stream,
                ConsumerConfig(
                    durable_name=durable_name,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=30.0,
                    max_ack_pending=100_000,
                    **(
                        {"filter_subject": filtered[0]}
                        if len(filtered) == 1
                        else {"filter_subjects": filtered}
                    ),
                ),
            )
        lifecycle_args = (
            [
                f"--done-subject={done_subject}",
                f"--done-stream={done_stream}",
                f"--capacity={p.runner_capacity}",
                *([f"--events-subject={events_subject}"] if events else []),
            ]
            if lifecycle
            else []
        )
        argv = profiled(
            f"{name}-worker",
            p,
            [
                sys.executable,
                str(ROOT / "benchmarks" / "_raw_worker.py"),
                f"--url={url}",
                f"--prefix={prefix}",
                f"--stream={stream}",
                f"--subject={subject}",
                f"--durable={durable}",
                f"--bucket={bucket}",
                f"--runners={p.runners}",
                f"--concurrency={p.raw_concurrency}",
                f"--batch={p.raw_batch}",
                f"--loop={p.raw_loop}",
                *lifecycle_args,
            ],
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i in range(p.raw_processes):
            child_name = f"{name}-worker" if p.raw_processes == 1 else f"{name}-worker-{i + 1}"
            partition = (
                [f"--partition={i}/{p.raw_processes}", f"--done-durable={done_durable}-{i}"]
                if lifecycle
                else []
            )
            raw_workers.append(
                children.spawn(
                    child_name,
                    [*argv, *partition],
                    env=env,
                    log=workdir / f"{child_name}.log",
                    cwd=ROOT,
                )
            )
        child = raw_workers[0]
        alive = all_alive(raw_workers)

        loops: set[str] = set()

        async def ready() -> bool:
            if alive():
                raise RuntimeError(alive())
            try:
                reply = await nc.request(f"{prefix}.ping", b"", timeout=0.5)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
                return False
            loops.add(reply.data.decode())
            return True

        if await until(ready, 30, 0.05) is None:
            raise RuntimeError(f"{name} worker not ready within 30s: {alive() or child.tail(2000)}")
        recv_nc = await nats.connect(url, name=f"bench-{name}-receivers", error_cb=nats_error)
        spies = [start_spy(children, w.name, w.pid, p, workdir) for w in raw_workers]
        recorder = Recorder()
        receivers = RawReceivers(
            recv_nc, prefix, runner_ids(p.runners), recorder, complete=lifecycle
        )
        await receivers.subscribe()

        meter = CostMeter(js, p.monitor_url)

        async def idle() -> bool:
            await nc.flush()
            await recv_nc.flush()
            for on_stream, _, durable_name in consumers:
                meter.tally()
                info = await js.consumer_info(on_stream, durable_name)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        async def settle() -> float | None:
            return await until(idle, 120, 0.05)

        target = Target(
            name=name,
            js=js,
            subject=subject,
            recorder=recorder,
            alive=alive,
            settle=settle,
            cpu_pids={
                "benchmark": os.getpid(),
                "worker": tuple(w.pid for w in raw_workers if w.pid is not None),
                "nats_server": server_pid,
            },
            tag="e" if events else "l" if lifecycle else "r",
            meter=meter,
            # the receivers report completions with core publishes the done stream captures
            unacked_streams=frozenset({done_stream}),
        )
        results = await run_all_phases(target, p)
        await receivers.close()
        if lifecycle:
            results["completions_sent"] = receivers.completions_sent
            results["completion_errors"] = receivers.completion_errors
            results["records_done"] = await _records_done(js, bucket)
        if events:
            results["events_stored"] = (await js.stream_info(events_stream)).state.messages
        results["worker_processes"] = len(raw_workers)
        results["event_loop"] = ",".join(sorted(loops))
        results["worker_exit_code"] = await stop_workers(children, raw_workers, spies, p)
        return results
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(20):
            await stop_started(children, raw_workers)
            streams = (stream, done_stream) if lifecycle else (stream,)
            for on_stream in (*streams, events_stream) if events else streams:
                try:
                    await js.delete_stream(on_stream)
                except (nats.errors.Error, nats.js.errors.Error):
                    pass
            try:
                await js.delete_key_value(bucket)
            except (nats.errors.Error, nats.js.errors.Error):
                pass
            if recv_nc is not None:
                await recv_nc.close()
            await nc.close()


async def _records_done(js: JetStreamContext, bucket: str) -> dict[str, int]:
    """Job records of the lifecycle baseline that reached their end, and slots still held at the end
    (proof the loop closed: every record done, no slot held)."""
    kv = await js.key_value(bucket)
    counts = {"records": 0, "done": 0, "slots_held": 0}
    limiter = anyio.Semaphore(64)

    async def one(key: str) -> None:
        async with limiter:
            entry = await kv.get(key)
        if key.startswith("slots."):
            counts["slots_held"] += int(entry.value or b"0")
            return
        counts["records"] += 1
        counts["done"] += entry.value == b'{"state":"done"}'

    async with anyio.create_task_group() as tg:
        for key in await kv.keys():
            tg.start_soon(one, key)
    return counts
