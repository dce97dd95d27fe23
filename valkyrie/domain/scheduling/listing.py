"""Listing a dispatcher's queue (pure): a filtered page of its held jobs, with their reasons.

Every dispatcher answers ``<prefix>.jobs.queue`` with :func:`list_queue` over the jobs it holds;
the asker merges the pages by ``key`` (each queued job is held by one dispatcher, so the merged
page lists each once). The order is serving order before tenant fair share (effective priority,
then submission time, then id), which every dispatcher can compute alike; the key is a string
that sorts the same way, so it is also the cursor of the next page.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from schemas import JobSubmission, QueuedJob, QueueListing, QueueListRequest
from valkyrie.config.model import ValkyrieConfig
from valkyrie.domain.explain import pending_reason
from valkyrie.domain.scheduling.ledger import job_labels, job_region
from valkyrie.domain.scheduling.priority import tenant_of
from valkyrie.domain.scheduling.queue import DispatchQueue, HeldJob

__all__ = ["list_queue", "listing_key", "merge_listings"]


def listing_key(effective_priority: int, submitted_at_ms: int, job_id: str) -> str:
    """A string that sorts like (effective priority, submission time, id)."""
    return f"{effective_priority:04d}.{submitted_at_ms:015d}.{job_id}"


def list_queue(
    queue: DispatchQueue,
    request: QueueListRequest,
    *,
    instance: str,
    now_ms: int,
    config: ValkyrieConfig,
    has_free: Callable[[str], bool],
) -> QueueListing:
    """The first ``request.limit`` held jobs matching ``request`` after its cursor.

    Jobs whose record is not known yet, and jobs being dispatched right now, are not listed
    (they are in the ledger's counts, and gone or placed in a moment). Each job's effective
    priority is the one the last placement round gave it (a round runs at least every 0.25 s and
    ranks every held job), so a listing costs one pass over the held jobs, not a sort.
    """
    tenant_key = config.scheduling.tenant_key

    def wanted(spec: JobSubmission) -> bool:
        # the cheap test first; a group or tenant is only worked out when asked for
        return (
            (request.job_type is None or spec.job_type == request.job_type)
            and (request.region is None or job_region(spec) == request.region)
            and (request.labels is None or job_labels(spec) == request.labels)
            and (request.tenant is None or tenant_of(spec, tenant_key) == request.tenant)
        )

    matching: list[tuple[str, HeldJob]] = []
    for job in queue.jobs.values():
        if job.record is None or job.committing or not wanted(job.record.spec):
            continue
        matching.append((listing_key(job.effective, job.record.submitted_at_ms, job.job_id), job))
    after = request.after
    page = heapq.nsmallest(
        request.limit,
        (m for m in matching if after is None or m[0] > after),
        key=lambda m: m[0],
    )
    jobs = []
    for key, job in page:
        record = job.record
        assert record is not None
        spec = record.spec
        jobs.append(
            QueuedJob(
                job_id=job.job_id,
                job_type=spec.job_type,
                region=job_region(spec),
                labels=job_labels(spec),
                tenant=tenant_of(spec, tenant_key),
                priority=spec.priority,
                effective_priority=job.effective,
                attempt=record.attempt,
                submitted_at_ms=record.submitted_at_ms,
                queued_at_ms=job.queued_at_ms(),
                reason=pending_reason(
                    record,
                    job.last,
                    mode=config.mode.value,
                    now_ms=now_ms,
                    has_free=has_free(spec.job_type),
                ),
                key=key,
            )
        )
    return QueueListing(instance=instance, matching=len(matching), jobs=jobs)


def merge_listings(listings: list[QueueListing], limit: int) -> tuple[list[QueuedJob], int, bool]:
    """Every dispatcher's page merged: the first ``limit`` jobs by key, how many match in all.

    The third value says whether more follow (the last job's ``key`` is then the next page's
    cursor); it is exact when the dispatchers were asked for ``limit + 1`` jobs each.
    """
    merged = heapq.nsmallest(
        limit + 1, (j for li in listings for j in li.jobs), key=lambda j: j.key
    )
    total = sum(li.matching for li in listings)
    return merged[:limit], total, len(merged) > limit
