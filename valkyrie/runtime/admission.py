"""Whether intake may take one more job in: its tenant's queue quota, and room in the jobs bucket.

The quota rule is pure (:func:`valkyrie.domain.intake.queue_quota_error`); this gathers its inputs
(the live limits, the queue ledger's count for the tenant) and asks the bucket (:class:`BucketRoom`).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import FieldError, JobSubmission
from valkyrie.bus.connection import Bus
from valkyrie.config.live import LiveConfig
from valkyrie.domain.intake import queue_quota_error
from valkyrie.domain.scheduling.priority import tenant_of
from valkyrie.runtime.queue_ledger import QueueLedger
from valkyrie.runtime.room import BucketRoom

__all__ = ["RECORD_OVERHEAD", "Admission", "AdmissionRefusal"]

#: what a job record adds to its submission's size, about (ids, states, instants, envelope)
RECORD_OVERHEAD = 512


@dataclass(frozen=True, slots=True)
class AdmissionRefusal:
    """Why a job may not come in now: over its tenant's quota, or no room (one of the two)."""

    over_quota: FieldError | None = None
    #: why the jobs bucket has no room (see :meth:`BucketRoom.full`)
    full: str | None = None


class Admission:
    """Admits new jobs against the live limits."""

    def __init__(self, bus: Bus, config: LiveConfig, ledger: QueueLedger) -> None:
        self._config = config
        self._ledger = ledger
        self._room = BucketRoom(bus, "jobs", lambda: config.current.limits.job_store_reserve)

    async def refused(self, spec: JobSubmission) -> AdmissionRefusal | None:
        """Why ``spec`` may not be queued now (``None``: it may); the quota is checked first."""
        over = self.over_quota(spec)
        if over is not None:
            return AdmissionRefusal(over_quota=over)
        full = await self._room.full()
        return AdmissionRefusal(full=full) if full is not None else None

    def over_quota(self, spec: JobSubmission) -> FieldError | None:
        """Why the tenant of ``spec`` may not queue another job now (``None``: it may)."""
        current = self._config.current
        limits, tenant_key = current.limits, current.scheduling.tenant_key
        if limits.max_queued_per_tenant is None and not limits.tenant_max_queued:
            return None
        tenant = tenant_of(spec, tenant_key)
        return queue_quota_error(
            spec,
            self._ledger.queued_of(tenant),
            tenant=tenant,
            tenant_key=tenant_key,
            limits=limits,
        )

    def took(self, submission_bytes: int) -> None:
        """A job record of about this submission's size was just added (counted until re-read)."""
        self._room.took(submission_bytes + RECORD_OVERHEAD)
