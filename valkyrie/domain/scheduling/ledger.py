"""Summarising a dispatcher's queue (pure): groups by job type, region and label set, tenants.

The summary is what an autoscaler and an operator need ("how many jobs wait for a runner of this
kind, since when") with a bounded size whatever the jobs carry: at most ``max_groups`` groups and
``max_tenants`` tenants per dispatcher, the rest merged into ``(other)`` (largest kept first).
Snapshots of several dispatchers add up (:func:`merge_snapshots`): each queued job is held by one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from schemas import OTHER, JobSubmission, QueueGroup, QueueSnapshot
from valkyrie.domain.scheduling.priority import tenant_of
from valkyrie.domain.scheduling.queue import DispatchQueue

__all__ = [
    "MAX_GROUPS",
    "MAX_LABELS_CHARS",
    "MAX_TENANTS",
    "job_labels",
    "job_region",
    "merge_snapshots",
    "queue_snapshot",
]

#: queue groups one dispatcher reports at most (Prometheus series per dispatcher and metric)
MAX_GROUPS = 64
#: tenants one dispatcher reports at most
MAX_TENANTS = 128
#: a label set longer than this is cut (it is a metric label value)
MAX_LABELS_CHARS = 200


def job_region(spec: JobSubmission) -> str:
    """The region a job wants (``-`` when it names none): label, geographic hint, preference."""
    region = spec.labels.get("region")
    if region:
        return region
    hints = spec.routing_hints
    if hints is not None and hints.geographic_preference:
        return hints.geographic_preference.split("/", 1)[0]
    if spec.requirements.preferred_regions:
        return spec.requirements.preferred_regions[0]
    return "-"


def job_labels(spec: JobSubmission) -> str:
    """The job's labels but ``region``, as sorted ``key=value`` pairs joined by commas."""
    pairs = ",".join(f"{k}={v}" for k, v in sorted(spec.labels.items()) if k != "region")
    return pairs if len(pairs) <= MAX_LABELS_CHARS else pairs[: MAX_LABELS_CHARS - 1] + "…"


def _bounded(counts: Counter[str], limit: int) -> dict[str, int]:
    if len(counts) <= limit:
        return dict(counts)
    kept = dict(counts.most_common(limit - 1))
    kept[OTHER] = sum(counts.values()) - sum(kept.values())
    return kept


def queue_snapshot(
    queue: DispatchQueue,
    *,
    instance: str,
    now_ms: int,
    tenant_key: str,
    max_groups: int = MAX_GROUPS,
    max_tenants: int = MAX_TENANTS,
) -> QueueSnapshot:
    """What ``queue`` holds now (jobs whose record is not known yet count as ``-`` groups)."""
    counts: Counter[tuple[str, str, str]] = Counter()
    oldest: dict[tuple[str, str, str], int] = {}
    tenants: Counter[str] = Counter()
    waiting = 0
    for job in queue.jobs.values():
        waiting += not job.committing
        if job.record is None:
            key = ("-", "-", "")
            at = now_ms
            tenants["-"] += 1
        else:
            spec = job.record.spec
            key = (spec.job_type, job_region(spec), job_labels(spec))
            at = job.queued_at_ms()
            tenants[tenant_of(spec, tenant_key)] += 1
        counts[key] += 1
        oldest[key] = min(at, oldest.get(key, at))
    ranked = counts.most_common()
    groups = [
        QueueGroup(
            job_type=t, region=r, labels=lab, count=n, oldest_queued_at_ms=oldest[(t, r, lab)]
        )
        for (t, r, lab), n in ranked[: max_groups - 1 if len(ranked) > max_groups else None]
    ]
    if len(ranked) > max_groups:
        rest = ranked[max_groups - 1 :]
        groups.append(
            QueueGroup(
                job_type=OTHER,
                region=OTHER,
                labels=OTHER,
                count=sum(n for _, n in rest),
                oldest_queued_at_ms=min(oldest[k] for k, _ in rest),
            )
        )
    return QueueSnapshot(
        instance=instance,
        at_ms=now_ms,
        held=len(queue.jobs),
        waiting=waiting,
        oldest_queued_at_ms=min(oldest.values()) if oldest else None,
        groups=groups,
        tenants=_bounded(tenants, max_tenants),
    )


def merge_snapshots(
    snapshots: Iterable[QueueSnapshot], *, now_ms: int, fresh_ms: int
) -> QueueSnapshot:
    """The installation's queue: the sum of the snapshots written within ``fresh_ms``."""
    counts: Counter[tuple[str, str, str]] = Counter()
    oldest: dict[tuple[str, str, str], int] = {}
    tenants: Counter[str] = Counter()
    held = waiting = 0
    for snap in snapshots:
        if now_ms - snap.at_ms > fresh_ms:
            continue  # its dispatcher stopped writing: it holds nothing any more
        held += snap.held
        waiting += snap.waiting
        tenants.update(snap.tenants)
        for g in snap.groups:
            key = (g.job_type, g.region, g.labels)
            counts[key] += g.count
            oldest[key] = min(g.oldest_queued_at_ms, oldest.get(key, g.oldest_queued_at_ms))
    groups = [
        QueueGroup(
            job_type=t, region=r, labels=lab, count=n, oldest_queued_at_ms=oldest[(t, r, lab)]
        )
        for (t, r, lab), n in counts.most_common()
    ]
    return QueueSnapshot(
        instance="*",
        at_ms=now_ms,
        held=held,
        waiting=waiting,
        oldest_queued_at_ms=min(oldest.values()) if oldest else None,
        groups=groups,
        tenants=dict(tenants),
    )
