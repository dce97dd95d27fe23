"""Subprocesses a benchmark owns, and CPU accounting per process from ``/proc``.

Every process started through :class:`Children` is stopped by :meth:`Children.stop_all`, which the
benchmark calls from a plain ``finally`` outside the event loop, so Ctrl-C, SIGTERM and errors all
clean up. Children get their own session so a terminal's Ctrl-C reaches only the benchmark, which
then stops them in order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "Children", "CpuClock", "cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float | None:
    """User+system CPU seconds used so far by ``pid`` (all threads); ``None`` if unknown."""
    if pid is None:
        return None
    if pid == os.getpid():
        t = os.times()
        return t.user + t.system
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces: split after its closing parenthesis
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return None


@dataclass
class CpuClock:
    """CPU used by named processes over an interval, as a share of one core."""

    pids: Mapping[str, int | None]
    _start: dict[str, float | None] = field(default_factory=dict)
    _wall: float = 0.0

    def start(self) -> None:
        """Start the interval."""
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float | None]:
        """Per process: CPU seconds over the interval divided by wall seconds (1.0 = one core)."""
        wall = time.perf_counter() - self._wall
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            before, after = self._start.get(name), cpu_seconds(pid)
            out[name] = (
                round((after - before) / wall, 3)
                if before is not None and after is not None and wall > 0
                else None
            )
        return out


@dataclass
class Child:
    """A subprocess with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int | None:
        """The pid while running."""
        return self.proc.pid if self.proc.poll() is None else None

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``; the exit code."""
        proc = self.proc
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except KeyboardInterrupt:  # a second Ctrl-C while waiting: do not leave it behind
                proc.kill()
                proc.wait(5)
                raise
        return proc.returncode


@dataclass
class Children:
    """Every subprocess a benchmark started, stopped newest first."""

    started: list[Child] = field(default_factory=list)

    def spawn(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path
    ) -> Child:
        """Start ``argv`` with stdout and stderr to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name, proc, log)
        self.started.append(child)
        return child

    def stop(self, child: Child, timeout_s: float = 15.0) -> int:
        """Stop one child and forget it."""
        code = child.stop(timeout_s)
        if child in self.started:
            self.started.remove(child)
        return code

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """Stop every child still known, newest first."""
        while self.started:
            child = self.started.pop()
            try:
                child.stop(timeout_s)
            except Exception:
                if child.proc.poll() is None:
                    child.proc.kill()
