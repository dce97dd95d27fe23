"""The health records in the stats bucket: the monitor's summary and its fallback record.

The monitor writes both; the gateway and ``valkyrie status`` read them. An unreadable record
counts as absent: the monitor writes a new one at its next evaluation.
"""

from __future__ import annotations

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from schemas import FallbackRecord, HealthSummary, SafeDecoder
from valkyrie.bus.codec import encode
from valkyrie.bus.connection import Bus

__all__ = ["FALLBACK_KEY", "HEALTH_KEY", "HealthStore"]

#: stats bucket keys
HEALTH_KEY = "health"
FALLBACK_KEY = "fallback"

_SUMMARY = SafeDecoder(HealthSummary)
_RECORD = SafeDecoder(FallbackRecord)


class HealthStore:
    """Reads and writes the health records of one installation's stats bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        # (revision, summary) of the summary last written or read here; None: read it first
        self._known: tuple[int, HealthSummary | None] | None = None

    @classmethod
    async def open(cls, bus: Bus) -> HealthStore:
        """The store of ``bus``'s installation."""
        return cls(await bus.kv("stats"))

    async def _get(self, key: str) -> tuple[int, bytes | None]:
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return 0, None
        return int(entry.revision or 0), entry.value or None

    async def summary(self) -> tuple[int, HealthSummary | None]:
        """The stored summary and its revision (0: none was ever written)."""
        revision, raw = await self._get(HEALTH_KEY)
        try:
            return revision, _SUMMARY.decode(raw) if raw else None
        except msgspec.DecodeError:
            return revision, None

    async def replace_summary(
        self, summary: HealthSummary, *, tries: int = 3
    ) -> tuple[HealthSummary | None, int] | None:
        """Write ``summary`` over the stored one with a compare-and-set.

        Returns the summary it replaced and the new revision, or ``None`` when other writers
        (monitors) kept writing first. After a lost race the next try compares with what the
        winner recorded, so each change is recorded, and announced, by one writer only.
        """
        for _ in range(tries):
            if self._known is None:
                self._known = await self.summary()
            last, previous = self._known
            try:
                if last:
                    revision = await self._kv.update(HEALTH_KEY, encode(summary), last=last)
                else:
                    revision = await self._kv.create(HEALTH_KEY, encode(summary))
            except nats.js.errors.KeyWrongLastSequenceError:
                self._known = None
                continue
            self._known = (int(revision), summary)
            return previous, int(revision)
        return None

    async def fallback(self) -> FallbackRecord | None:
        """The automatic-fallback record, if one is stored."""
        _, raw = await self._get(FALLBACK_KEY)
        if raw is None:
            return None
        try:
            return _RECORD.decode(raw)
        except msgspec.DecodeError:
            return None

    async def put_fallback(self, record: FallbackRecord) -> None:
        """Store the automatic-fallback record."""
        await self._kv.put(FALLBACK_KEY, encode(record))

    async def forget_fallback(self) -> None:
        """Remove the automatic-fallback record."""
        try:
            await self._kv.delete(FALLBACK_KEY)
        except nats.js.errors.KeyNotFoundError:
            pass
