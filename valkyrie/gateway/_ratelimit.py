"""Per-caller token buckets; the rate and burst are passed on every call so config changes apply."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["RateLimiter", "retry_after_header"]

#: buckets kept before idle, full ones are forgotten (a full bucket is the same as a new one)
_PRUNE_ABOVE = 10_000


class RateLimiter:
    """Token buckets keyed by caller (token name, or the client address for anonymous calls).

    A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; each call takes one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str, *, rate: float, burst: int) -> float:
        """Take a token for ``key``; return 0 if allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(burst), now))
        tokens = min(float(burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / rate
        if len(self._buckets) > _PRUNE_ABOVE:
            self._prune(now, rate, burst)
        return wait

    def wait(self, key: str, *, rate: float, burst: int) -> float:
        """The seconds until ``key`` has a token (0: it has one now), without taking it."""
        tokens, last = self._buckets.get(key, (float(burst), self._clock()))
        tokens = min(float(burst), tokens + (self._clock() - last) * rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def _prune(self, now: float, rate: float, burst: int) -> None:
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * rate >= burst:
                del self._buckets[key]


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` takes whole seconds: round up, and never say 0 (that invites a hot loop)."""
    return str(max(1, math.ceil(wait_s)))
