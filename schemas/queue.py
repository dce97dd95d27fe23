"""What each dispatcher holds in its queue, summarised for metrics, quotas and operators.

Every dispatcher process writes a :class:`QueueSnapshot` of the queued jobs it holds to the stats
KV bucket under ``queue.<instance>`` about once a second. A queued job is held by exactly one
dispatcher at a time (the events consumer delivers it to one), so summing the fresh snapshots of
every instance counts each queued job once; a snapshot whose ``at_ms`` is older than a few
seconds belongs to a dispatcher that stopped and is ignored.
"""

from __future__ import annotations

import msgspec

from schemas._common import NonNegativeInt, TimestampMs

__all__ = ["OTHER", "QueueGroup", "QueueSnapshot"]

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
