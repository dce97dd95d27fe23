"""Smoke test of the benchmarks: ``benchmarks/dispatch.py --quick`` runs end to end and every job it
submitted was dispatched, for both systems, so the benchmark cannot silently rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.nats]

PHASES = ("warmup", "paced", "saturating")


@pytest.mark.timeout(300)
def test_dispatch_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "dispatch.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "dispatch.py"), "--quick", "--json", str(out)]
    existing = os.environ.get("VALKYRIE_TEST_NATS_URL")
    if existing:  # the session's server; otherwise the benchmark starts its own
        argv += ["--nats-url", existing]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, report

    doc = json.loads(out.read_text())
    assert doc["errors"] == [], report
    assert doc["missing_total"] == 0, report
    params = doc["parameters"]
    expected = {
        "warmup": params["warmup"],
        "paced": params["paced_jobs"],
        "saturating": params["jobs"],
    }
    for system in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events"):
        results = doc["results"][system]
        assert results["worker_exit_code"] == 0, report
        for phase in PHASES:
            figures = results[phase]
            assert figures["requested"] == expected[phase] > 0
            assert figures["submitted"] == figures["requested"], (system, phase, figures)
            assert figures["dispatched"] == figures["submitted"], (system, phase, figures)
            assert figures["missing"] == 0
            latency = figures["latency_ms"]
            assert latency["count"] == figures["dispatched"]
            assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
            assert figures["throughput_per_s"] > 0
        assert results["paced"]["submit_rate_per_s"] > 0
    for phase in ("paced", "saturating"):
        for by_phase in (
            doc["ratios"],
            doc["ratios"]["lifecycle"],
            doc["ratios"]["lifecycle_events"],
        ):
            assert by_phase[phase]["throughput"] is not None
            assert by_phase[phase]["latency_p50"] is not None
    # the lifecycle floor really closed every job's life and gave every slot back
    jobs = sum(expected.values())
    for system in ("raw_lifecycle", "raw_lifecycle_events"):
        lifecycle = doc["results"][system]
        assert lifecycle["completions_sent"] == jobs, system
        assert lifecycle["records_done"] == {"records": jobs, "done": jobs, "slots_held": 0}
    # per-job costs from the server's counters: at least what each design stores by construction
    # (other streams of a shared test server can only add to them)
    least = {"raw": 2, "raw_lifecycle": 6, "raw_lifecycle_events": 10, "valkyrie": 8}
    for system, stored in least.items():
        costs = doc["results"][system]["saturating"]["costs"]
        assert costs["jobs"] == params["jobs"], system
        assert costs["stored_messages_per_job"] >= stored, (system, costs)
        assert costs["round_trips_per_job"] >= costs["acked_publishes_per_job"] > 0, system
        assert sum(costs["stored_by_stream"].values()) >= stored * params["jobs"], system
    # the raw workers run on the loop the report names (valkyrie's, uvloop when installed)
    for system in ("raw", "raw_lifecycle", "raw_lifecycle_events"):
        assert doc["results"][system]["event_loop"] == doc["event_loops"]["raw"], system
    assert {t["met"] for t in doc["targets"].values()} <= {True, False, None}
    assert "targets (issue 17" in proc.stdout
    # and the events floor stored its four events per job, each once
    assert doc["results"]["raw_lifecycle_events"]["events_stored"] == 4 * jobs
    versions = doc["environment"]["versions"]
    for name in ("python", "nats_server", "nats-py", "msgspec"):
        assert versions[name], name
    assert doc["environment"]["machine"]["nproc"]
    assert "valkyrie/raw " in proc.stdout
    assert "valkyrie/raw-lifecycle " in proc.stdout
    assert "valkyrie/raw-lifecycle-events" in proc.stdout


@pytest.mark.timeout(120)
def test_kv_write_benchmark_small_run(tmp_path: Path) -> None:
    out = tmp_path / "kv_write.json"
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "kv_write.py"),
        *("--writes", "256", "--rounds", "1", "--concurrency", "8", "--json", str(out)),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=100, check=False
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    for path in ("nats-py", "valkyrie"):
        assert doc["results"][path]["writes_per_s"] > 0
        assert doc["results"][path]["client_us_per_write"] > 0
    assert doc["ratios"]["client_cpu"] is not None
