"""The reference job handler: run the payload's command in a subprocess and report on it."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
import msgspec

from schemas import FieldError, JobResult, convert_or_errors
from valkyrie.runner._context import JobContext
from valkyrie.runner._logs import LogStream
from valkyrie.runner._process import ChildProcess, Exit

__all__ = ["CommandPayload", "ShellHandler", "parse_command_payload"]

#: After the command exits, how long its output pipes may stay open (held by a process that left
#: its process group) before reading stops.
_OUTPUT_DRAIN_S = 2.0

_Word = Annotated[str, msgspec.Meta(min_length=1)]


class CommandPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The payload the reference runner executes.

    Attributes:
        command: an argument list (run directly) or a string (run by ``/bin/sh -c``).
        shell: run through the shell; defaults to true for a string, false for a list.
        env: extra environment variables for the command.
        cwd: the working directory; ``None`` gives a fresh temporary directory per attempt.
    """

    command: Annotated[list[_Word], msgspec.Meta(min_length=1)] | _Word
    shell: bool | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None

    def argv(self) -> tuple[str | list[str], bool]:
        """What to pass to the process: ``(args, shell)``.

        Raises:
            ValueError: a string command with ``shell: false`` cannot be split into words.
        """
        shell = self.shell if self.shell is not None else isinstance(self.command, str)
        if isinstance(self.command, str):
            return (self.command, True) if shell else (shlex.split(self.command), False)
        return (shlex.join(self.command), True) if shell else (list(self.command), False)

    def display(self) -> str:
        """The command as one line, for logs."""
        text = self.command if isinstance(self.command, str) else shlex.join(self.command)
        return text if len(text) <= 200 else f"{text[:199]}…"


def parse_command_payload(payload: Any) -> tuple[CommandPayload | None, list[FieldError]]:
    """Validate a job payload; errors carry paths such as ``$.payload.command``."""
    spec, errors = convert_or_errors(CommandPayload, {} if payload is None else payload)
    return spec, [
        FieldError(path="$.payload" + e.path.removeprefix("$"), reason=e.reason) for e in errors
    ]


def _spawn_error(e: OSError, payload: CommandPayload, cwd: str) -> JobResult:
    """Why the command could not start, as its result.

    A command that does not exist or may not be executed is the job's fault, not the
    infrastructure's: it ends ``failed`` with the exit code a shell gives it (127, 126), so it
    is not retried unless the job's retry policy says so. Anything else is an ``error``.
    """
    missing = e.filename if e.filename is not None else payload.display()
    if isinstance(e, FileNotFoundError):
        if str(missing) == cwd:
            return JobResult(error=f"working directory not found: {cwd}")
        return JobResult(exit_code=127, error=f"executable not found: {missing}")
    if isinstance(e, PermissionError):
        return JobResult(exit_code=126, error=f"permission denied: {missing}")
    return JobResult(error=f"cannot start {payload.display()}: {e.strerror or e}")


class ShellHandler:
    """A :data:`~valkyrie.runner.JobHandler` that executes the payload's command.

    The command runs in its own process group with stdin closed; stdout and stderr lines become the
    job's logs. On a stop request (cancel, timeout, shutdown) the group gets SIGTERM, then SIGKILL
    after the context's grace period. When the command exits, processes it left behind in its group
    are killed. Resource usage comes from ``wait4`` on the command's process: CPU time and peak RSS
    of that process and of the descendants it waited for (not of ones it left running).

    Args:
        workdir: where per-attempt temporary directories are made (default: the system's).
        inherit_env: pass the runner's environment on (without ``VALKYRIE_*`` variables).
    """

    def __init__(self, *, workdir: str | Path | None = None, inherit_env: bool = True) -> None:
        self._workdir = str(workdir) if workdir is not None else None
        self._inherit_env = inherit_env

    async def __call__(self, ctx: JobContext) -> JobResult:
        """Run the job's command and return its result."""
        payload, errors = parse_command_payload(ctx.payload)
        if payload is None:
            return JobResult(error="; ".join(f"{e.path}: {e.reason}" for e in errors))
        try:
            args, shell = payload.argv()
        except ValueError as e:
            return JobResult(error=f"$.payload.command: cannot split into words: {e}")
        scratch = (
            None
            if payload.cwd
            else tempfile.mkdtemp(prefix=f"valkyrie-{ctx.job_id}-", dir=self._workdir)
        )
        cwd = payload.cwd or scratch
        assert cwd is not None
        try:
            return await self._run(ctx, payload, args, shell, cwd)
        finally:
            if scratch is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)

    def _env(self, ctx: JobContext, payload: CommandPayload) -> dict[str, str]:
        if self._inherit_env:
            env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
        else:
            env = {"PATH": os.environ.get("PATH", os.defpath)}
        env.update(payload.env)
        env.update(ctx.secret_env)  # the values: the spec shows *** (docs/security.md#secrets)
        env.update(
            VALKYRIE_JOB_ID=ctx.job_id,
            VALKYRIE_JOB_ATTEMPT=str(ctx.attempt),
            VALKYRIE_RUNNER_ID=ctx.runner_id,
        )
        return env

    async def _run(
        self,
        ctx: JobContext,
        payload: CommandPayload,
        args: str | list[str],
        shell: bool,
        cwd: str,
    ) -> JobResult:
        if ctx.stop_requested.is_set():
            return JobResult(error=f"stopped before it started: {ctx.stop_detail}")
        await ctx.log(f"[valkyrie] $ {payload.display()}", "system")
        started = anyio.current_time()
        try:
            proc = ChildProcess.spawn(args, shell=shell, env=self._env(ctx, payload), cwd=cwd)
        except OSError as e:
            result = _spawn_error(e, payload, cwd)
            await ctx.log(f"[valkyrie] {result.error}", "system")
            return result
        try:
            end = await self._supervise(ctx, proc)
        finally:
            with anyio.CancelScope(shield=True):
                await proc.aclose()
        return JobResult(
            exit_code=end.exit_code,
            duration_ms=int((anyio.current_time() - started) * 1000),
            output_tail=ctx.output_tail,
            resource_usage=end.usage,
        )

    async def _supervise(self, ctx: JobContext, proc: ChildProcess) -> Exit:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_when_asked, ctx, proc)
            async with anyio.create_task_group() as readers:
                readers.start_soon(self._pump, ctx, proc, "stdout")
                readers.start_soon(self._pump, ctx, proc, "stderr")
                await proc.wait()
                # The job is over: whatever it left running in its group would hold the pipes open.
                proc.signal_group(signal.SIGKILL)
                end = proc.reap()
                readers.cancel_scope.deadline = anyio.current_time() + _OUTPUT_DRAIN_S
            if readers.cancel_scope.cancelled_caught:
                await ctx.log(
                    "[valkyrie] output still open after the command exited (a process left its "
                    "process group); stopped reading",
                    "system",
                )
            tg.cancel_scope.cancel()
        return end

    async def _pump(self, ctx: JobContext, proc: ChildProcess, stream: LogStream) -> None:
        async for line in proc.lines(stream):
            await ctx.log(line, stream)

    async def _stop_when_asked(self, ctx: JobContext, proc: ChildProcess) -> None:
        await ctx.stop_requested.wait()
        grace = ctx.grace_period_s
        await ctx.log(f"[valkyrie] SIGTERM to the process group; SIGKILL in {grace:g}s", "system")
        if await proc.terminate(grace):
            await ctx.log(f"[valkyrie] still running {grace:g}s after SIGTERM: SIGKILL", "system")
