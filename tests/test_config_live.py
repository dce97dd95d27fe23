"""Hot reload: changes over the bus become revisions that every running process applies live."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from schemas import ConfigRevision, HealthReport, JobState
from tests._config_helpers import (
    applied_revisions,
    change,
    control_plane,
    wait_event,
    wait_log,
    wait_revision,
)
from tests._helpers import config_for_test, events_of, spawn, stop_process, wait_until
from valkyrie import Client, Settings, open_bus
from valkyrie.client.config import ConfigClient
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import load_config
from valkyrie.config.model import IntegrationMode, ValkyrieConfig
from valkyrie.testing import SimulatedRunner

# -- LiveConfig (pure) ------------------------------------------------------------------------------


def revision(number: int, **values: Any) -> ConfigRevision:
    dotted = {k.replace("__", "."): v for k, v in values.items()}
    return ConfigRevision(revision=number, at_ms=1, changed_by="t", values=dotted)


@pytest.mark.timeout(10)
def test_live_config_applies_newer_valid_revisions_only() -> None:
    live = LiveConfig(load_config(environ={}))
    seen: list[tuple[ValkyrieConfig, ValkyrieConfig]] = []
    live.on_change(lambda old, new: seen.append((old, new)))
    assert live.apply(revision(2, mode="hybrid")) == []
    assert live.current.mode == IntegrationMode.HYBRID
    assert live.revision == 2
    assert live.apply(revision(1, mode="disabled")) == []  # older: ignored
    assert live.current.mode == IntegrationMode.HYBRID
    errors = live.apply(revision(3, dispatch__accept_timeout_ms=1))
    assert [e.path for e in errors] == ["dispatch.accept_timeout_ms"]
    assert live.revision == 2
    assert live.last_error == errors
    assert live.apply(revision(4)) == []  # runtime overrides removed: back to the base
    assert live.current == live.loaded.config
    assert [(o.mode, n.mode) for o, n in seen] == [("full", "hybrid"), ("hybrid", "full")]


# -- over the bus, in process -----------------------------------------------------------------------


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_change_is_accepted_audited_and_applied(settings: Settings) -> None:
    async with control_plane(settings, ["config"]) as (bus, live):
        assert live.revision == 0
        client = ConfigClient(bus, actor="alice")
        verdict = await client.change(
            set_values={"dispatch.max_queue_scan": 77}, reason="smaller scans"
        )
        assert verdict.accepted
        assert verdict.revision == 1
        assert not verdict.errors
        assert verdict.diff == {"dispatch.max_queue_scan": {"old": 2000, "new": 77}}
        await wait_revision(live, 1)
        assert live.current.dispatch.max_queue_scan == 77
        assert live.sources()["dispatch.max_queue_scan"] == "runtime"
        current = await client.current()
        assert current is not None
        assert current.revision == 1
        assert current.values == {"dispatch.max_queue_scan": 77}
        assert current.changed_by == "alice"
        assert current.reason == "smaller scans"
        audit = await wait_event(bus, "config.1.changed")
        assert audit.type == "config.changed"
        assert audit.subject_id == "1"
        assert audit.data["changed_by"] == "alice"
        assert audit.data["at_ms"] == current.at_ms
        assert abs(audit.at_ms - current.at_ms) < 5000
        assert audit.data["diff"] == {"dispatch.max_queue_scan": {"old": 2000, "new": 77}}
        assert audit.data["reason"] == "smaller scans"
        # the same value again changes nothing and writes no revision
        again = await client.change(set_values={"dispatch.max_queue_scan": 77})
        assert again.accepted
        assert again.revision == 1
        assert not again.diff
        assert len(await client.history()) == 1


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_refusals_name_the_key_and_the_reason(settings: Settings) -> None:
    async with control_plane(settings, ["config"]) as (bus, live):
        client = ConfigClient(bus, actor="bob")
        for key, value in (("http.port", 9999), ("performance.handler_concurrency", 8)):
            verdict = await client.change(set_values={key: value})
            assert not verdict.accepted
            assert verdict.revision is None
            assert [e.path for e in verdict.errors] == [key]
            assert "cannot change live" in verdict.errors[0].reason
        verdict = await client.change(set_values={"dispatch.accept_timeout_ms": 10})
        assert not verdict.accepted
        assert [e.path for e in verdict.errors] == ["dispatch.accept_timeout_ms"]
        assert ">= 50" in verdict.errors[0].reason
        verdict = await client.change(set_values={"dispatch.bogus": 1, "mode": "turbo"})
        assert sorted(e.path for e in verdict.errors) == ["dispatch.bogus", "mode"]
        assert await client.current() is None
        assert live.revision == 0
        rejected: list[Any] = []

        async def four() -> bool:
            rejected[:] = await events_of(bus, "config.*.rejected")
            return len(rejected) >= 4

        await wait_until(four, timeout_s=10)
        assert [e.type for e in rejected] == ["config.rejected"] * 4
        assert rejected[0].subject_id == "1"  # the revision it would have been
        assert rejected[0].data["requested_by"] == "bob"
        assert rejected[0].data["errors"][0]["path"] == "http.port"
        assert "cannot change live" in rejected[0].data["errors"][0]["reason"]
        assert rejected[2].data["errors"][0]["path"] == "dispatch.accept_timeout_ms"
        assert await events_of(bus, "config.*.changed") == []


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_history_and_rollback_make_new_revisions(settings: Settings) -> None:
    async with control_plane(settings, ["config"]) as (bus, live):
        client = ConfigClient(bus, actor="carol")
        await change(bus, live, dispatch__max_queue_scan=10)
        await change(bus, live, mode="hybrid")
        await change(bus, live, dispatch__max_queue_scan=30, features__explain=False)
        assert live.current.dispatch.max_queue_scan == 30
        verdict = await client.change(rollback_to=1)
        assert verdict.accepted
        assert verdict.revision == 4
        assert verdict.diff == {
            "dispatch.max_queue_scan": {"old": 30, "new": 10},
            "features.explain": {"old": False, "new": True},
            "mode": {"old": "hybrid", "new": "full"},
        }
        await wait_revision(live, 4)
        assert live.current.dispatch.max_queue_scan == 10
        assert live.current.mode == IntegrationMode.FULL
        assert live.current.features.explain
        history = await client.history()
        assert [r.revision for r in history] == [1, 2, 3, 4]
        assert history[3].values == history[0].values == {"dispatch.max_queue_scan": 10}
        assert history[3].reason == "rollback to 1"
        assert history[3].changed_by == "carol"
        # revision 0 is "no runtime overrides"
        verdict = await client.change(rollback_to=0)
        assert verdict.accepted
        assert verdict.revision == 5
        await wait_revision(live, 5)
        assert live.current == live.loaded.config
        assert live.runtime == {}
        verdict = await client.change(rollback_to=42)
        assert not verdict.accepted
        assert verdict.errors[0].path == "rollback_to"
        audits = await events_of(bus, "config.*.changed")
        assert [e.subject_id for e in audits] == ["1", "2", "3", "4", "5"]


@pytest.mark.nats
@pytest.mark.timeout(60)
async def test_a_process_started_later_runs_the_current_revision(settings: Settings) -> None:
    async with control_plane(settings, ["config"]) as (bus, _live):
        await change(bus, mode="fallback")
        async with control_plane(settings, ["canceller"]) as (_bus2, late):
            # the watcher starts once the current revision is in
            assert late.revision == 1
            assert late.current.mode == IntegrationMode.FALLBACK


# -- over the bus, across worker processes ----------------------------------------------------------


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_every_worker_process_applies_changes_without_restart(
    settings: Settings, tmp_path: Path
) -> None:
    groups = {
        "front": ["config", "intake"],
        "placement": ["dispatcher", "registry"],
        "back": ["results", "supervisor"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: tmp_path / f"{name}.log" for name in groups}
    try:
        for name, handlers in groups.items():
            procs[name] = spawn(["worker", *handlers], settings, logs[name])
        for name in groups:
            await wait_log(logs[name], "handlers running", procs[name])
        pids = {name: p.pid for name, p in procs.items()}
        components = {"+".join(handlers): name for name, handlers in groups.items()}
        # each process's health reporter says which revision it runs (at once after applying it)
        reported: dict[str, HealthReport] = {}

        async def on_report(msg: Msg) -> None:
            report = msgspec.json.decode(msg.data, type=HealthReport)
            if report.component in components and not report.stopping:
                reported[components[report.component]] = report

        base = config_for_test(settings).config
        async with open_bus(settings, embed=False, config=base) as (bus, _):
            sub = await bus.nc.subscribe(bus.names.health("*"), cb=on_report)
            config = ConfigClient(bus, actor="ops")
            client = Client(bus)

            async def everyone_runs(number: int) -> None:
                async def check() -> bool:
                    logged = all(number in applied_revisions(log) for log in logs.values())
                    return (number == 0 or logged) and all(
                        name in reported and reported[name].config_revision >= number
                        for name in groups
                    )

                await wait_until(check, timeout_s=20)
                for name, report in reported.items():
                    assert report.pid == pids[name]  # the same process, not a restarted one

            await everyone_runs(0)
            instances = {name: r.instance for name, r in reported.items()}

            # 1: a plain live key reaches all three processes
            verdict = await config.change(set_values={"dispatch.max_queue_scan": 500})
            assert verdict.accepted
            assert verdict.revision == 1
            await everyone_runs(1)

            # 2: the intake process applies a smaller submission limit
            verdict = await config.change(set_values={"limits.submission_max_bytes": 1024})
            assert verdict.accepted
            assert verdict.revision == 2
            await everyone_runs(2)
            big = await client.submit({"job_type": "shell", "payload": {"blob": "x" * 2000}})
            assert big is not None
            assert not big.accepted
            assert "limit is 1024" in big.errors[0].reason

            # 3: the dispatcher process stops dispatching
            verdict = await config.change(
                set_values={"mode": "disabled", "limits.submission_max_bytes": None}
            )
            assert verdict.accepted
            assert verdict.revision == 3
            await everyone_runs(3)
            stop = anyio.Event()
            runner = SimulatedRunner(bus, "r1", capacity=2)
            async with anyio.create_task_group() as tg:
                await tg.start(runner.run, stop)
                held = await client.submit({"job_type": "shell", "payload": {"blob": "x" * 2000}})
                assert held is not None
                assert held.accepted
                assert held.job_id
                await anyio.sleep(1.5)
                assert (await client.get_job(held.job_id)).state == JobState.QUEUED
                assert runner.dispatches == 0

                # 4: and starts again, with nothing lost
                verdict = await config.change(set_values={"mode": "full"})
                assert verdict.accepted
                assert verdict.revision == 4
                record = await client.wait_for_job(held.job_id, timeout_s=20)
                assert record.state == JobState.SUCCEEDED
                assert record.runner_id == "r1"
                await everyone_runs(4)
                stop.set()
            await sub.unsubscribe()
        assert {name: r.instance for name, r in reported.items()} == instances
        # nobody restarted: same processes, still running, each applied 1..4 in order
        for name, proc in procs.items():
            assert proc.poll() is None
            assert proc.pid == pids[name]
            assert applied_revisions(logs[name]) == [1, 2, 3, 4], name
    finally:
        for proc in procs.values():
            stop_process(proc)
