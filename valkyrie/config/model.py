"""The runtime configuration model: sections, profiles, and which keys may change live.

Durations carry their unit in the key (``_ms``, ``_s``) and are integers or floats with a lower
bound above zero where zero would be meaningless, so no value can silently round to nothing.
Unknown keys are refused everywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "LIVE_KEYS",
    "PROFILES",
    "ZERO_ALLOWED",
    "DispatchConfig",
    "FeatureFlags",
    "HealthConfig",
    "HttpConfig",
    "IntegrationMode",
    "LimitsConfig",
    "ObservabilityConfig",
    "PerformanceConfig",
    "SchedulingConfig",
    "SecurityConfig",
    "TokenConfig",
    "ValkyrieConfig",
    "flatten",
    "is_live",
    "profile_overrides",
    "unflatten",
]

Ms = Annotated[int, msgspec.Meta(ge=1, le=86_400_000)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
Weight = Annotated[float, msgspec.Meta(ge=0, le=100)]


class IntegrationMode(enum.StrEnum):
    """How much of the scheduler is in play (see docs/configuration.md)."""

    FULL = "full"
    HYBRID = "hybrid"
    FALLBACK = "fallback"
    COMPATIBILITY = "compatibility"
    DISABLED = "disabled"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class FeatureFlags(_Section, frozen=True, kw_only=True):
    """Switches for whole features."""

    qos_routing: bool = True
    priority_aging: bool = True
    fair_share: bool = True
    auto_fallback: bool = True
    legacy_v1_api: bool = True
    explain: bool = True


class DispatchConfig(_Section, frozen=True, kw_only=True):
    """Placement timing."""

    accept_timeout_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 5000
    runner_lost_after_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 3000
    reconcile_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 1000
    supervise_interval_ms: Annotated[int, msgspec.Meta(ge=20, le=60_000)] = 250
    execution_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 5000
    cancel_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0
    max_queue_scan: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 2000


class SchedulingConfig(_Section, frozen=True, kw_only=True):
    """Score weights, priority aging and fair shares (docs/scheduling.md)."""

    weight_free_capacity: Weight = 0.4
    weight_success_rate: Weight = 0.2
    weight_preferred_runner: Weight = 0.3
    weight_region: Weight = 0.1
    weight_affinity: Weight = 0.1
    weight_accept_latency: Weight = 0.1
    weight_efficiency: Weight = 0.1
    aging_step_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 30.0
    max_aging_boost: Annotated[int, msgspec.Meta(ge=0, le=8)] = 2
    fair_share_half_life_s: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    candidate_sample: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 16
    tenant_key: str = "project_id"
    tenant_weights: dict[str, Weight] = msgspec.field(default_factory=dict)
    sla_classes: dict[str, Annotated[int, msgspec.Meta(ge=0, le=4)]] = msgspec.field(
        default_factory=lambda: {
            "platinum": 0,
            "gold": 1,
            "silver": 2,
            "bronze": 3,
            "best_effort": 4,
        }
    )


class HealthConfig(_Section, frozen=True, kw_only=True):
    """Health reporting and the thresholds that make a component degraded or unhealthy."""

    report_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 1000
    stale_after_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 5000
    consumer_lag_degraded: Annotated[int, msgspec.Meta(ge=1)] = 5_000
    consumer_lag_unhealthy: Annotated[int, msgspec.Meta(ge=1)] = 50_000
    kv_latency_degraded_ms: Annotated[float, msgspec.Meta(gt=0)] = 100.0
    kv_latency_unhealthy_ms: Annotated[float, msgspec.Meta(gt=0)] = 1000.0
    min_active_runners: Annotated[int, msgspec.Meta(ge=0)] = 0
    failure_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    recovery_threshold: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2


class TokenConfig(_Section, frozen=True, kw_only=True):
    """An API token: only its SHA-256 is stored."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    scopes: list[Literal["jobs:write", "jobs:read", "runners:admin", "config:admin"]] = (
        msgspec.field(default_factory=list)
    )
    rate_limit_per_s: PosFloat | None = None


class HttpConfig(_Section, frozen=True, kw_only=True):
    """The HTTP bridge.

    Authentication is required whatever ``auth_required`` says when ``host`` is not a loopback
    address. Failed authentications are rate limited per client address
    (``failed_auth_per_s``, ``failed_auth_burst``) before they are answered.
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    auth_required: bool = False
    tokens: list[TokenConfig] = msgspec.field(default_factory=list)
    rate_limit_per_s: PosFloat = 50.0
    rate_limit_burst: Annotated[int, msgspec.Meta(ge=1)] = 100
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    cors_origins: list[str] = msgspec.field(default_factory=list)
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    failed_auth_per_s: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    failed_auth_burst: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10


class ObservabilityConfig(_Section, frozen=True, kw_only=True):
    """Metrics, logs, events."""

    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    events_max_age_s: Annotated[int, msgspec.Meta(ge=60)] = 7 * 24 * 3600


class SecurityConfig(_Section, frozen=True, kw_only=True):
    """TLS to NATS and auditing."""

    tls_enabled: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    audit_enabled: bool = True


class PerformanceConfig(_Section, frozen=True, kw_only=True):
    """Throughput knobs."""

    handler_concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    fetch_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    max_deliver: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    ack_wait_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 30.0


class LimitsConfig(_Section, frozen=True, kw_only=True):
    """Input limits, retention, quotas.

    ``max_queued_per_tenant`` caps the jobs one tenant (``scheduling.tenant_key``) may have
    queued (``None``: no cap); ``tenant_max_queued`` sets the cap of named tenants.
    ``job_log_max_bytes`` is what a runner publishes of one attempt's log at most.
    ``job_store_reserve`` is the part of the jobs bucket kept for the records of accepted jobs
    to grow as they run: intake refuses new jobs once the rest is used.
    """

    submission_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    max_metadata_entries: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 64
    job_retention_s: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86_400)] = 7 * 86_400
    offline_runner_retention_s: Annotated[int, msgspec.Meta(ge=60, le=365 * 86_400)] = 86_400
    max_queued_per_tenant: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] | None = 10_000
    tenant_max_queued: dict[str, Annotated[int, msgspec.Meta(ge=0, le=100_000_000)]] = (
        msgspec.field(default_factory=dict)
    )
    job_log_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1024 * 1024 * 1024)] = (
        8 * 1024 * 1024
    )
    job_store_reserve: Annotated[float, msgspec.Meta(ge=0.0, le=0.9)] = 0.2


class ValkyrieConfig(_Section, frozen=True, kw_only=True):
    """The whole runtime configuration."""

    profile: Literal["development", "testing", "staging", "production"] = "development"
    mode: IntegrationMode = IntegrationMode.FULL
    features: FeatureFlags = msgspec.field(default_factory=FeatureFlags)
    dispatch: DispatchConfig = msgspec.field(default_factory=DispatchConfig)
    scheduling: SchedulingConfig = msgspec.field(default_factory=SchedulingConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    observability: ObservabilityConfig = msgspec.field(default_factory=ObservabilityConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    performance: PerformanceConfig = msgspec.field(default_factory=PerformanceConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)


#: Key prefixes that apply without a restart; everything else is read once at start.
LIVE_KEYS: tuple[str, ...] = (
    "mode",
    "features.",
    "dispatch.",
    "scheduling.",
    "health.",
    "http.auth_required",
    "http.tokens",
    "http.rate_limit_per_s",
    "http.rate_limit_burst",
    "http.max_body_bytes",
    "http.cors_origins",
    "http.request_timeout_s",
    "http.failed_auth_per_s",
    "http.failed_auth_burst",
    "observability.log_level",
    "limits.",
    "security.audit_enabled",
)

#: Durations that may be 0, and what 0 means. Every other ``*_ms``/``*_s`` key excludes 0
#: (tests/test_config_model.py walks the model to keep it so).
ZERO_ALLOWED: dict[str, str] = {
    "dispatch.execution_grace_ms": "no grace: a silent runner's job times out at max_execution_time_s",
    "dispatch.cancel_grace_s": "no grace: a cancelled job's processes are killed at once",
}

_RESTART_REASONS = {
    "profile": "the profile is chosen when a process starts",
    "http.": "the HTTP listener is bound when the gateway starts",
    "observability.metrics": "the metrics endpoint is bound when a process starts",
    "observability.events_max_age_s": "stream retention is provisioned at start (run `valkyrie provision`)",
    "security.tls": "TLS is negotiated when the NATS connection is made",
    "performance.": "consumers and worker pools are sized when a handler starts (a restarted handler updates its durable consumer)",
}


def is_live(key: str) -> tuple[bool, str | None]:
    """Whether dotted ``key`` may change without a restart, and if not, why."""
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in LIVE_KEYS):
        return True, None
    for prefix, reason in _RESTART_REASONS.items():
        if key == prefix or key.startswith(prefix):
            return False, reason
    return False, "read once at start"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and maps of scalars stay values)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.to_builtins(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path.count(".") < 1 and _is_section(path):
            out.update(flatten(value, f"{path}."))  # an empty section adds nothing
        else:
            out[path] = value
    return out


def unflatten(dotted: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (the inverse of :func:`flatten`)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    return out


def _is_section(name: str) -> bool:
    return name in {f.name for f in msgspec.structs.fields(ValkyrieConfig)} and name not in {
        "profile",
        "mode",
    }


#: What each environment profile changes from the defaults (documented in docs/configuration.md).
PROFILES: dict[str, dict[str, Any]] = {
    "development": {
        "observability.log_level": "debug",
    },
    "testing": {
        "observability.log_level": "debug",
        "dispatch.accept_timeout_ms": 2000,
        "health.report_interval_ms": 500,
    },
    "staging": {
        "mode": "hybrid",
        "http.auth_required": True,
        "security.audit_enabled": True,
    },
    "production": {
        "http.auth_required": True,
        "security.audit_enabled": True,
        "observability.log_level": "warning",
        "health.min_active_runners": 1,
        "performance.ack_wait_s": 60.0,
    },
}


def profile_overrides(profile: str) -> dict[str, Any]:
    """The dotted overrides of ``profile`` (plus the profile key itself)."""
    return {"profile": profile, **PROFILES.get(profile, {})}
