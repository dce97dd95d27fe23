"""A child process in its own process group, watched and reaped without threads.

asyncio's subprocess support reaps children itself and throws their resource usage away; this
module reaps with :func:`os.wait4` instead, which reports the CPU time and peak memory of the child
and of the descendants it waited for.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

import anyio

from schemas import ResourceUsage

__all__ = ["ChildProcess", "Exit"]

_READ_SIZE = 64 * 1024
_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Exit:
    """How a child ended: ``exit_code`` is negative (``-N``) when signal N killed it."""

    exit_code: int
    usage: ResourceUsage


def _usage(ru: resource.struct_rusage) -> ResourceUsage:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    rss_kib = ru.ru_maxrss / 1024 if sys.platform == "darwin" else ru.ru_maxrss
    return ResourceUsage(
        cpu_time_ms=int((ru.ru_utime + ru.ru_stime) * 1000),
        memory_peak_mb=round(rss_kib / 1024, 3),
    )


class ChildProcess:
    """One spawned command: read its output, signal its process group, wait for it, reap it."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.exited = anyio.Event()
        self._exit: Exit | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # no pidfd (not Linux >= 5.3): poll with waitid instead

    @classmethod
    def spawn(
        cls,
        args: str | Sequence[str],
        *,
        shell: bool,
        env: Mapping[str, str],
        cwd: str | None,
    ) -> ChildProcess:
        """Start ``args`` in a new session (so a new process group whose id is its pid).

        Raises:
            OSError: the program or ``cwd`` does not exist or cannot be executed.
        """
        # running a job's command is the runner's purpose; who may send one is the bus's
        # permissions' concern (the warning in docs/runners.md)
        popen = subprocess.Popen(  # noqa: S603 - the job's command, by design
            args,
            shell=shell,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        for pipe in (popen.stdout, popen.stderr):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
        return cls(popen)

    @property
    def result(self) -> Exit | None:
        """How it ended, once reaped."""
        return self._exit

    async def lines(self, which: str) -> AsyncIterator[str]:
        """Yield the lines of ``stdout`` or ``stderr`` (decoded as UTF-8, lenient) until EOF."""
        pipe = self._popen.stdout if which == "stdout" else self._popen.stderr
        assert pipe is not None
        fd = pipe.fileno()
        pending = b""
        while True:
            await anyio.wait_readable(fd)
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                yield raw.rstrip(b"\r").decode(errors="replace")
            # A line without end (a progress bar, binary output) must not grow without bound.
            while len(pending) >= _READ_SIZE:
                yield pending[:_READ_SIZE].decode(errors="replace")
                pending = pending[_READ_SIZE:]
        if pending:
            yield pending.rstrip(b"\r").decode(errors="replace")

    async def wait(self) -> None:
        """Wait until the child has exited (without reaping it), then set :attr:`exited`."""
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
        else:
            # Without a pidfd there is nothing to wait on: poll.
            while not self._has_exited():  # noqa: ASYNC110
                await anyio.sleep(_POLL_S)
        self.exited.set()

    def _has_exited(self) -> bool:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:
            return True

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process in the child's process group."""
        # Until reaped, the child (a zombie at worst) holds its pid, so the group id cannot have
        # been reused by an unrelated process.
        if self._exit is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    async def terminate(self, grace_s: float) -> bool:
        """SIGTERM the group, SIGKILL it if the child is still alive after ``grace_s``.

        Returns whether SIGKILL was needed.
        """
        self.signal_group(signal.SIGTERM)
        with anyio.move_on_after(grace_s):
            await self.exited.wait()
        if self.exited.is_set():
            return False
        self.signal_group(signal.SIGKILL)
        return True

    def reap(self) -> Exit:
        """Collect the exited child's status and resource usage (call after :meth:`wait`)."""
        if self._exit is None:
            _pid, status, ru = os.wait4(self.pid, 0)
            self._exit = Exit(exit_code=os.waitstatus_to_exitcode(status), usage=_usage(ru))
            # Popen did not reap it, so tell it the outcome: it would otherwise warn and retry.
            self._popen.returncode = self._exit.exit_code
        return self._exit

    async def aclose(self) -> None:
        """Kill whatever is left of the group, reap the child, and release the pipes."""
        if self._exit is None:
            self.signal_group(signal.SIGKILL)
            if not self.exited.is_set():
                with anyio.move_on_after(5):
                    await self.wait()
            if self.exited.is_set():
                self.reap()
        for pipe in (self._popen.stdout, self._popen.stderr):
            if pipe is not None and not pipe.closed:
                anyio.notify_closing(pipe.fileno())
                pipe.close()
        if self._pidfd is not None:
            anyio.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
