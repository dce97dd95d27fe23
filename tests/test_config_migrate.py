"""Migration of the ancestor's ValkyrieIntegrationConfig (its field names and units)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests._helpers import ROOT
from valkyrie.cli import cli
from valkyrie.config.migrate import migrate_ancestor
from valkyrie.config.validate import validate_dotted

pytestmark = pytest.mark.timeout(30)

SAMPLE = ROOT / "tests" / "data" / "ancestor-config.json"

#: every field of the ancestor's ValkyrieIntegrationConfig (design inventory §5)
ANCESTOR_FIELDS = {
    "valkyrie_enabled",
    "integration_mode",
    "backward_compatibility_enabled",
    "performance_enhancement_enabled",
    "valkyrie_listen_address",
    "max_connections",
    "connection_timeout",
    "enable_tls",
    "tls_cert_path",
    "tls_key_path",
    "max_concurrent_jobs",
    "dispatch_timeout",
    "queue_capacity",
    "intelligent_routing_enabled",
    "fallback_mode_enabled",
    "fallback_timeout",
    "fallback_retry_attempts",
    "health_check_interval",
    "health_check_timeout",
    "failure_threshold",
    "recovery_threshold",
    "enable_zero_copy",
    "enable_simd_optimization",
    "memory_pool_size",
    "buffer_pool_sizes",
    "metrics_enabled",
    "metrics_interval",
    "tracing_enabled",
    "logging_level",
    "hot_reload_enabled",
    "config_validation_strict",
    "config_backup_enabled",
    "authentication_required",
    "authorization_enabled",
    "audit_logging_enabled",
    "rate_limiting_enabled",
    "adaptive_routing_enabled",
    "machine_learning_enabled",
    "predictive_scaling_enabled",
    "chaos_engineering_enabled",
}


def sample() -> dict[str, Any]:
    doc = json.loads(SAMPLE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_the_sample_has_every_ancestor_field_in_its_wire_units() -> None:
    doc = sample()
    assert set(doc) == ANCESTOR_FIELDS
    assert doc["dispatch_timeout"] == 0  # 100 µs serialised as integer milliseconds
    assert doc["health_check_timeout"] == {"secs": 5, "nanos": 0}  # the one serde Duration
    assert doc["logging_level"] == "Warn"
    assert doc["integration_mode"] == "Hybrid"


def test_every_field_is_reported_with_a_reason() -> None:
    report = migrate_ancestor(sample())
    assert sorted(s.field for s in report.steps) == sorted(ANCESTOR_FIELDS)  # once each
    for step in report.steps:
        assert step.action in ("mapped", "changed", "dropped"), step
        assert step.reason, step
        assert (step.target is None) == (step.action == "dropped"), step
        if step.target is not None:
            assert step.target in report.values, step


def test_values_and_units_are_converted() -> None:
    report = migrate_ancestor(sample())
    steps = {s.field: s for s in report.steps}
    assert report.values["mode"] == "hybrid"
    assert steps["integration_mode"].action == "changed"
    assert report.values["observability.log_level"] == "warning"
    assert steps["logging_level"].action == "changed"
    assert report.values["http.request_timeout_s"] == 5.0  # 5000 ms -> s
    assert report.values["health.report_interval_ms"] == 30_000
    assert report.values["health.stale_after_ms"] == 90_000
    assert "stale_after_ms" in steps["health_check_interval"].reason
    assert (report.values["http.host"], report.values["http.port"]) == ("127.0.0.1", 8080)
    assert "http.port" in steps["valkyrie_listen_address"].reason
    assert report.values["features.legacy_v1_api"] is True
    assert report.values["http.auth_required"] is True
    # the 100 µs dispatch target that the ancestor's wire turned into 0 ms is not carried over
    assert steps["dispatch_timeout"].action == "dropped"
    assert "0 ms" in steps["dispatch_timeout"].reason
    assert "dispatch.accept_timeout_ms" in steps["dispatch_timeout"].reason
    assert "dispatch.accept_timeout_ms" not in report.values
    # {secs, nanos} is understood
    assert steps["health_check_timeout"].action == "dropped"
    assert steps["health_check_timeout"].reason.startswith("5000 ms: ")


def test_the_output_validates() -> None:
    report = migrate_ancestor(sample())
    result = validate_dotted(report.values)
    assert result.errors == []
    assert result.config is not None
    assert result.config.mode == "hybrid"
    # authentication on without a token: said, not hidden
    assert [w.path for w in result.warnings] == ["http.tokens"]


@pytest.mark.parametrize(
    ("doc", "key", "value"),
    [
        ({"valkyrie_enabled": False, "integration_mode": "Full"}, "mode", "disabled"),
        ({"valkyrie_enabled": True, "integration_mode": "Compatibility"}, "mode", "compatibility"),
        ({"logging_level": "Trace"}, "observability.log_level", "debug"),
        ({"fallback_timeout": {"secs": 2, "nanos": 500_000_000}}, "http.request_timeout_s", 2.5),
    ],
)
def test_other_values(doc: dict[str, Any], key: str, value: Any) -> None:
    assert migrate_ancestor(doc).values[key] == value


def test_a_sub_millisecond_dispatch_timeout_is_reported() -> None:
    (step,) = migrate_ancestor({"dispatch_timeout": {"secs": 0, "nanos": 100_000}}).steps
    assert step.action == "dropped"
    assert "0.1 ms" in step.reason


def test_unknown_and_unreadable_fields() -> None:
    report = migrate_ancestor(
        {"colour": "blue", "health_check_interval": 0, "failure_threshold": 0}
    )
    actions = {s.field: s.action for s in report.steps}
    assert actions == {
        "colour": "unknown",
        "health_check_interval": "dropped",
        "failure_threshold": "dropped",
    }
    assert report.values == {}


def test_the_ancestors_tls_profile_without_certificates_is_caught() -> None:
    # staging()/production() turned TLS on without certificate paths and failed validation
    report = migrate_ancestor({"valkyrie_enabled": True, "enable_tls": True})
    errors = validate_dotted(report.values).errors
    assert sorted(e.path for e in errors) == ["security.tls_cert_file", "security.tls_key_file"]


# -- the CLI ----------------------------------------------------------------------------------------


def test_migrate_command_writes_toml_that_validates(tmp_path: Path) -> None:
    out = tmp_path / "valkyrie.toml"
    result = CliRunner().invoke(cli, ["config", "migrate", str(SAMPLE), "-o", str(out)])
    assert result.exit_code == 0, result.output
    for name in ANCESTOR_FIELDS:
        assert f" {name}" in result.stderr, name
    assert "dropped  dispatch_timeout" in result.stderr
    assert "changed  logging_level -> observability.log_level" in result.stderr
    assert "warning: http.tokens" in result.stderr
    document = tomllib.loads(out.read_text())
    assert document["mode"] == "hybrid"
    assert document["observability"]["log_level"] == "warning"
    assert document["http"]["request_timeout_s"] == 5.0
    checked = CliRunner().invoke(cli, ["config", "validate", str(out)])
    assert checked.exit_code == 0, checked.output
    assert "valid" in checked.stdout


def test_migrate_command_prints_toml_and_fails_when_the_result_is_invalid(tmp_path: Path) -> None:
    source = tmp_path / "ancestor.json"
    source.write_text(json.dumps({"valkyrie_enabled": True, "enable_tls": True}))
    result = CliRunner().invoke(cli, ["config", "migrate", str(source)])
    assert result.exit_code == 3
    assert "error: security.tls_cert_file" in result.stderr
    assert tomllib.loads(result.stdout) == {"security": {"tls_enabled": True}}
