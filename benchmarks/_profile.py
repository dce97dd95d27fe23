"""Profiling helpers: summaries of py-spy "raw" (collapsed stack) output and of cProfile files.

py-spy (``pip install py-spy`` into the venv) samples a running process without slowing it much;
``record --format raw`` writes one line per distinct stack, ``frame;frame;... count``. The summary
gives, per function, the share of samples it was on the stack (inclusive) and at the top (self),
and per source file, the inclusive share (which handler or library the CPU went to).
"""

from __future__ import annotations

import pstats
import re
import shutil
from collections import Counter
from pathlib import Path

__all__ = ["find_py_spy", "summarize_collapsed", "write_cprofile_summary"]

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?):(?P<line>\d+)\)$")


def find_py_spy() -> str | None:
    """The py-spy executable next to this Python or on PATH."""
    import sys

    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    for anchor in ("site-packages", "handlers", "valkyrie", "benchmarks", "asyncio"):
        if anchor in parts:
            i = parts.index(anchor)
            return "/".join(parts[i + 1 :] if anchor == "site-packages" else parts[i:])
    return "/".join(parts[-2:])


def summarize_collapsed(path: Path, *, top: int = 40) -> str:
    """A text summary of a py-spy ``--format raw`` file."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names: list[str] = []
        paths: set[str] = set()
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m:
                short = _short(m.group("file"))
                names.append(f"{m.group('func')} ({short})")
                paths.add(short)
            else:
                names.append(frame)
        for name in set(names):
            inclusive[name] += n
        if names:
            own[names[-1]] += n
        for p in paths:
            files[p] += n
    if not total:
        return f"{path}: no samples\n"

    def block(title: str, counter: Counter[str]) -> list[str]:
        return [title, *(f"{100 * v / total:6.1f}%  {k}" for k, v in counter.most_common(top)), ""]

    return "\n".join(
        [
            f"{path.name}: {total} samples (on-CPU only)",
            "",
            *block("-- by file, inclusive", files),
            *block("-- by function, inclusive", inclusive),
            *block("-- by function, self", own),
        ]
    )


def write_cprofile_summary(prof: Path, out: Path, *, top: int = 45) -> None:
    """Write the top functions of a cProfile file by own time and by cumulative time."""
    with out.open("w") as stream:
        stats = pstats.Stats(str(prof), stream=stream)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
