"""What each dispatcher holds in its queue, summarised for metrics, quotas and operators.

Every dispatcher process writes a :class:`QueueSnapshot` of the queued jobs it holds to the stats
KV bucket under ``queue.<instance>`` about once a second. A queued job is held by exactly one
dispatcher at a time (the events consumer delivers it to one), so summing the fresh snapshots of
every instance counts each queued job once; a snapshot whose ``at_ms`` is older than a few
seconds belongs to a dispatcher that stopped and is ignored.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from schemas._common import NonNegativeInt, TimestampMs

__all__ = [
    "OTHER",
    "QueueGroup",
    "QueueListRequest",
    "QueueListing",
    "QueueSnapshot",
    "QueuedJob",
]

#: the group, region or label set that stands for everything past the cardinality bound
OTHER = "(other)"


class QueueGroup(msgspec.Struct, frozen=True, kw_only=True):
    """Queued jobs of one job type, region and label set.

    ``region`` is the job's ``labels.region``, else the region of its
    ``routing_hints.geographic_preference``, else its first ``requirements.preferred_regions``,
    else ``-``. ``labels`` is its other labels as sorted ``key=value`` pairs joined by commas
    (empty when none). Past the bound, groups are merged into one whose fields are ``(other)``.
    """

    job_type: str
    region: str
    labels: str
    count: NonNegativeInt
    oldest_queued_at_ms: TimestampMs


class QueueSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The queue one dispatcher holds (stats bucket, key ``queue.<instance>``).

    ``held`` counts every queued job the dispatcher holds, ``waiting`` those not being dispatched
    right now; ``tenants`` counts held jobs per tenant (``scheduling.tenant_key``), bounded like
    the groups.
    """

    instance: str
    at_ms: TimestampMs
    held: NonNegativeInt
    waiting: NonNegativeInt
    oldest_queued_at_ms: TimestampMs | None = None
    groups: list[QueueGroup] = msgspec.field(default_factory=list)
    tenants: dict[str, NonNegativeInt] = msgspec.field(default_factory=dict)


class QueueListRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Ask every dispatcher for a page of the queued jobs it holds (``<prefix>.jobs.queue``).

    The filters match a job's queue group (see :class:`QueueGroup`) and tenant exactly. Jobs are
    listed in serving order before tenant fair share: effective priority, then submission time;
    ``after`` is the ``key`` of the last job of the previous page.
    """

    job_type: str | None = None
    region: str | None = None
    labels: str | None = None
    tenant: str | None = None
    after: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50


class QueuedJob(msgspec.Struct, frozen=True, kw_only=True):
    """One queued job as its dispatcher sees it, with a short reason it still waits.

    ``reason`` comes from the dispatcher's last placement attempt (``valkyrie jobs explain`` gives
    the full explanation). ``key`` orders the listing: effective priority, submission time, id.
    """

    job_id: str
    job_type: str
    region: str
    labels: str
    tenant: str
    priority: int
    effective_priority: int
    attempt: NonNegativeInt
    submitted_at_ms: TimestampMs
    queued_at_ms: TimestampMs
    reason: str
    key: str


class QueueListing(msgspec.Struct, frozen=True, kw_only=True):
    """One dispatcher's answer to a :class:`QueueListRequest`.

    ``jobs`` are its first ``limit`` matching jobs after the cursor; ``matching`` counts every
    held job that matches the filters; ``error`` is set when it could not answer.
    """

    instance: str
    matching: NonNegativeInt = 0
    jobs: list[QueuedJob] = msgspec.field(default_factory=list)
    error: str | None = None
