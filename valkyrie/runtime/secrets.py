"""Jobs' secret environment values in the secrets bucket (key = job id), until the job ends.

Intake stores them before it creates the job record, dispatchers read them for every attempt
(into that attempt's ``Dispatch``), and whoever ends the job deletes them; the bucket's TTL
(``limits.job_retention_s``) removes what a crash left behind. Nothing else reads the bucket.
"""

from __future__ import annotations

import logging

import anyio
import msgspec
import nats.errors
import nats.js.errors

from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import kv_create

__all__ = ["SecretStore"]

log = logging.getLogger("valkyrie.secrets")

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(dict[str, str])
#: how long a best-effort delete may take (the TTL is the backstop)
_FORGET_TIMEOUT_S = 2.0


class SecretStore:
    """Store, read and forget the secret values of jobs."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def store(self, job_id: str, values: dict[str, str]) -> bool:
        """Store ``values`` for ``job_id`` unless an entry exists; whether this call stored them.

        An existing entry is never replaced: it is this job's own (a redelivered submission) or
        another job's whose id was chosen again (that submission is a duplicate), and nobody may
        change another job's secrets by naming its id.

        Raises:
            nats.errors.Error: the write failed (storage full included: see
                :func:`~valkyrie.bus.storage.storage_full`).
        """
        kv = await self._bus.kv("secrets")
        try:
            await kv_create(kv, job_id, _ENCODER.encode(values))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def read(self, job_id: str) -> dict[str, str] | None:
        """The values stored for ``job_id``; ``None`` when there are none (any more)."""
        kv = await self._bus.kv("secrets")
        try:
            entry = await kv.get(job_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not entry.value:
            return None
        return _DECODER.decode(entry.value)

    async def forget(self, job_id: str) -> None:
        """Delete ``job_id``'s values, best effort (logged when it fails: the TTL removes them)."""
        with anyio.move_on_after(_FORGET_TIMEOUT_S) as scope:
            try:
                kv = await self._bus.kv("secrets")
                await kv.purge(job_id)
            except (nats.errors.Error, nats.js.errors.Error, OSError) as e:
                log.warning("secrets of %s not deleted (%r); the bucket's TTL will", job_id, e)
        if scope.cancelled_caught:
            log.warning("secrets of %s not deleted in time; the bucket's TTL will", job_id)
