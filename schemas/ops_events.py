"""Typed events about operating Valkyrie: ``config.*``, ``health.*``, ``dead.*`` and ``audit.*``."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from schemas._common import TimestampMs
from schemas.event_base import TypedEvent
from schemas.health import HealthStatus
from schemas.jobs import FieldError

__all__ = [
    "AUDIT_EVENTS",
    "HEALTH_CHANGED",
    "AuditConfigChange",
    "AuditConfigReload",
    "AuditEvent",
    "AuditIntegrationFallback",
    "AuditJobCancel",
    "AuditJobSubmit",
    "AuditRunnerRegister",
    "AuditRunnerStatus",
    "ConfigChanged",
    "ConfigRejected",
    "DeadReplayed",
    "FallbackActivated",
    "FallbackOverridden",
    "FallbackRecovered",
    "HealthChanged",
    "HealthDegraded",
    "HealthHealthy",
    "HealthUnhealthy",
]


# -- config -----------------------------------------------------------------------------------------
class _ConfigEvent(TypedEvent, frozen=True, kw_only=True):
    entity: ClassVar[str] = "config"
    subject_doc: ClassVar[str] = "the config revision (a number)"


class ConfigChanged(_ConfigEvent, frozen=True, kw_only=True):
    """A config change was stored as a new revision (config handler)."""

    event_type: ClassVar[str] = "config.changed"

    changed_by: str
    at_ms: TimestampMs
    diff: dict[str, Any]
    reason: str | None

    def event_id(self) -> str:
        """``config.changed.<revision>``: once per revision."""
        return f"config.changed.{self.subject_id}"


class ConfigRejected(_ConfigEvent, frozen=True, kw_only=True):
    """A config change was refused, with every problem; ``subject_id`` is the revision it would have been."""

    event_type: ClassVar[str] = "config.rejected"

    requested_by: str
    reason: str | None
    errors: list[FieldError]


# -- health -----------------------------------------------------------------------------------------
class HealthChanged(TypedEvent, frozen=True, kw_only=True):
    """A component's (or the overall) health status changed (monitor).

    A component's event has ``details`` (its failing checks); the overall one has ``reasons``.
    ``summary_revision`` is the health summary's revision in the stats bucket that recorded it.
    """

    entity: ClassVar[str] = "health"
    subject_doc: ClassVar[str] = "the component (`consumer-lag`, `runner-pool`, ...), or `overall`"
    optional_keys: ClassVar[frozenset[str]] = frozenset({"details", "reasons"})

    from_: HealthStatus = msgspec.field(name="from")
    to: HealthStatus
    details: list[str] | None = None
    reasons: list[str] | None = None
    mode: str
    config_revision: int
    summary_revision: int = 0

    def event_id(self) -> str:
        """``health.<subject_id>.<status>.<summary_revision>``: once per recorded change."""
        return f"health.{self.subject_id}.{self.kind}.{self.summary_revision}"


class HealthHealthy(HealthChanged, frozen=True, kw_only=True):
    """A component (or the whole installation) became healthy again (monitor)."""

    event_type: ClassVar[str] = "health.healthy"


class HealthDegraded(HealthChanged, frozen=True, kw_only=True):
    """A component (or the whole installation) became degraded (monitor)."""

    event_type: ClassVar[str] = "health.degraded"


class HealthUnhealthy(HealthChanged, frozen=True, kw_only=True):
    """A component (or the whole installation) became unhealthy (monitor)."""

    event_type: ClassVar[str] = "health.unhealthy"


#: the typed event of a change to each status
HEALTH_CHANGED: dict[HealthStatus, type[HealthChanged]] = {
    "healthy": HealthHealthy,
    "degraded": HealthDegraded,
    "unhealthy": HealthUnhealthy,
}


class _FallbackEvent(TypedEvent, frozen=True, kw_only=True):
    entity: ClassVar[str] = "health"
    subject_doc: ClassVar[str] = "`fallback`"

    subject_id: str = "fallback"


class FallbackActivated(_FallbackEvent, frozen=True, kw_only=True):
    """The monitor switched to fallback mode; ``config_revision`` is the revision it made."""

    event_type: ClassVar[str] = "health.activated"

    previous_mode: str
    config_revision: int | None
    reason: str
    reasons: list[str]

    def event_id(self) -> str:
        """``health.fallback.activated.<config_revision>``: once per switch."""
        return f"health.fallback.activated.{self.config_revision}"


class FallbackRecovered(_FallbackEvent, frozen=True, kw_only=True):
    """The monitor restored the mode in force before its automatic fallback."""

    event_type: ClassVar[str] = "health.recovered"

    mode: str
    config_revision: int | None
    reason: str

    def event_id(self) -> str:
        """``health.fallback.recovered.<config_revision>``: once per switch."""
        return f"health.fallback.recovered.{self.config_revision}"


class FallbackOverridden(_FallbackEvent, frozen=True, kw_only=True):
    """An operator changed the mode during an automatic fallback (monitor).

    ``fallback_revision`` is the config revision that entered the fallback.
    """

    event_type: ClassVar[str] = "health.overridden"

    changed_by: str
    mode: str
    previous_mode: str
    fallback_revision: int = 0

    def event_id(self) -> str:
        """``health.fallback.overridden.<fallback_revision>``: once per fallback."""
        return f"health.fallback.overridden.{self.fallback_revision}"


# -- dead letters -----------------------------------------------------------------------------------
class DeadReplayed(TypedEvent, frozen=True, kw_only=True):
    """A dead letter was published on its original subject again (``valkyrie dead replay``).

    The source is the operator (``cli:<user>``); ``new_seq`` is the replayed message's sequence.
    """

    entity: ClassVar[str] = "dead"
    event_type: ClassVar[str] = "dead.replayed"
    subject_doc: ClassVar[str] = "the dead letter's sequence in the dead-letter stream"

    handler: str
    subject: str
    new_seq: int


# -- audit ------------------------------------------------------------------------------------------
class AuditEvent(TypedEvent, frozen=True, kw_only=True):
    """A mutating HTTP call, audited by the gateway while ``security.audit_enabled``.

    Stored in the audit stream of its own (``<prefix>.audit.<subject_id>.<kind>``), which only
    the control plane's identities and the gateway may publish on. ``identity`` is the HTTP
    caller its token proves, ``bus_identity`` the NATS identity that published the event (its
    credentials prove it), ``job_id`` the job the call was about (the one it created, for a
    submission). ``outcome`` is ``ok`` (status below 400), ``refused`` (4xx) or ``error`` (5xx).
    """

    entity: ClassVar[str] = "audit"
    subject_doc: ClassVar[str] = (
        "the caller's identity (token name; characters other than letters, digits, `_` and `-` "
        "replaced by `_`, at most 64)"
    )

    identity: str
    authenticated: bool
    action: str
    method: str
    path: str
    route: str
    status: int
    outcome: str
    path_params: dict[str, str]
    client: str | None
    bus_identity: str | None = None
    job_id: str | None = None


class AuditJobSubmit(AuditEvent, frozen=True, kw_only=True):
    """``POST /api/v2/jobs`` or ``POST /api/v1/jobs`` (gateway)."""

    event_type: ClassVar[str] = "audit.job_submit"


class AuditJobCancel(AuditEvent, frozen=True, kw_only=True):
    """``DELETE /api/v2/jobs/{job_id}`` or ``DELETE /api/v1/jobs/{job_id}`` (gateway)."""

    event_type: ClassVar[str] = "audit.job_cancel"


class AuditConfigChange(AuditEvent, frozen=True, kw_only=True):
    """``PUT /api/v2/config/valkyrie`` (gateway)."""

    event_type: ClassVar[str] = "audit.config_change"


class AuditConfigReload(AuditEvent, frozen=True, kw_only=True):
    """``POST /api/v2/config/valkyrie/reload`` (gateway)."""

    event_type: ClassVar[str] = "audit.config_reload"


class AuditIntegrationFallback(AuditEvent, frozen=True, kw_only=True):
    """``POST /api/v2/integration/fallback`` (gateway)."""

    event_type: ClassVar[str] = "audit.integration_fallback"


class AuditRunnerStatus(AuditEvent, frozen=True, kw_only=True):
    """``PUT /api/v2/runners/{runner_id}/status`` (gateway)."""

    event_type: ClassVar[str] = "audit.runner_status"


class AuditRunnerRegister(AuditEvent, frozen=True, kw_only=True):
    """``POST /api/v2/runners/register`` (gateway)."""

    event_type: ClassVar[str] = "audit.runner_register"


#: the typed event of each audited action (a route's ``audit`` name)
AUDIT_EVENTS: dict[str, type[AuditEvent]] = {
    kind.kind: kind
    for kind in (
        AuditJobSubmit,
        AuditJobCancel,
        AuditConfigChange,
        AuditConfigReload,
        AuditIntegrationFallback,
        AuditRunnerStatus,
        AuditRunnerRegister,
    )
}
