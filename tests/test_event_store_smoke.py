"""Smoke test of ``benchmarks/event_store.py --quick``: it runs end to end against a real server,
every way completes every job, and the server-derived events stream holds exactly one event per
KV write, in order, with its headers; no figure is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.nats]

WAYS = ("client-events", "server-derived", "server-derived-h4", "atomic-batch")
#: ways whose events stream must hold every event (the derived one over a bucket of history 1
#: loses events whenever its source lags: the benchmark measures that, it is no failure)
COMPLETE = ("client-events", "server-derived-h4", "atomic-batch")
KINDS = 4  # queued, dispatched, accepted, succeeded: one KV write and one event each


@pytest.mark.timeout(180)
def test_event_store_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "event-store.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "event_store.py"), "--quick"]
    argv += ["--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report

    doc = json.loads(out.read_text())
    assert doc["errors"] == [], report
    assert doc["incomplete_jobs"] == 0, report
    params = doc["parameters"]
    assert set(doc["results"]) == set(WAYS)
    for way in WAYS:
        rounds = doc["rounds"][way]
        assert len(rounds) == params["rounds"] == 1
        for figures in rounds:
            assert figures["completed"] == figures["jobs"] == params["jobs"] > 0
            for key in ("jobs_per_s", "client_cpu_us", "stored_msgs", "round_trips"):
                assert figures[key] is not None, (way, key)
        stored = doc["events_stored"][way]
        if way in COMPLETE:
            assert stored["stored"] == stored["expected"] > 0, (way, stored)
        else:
            assert 0 < stored["stored"] <= stored["expected"], (way, stored)

    # every job a derived way ran: warm-up, the round and the lag round
    jobs = params["warmup"] + params["jobs"] * (params["rounds"] + 1)
    for way in ("server-derived", "server-derived-h4"):
        derived = doc["derived"][way]
        check = derived["check"]
        assert check["expected"] == KINDS * jobs
        # whatever is stored is one event per write, in order, with its kind and id
        assert check["out_of_order"] == check["missing_headers"] == check["wrong_subject"] == 0
        if way in COMPLETE:
            assert check["stored"] == check["expected"], check
            assert check["jobs_complete"] == jobs, check
            assert check["ok"] is True, check
            lag = derived["lag_ms"]
            assert lag["events_arrived"] == KINDS * params["jobs"], lag
            assert lag["write_to_event"]["count"] == KINDS * params["jobs"], lag
        else:
            assert 0 < check["stored"] <= check["expected"], check
    for name in WAYS:
        assert name in proc.stdout
    assert "server-derived/client-events" in proc.stdout
