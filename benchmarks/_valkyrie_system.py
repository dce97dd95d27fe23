"""The Valkyrie pipeline as a system under test: worker subprocesses, lean runners, identities."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from benchmarks._costs import CostMeter
from benchmarks._fleet import LeanFleet, Recorder, runner_ids
from benchmarks._phases import (
    EVENTS_MAX_BYTES,
    PROCESSES,
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
    valkyrie_loop,
)
from benchmarks._procs import Child, Children
from valkyrie import BUCKETS, Bus, Names, Settings, connect
from valkyrie.bus.credentials import discover
from valkyrie.config.model import ValkyrieConfig
from valkyrie.security import AuthStore, Permissions, new_seed, permissions


def _env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update(
        {
            "VALKYRIE_NATS_URL": settings.nats_url or "",
            "VALKYRIE_PREFIX": settings.prefix,
            "VALKYRIE_METRICS_PORT": "0",
            "VALKYRIE_EVENTS_MAX_BYTES": str(settings.events_max_bytes),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.data_dir:  # --secure: each worker finds its handlers' seeds there
        env["VALKYRIE_DATA_DIR"] = settings.data_dir
    return env


FLEET_IDENTITY = "fleet"
#: reads the per-job cost counters of a ``--secure`` run (no role may list streams)
METER_IDENTITY = "meter"


def secure_setup(p: Params, workdir: Path) -> tuple[Params, Path]:
    """Generate the identities of a ``--secure`` run; returns the params and the auth include.

    The simulated runners share one connection here, so they share one user: the union of every
    runner's permissions (an extra user the role table does not know), which makes the server
    check each publish against a longer list than a real runner's.
    """
    prefix = "bv" + uuid.uuid4().hex[:8]
    data = workdir / "secure"
    store = AuthStore(data / "auth")
    store.init(prefix)
    seed, public = new_seed()
    (data / "fleet.nk").write_bytes(seed + b"\n")
    (data / "fleet.nk").chmod(0o600)
    names = Names(prefix)
    publish: dict[str, None] = {}
    subscribe: dict[str, None] = {f"_INBOX_{FLEET_IDENTITY}.>": None}
    for rid in runner_ids(max(p.runners, p.scale_runners)):
        perms = permissions(f"runner-{rid}", names)
        publish.update(dict.fromkeys(perms.publish))
        subscribe.update(dict.fromkeys(s for s in perms.subscribe if not s.startswith("_INBOX")))
    fleet = Permissions(publish=tuple(publish), subscribe=tuple(subscribe))
    conf = workdir / "bench-auth.conf"
    meter_seed, meter_public = new_seed()
    (data / "meter.nk").write_bytes(meter_seed + b"\n")
    (data / "meter.nk").chmod(0o600)
    meter = Permissions(
        publish=("$JS.API.STREAM.LIST", "$JS.API.INFO"),
        subscribe=(f"_INBOX_{METER_IDENTITY}.>",),
    )
    conf.write_text(store.accounts(extra_users={public: fleet, meter_public: meter}))
    return replace(p, secure_prefix=prefix, secure_dir=str(data)), conf


async def _delete_valkyrie(bus: Bus) -> None:
    for config in bus.stream_configs(ValkyrieConfig()):
        try:
            await bus.js.delete_stream(config.name or "")
        except (nats.errors.Error, nats.js.errors.Error):
            pass
    for name in BUCKETS:
        try:
            await bus.js.delete_key_value(bus.names.bucket(name))
        except (nats.errors.Error, nats.js.errors.Error):
            pass


async def valkyrie_scale_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The same pipeline with ``--scale-runners`` registered runners (same total slots).

    Heartbeats are slowed (``--scale-heartbeat-ms``, and the loss window with them) because ten
    thousand runners beating every second would measure heartbeat handling, not placement.
    """
    capacity = max(1, p.runners * p.runner_capacity // p.scale_runners)
    scaled = replace(
        p,
        runners=p.scale_runners,
        runner_capacity=capacity,
        heartbeat_ms=p.scale_heartbeat_ms,
        py_spy=None,
        profile=None,
    )
    lost_after = str(max(4 * p.scale_heartbeat_ms, 10_000))
    return await valkyrie_scenario(
        scaled,
        url,
        server_pid,
        children,
        workdir,
        extra_env={"VALKYRIE_DISPATCH__RUNNER_LOST_AFTER_MS": lost_after},
        register_timeout_s=600,
        label="valkyrie-scale",
    )


async def valkyrie_scenario(
    p: Params,
    url: str,
    server_pid: int | None,
    children: Children,
    workdir: Path,
    *,
    extra_env: dict[str, str] | None = None,
    register_timeout_s: float = 60,
    label: str = "valkyrie",
) -> dict[str, Any]:
    """The Valkyrie pipeline: handlers in one subprocess, lean runners here."""
    prefix = p.secure_prefix or "bv" + uuid.uuid4().hex[:8]
    settings = Settings.from_env(
        {},
        nats_url=url,
        prefix=prefix,
        events_max_bytes=EVENTS_MAX_BYTES,
        data_dir=p.secure_dir,
    )
    names = settings.prefix
    secured = " (secure: NATS auth, one identity per handler)" if p.secure else ""
    log(f"valkyrie: prefix {names}, {p.runners} runners x capacity {p.runner_capacity}{secured}")
    # --secure: the benchmark submits and reads as admin, and provisions as provisioner
    bus = await connect(
        settings, name="bench-valkyrie-submit", credentials=discover(settings, "admin")
    )
    fleet_nc: NatsClient | None = None
    meter_nc: NatsClient | None = None
    workers: list[Child] = []
    try:
        # the model's defaults: the worker processes (no config variables) provision the same
        provisioner = await connect(settings, credentials=discover(settings, "provisioner"))
        try:
            await provisioner.provision(ValkyrieConfig())
        finally:
            await provisioner.close()
        groups = p.process_groups()
        for i, group in enumerate(groups, 1):
            name = "valkyrie-worker" if len(groups) == 1 else f"valkyrie-worker-{i}"
            argv = profiled(name, p, [sys.executable, "-m", "valkyrie", "worker", *group])
            workers.append(
                children.spawn(
                    name,
                    argv,
                    env={**_env_for(settings), **(extra_env or {})},
                    log=workdir / f"{label}-{name.removeprefix('valkyrie-')}.log",
                    cwd=ROOT,
                )
            )
        alive = all_alive(workers)

        fleet_auth: dict[str, Any] = {}
        if p.secure_dir:
            fleet_auth = {
                "nkeys_seed": str(Path(p.secure_dir) / "fleet.nk"),
                "inbox_prefix": f"_INBOX_{FLEET_IDENTITY}",
            }
        fleet_nc = await nats.connect(
            url, name="bench-valkyrie-fleet", error_cb=nats_error, **fleet_auth
        )
        recorder = Recorder()
        fleet = LeanFleet(
            fleet_nc,
            bus.names,
            runner_ids(p.runners),
            recorder,
            capacity=p.runner_capacity,
            heartbeat_ms=p.heartbeat_ms,
        )
        await fleet.subscribe()
        setup_started = time.perf_counter()
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            try:
                await fleet.register_all(timeout_s=register_timeout_s, alive=alive)
            except TimeoutError as e:
                raise RuntimeError(
                    f"runners not registered within {register_timeout_s:g}s; "
                    f"{alive() or 'worker running'}"
                ) from e
            tg.start_soon(fleet.heartbeats, stop)
            runners_kv = await bus.kv("runners")
            wanted = set(fleet.ids)

            async def all_registered() -> bool:
                try:
                    keys = await runners_kv.keys()
                except nats.js.errors.NoKeysError:
                    return False
                return wanted <= set(keys)

            if await until(all_registered, register_timeout_s, 0.5) is None:
                raise RuntimeError("the runners bucket does not list every runner in time")
            setup_s = time.perf_counter() - setup_started
            log(f"valkyrie: {p.runners} runners registered in {setup_s:.1f}s")
            spies = [start_spy(children, w.name, w.pid, p, workdir) for w in workers]

            if p.breakdown:
                # the queued event (intake done) as a milestone: splits latency into intake and
                # dispatcher parts; the job id is the subject's second-to-last token
                async def on_queued(msg: Msg) -> None:
                    recorder.mark(msg.subject.rsplit(".", 2)[-2], time.perf_counter_ns())

                await bus.nc.subscribe(bus.names.event("job", "*", "queued"), cb=on_queued)
                await bus.nc.flush()

            submit_info = bus.names.stream("submit")
            updates_info = bus.names.stream("updates")
            events_info = bus.names.stream("events")

            meter_js = bus.js
            if p.secure_dir:
                meter_nc = await nats.connect(
                    url,
                    name="bench-valkyrie-meter",
                    error_cb=nats_error,
                    nkeys_seed=str(Path(p.secure_dir) / "meter.nk"),
                    inbox_prefix=f"_INBOX_{METER_IDENTITY}",
                )
                meter_js = meter_nc.jetstream()
            meter = CostMeter(meter_js, p.monitor_url)

            async def idle() -> bool:
                await bus.nc.flush()
                await fleet.nc.flush()
                for stream in (submit_info, updates_info):
                    meter.tally()
                    if (await bus.js.stream_info(stream)).state.messages:
                        return False
                meter.tally()
                consumer = await bus.js.consumer_info(events_info, "dispatcher")
                return not consumer.num_pending and not consumer.num_ack_pending

            async def settle() -> float | None:
                return await until(idle, 120, 0.05)

            def extra() -> dict[str, Any]:
                return {
                    "redispatches": fleet.redispatches,
                    "updates_sent": fleet.updates_sent,
                    "update_errors": fleet.update_errors,
                    "setup_s": round(setup_s, 3),
                }

            target = Target(
                name="valkyrie",
                js=bus.js,
                subject=bus.names.submit_as(bus.identity),
                recorder=recorder,
                alive=alive,
                settle=settle,
                cpu_pids={
                    "benchmark": os.getpid(),
                    "worker": tuple(w.pid for w in workers if w.pid is not None),
                    "nats_server": server_pid,
                },
                tag="v",
                extra=extra,
                milestone="queued_event" if p.breakdown else None,
                meter=meter,
                # the runners' updates are core publishes that the updates stream captures
                unacked_streams=frozenset({updates_info}),
            )
            results = await run_all_phases(target, p)
            stop.set()
            await fleet.close()
        results["worker_processes"] = [" ".join(g) for g in groups]
        results["event_loop"] = valkyrie_loop()
        results["worker_exit_code"] = await stop_workers(children, workers, spies, p)
        return results
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(20):
            await stop_started(children, workers)
            if not p.secure:  # a secured run's server store is thrown away: nobody may delete
                await _delete_valkyrie(bus)
            for nc in (fleet_nc, meter_nc):
                if nc is not None:
                    await nc.close()
            await bus.close()


async def scale_out_scenario(
    p: Params, url: str, server_pid: int | None, children: Children, workdir: Path
) -> dict[str, Any]:
    """The pipeline with one, then two copies of the default worker layout (``--scale-out``).

    Two copies run each handler in two processes (sharing its durable consumers). Only the
    warm-up and the saturating phase run: the figures wanted are throughput and CPU per job.
    """
    out: dict[str, Any] = {}
    for copies in (1, 2):
        layout = ",".join([PROCESSES] * copies)
        log(f"scale-out: {copies} cop{'y' if copies == 1 else 'ies'} of the layout ({layout})")
        scaled = replace(p, processes=layout, paced_jobs=0, py_spy=None, profile=None)
        out[f"x{copies}"] = await valkyrie_scenario(
            scaled, url, server_pid, children, workdir, label=f"valkyrie-x{copies}"
        )
    return out
