"""What a job handler gets: the dispatch, a log sink, and the stop request."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias

import anyio
import msgspec

from schemas import Dispatch, JobResult, JobSubmission
from valkyrie.runner._logs import MAX_LINE_CHARS, LogPublisher, LogStream
from valkyrie.runner._redact import Redactor

__all__ = ["JobContext", "JobHandler", "StopReason"]

#: Why the runner asks a job to stop: a ``cancel`` command, an ``abandon`` command (the result will
#: not be reported), the job's ``timeout`` (``max_execution_time_s``), or the runner's ``shutdown``
#: (drain timeout reached).
StopReason = Literal["cancel", "abandon", "timeout", "shutdown"]

_TAIL_LINES = 50
_TAIL_BYTES = 8 * 1024


class JobContext:
    """One attempt of one job, as seen by its handler.

    The handler should watch :attr:`stop_requested`: once it is set, stop the work within
    :attr:`grace_period_s` and return (the returned result is still used, but the outcome follows
    :attr:`stop_reason`). A handler still running ``grace_period_s`` plus the runner's
    ``stop_timeout_s`` later is cancelled.

    Attributes:
        dispatch: the placement message, as received.
        runner_id: the id of the runner running the job.
        stop_requested: set when the job must stop; :attr:`stop_reason` says why.
    """

    def __init__(self, dispatch: Dispatch, runner_id: str, logs: LogPublisher) -> None:
        self.dispatch = dispatch
        #: replaces this attempt's secret values with ``***`` in what is published
        self.redact = Redactor(dispatch.secret_env.values())
        self.runner_id = runner_id
        self.stop_requested = anyio.Event()
        self._stop_reason: StopReason | None = None
        self._stop_detail: str | None = None
        self._grace_period_s = 0.0
        self._logs = logs
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)

    @property
    def job_id(self) -> str:
        """The job's id."""
        return self.dispatch.job_id

    @property
    def attempt(self) -> int:
        """The attempt number (1 for the first placement)."""
        return self.dispatch.attempt

    @property
    def spec(self) -> JobSubmission:
        """The job as it was submitted."""
        return self.dispatch.spec

    @property
    def secret_env(self) -> dict[str, str]:
        """The job's secret environment values (``spec.secret_env`` shows ``***`` instead).

        Set them in the job's environment; never log them: every line passed to :meth:`log` and
        the result's ``output_tail`` and ``error`` have them replaced by ``***`` all the same.
        """
        return self.dispatch.secret_env

    @property
    def payload(self) -> Any:
        """The job's payload (``spec.payload``)."""
        return self.dispatch.spec.payload

    @property
    def timeout_s(self) -> float:
        """How long the job may run (``spec.requirements.max_execution_time_s``)."""
        return float(self.dispatch.spec.requirements.max_execution_time_s)

    @property
    def stop_reason(self) -> StopReason | None:
        """Why the job must stop, or ``None`` while it may go on."""
        return self._stop_reason

    @property
    def stop_detail(self) -> str | None:
        """A human-readable explanation of the stop request (e.g. the cancel reason)."""
        return self._stop_detail

    @property
    def grace_period_s(self) -> float:
        """How long the handler has to stop once :attr:`stop_requested` is set."""
        return self._grace_period_s

    async def log(self, line: str, stream: LogStream = "stdout") -> None:
        """Record output: multi-line text becomes several lines; over-long lines are cut.

        Lines are published in batches in the background; this only waits (a few seconds at
        most) when publishing falls far behind. ``stdout`` and ``stderr`` lines also feed
        :attr:`output_tail`. Secret values are replaced by ``***`` first (before a line is cut),
        and at most the dispatch's ``log_max_bytes`` are published.
        """
        if self.redact:
            line = self.redact(line)
        for part in line.splitlines() or [""]:
            if len(part) > MAX_LINE_CHARS:
                part = f"{part[:MAX_LINE_CHARS]}… [{len(part) - MAX_LINE_CHARS} characters cut]"
            if stream != "system":
                self._tail.append(part)
            self._logs.write(part, stream)
        await self._logs.wait_for_room()

    @property
    def output_tail(self) -> str:
        """The last 50 output lines (stdout and stderr, in order), at most the last 8 KiB."""
        text = "\n".join(self._tail)
        data = text.encode()
        if len(data) <= _TAIL_BYTES:
            return text
        return data[-_TAIL_BYTES:].decode(errors="ignore")

    def redact_result(self, result: JobResult) -> JobResult:
        """``result`` with this attempt's secret values replaced by ``***`` (what is reported)."""
        if not self.redact:
            return result
        return msgspec.structs.replace(
            result,
            output_tail=self.redact(result.output_tail),
            error=self.redact(result.error) if result.error is not None else None,
        )

    def _request_stop(self, reason: StopReason, grace_period_s: float, detail: str | None) -> bool:
        """Ask the job to stop; the first request wins. Returns whether this one took effect."""
        if self._stop_reason is not None:
            # An abandon overrides an earlier cancel/timeout: the result must then not be reported.
            if reason == "abandon" and self._stop_reason != "abandon":
                self._stop_reason = reason
                self._stop_detail = detail
            return False
        self._stop_reason = reason
        self._stop_detail = detail
        self._grace_period_s = grace_period_s
        self.stop_requested.set()
        return True


#: The signature of a job handler: run the job described by the context and return its result.
#: The outcome follows from the result: an ``exit_code`` of 0 (or none, without ``error``) is
#: ``succeeded``, another exit code ``failed``, an ``error`` without exit code ``error``. Raising
#: :class:`~valkyrie.runner.JobError` (or any exception) also gives ``error``.
JobHandler: TypeAlias = Callable[[JobContext], Awaitable[JobResult]]
