"""Generated blocks in docs/: the block between two markers, and the ``--write``/``--check`` CLI.

Each generated table (configuration keys, security roles, metrics, benchmark results) lives in a
Markdown file between a begin and an end marker, and its module is run with ``--write`` to
update it or ``--check`` to fail when it drifted. (``schemas`` has its own copy for the event
table: it imports nothing of ``valkyrie``.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["generated_doc_main", "replace_region"]


def replace_region(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with what stands between the markers ``begin`` and ``end`` replaced by ``block``.

    Raises:
        ValueError: the markers are missing (or out of order).
    """
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the markers {begin!r} and {end!r} are missing")
    return text[: start + len(begin)] + "\n" + block + text[stop:]


def generated_doc_main(
    argv: Sequence[str] | None,
    *,
    prog: str,
    path: Path,
    render: Callable[[], str],
    begin: str,
    end: str,
) -> int:
    """``--write`` updates the block in ``path``; ``--check`` exits 1 when it drifted; else print it."""
    parser = argparse.ArgumentParser(prog=prog)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the block in the document")
    group.add_argument("--check", action="store_true", help="exit 1 when the block is stale")
    parser.add_argument("--path", type=Path, default=path)
    args = parser.parse_args(argv)
    block = render()
    if not (args.write or args.check):
        sys.stdout.write(block)
        return 0
    current = args.path.read_text()
    wanted = replace_region(current, begin, end, block)
    if args.check:
        if wanted != current:
            print(f"{args.path} is out of date: run {prog} --write", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        args.path.write_text(wanted)
        print(f"updated {args.path}")
    return 0
