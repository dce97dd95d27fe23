"""Queue order as pure logic: priority with aging and SLA classes, SLO boosts, weighted fair shares.

Effective priority (lower runs first)::

    base      = min(spec.priority, sla_classes[qos.priority_class])      # SLA class can raise it
    aging     = min(max_aging_boost, floor(max(0, waited_s) / aging_step_s))   # waiting raises it
    effective = base - aging            (- 5 - max_aging_boost when boosted: above every unboosted job)

Jobs of equal effective priority are ordered by their tenant's fair-share usage (decayed count of
recent dispatches divided by the tenant's weight), then by arrival.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas import JobSubmission

__all__ = ["FairShare", "effective_priority", "tenant_of"]


def tenant_of(spec: JobSubmission, tenant_key: str) -> str:
    """The tenant a job is charged to (``metadata[tenant_key]``; ``-`` when absent)."""
    return spec.metadata.get(tenant_key) or "-"


def effective_priority(
    spec: JobSubmission,
    *,
    waited_ms: int,
    aging_step_s: float,
    max_aging_boost: int,
    sla_classes: Mapping[str, int],
    boosted: bool = False,
    aging: bool = True,
) -> int:
    """The priority a queued job competes with now (see the module docstring)."""
    base = spec.priority
    qos = spec.qos_requirements
    if qos is not None and qos.priority_class is not None:
        base = min(base, sla_classes.get(qos.priority_class, base))
    steps = int(max(0, waited_ms) / 1000 // aging_step_s) if aging else 0  # clocks may skew
    effective = base - min(max_aging_boost, steps)
    if boosted:
        # ahead of every job that is not boosted: those are at least 0 - max_aging_boost
        effective -= 5 + max_aging_boost
    return effective


@dataclass
class FairShare:
    """Decayed per-tenant dispatch counts: tenants that got less (per weight) go first."""

    half_life_s: float = 60.0
    weights: Mapping[str, float] = field(default_factory=dict)
    _usage: dict[str, tuple[float, float]] = field(default_factory=dict)

    def _decayed(self, tenant: str, now_s: float) -> float:
        value, at = self._usage.get(tenant, (0.0, now_s))
        return value * math.pow(0.5, max(0.0, now_s - at) / self.half_life_s)

    def charge(self, tenant: str, now_s: float, amount: float = 1.0) -> None:
        """Count a dispatch for ``tenant``."""
        self._usage[tenant] = (self._decayed(tenant, now_s) + amount, now_s)

    def share_key(self, tenant: str, now_s: float) -> float:
        """Usage per unit of weight (lower is served first)."""
        weight = self.weights.get(tenant, 1.0) or 1e-9
        return self._decayed(tenant, now_s) / weight

    def usage(self, now_s: float) -> dict[str, float]:
        """Current decayed usage of every tenant seen."""
        return {t: self._decayed(t, now_s) for t in self._usage}
