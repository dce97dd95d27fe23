"""Issue 17's targets and the scale-out prediction, computed from a run's results.

Pure functions of the result document: the benchmark calls them at the end of a run, and
``benchmarks.results_table`` reads what they wrote into the committed JSON files.
"""

from __future__ import annotations

import math
from typing import Any

#: (key, what, comparison, bound): every ratio is valkyrie over the baseline, within one run
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("saturating_vs_raw", "saturating throughput / raw", ">=", 0.5),
    (
        "saturating_vs_raw_lifecycle_events",
        "saturating throughput / raw-lifecycle-events",
        ">=",
        1.0,
    ),
    ("paced_p50_vs_raw", "paced p50 / raw paced p50", "<=", 1.3),
    ("paced_p99_ms", "paced p99 (ms)", "<=", 5.0),
    ("scale_runners_vs_base", "saturating throughput, scale runners / base runners", ">=", 0.9),
)

#: cores the scale-out prediction is made for
PREDICTED_CORES = (8, 16)


def figure(results: dict[str, Any], system: str, phase: str, *path: str) -> float | None:
    """``results[system][phase][path...]``, or ``None`` when any step is missing."""
    node: Any = (results.get(system) or {}).get(phase) or {}
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target: its bound, what this run measured, and whether it was met (``None``: not run)."""
    sat = "throughput_per_s"
    measured = {
        "saturating_vs_raw": _ratio(
            figure(results, "valkyrie", "saturating", sat),
            figure(results, "raw", "saturating", sat),
        ),
        "saturating_vs_raw_lifecycle_events": _ratio(
            figure(results, "valkyrie", "saturating", sat),
            figure(results, "raw_lifecycle_events", "saturating", sat),
        ),
        "paced_p50_vs_raw": _ratio(
            figure(results, "valkyrie", "paced", "latency_ms", "p50"),
            figure(results, "raw", "paced", "latency_ms", "p50"),
        ),
        "paced_p99_ms": figure(results, "valkyrie", "paced", "latency_ms", "p99"),
        "scale_runners_vs_base": _ratio(
            figure(results, "valkyrie_scale", "saturating", sat),
            figure(results, "valkyrie", "saturating", sat),
        ),
    }
    out: dict[str, Any] = {}
    for key, what, op, bound in TARGETS:
        value = measured[key]
        met = None if value is None else value >= bound if op == ">=" else value <= bound
        out[key] = {"what": what, "target": f"{op} {bound:g}", "measured": value, "met": met}
    return out


def predict(worker_ms: float, server_ms: float, cores: int) -> dict[str, Any]:
    """What CPU per job predicts on ``cores`` cores for the workers and the server together.

    Throughput when the control plane keeps every core busy: ``X = 1000 * C / (w + s)`` jobs/s
    (``w``, ``s``: worker and server CPU ms per job). The workers then need ``C * w / (w + s)``
    cores, which single-threaded Python processes only get with at least that many worker
    processes; the server ``C * s / (w + s)``. The larger share is the first limit.
    """
    total = worker_ms + server_ms
    jobs_per_s = 1000 * cores / total
    worker_cores = cores * worker_ms / total
    return {
        "cores": cores,
        "jobs_per_s": round(jobs_per_s, 1),
        "worker_cores": round(worker_cores, 2),
        "server_cores": round(cores - worker_cores, 2),
        "worker_processes_needed": math.ceil(worker_cores),
        "first_limit": "python workers" if worker_ms >= server_ms else "nats-server",
    }


def scale_out(results: dict[str, Any]) -> dict[str, Any] | None:
    """Throughput, CPU per job and the predictions of each measured layout (``--scale-out``)."""
    layouts = results.get("scale_out")
    if not layouts:
        return None
    out: dict[str, Any] = {}
    for name, r in sorted(layouts.items()):
        w = figure(layouts, name, "saturating", "cpu_ms_per_job", "worker")
        s = figure(layouts, name, "saturating", "cpu_ms_per_job", "nats_server")
        out[name] = {
            "worker_processes": r.get("worker_processes"),
            "throughput_per_s": figure(layouts, name, "saturating", "throughput_per_s"),
            "worker_cpu_ms_per_job": w,
            "server_cpu_ms_per_job": s,
            "predicted": [predict(w, s, c) for c in PREDICTED_CORES] if w and s else [],
        }
    return out
