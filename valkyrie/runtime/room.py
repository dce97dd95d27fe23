"""Whether a bucket has room for one more new entry, keeping a reserve for the ones it holds.

A job record grows as its job runs (runner, attempts, result): in a full jobs bucket the records
of jobs already accepted could not move on. So intake stops taking jobs while the bucket is
fuller than ``1 - limits.job_store_reserve`` of its size limit, keeping the rest for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import nats.errors

from valkyrie.bus.connection import Bus

__all__ = ["BucketRoom"]

#: how old the bucket's fill may be when it is far from the threshold
REFRESH_S = 1.0


class BucketRoom:
    """The fill of one bucket against its limit.

    It is read again at most every ``REFRESH_S``, and before every check once the bucket is
    within one reserve of the threshold; in between, what this process adds (:meth:`took`) is
    counted, so a burst from one process is seen at once.
    """

    def __init__(self, bus: Bus, bucket: str, reserve: Callable[[], float]) -> None:
        self._bus = bus
        self._stream = f"KV_{bus.names.bucket(bucket)}"
        self._setting = f"VALKYRIE_{bucket.upper()}_MAX_BYTES"
        self._reserve = reserve
        self._used = 0
        self._limit = 0
        self._read_at = float("-inf")

    async def full(self) -> str | None:
        """Why no new entry may be added now (``None``: there is room)."""
        reserve = self._reserve()
        threshold = 1.0 - reserve
        ratio = self._used / self._limit if self._limit > 0 else 0.0
        stale = time.monotonic() - self._read_at >= REFRESH_S
        if stale or ratio >= threshold - reserve:
            await self._read()
            ratio = self._used / self._limit if self._limit > 0 else 0.0
        if self._limit <= 0 or ratio < threshold:
            return None
        return (
            f"{self._stream} holds {self._used} of its {self._limit} bytes ({self._setting}); "
            f"the last {reserve:.0%} are kept for the jobs already accepted "
            "(limits.job_store_reserve)"
        )

    def took(self, nbytes: int) -> None:
        """This process added about ``nbytes`` since the last reading (counted until the next)."""
        self._used += nbytes

    async def _read(self) -> None:
        try:
            info = await self._bus.js.stream_info(self._stream)
        except (nats.errors.Error, OSError):
            return  # keep the last reading: the write itself still fails when it must
        self._used = int(info.state.bytes)
        self._limit = int(info.config.max_bytes or 0)
        self._read_at = time.monotonic()
