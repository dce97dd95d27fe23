"""The results table in docs/benchmarks.md is what ``benchmarks.results_table`` makes of the
committed runs, and the generator reads a run the way the benchmark writes it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import results_table
from benchmarks._targets import predict


def _phase(throughput: float, p50: float, p99: float, costs: dict[str, Any]) -> dict[str, Any]:
    return {
        "throughput_per_s": throughput,
        "latency_ms": {"p50": p50, "p99": p99},
        "cpu_ms_per_job": {"worker": 1.25, "nats_server": 0.5},
        "costs": costs,
    }


def _run(valkyrie_sat: float) -> dict[str, Any]:
    costs = {"stored_messages_per_job": 12.0, "round_trips_per_job": 9.5}
    raw_costs = {"stored_messages_per_job": 2.0, "round_trips_per_job": 2.0}
    return {
        "timestamp": "2026-12-04T08:00:00+00:00",
        "environment": {"source": {"commit": "abcdef0123456789"}},
        "parameters": {"runners": 100, "scale_runners": 10000},
        "results": {
            "valkyrie": {
                "paced": _phase(200, 1.5, 4.0, costs),
                "saturating": _phase(valkyrie_sat, 900, 1500, costs),
            },
            "raw": {
                "paced": _phase(200, 1.0, 2.0, raw_costs),
                "saturating": _phase(4000, 300, 500, raw_costs),
            },
            "raw_lifecycle_events": {"saturating": _phase(1500, 600, 900, raw_costs)},
            "valkyrie_scale": {"saturating": _phase(valkyrie_sat * 0.95, 900, 1500, costs)},
            "scale_out": {
                "x1": {"saturating": _phase(valkyrie_sat, 900, 1500, costs)},
                "x2": {"saturating": _phase(valkyrie_sat * 1.5, 900, 1500, costs)},
            },
        },
    }


def _rows(region: str) -> dict[str, list[str]]:
    rows = {}
    for line in region.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_docs_region_is_generated_from_the_committed_runs() -> None:
    files = results_table.committed_files()
    assert all(f.name.startswith("dispatch-") and "scratch" not in f.parts for f in files)
    wanted = results_table.table(results_table.load(files))
    current = results_table.DOC.read_text()
    assert results_table.replace_region(current, wanted) == current, (
        "docs/benchmarks.md is stale: run .venv/bin/python -m benchmarks.results_table --write"
    )


def test_a_synthetic_run_gives_its_figures_and_verdicts(tmp_path: Path) -> None:
    path = tmp_path / "dispatch-20261204T080000Z-abcdef0.json"
    path.write_text(json.dumps(_run(2100.0)))
    rows = _rows(results_table.table(results_table.load([path])))
    assert rows["commit"] == ["`abcdef0`"]
    assert rows["valkyrie saturating (jobs/s)"] == ["2,100.0"]
    assert rows["raw-lifecycle saturating (jobs/s)"] == ["-"]
    assert rows["valkyrie / raw saturating"] == ["0.53"]
    assert rows["valkyrie / raw paced p50 / p99"] == ["1.50 / 2.00"]
    assert rows["scale runners / base runners saturating"] == ["0.95 (10,000/100)"]
    assert rows["scale-out x1 / x2 saturating (jobs/s)"] == ["2,100.0 / 3,150.0"]
    stored = next(v for k, v in rows.items() if k.startswith("stored messages per job"))
    assert stored == ["12.0 / 2.0 / - / 2.0"]
    verdicts = {k: v[0] for k, v in rows.items() if k.startswith("target:")}
    assert verdicts == {
        "target: saturating throughput / raw >= 0.5": "met (0.53)",
        "target: saturating throughput / raw-lifecycle-events >= 1": "met (1.40)",
        "target: paced p50 / raw paced p50 <= 1.3": "**missed** (1.50)",
        "target: paced p99 (ms) <= 5": "met (4.00)",
        "target: saturating throughput, scale runners / base runners >= 0.9": "met (0.95)",
    }


def test_columns_follow_the_runs_and_missed_targets_show() -> None:
    slow = copy.deepcopy(_run(1000.0))
    del slow["results"]["valkyrie_scale"]
    del slow["results"]["scale_out"]
    rows = _rows(results_table.table([("a.json", _run(2100.0)), ("b.json", slow)]))
    assert rows["valkyrie saturating (jobs/s)"] == ["2,100.0", "1,000.0"]
    assert rows["target: saturating throughput / raw >= 0.5"][1] == "**missed** (0.25)"
    assert rows["target: saturating throughput, scale runners / base runners >= 0.9"][1] == "-"
    assert rows["scale-out x1 / x2 saturating (jobs/s)"][1] == "-"


def test_the_region_is_replaced_between_the_markers_only() -> None:
    text = f"intro\n{results_table.START}\nold table\n{results_table.END}\noutro\n"
    new = results_table.replace_region(text, "new table\n")
    assert new == f"intro\n{results_table.START}\nnew table\n{results_table.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        results_table.replace_region("no markers here", "x")


def test_prediction_names_the_larger_share_as_the_first_limit() -> None:
    workers_bound = predict(1.5, 0.5, 8)
    assert workers_bound["jobs_per_s"] == 4000.0
    assert workers_bound["worker_cores"] == 6.0
    assert workers_bound["first_limit"] == "python workers"
    assert predict(0.4, 0.6, 16)["first_limit"] == "nats-server"
