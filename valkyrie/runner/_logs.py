"""Batching a job's log lines into :class:`~schemas.JobLog` messages on the logs stream."""

from __future__ import annotations

import logging
from collections import deque
from typing import Literal

import anyio
import nats.errors
from nats.js import JetStreamContext
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from schemas import JobLog
from valkyrie.bus.codec import encode, now_ms
from valkyrie.config.model import LimitsConfig

__all__ = ["DEFAULT_LOG_MAX_BYTES", "MAX_LINE_CHARS", "LogPublisher", "LogStream"]

log = logging.getLogger("valkyrie.runner")

LogStream = Literal["stdout", "stderr", "system"]

#: Longer lines are cut so that one line cannot exceed the server's message size limit.
MAX_LINE_CHARS = 16 * 1024
_MAX_BATCH_BYTES = 256 * 1024
#: Sealed batches waiting to be published beyond which writers are slowed down (backpressure: a
#: command's output pipe then fills and the command waits, instead of its lines being lost).
_HIGH_WATER = 32
#: Sealed batches kept at most: when publishing is stuck (NATS unreachable), writers stop waiting
#: after ``room_timeout_s`` and lines beyond this are dropped (and counted): the job goes on.
_MAX_PENDING_BATCHES = 256
#: What is published of one attempt's log when its dispatch sets no cap (a control plane that
#: predates ``Dispatch.log_max_bytes``): the config key's default.
DEFAULT_LOG_MAX_BYTES = LimitsConfig().job_log_max_bytes
#: Past the cap, the runner's own ``system`` lines (why a job stops, …) may still add this much.
_SYSTEM_ALLOWANCE = 64 * 1024


class LogPublisher:
    """Collects lines and publishes them in batches, in order, with increasing ``seq``.

    A batch holds lines of one stream; it is sealed when the stream changes (so that the order of
    interleaved stdout/stderr lines survives), when it is full, or ``flush_interval_s`` after its
    first line. :meth:`run` publishes sealed batches until :meth:`close`.

    At most ``max_bytes`` of lines are published (``None``: no cap): the line that would pass it
    is replaced by a last one saying the log was truncated, and later lines are not published
    (the runner's ``system`` lines may still add ``_SYSTEM_ALLOWANCE``).
    """

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        *,
        job_id: str,
        attempt: int,
        runner_id: str,
        flush_interval_s: float = 0.1,
        batch_lines: int = 100,
        publish_timeout_s: float = 5.0,
        publish_retry_s: float = 10.0,
        max_bytes: int | None = None,
    ) -> None:
        self._js = js
        self._subject = subject
        self._job_id = job_id
        self._attempt = attempt
        self._runner_id = runner_id
        self._flush_interval_s = flush_interval_s
        self._batch_lines = max(1, batch_lines)
        self._publish_timeout_s = publish_timeout_s
        self._publish_retry_s = publish_retry_s
        self._lines: list[str] = []
        self._stream: LogStream = "stdout"
        self._bytes = 0
        self._first_at_ms = 0
        self._sealed: deque[JobLog] = deque()
        self._seq = 0
        self._dropped = 0
        self._closing = False
        self._discard = False
        self._data = anyio.Event()
        self._full = anyio.Event()
        self._done = anyio.Event()
        self._room = anyio.Event()
        self._stalled = False
        self._max_bytes = max_bytes
        self._written = 0
        #: lines not published because the log reached ``max_bytes``
        self.truncated = 0

    @property
    def dropped(self) -> int:
        """Lines dropped because publishing could not keep up."""
        return self._dropped

    def write(self, line: str, stream: LogStream) -> None:
        """Queue one line (never blocks; see ``_MAX_PENDING_BATCHES``)."""
        if self._closing:
            return
        if self._max_bytes is not None:
            self._written += len(line) if line.isascii() else len(line.encode())
            if self._written > self._max_bytes and (
                stream != "system" or self._written > self._max_bytes + _SYSTEM_ALLOWANCE
            ):
                if not self.truncated:
                    self._append(
                        f"[valkyrie] log truncated: this attempt's log reached {self._max_bytes} "
                        "bytes (limits.job_log_max_bytes); later lines are not published",
                        "system",
                    )
                self.truncated += 1
                return
        self._append(line, stream)

    def _append(self, line: str, stream: LogStream) -> None:
        if self._lines and stream != self._stream:
            self._seal()
        if not self._lines:
            self._stream = stream
            self._first_at_ms = now_ms()
        self._lines.append(line)
        self._bytes += len(line) + 3
        if len(self._lines) >= self._batch_lines or self._bytes >= _MAX_BATCH_BYTES:
            self._seal()
            self._full.set()
        self._data.set()

    async def wait_for_room(self, timeout_s: float = 5.0) -> None:
        """Wait (at most ``timeout_s``) while too many batches are waiting to be published.

        After one such wait times out, writers no longer wait until the backlog is worked off:
        a stuck connection must slow a job down once, not at every line.
        """
        if self._stalled:
            return
        with anyio.move_on_after(timeout_s) as scope:
            while len(self._sealed) >= _HIGH_WATER and not self._closing:
                await self._room.wait()
        self._stalled = scope.cancelled_caught

    def _seal(self) -> None:
        if not self._lines:
            return
        if len(self._sealed) >= _MAX_PENDING_BATCHES:
            self._dropped += len(self._lines)
        else:
            if self._dropped:
                notice = f"[{self._dropped} log lines dropped: publishing fell behind]"
                self._sealed.append(self._batch("system", [notice]))
                self._dropped = 0
            self._sealed.append(self._batch(self._stream, self._lines))
        self._lines = []
        self._bytes = 0

    def _batch(self, stream: LogStream, lines: list[str]) -> JobLog:
        batch = JobLog(
            job_id=self._job_id,
            attempt=self._attempt,
            runner_id=self._runner_id,
            at_ms=self._first_at_ms or now_ms(),
            stream=stream,
            seq=self._seq,
            lines=lines,
        )
        self._seq += 1
        return batch

    async def run(self) -> None:
        """Publish batches until :meth:`close` was called and everything queued is out."""
        try:
            while not (self._closing and not self._lines and not self._sealed):
                with anyio.move_on_after(1.0):
                    await self._data.wait()
                if self._lines and not self._closing:
                    # Let the batch fill for up to the flush interval: one publish per batch.
                    with anyio.move_on_after(self._flush_interval_s):
                        await self._full.wait()
                self._data = anyio.Event()
                self._full = anyio.Event()
                self._seal()
                while self._sealed and not self._discard:
                    await self._publish(self._sealed[0])
                    self._sealed.popleft()
                    if len(self._sealed) < _HIGH_WATER:
                        self._stalled = False
                    self._room.set()
                    self._room = anyio.Event()
                if self._discard:
                    return
        finally:
            self._done.set()

    async def _publish(self, batch: JobLog) -> None:
        msg_id = f"{self._job_id}.{self._attempt}.log.{batch.seq}"
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(self._publish_retry_s),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                retry=retry_if_exception_type((nats.errors.Error, OSError)),
                reraise=True,
            ):
                with attempt:
                    await self._js.publish(
                        self._subject,
                        encode(batch),
                        timeout=self._publish_timeout_s,
                        headers={"Nats-Msg-Id": msg_id},
                    )
        except (nats.errors.Error, OSError) as e:
            log.warning(
                "job %s attempt %d: dropped log batch %d (%d lines): %r",
                self._job_id,
                self._attempt,
                batch.seq,
                len(batch.lines),
                e,
            )

    async def close(self, *, discard: bool = False, timeout_s: float = 10.0) -> None:
        """Stop accepting lines and wait (at most ``timeout_s``) until queued ones are published.

        With ``discard``, queued lines are thrown away instead (the attempt was abandoned).
        """
        self._closing = True
        self._discard = discard
        self._data.set()
        self._full.set()
        self._room.set()
        with anyio.move_on_after(timeout_s):
            await self._done.wait()
