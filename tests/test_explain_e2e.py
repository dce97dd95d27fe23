"""``explain`` over the bus: every pending cause against real handlers, an offline runner and a
dispatched job's decision, and ``valkyrie jobs explain``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from schemas import RunnerResources
from tests._helpers import ROOT, env_for
from tests._sched_helpers import (
    MEASURED_BAD,
    SimRunner,
    decision,
    explained,
    finished,
    fleet,
    plane,
    rejected,
    set_mode,
    settings_with,
    sim,
    submit,
    wait_event,
    write_stats,
)
from valkyrie import Client, NotFoundError, Settings
from valkyrie.bus.codec import now_ms
from valkyrie.client.admin import Admin
from valkyrie.client.config import ConfigClient

pytestmark = pytest.mark.timeout(60)


# -- over the bus ----------------------------------------------------------------------------------
def _has(cause: str) -> Any:
    return lambda e: cause in e.causes


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_explain_over_the_bus_names_every_pending_cause(settings: Settings) -> None:
    async with plane(settings) as (bus, live):
        client = Client(bus)
        with pytest.raises(NotFoundError):
            await client.explain("no-such-job")
        first = await submit(client, job_type="build", payload=sim(0.3))
        e = await explained(client, first, _has("no_runners"))
        assert e.summary == "no runner is registered"

        linux = SimRunner(
            bus,
            "linux-1",
            job_types=["build"],
            labels={"os": "linux"},
            languages=["python"],
            resources=RunnerResources(cpu_cores=4, memory_mb=8192, gpu_count=0),
        )
        windows = SimRunner(bus, "win-1", job_types=["test"], labels={"os": "windows"})
        async with fleet(bus, [linux, windows]):
            assert (await finished(client, first)).runner_id == "linux-1"
            await wait_event(bus, f"job.{first}.succeeded")  # the dispatcher learns durations

            async def pending(cause: str, **spec: Any) -> Any:
                spec.setdefault("job_type", "build")
                job_id = await submit(client, payload=sim(), **spec)
                e = await explained(client, job_id, _has(cause))
                assert e.state == "queued"
                return e

            e = await pending("job_type", job_type="deploy")
            assert rejected(e) == {"job_type": {"linux-1", "win-1"}}
            e = await pending("labels", labels={"os": "windows"})
            assert rejected(e) == {"job_type": {"win-1"}, "labels": {"linux-1"}}
            assert "1 runner(s) match without labels {'os': 'windows'}" in e.suggestions
            assert "1 runner(s) match without the job type 'build'" in e.suggestions
            e = await pending("capabilities", requirements={"required_capabilities": ["cuda"]})
            e = await pending("cpu", requirements={"cpu_cores": 16})
            e = await pending("memory", requirements={"memory_mb": 65536})
            e = await pending("gpu", requirements={"gpu_count": 1})
            e = await pending("excluded", routing_hints={"excluded_runners": ["linux-1"]})
            rule = {"key": "os", "values": ["linux"]}
            e = await pending(
                "anti_affinity",
                routing_hints={"affinity_rules": [{"rule_type": "anti_affinity", **rule}]},
            )
            e = await pending(
                "affinity",
                routing_hints={
                    "affinity_rules": [
                        {"rule_type": "required", "key": "os", "values": ["windows"]}
                    ]
                },
            )
            assert "1 runner(s) match without the required affinity rule" in e.suggestions

            # a failed attempt waits out its retry backoff
            retry = await submit(
                client,
                job_type="build",
                payload=sim(exit_code=1),
                retry_policy={
                    "retry_on_exit_code": True,
                    "initial_backoff_ms": 120_000,
                    "max_backoff_ms": 120_000,
                    "max_attempts": 3,
                },
            )
            await wait_event(bus, f"job.{retry}.requeued")
            e = await explained(client, retry, _has("retry_backoff"))
            record = await client.get_job(retry)
            assert record.not_before_at_ms is not None
            assert e.estimated_start_at_ms is not None
            assert e.estimated_start_at_ms >= record.not_before_at_ms

            # measured statistics below the job's QoS demands (a throughput no runner declares
            # keeps this job queued whether or not the dispatcher has seen the new stats yet)
            await write_stats(bus, "linux-1", MEASURED_BAD)
            e = await pending(
                "qos_latency",
                qos_requirements={"max_latency_ms": 100, "min_throughput_bytes_per_s": 10**15},
            )
            assert rejected(e) == {"job_type": {"win-1"}, "qos_latency": {"linux-1"}}
            assert e.rejected[-1].detail == (
                "their measured accept latency exceeds max_latency_ms=100.0"
            )
            e = await pending("qos_reliability", qos_requirements={"reliability_threshold": 0.9})

            # all busy: queue position and an estimate from the average duration
            blocker = await submit(client, job_type="build", payload=sim(60))
            await decision(bus, blocker)
            before = now_ms()
            e = await pending("capacity")
            waiting = e.job_id
            assert e.estimated_start_at_ms is not None
            assert e.estimated_start_at_ms > before  # every slot is taken: not "now"
            assert e.queue_position is not None
            assert e.queue_length is not None
            assert e.queue_position < e.queue_length
            assert e.estimated_start_at_ms is not None
            assert e.predicted_finish_at_ms is not None
            assert e.predicted_finish_at_ms > e.estimated_start_at_ms
            assert e.effective_priority == 2

            # a busy preferred runner the job waits for
            e = await pending(
                "preferred_wait",
                routing_hints={"preferred_runners": ["linux-1"], "preferred_wait_s": 300},
            )
            assert e.causes == ["preferred_wait", "job_type", "capacity"]
            assert rejected(e) == {"job_type": {"win-1"}, "capacity": {"linux-1"}}

            # placement switched off: feasible, but paused
            free_test = await submit(client, job_type="test", payload=sim())
            assert (await finished(client, free_test)).runner_id == "win-1"
            await set_mode(bus, live, "disabled")
            e = await pending("mode_disabled", job_type="test")
            assert e.summary == "1 runner(s) can take it; placement is paused (mode disabled)"
            assert e.mode == "disabled"
            await set_mode(bus, live, "full")

            # a drained runner (once the dispatcher has seen it: draining is checked first)
            await Admin(bus, actor="test").set_drain("win-1", drain=True)
            await explained(client, waiting, lambda e: "win-1" in rejected(e).get("draining", ()))
            e = await pending("draining", job_type="test")
            assert "1 runner(s) match once they are undrained" in e.suggestions

            # features.explain switches the answer off (placement goes on)
            verdict = await ConfigClient(bus, actor="test").change(
                set_values={"features.explain": False}
            )
            assert verdict.revision is not None
            with anyio.fail_after(10):
                while live.revision < verdict.revision:
                    await live.changed()
            off = await client.explain(e.job_id)
            assert off.error == "explain is switched off (features.explain = false)"
            assert off.causes == []


@pytest.mark.nats
@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_explain_offline_runner_and_dispatched_decision(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    settings = settings_with(nats_url, prefix, tmp_path, "[dispatch]\nrunner_lost_after_ms = 600\n")
    async with plane(settings) as (bus, _):
        client = Client(bus)
        stays = [SimRunner(bus, rid, heartbeat_ms=100) for rid in ("r-a", "r-b")]
        async with fleet(bus, stays):
            gone = SimRunner(bus, "gone", job_types=["gpu"], heartbeat_ms=100)
            async with fleet(bus, [gone]):
                pass  # registered, then its heartbeats stop
            await wait_event(bus, "runner.gone.lost", timeout_s=10)
            job_id = await submit(client, job_type="gpu", payload=sim())
            e = await explained(client, job_id, _has("offline"))
            assert rejected(e) == {"offline": {"gone"}, "job_type": {"r-a", "r-b"}}
            assert "1 runner(s) match once they come back online" in e.suggestions

            # a placed job: its runner against the runners-up
            placed = await submit(
                client, payload=sim(), routing_hints={"preferred_runners": ["r-b"]}
            )
            await finished(client, placed)
            e = await client.explain(placed)
            assert e.state == "succeeded"
            assert e.placement is not None
            assert e.placement["runner_id"] == "r-b"
            assert e.summary.startswith(f"placed on r-b with score {e.placement['score']}")
            assert "(a preferred runner: those go first)" in e.summary
            assert "runners-up: r-a (" in e.summary

            plain = await submit(client, payload=sim())
            await finished(client, plain)
            e = await client.explain(plain)
            assert e.placement is not None
            ups = e.placement["runners_up"]
            assert ups
            assert all(u["score"] <= e.placement["score"] for u in ups)
            assert e.placement["rejected"] == {}

            # the CLI prints the same explanation
            result = await _cli(settings, "jobs", "explain", job_id)
            assert result.returncode == 0, result.stderr
            out = result.stdout.decode()
            assert out.startswith(f"{job_id}: queued\n")
            assert "  causes: offline, job_type\n" in out
            assert "  1 runner(s) rejected: they are offline (e.g. gone)\n" in out
            assert "  hint: 1 runner(s) match once they come back online\n" in out
            result = await _cli(settings, "jobs", "explain", plain, "--json")
            assert result.returncode == 0, result.stderr
            shown = json.loads(result.stdout)
            assert shown["state"] == "succeeded"
            assert shown["placement"]["runner_id"] == e.placement["runner_id"]
            result = await _cli(settings, "jobs", "explain", "no-such-job")
            assert result.returncode != 0
            assert b"no-such-job" in result.stderr


async def _cli(settings: Settings, *args: str) -> Any:
    with anyio.fail_after(60):
        return await anyio.run_process(
            [sys.executable, "-m", "valkyrie", *args],
            env=env_for(settings),
            cwd=ROOT,
            check=False,
        )
