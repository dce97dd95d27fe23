"""Migration of the ancestor's ``ValkyrieIntegrationConfig`` (RustCI) to Valkyrie's config.

Every ancestor field is accounted for: mapped (same meaning), changed (unit or shape converted), or
dropped (no equivalent here) — each with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from valkyrie.config.model import ValkyrieConfig, is_live

__all__ = [
    "ANCESTOR_FIELDS",
    "MigrationReport",
    "MigrationStep",
    "is_ancestor_document",
    "live_only",
    "migrate_ancestor",
]


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """What happened to one ancestor field."""

    field: str
    action: Literal["mapped", "changed", "dropped", "restart", "unknown"]
    target: str | None
    value: Any
    reason: str


@dataclass
class MigrationReport:
    """The migrated dotted values and one step per ancestor field."""

    values: dict[str, Any] = field(default_factory=dict)
    steps: list[MigrationStep] = field(default_factory=list)


def _ms(value: Any) -> float | None:
    """Ancestor durations: integer milliseconds, or serde's ``{secs, nanos}``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict) and "secs" in value:
        return float(value.get("secs", 0)) * 1000 + float(value.get("nanos", 0)) / 1e6
    return None


_LOG_LEVELS = {
    "error": "error",
    "warn": "warning",
    "info": "info",
    "debug": "debug",
    "trace": "debug",
}
_MODES = {"full", "hybrid", "fallback", "compatibility", "disabled"}

#: Dropped fields that are durations (their value is shown in milliseconds in the report).
_DURATIONS = {"connection_timeout", "health_check_timeout", "metrics_interval"}

_DROPPED = {
    "performance_enhancement_enabled": "placement is always measured; there is no separate enhanced path",
    "max_connections": "connections are NATS's concern (server limits), not the control plane's",
    "connection_timeout": "connection timeouts are process settings (VALKYRIE_CONNECT_TIMEOUT_S)",
    "max_concurrent_jobs": "capacity is per runner (max_concurrent_jobs at registration)",
    "queue_capacity": "the queue is a JetStream stream bounded by its retention, not a fixed capacity",
    "fallback_retry_attempts": "HTTP clients retry with an Idempotency-Key; the bridge holds no state",
    "health_check_timeout": "staleness is health.stale_after_ms, derived from the report interval",
    "enable_zero_copy": "a transport optimisation of the Rust engine; not applicable",
    "enable_simd_optimization": "a transport optimisation of the Rust engine; not applicable",
    "memory_pool_size": "memory pools of the Rust engine; not applicable",
    "buffer_pool_sizes": "buffer pools of the Rust engine; not applicable",
    "metrics_interval": "Prometheus scrapes /metrics when it wants; there is no push interval",
    "tracing_enabled": "tracing is not part of this release",
    "hot_reload_enabled": "always on: changes over the bus apply live",
    "config_validation_strict": "validation is always strict (unknown keys and bad values refused)",
    "config_backup_enabled": "every revision is kept in the config bucket's history",
    "authorization_enabled": "token scopes are always enforced when authentication is on",
    "rate_limiting_enabled": "rate limits are always on (http.rate_limit_per_s)",
    "adaptive_routing_enabled": "placement adapts from measured runner statistics already",
    "machine_learning_enabled": "no ML placement; the score is documented and deterministic",
    "predictive_scaling_enabled": "scaling runners is outside the control plane",
    "chaos_engineering_enabled": "chaos is tested in the suite, not switched on in production",
    "valkyrie_listen_address": "handled with http.host/http.port",
}


@dataclass
class _Migration:
    """One document's migration: the report it fills and the document, for fields read together."""

    doc: Mapping[str, Any]
    report: MigrationReport = field(default_factory=MigrationReport)

    def mapped(self, name: str, target: str, value: Any, reason: str = "same meaning") -> None:
        self.report.values[target] = value
        self.report.steps.append(MigrationStep(name, "mapped", target, value, reason))

    def changed(self, name: str, target: str, value: Any, reason: str) -> None:
        self.report.values[target] = value
        self.report.steps.append(MigrationStep(name, "changed", target, value, reason))

    def dropped(self, name: str, value: Any, reason: str) -> None:
        self.report.steps.append(MigrationStep(name, "dropped", None, value, reason))


#: A field's translation: it records the field's step (and any values) on the migration.
_Translate = Callable[[_Migration, str, Any], None]


def _flag(target: str, reason: str = "same meaning") -> _Translate:
    """A switch that means the same here under another name."""

    def translate(m: _Migration, name: str, value: Any) -> None:
        m.mapped(name, target, bool(value), reason)

    return translate


def _file(target: str) -> _Translate:
    """A file path, carried over when set."""

    def translate(m: _Migration, name: str, value: Any) -> None:
        if value:
            m.mapped(name, target, str(value))
        else:
            m.dropped(name, value, "not set")

    return translate


def _enabled(m: _Migration, name: str, value: Any) -> None:
    if value is False:
        m.changed(
            name,
            "mode",
            "disabled",
            "valkyrie_enabled=false: intake still accepts jobs, nothing is dispatched",
        )
    else:
        m.dropped(name, value, "enabled is the default; the mode decides behaviour")


def _mode(m: _Migration, name: str, value: Any) -> None:
    mode = str(value).lower()
    if m.doc.get("valkyrie_enabled") is False:
        m.dropped(name, value, "valkyrie_enabled=false wins: mode is disabled")
    elif mode in _MODES:
        m.changed(name, "mode", mode, "enum names are lower-case here")
    else:
        m.dropped(name, value, f"unknown mode {value!r}")


def _fallback_timeout(m: _Migration, name: str, value: Any) -> None:
    ms = _ms(value)
    if ms:
        m.changed(
            name,
            "http.request_timeout_s",
            ms / 1000,
            "milliseconds -> seconds; bounds a bridged call",
        )
    else:
        m.dropped(name, value, "zero or unreadable duration")


def _health_interval(m: _Migration, name: str, value: Any) -> None:
    ms = _ms(value)
    if ms and ms >= 50:
        stale = max(int(ms) * 3, 5000)
        m.changed(
            name,
            "health.report_interval_ms",
            int(ms),
            "health is reported by every worker at this interval; "
            f"health.stale_after_ms becomes {stale} (3 intervals) to stay above it",
        )
        m.report.values.setdefault("health.stale_after_ms", stale)
    else:
        m.dropped(name, value, "below 50 ms or unreadable")


def _threshold(m: _Migration, name: str, value: Any) -> None:
    if isinstance(value, int) and value >= 1:
        m.mapped(name, f"health.{name}", value, "consecutive evaluations before fallback/recovery")
    else:
        m.dropped(name, value, "must be at least 1")


def _log_level(m: _Migration, name: str, value: Any) -> None:
    level = _LOG_LEVELS.get(str(value).lower())
    if level:
        m.changed(
            name, "observability.log_level", level, "lower-case; trace becomes debug, warn warning"
        )
    else:
        m.dropped(name, value, f"unknown level {value!r}")


def _dispatch_timeout(m: _Migration, name: str, value: Any) -> None:
    ms = _ms(value)
    shown = f"{ms:g} ms" if ms is not None else repr(value)
    m.dropped(
        name,
        value,
        f"the ancestor's {shown} dispatch target (100 µs, rounded to 0 ms on its wire) is not a "
        "timeout; the acceptance window is dispatch.accept_timeout_ms (default 5000)",
    )


def _no_equivalent(m: _Migration, name: str, value: Any) -> None:
    ms = _ms(value) if name in _DURATIONS else None
    read = f"{ms:g} ms: " if ms is not None else ""
    m.dropped(name, value, read + _DROPPED[name])


def _listen_address(m: _Migration, name: str, value: Any) -> None:
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        if port.isdigit():
            m.changed(
                name,
                "http.host",
                host,
                f"the engine listener becomes the HTTP bridge address (http.port {port})",
            )
            m.report.values["http.port"] = int(port)
            return
    _no_equivalent(m, name, value)


def _unknown(m: _Migration, name: str, value: Any) -> None:
    m.report.steps.append(
        MigrationStep(name, "unknown", None, value, "not an ancestor field; ignored")
    )


#: How each ancestor field translates; a field without an entry is not the ancestor's.
_TRANSLATE: dict[str, _Translate] = dict.fromkeys(_DROPPED, _no_equivalent) | {
    "valkyrie_enabled": _enabled,
    "integration_mode": _mode,
    "backward_compatibility_enabled": _flag("features.legacy_v1_api"),
    "intelligent_routing_enabled": _flag(
        "features.qos_routing", "QoS and routing hints in placement"
    ),
    "fallback_mode_enabled": _flag(
        "features.auto_fallback", "fall back automatically on degradation"
    ),
    "fallback_timeout": _fallback_timeout,
    "health_check_interval": _health_interval,
    "failure_threshold": _threshold,
    "recovery_threshold": _threshold,
    "enable_tls": _flag("security.tls_enabled", "TLS to NATS"),
    "tls_cert_path": _file("security.tls_cert_file"),
    "tls_key_path": _file("security.tls_key_file"),
    "metrics_enabled": _flag("observability.metrics_enabled"),
    "logging_level": _log_level,
    "authentication_required": _flag("http.auth_required", "bearer tokens on the HTTP bridge"),
    "audit_logging_enabled": _flag("security.audit_enabled"),
    "dispatch_timeout": _dispatch_timeout,
    # in _DROPPED too: dropped unless it reads as host:port
    "valkyrie_listen_address": _listen_address,
}


#: every field of the ancestor's config that :func:`migrate_ancestor` knows
ANCESTOR_FIELDS = frozenset(_TRANSLATE)
_OURS = frozenset(f.name for f in msgspec.structs.fields(ValkyrieConfig))


def is_ancestor_document(doc: Any) -> bool:
    """Whether ``doc`` is the ancestor's config: ancestor fields, and no key of ours."""
    if not isinstance(doc, dict) or not doc:
        return False
    ours = any(str(key).partition(".")[0] in _OURS for key in doc)
    return not ours and bool(ANCESTOR_FIELDS & doc.keys())


def live_only(report: MigrationReport) -> MigrationReport:
    """The report with only the values that may change live.

    A runtime change can hold only those: each other value becomes a ``restart`` step saying
    where to put it instead.
    """
    kept = MigrationReport()
    targets: dict[str, str] = {}
    for key, value in report.values.items():
        live, why = is_live(key)
        if live:
            kept.values[key] = value
        else:
            targets[key] = (
                f"cannot change live ({why}): set {key} = {value!r} in the config file or environment and restart"
            )
    for step in report.steps:
        if step.target in targets:
            kept.steps.append(
                MigrationStep(
                    step.field, "restart", step.target, step.value, targets.pop(step.target)
                )
            )
        else:
            kept.steps.append(step)
    for key, reason in targets.items():  # values set alongside another field's step
        kept.steps.append(MigrationStep(key, "restart", key, report.values[key], reason))
    return kept


def migrate_ancestor(doc: dict[str, Any]) -> MigrationReport:
    """Translate an ancestor config document (its field names and units) to dotted Valkyrie keys."""
    migration = _Migration(doc)
    for name, value in doc.items():
        _TRANSLATE.get(name, _unknown)(migration, name, value)
    return migration.report
