"""Smoke test of ``benchmarks/slot_store.py --quick``: it runs end to end against a real server, every
way completes every job on runners that fill up, and the end state holds: no slot held on the
server or in any watcher's view, no runner ever seen above its capacity or below zero; no figure
is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.nats]

WAYS = ("record", "slot-record", "counter", "slot-keys")


@pytest.mark.timeout(180)
def test_slot_store_benchmark_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "slot-store.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "slot_store.py"), "--quick"]
    argv += ["--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False
    )
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report

    doc = json.loads(out.read_text())
    assert doc["ok"] is True, report
    assert doc["incomplete_jobs"] == 0, report
    params = doc["parameters"]
    capacity = params["capacity"]
    assert set(doc["results"]) == set(WAYS)
    for way in WAYS:
        rounds = doc["rounds"][way]
        assert len(rounds) == params["rounds"] == 1
        for figures in rounds:
            assert figures["completed"] == figures["jobs"] == params["jobs"] > 0
            assert figures["errors"] == [], (way, figures)
            assert figures["settled"] is True, (way, figures)
            for key in ("jobs_per_s", "client_cpu_us", "stored_msgs", "writes"):
                assert figures[key] is not None, (way, key)
        check = doc["checks"][way]
        assert check["ok"] is True, (way, check)
        assert check["slots_held_at_end"] == 0, (way, check)
        assert check["watchers_used_at_end"] == [0] * params["watchers"], (way, check)
        assert check["watchers_over_capacity"] == check["watchers_negative"] == 0, (way, check)
        # the quick run's runners fill up: the bound was reached and claims were refused
        assert check["watchers_most_used"] == capacity, (way, check)
        assert 0 < check["client_most_held"] <= capacity, (way, check)
        assert check["refusals"] > 0, (way, check)
    for name in WAYS:
        assert name in proc.stdout
    assert "slot-record/record" in proc.stdout
