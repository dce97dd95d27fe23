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

__all__ = ["Child", "Children", "CpuClock", "CpuSample", "cpu_seconds"]

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


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine (all cores) since boot, from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice
    return (sum(fields[:8]) - idle) / _TICKS


def _cpu_pressure_us() -> int | None:
    """Total microseconds some task waited for a CPU (Linux PSI), since boot."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some"):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU counters at one instant."""

    wall: float
    process_s: dict[str, float | None]
    machine_busy_s: float | None
    pressure_us: int | None


def _total_cpu(pids: int | tuple[int, ...] | None) -> float | None:
    if pids is None or isinstance(pids, int):
        return cpu_seconds(pids)
    each = [cpu_seconds(pid) for pid in pids]
    return None if any(v is None for v in each) else sum(v for v in each if v is not None)


@dataclass
class CpuClock:
    """CPU used by named processes, and by the whole machine, between samples."""

    #: name -> a pid, or several whose CPU counts together (one role split over processes)
    pids: Mapping[str, int | tuple[int, ...] | None]

    def sample(self) -> CpuSample:
        """The counters now."""
        return CpuSample(
            wall=time.perf_counter(),
            process_s={name: _total_cpu(pids) for name, pids in self.pids.items()},
            machine_busy_s=_machine_busy_s(),
            pressure_us=_cpu_pressure_us(),
        )

    @staticmethod
    def seconds(a: CpuSample, b: CpuSample) -> dict[str, float | None]:
        """CPU seconds each process used from ``a`` to ``b``."""
        out: dict[str, float | None] = {}
        for name, before in a.process_s.items():
            after = b.process_s.get(name)
            out[name] = after - before if before is not None and after is not None else None
        return out

    @staticmethod
    def usage(a: CpuSample, b: CpuSample) -> dict[str, float | None]:
        """From ``a`` to ``b``, in cores (1.0 = one core busy): each process, the whole machine,
        everything else on it (``others``: other users of the shared cores), and the share of
        time some task waited for a CPU (``cpu_pressure``, 0-1; high means a noisy run)."""
        wall = b.wall - a.wall
        if wall <= 0:
            return {}
        out: dict[str, float | None] = {
            name: round(s / wall, 3) if s is not None else None
            for name, s in CpuClock.seconds(a, b).items()
        }
        machine = (
            (b.machine_busy_s - a.machine_busy_s) / wall
            if a.machine_busy_s is not None and b.machine_busy_s is not None
            else None
        )
        out["machine"] = round(machine, 3) if machine is not None else None
        per = [out[name] for name in a.process_s]
        out["others"] = (
            round(max(0.0, machine - sum(v for v in per if v is not None)), 3)
            if machine is not None and all(v is not None for v in per)
            else None
        )
        out["cpu_pressure"] = (
            round((b.pressure_us - a.pressure_us) / 1e6 / wall, 3)
            if a.pressure_us is not None and b.pressure_us is not None
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
            except (subprocess.TimeoutExpired, OSError):
                if child.proc.poll() is None:
                    child.proc.kill()
