"""Scheduling as pure logic: placement, the dispatch queue, priorities and fair shares, the index."""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
    from valkyrie.domain.scheduling.index import (
        IndexedSet,
        RunnerIndex,
    )
    from valkyrie.domain.scheduling.ledger import (
        MAX_GROUPS,
        MAX_LABELS_CHARS,
        MAX_TENANTS,
        job_labels,
        job_region,
        merge_snapshots,
        queue_snapshot,
    )
    from valkyrie.domain.scheduling.listing import (
        list_queue,
        listing_key,
        merge_listings,
    )
    from valkyrie.domain.scheduling.placement import (
        CONSTRAINTS,
        Placement,
        Scored,
        ScoreWeights,
        check_runner,
        failing_constraints,
        place,
        runner_labels,
        score_runner,
    )
    from valkyrie.domain.scheduling.priority import (
        FairShare,
        effective_priority,
        tenant_of,
    )
    from valkyrie.domain.scheduling.queue import (
        FULL_SCAN_EVERY_MS,
        Action,
        Breach,
        Commit,
        DispatchQueue,
        DurationEstimates,
        Expire,
        HeldJob,
        Offer,
        dispatch_decision,
        predicted_finish_at_ms,
        score_weights,
        target_at_risk,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "CONSTRAINTS",
    "FULL_SCAN_EVERY_MS",
    "MAX_GROUPS",
    "MAX_LABELS_CHARS",
    "MAX_TENANTS",
    "Action",
    "Breach",
    "Commit",
    "DispatchQueue",
    "DurationEstimates",
    "Expire",
    "FairShare",
    "HeldJob",
    "IndexedSet",
    "Offer",
    "Placement",
    "RunnerIndex",
    "ScoreWeights",
    "Scored",
    "check_runner",
    "dispatch_decision",
    "effective_priority",
    "failing_constraints",
    "job_labels",
    "job_region",
    "list_queue",
    "listing_key",
    "merge_listings",
    "merge_snapshots",
    "place",
    "predicted_finish_at_ms",
    "queue_snapshot",
    "runner_labels",
    "score_runner",
    "score_weights",
    "target_at_risk",
    "tenant_of",
]
