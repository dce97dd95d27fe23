"""Report of the dispatch benchmark: ratios, targets, per-job costs and the stdout tables."""

from __future__ import annotations

from typing import Any

from benchmarks._phases import (
    PHASES,
)
from benchmarks._report import (
    ratio,
    render_table,
)


def _row(system: str, phase: str, r: dict[str, Any]) -> list[object]:
    lat = r["latency_ms"]
    return [
        system,
        phase,
        r["submitted"],
        r["dispatched"],
        r["missing"],
        r["submit_rate_per_s"],
        r["throughput_per_s"],
        lat["p50"],
        lat["p95"],
        lat["p99"],
        lat["max"],
    ]


def ratios(results: dict[str, Any], baseline: str = "raw") -> dict[str, Any]:
    """valkyrie/``baseline`` for throughput and latency percentiles, per phase."""
    v, r = results.get("valkyrie") or {}, results.get(baseline) or {}
    out: dict[str, Any] = {}
    for phase in PHASES:
        vp, rp = v.get(phase), r.get(phase)
        if not vp or not rp:
            continue
        out[phase] = {
            "throughput": ratio(vp["throughput_per_s"], rp["throughput_per_s"]),
            **{
                f"latency_{k}": ratio(vp["latency_ms"][k], rp["latency_ms"][k])
                for k in ("p50", "p95", "p99")
            },
        }
    return out


def scale_ratio(results: dict[str, Any]) -> float | None:
    """Saturating throughput with many runners over that with the usual count (same run)."""
    big = ((results.get("valkyrie_scale") or {}).get("saturating") or {}).get("throughput_per_s")
    base = ((results.get("valkyrie") or {}).get("saturating") or {}).get("throughput_per_s")
    return ratio(big, base) if big and base else None


def _display(system: str, p: dict[str, Any]) -> str:
    if system == "valkyrie_scale":
        return f"valkyrie@{p['scale_runners']}"
    return system.replace("_", "-")


def render(doc: dict[str, Any]) -> str:
    """The stdout report."""
    results, rat, p = doc["results"], doc["ratios"], doc["parameters"]
    rows: list[list[object]] = []
    for system in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events", "valkyrie_scale"):
        for phase in PHASES:
            r = (results.get(system) or {}).get(phase)
            if r:
                rows.append(_row(_display(system, p), phase, r))
    scale = scale_ratio(results)
    if scale is not None:
        rows.append(
            [
                f"@{p['scale_runners']}/@{p['runners']}",
                "saturating",
                None,
                None,
                None,
                None,
                scale,
                None,
                None,
                None,
                None,
            ]
        )
    for label, by_phase in (
        ("valkyrie/raw", rat),
        ("valkyrie/raw-lifecycle", rat.get("lifecycle")),
        ("valkyrie/raw-lifecycle-events", rat.get("lifecycle_events")),
    ):
        for phase in PHASES:
            q = (by_phase or {}).get(phase)
            if not q:
                continue
            rows.append(
                [
                    label,
                    phase,
                    None,
                    None,
                    None,
                    None,
                    q["throughput"],
                    q["latency_p50"],
                    q["latency_p95"],
                    q["latency_p99"],
                    None,
                ]
            )
    headers = [
        "system",
        "phase",
        "submitted",
        "dispatched",
        "missing",
        "submit/s",
        "dispatch/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
    ]
    lines = [
        f"dispatch benchmark: {p['runners']} runners x capacity {p['runner_capacity']}, "
        f"paced {p['paced_jobs']} jobs at {p['rate']:g}/s, saturating {p['jobs']} jobs "
        f"({p['publish_concurrency']} publishers), nproc {doc['environment']['machine']['nproc']}",
        "",
        render_table(headers, rows),
        "",
        "ratio rows: dispatch/s column = valkyrie/baseline throughput, latency columns = "
        "valkyrie/baseline latency; raw-lifecycle = raw plus a runner slot taken and freed and "
        "each job recorded done (runner report captured by a stream): 3 more KV "
        "compare-and-sets, no events; raw-lifecycle-events = raw-lifecycle plus 4 events per "
        "job stored (deduplicated by id) before the ack",
    ]
    cpu_rows = []
    for system in ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events"):
        idle = (results.get(system) or {}).get("idle_cpu_cores")
        if idle:
            cpu_rows.append(
                [
                    _display(system, p),
                    "idle (no jobs)",
                    idle.get("benchmark"),
                    idle.get("worker"),
                    idle.get("nats_server"),
                    idle.get("others"),
                    idle.get("cpu_pressure"),
                    None,
                    None,
                    None,
                ]
            )
        for phase in PHASES:
            r = (results.get(system) or {}).get(phase)
            if r:
                c, per_job = r["cpu_cores"], r.get("cpu_ms_per_job") or {}
                cpu_rows.append(
                    [
                        _display(system, p),
                        phase,
                        c.get("benchmark"),
                        c.get("worker"),
                        c.get("nats_server"),
                        c.get("others"),
                        c.get("cpu_pressure"),
                        per_job.get("worker"),
                        per_job.get("nats_server"),
                        per_job.get("benchmark"),
                    ]
                )
    if cpu_rows:
        lines += [
            "",
            "CPU while dispatching, in cores (1.0 = one core busy); others = other users of the "
            "machine; pressure = share of time some task waited for a CPU; ms/job = CPU per job "
            "from first submit until idle (completion included):",
            render_table(
                [
                    "system",
                    "phase",
                    "bench",
                    "worker",
                    "server",
                    "others",
                    "pressure",
                    "worker ms/job",
                    "server ms/job",
                    "bench ms/job",
                ],
                cpu_rows,
                digits=3,
            ),
        ]
    split_rows = []
    for phase in PHASES:
        r = (results.get("valkyrie") or {}).get(phase) or {}
        b = r.get("breakdown_ms")
        if b:
            m = b["milestone"]
            for label, key in (
                (f"submit -> {m}", f"submit_to_{m}"),
                (f"{m} -> dispatch", f"{m}_to_dispatch"),
            ):
                x = b[key]
                split_rows.append([phase, label, x["count"], x["p50"], x["p95"], x["p99"]])
    if split_rows:
        lines += [
            "",
            "valkyrie latency split at the queued event (intake done; seen by a subscriber here):",
            render_table(["phase", "segment", "jobs", "p50 ms", "p95 ms", "p99 ms"], split_rows),
        ]
    lines += _costs_lines(doc)
    lines += _scale_out_lines(doc)
    lines += _target_lines(doc)
    if doc["errors"]:
        lines += ["", "ERRORS:", *doc["errors"]]
    if doc["missing_total"]:
        lines += ["", f"WARNING: {doc['missing_total']} submitted job(s) were never dispatched"]
    return "\n".join(lines)


SYSTEMS = ("valkyrie", "raw", "raw_lifecycle", "raw_lifecycle_events", "valkyrie_scale")


def _costs_lines(doc: dict[str, Any]) -> list[str]:
    results, p = doc["results"], doc["parameters"]
    rows = []
    for system in SYSTEMS:
        r = (results.get(system) or {}).get("saturating") or {}
        c, cpu = r.get("costs"), r.get("cpu_ms_per_job") or {}
        if not c:
            continue
        rows.append(
            [
                _display(system, p),
                (results.get(system) or {}).get("event_loop"),
                c["stored_messages_per_job"],
                c["round_trips_per_job"],
                c["api_requests_per_job"],
                c["acked_publishes_per_job"],
                c["server_msgs_in_per_job"],
                c["server_msgs_out_per_job"],
                cpu.get("worker"),
                cpu.get("nats_server"),
                cpu.get("benchmark"),
            ]
        )
    if not rows:
        return []
    return [
        "",
        "per job, saturating phase (first submit until idle): stored = messages stored in every "
        "stream (KV included); round trips = JetStream API requests + acknowledged publishes "
        "(a lower bound: direct gets and pull requests are not counted); msgs in/out = every "
        "message into and out of the server; CPU in ms:",
        render_table(
            [
                "system",
                "loop",
                "stored",
                "round trips",
                "api",
                "acked pubs",
                "msgs in",
                "msgs out",
                "worker ms",
                "server ms",
                "bench ms",
            ],
            rows,
        ),
    ]


def _scale_out_lines(doc: dict[str, Any]) -> list[str]:
    layouts = doc.get("scale_out")
    if not layouts:
        return []
    rows, predictions = [], []
    for name, x in layouts.items():
        rows.append(
            [
                name,
                len(x["worker_processes"] or []),
                x["throughput_per_s"],
                x["worker_cpu_ms_per_job"],
                x["server_cpu_ms_per_job"],
            ]
        )
        for q in x["predicted"]:
            predictions.append(
                f"  from {name}: {q['cores']} cores -> {q['jobs_per_s']:,.0f} jobs/s "
                f"(workers {q['worker_cores']} cores in >= {q['worker_processes_needed']} "
                f"processes, server {q['server_cores']}); first limit: {q['first_limit']}"
            )
    return [
        "",
        "scale-out: the default layout once (x1) and twice (x2), saturating:",
        render_table(
            ["layout", "processes", "jobs/s", "worker ms/job", "server ms/job"], rows, digits=3
        ),
        "prediction, X = 1000 * cores / (worker ms + server ms) per job, every core busy, "
        "costs per job as measured (benchmark process and runners elsewhere):",
        *predictions,
    ]


def _target_lines(doc: dict[str, Any]) -> list[str]:
    lines = ["", "targets (issue 17; ratios valkyrie / baseline within this run):"]
    for t in doc["targets"].values():
        verdict = {True: "MET", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"  {t['what']} {t['target']}: {verdict} ({t['measured']})")
    return lines
