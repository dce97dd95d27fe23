"""Report of the dispatch benchmark: ratios, targets, per-job costs and the stdout tables."""

from __future__ import annotations

from typing import Any

from benchmarks._phases import (
    PHASES,
    TARGET_PACED_P50_MS,
    TARGET_THROUGHPUT,
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


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the pipeline is judged against, and whether they were met."""
    v = results.get("valkyrie") or {}
    sat = (v.get("saturating") or {}).get("throughput_per_s")
    p50 = ((v.get("paced") or {}).get("latency_ms") or {}).get("p50")
    floor = ((results.get("raw_lifecycle") or {}).get("saturating") or {}).get("throughput_per_s")
    with_events = ((results.get("raw_lifecycle_events") or {}).get("saturating") or {}).get(
        "throughput_per_s"
    )
    return {
        # not a target: how far the least durable lifecycle in plain NATS gets on this machine
        "raw_lifecycle_saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": floor,
            "met": floor is not None and floor >= TARGET_THROUGHPUT,
        },
        # not a target either: the same floor with the event stream Valkyrie's contract has
        "raw_lifecycle_events_saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": with_events,
            "met": with_events is not None and with_events >= TARGET_THROUGHPUT,
        },
        "saturating_throughput_per_s": {
            "target": f">= {TARGET_THROUGHPUT:g}",
            "measured": sat,
            "met": sat is not None and sat >= TARGET_THROUGHPUT,
        },
        "paced_p50_ms": {
            "target": f"<= {TARGET_PACED_P50_MS:g}",
            "measured": p50,
            "met": p50 is not None and p50 <= TARGET_PACED_P50_MS,
        },
    }


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
    t = doc["targets"]
    if results.get("valkyrie"):
        lines += [
            "",
            "targets: saturating throughput {} jobs/s: {} ({}); paced p50 {} ms: {} ({})".format(
                t["saturating_throughput_per_s"]["target"],
                "MET" if t["saturating_throughput_per_s"]["met"] else "NOT MET",
                t["saturating_throughput_per_s"]["measured"],
                t["paced_p50_ms"]["target"],
                "MET" if t["paced_p50_ms"]["met"] else "NOT MET",
                t["paced_p50_ms"]["measured"],
            ),
        ]
    floor = t.get("raw_lifecycle_saturating_throughput_per_s") or {}
    if floor.get("measured") is not None:
        lines.append(
            "floor on this machine: raw-lifecycle (plain NATS: slots counted, job recorded "
            f"dispatched and done, no events) saturating {floor['measured']} jobs/s"
        )
    with_events = t.get("raw_lifecycle_events_saturating_throughput_per_s") or {}
    if with_events.get("measured") is not None:
        lines.append(
            "the same with the event stream (raw-lifecycle-events, 4 events per job) saturating "
            f"{with_events['measured']} jobs/s"
        )
    if doc["errors"]:
        lines += ["", "ERRORS:", *doc["errors"]]
    if doc["missing_total"]:
        lines += ["", f"WARNING: {doc['missing_total']} submitted job(s) were never dispatched"]
    return "\n".join(lines)
