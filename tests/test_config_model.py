"""The config model: validation paths, warnings, profiles, layering and sources, durations, docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from schemas import ConfigRevision
from valkyrie.config.doc import DOC_PATH, iter_keys, render_doc
from valkyrie.config.live import LiveConfig
from valkyrie.config.load import env_layer, known_keys, load_config
from valkyrie.config.model import (
    LIVE_KEYS,
    PROFILES,
    ZERO_ALLOWED,
    IntegrationMode,
    ValkyrieConfig,
    flatten,
    is_live,
    profile_overrides,
    unflatten,
)
from valkyrie.config.validate import validate_dotted
from valkyrie.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

SHA = "0" * 64
TOKEN = {"name": "ci", "sha256": SHA, "scopes": ["jobs:write"]}


def paths(dotted: dict[str, Any]) -> list[str]:
    result = validate_dotted(dotted)
    assert result.config is None, "expected the config to be refused"
    return [e.path for e in result.errors]


# -- invalid configs: each with the exact path of every error ---------------------------------------

INVALID: list[tuple[str, dict[str, Any], list[str]]] = [
    ("below the lower bound", {"dispatch.accept_timeout_ms": 0}, ["dispatch.accept_timeout_ms"]),
    # a fraction of a millisecond is refused, never rounded (the ancestor's 100 µs became 0 ms)
    ("fractional ms", {"dispatch.accept_timeout_ms": 0.1}, ["dispatch.accept_timeout_ms"]),
    ("wrong type", {"dispatch.reconcile_interval_ms": "1s"}, ["dispatch.reconcile_interval_ms"]),
    (
        "above the upper bound",
        {"dispatch.supervise_interval_ms": 60_001},
        ["dispatch.supervise_interval_ms"],
    ),
    ("unknown key in a section", {"dispatch.bogus": 1}, ["dispatch.bogus"]),
    ("unknown top-level key", {"bogus": True}, ["bogus"]),
    ("unknown section key via a table", {"health": {"report_every": 5}}, ["health.report_every"]),
    ("section is not a table", {"dispatch": 5}, ["dispatch"]),
    ("enum mode", {"mode": "turbo"}, ["mode"]),
    ("ancestor enum casing", {"mode": "Hybrid"}, ["mode"]),
    ("profile", {"profile": "prod"}, ["profile"]),
    ("log level", {"observability.log_level": "Warn"}, ["observability.log_level"]),
    (
        "token digest",
        {"http.tokens": [{"name": "ci", "sha256": "not-a-digest"}]},
        ["http.tokens[0].sha256"],
    ),
    (
        "second token's name and scope",
        {"http.tokens": [TOKEN, {"name": "", "sha256": SHA, "scopes": ["admin"]}]},
        ["http.tokens[1].name", "http.tokens[1].scopes[0]"],
    ),
    (
        "unknown key in a token",
        {"http.tokens": [{**TOKEN, "secret": "hunter2"}]},
        ["http.tokens[0].secret"],
    ),
    (
        "token rate",
        {"http.tokens": [{**TOKEN, "rate_limit_per_s": 0}]},
        ["http.tokens[0].rate_limit_per_s"],
    ),
    ("port", {"http.port": 70_000}, ["http.port"]),
    (
        "tenant weight",
        {"scheduling.tenant_weights": {"team-a": -1}},
        ['scheduling.tenant_weights["team-a"]'],
    ),
    ("sla class", {"scheduling.sla_classes": {"gold": 7}}, ["scheduling.sla_classes.gold"]),
    ("ack wait", {"performance.ack_wait_s": 0.1}, ["performance.ack_wait_s"]),
    ("negative grace", {"dispatch.execution_grace_ms": -1}, ["dispatch.execution_grace_ms"]),
    # cross-field rules (_config_validate._rules)
    (
        "lag thresholds",
        {"health.consumer_lag_degraded": 100, "health.consumer_lag_unhealthy": 100},
        ["health.consumer_lag_degraded"],
    ),
    (
        "kv latency thresholds",
        {"health.kv_latency_degraded_ms": 500.0, "health.kv_latency_unhealthy_ms": 200.0},
        ["health.kv_latency_degraded_ms"],
    ),
    (
        "stale before a report is due",
        {"health.report_interval_ms": 2000, "health.stale_after_ms": 2000},
        ["health.stale_after_ms"],
    ),
    (
        "supervision slower than loss",
        {"dispatch.supervise_interval_ms": 3000, "dispatch.runner_lost_after_ms": 3000},
        ["dispatch.supervise_interval_ms"],
    ),
    (
        "tls without files",
        {"security.tls_enabled": True},
        ["security.tls_cert_file", "security.tls_key_file"],
    ),
    (
        "duplicate token names",
        {"http.tokens": [TOKEN, {**TOKEN, "sha256": "1" * 64}]},
        ["http.tokens"],
    ),
    ("http and metrics on one address", {"http.port": 9464}, ["http.port"]),
]


@pytest.mark.parametrize(
    ("dotted", "expected"), [(d, e) for _, d, e in INVALID], ids=[name for name, _, _ in INVALID]
)
def test_invalid_config_names_the_exact_path(dotted: dict[str, Any], expected: list[str]) -> None:
    assert sorted(paths(dotted)) == sorted(expected)


def test_there_are_at_least_fifteen_invalid_cases() -> None:
    assert len(INVALID) >= 15


def test_every_problem_comes_back_at_once() -> None:
    result = validate_dotted(
        {
            "dispatch.accept_timeout_ms": 10,
            "dispatch.bogus": 1,
            "mode": "Hybrid",
            "http.tokens": [{"name": "ci", "sha256": "xyz", "extra": 1}],
            "observability.log_level": "Trace",
            # a rule between two valid keys is still checked next to the type errors
            "health.consumer_lag_degraded": 10,
            "health.consumer_lag_unhealthy": 5,
            "security.tls_enabled": True,
        }
    )
    assert result.config is None
    assert sorted(e.path for e in result.errors) == [
        "dispatch.accept_timeout_ms",
        "dispatch.bogus",
        "health.consumer_lag_degraded",
        "http.tokens[0].extra",
        "http.tokens[0].sha256",
        "mode",
        "observability.log_level",
        "security.tls_cert_file",
        "security.tls_key_file",
    ]
    assert all(e.reason for e in result.errors)


def test_a_rule_on_a_bad_key_is_not_reported_twice() -> None:
    # consumer_lag_unhealthy is itself invalid: comparing against its default would mislead
    errors = validate_dotted(
        {"health.consumer_lag_unhealthy": 0, "health.consumer_lag_degraded": 60_000}
    ).errors
    assert [e.path for e in errors] == ["health.consumer_lag_unhealthy"]


def test_reasons_say_what_is_wrong() -> None:
    (error,) = validate_dotted({"dispatch.accept_timeout_ms": 0}).errors
    assert ">= 50" in error.reason
    (error,) = validate_dotted({"dispatch.bogus": 1}).errors
    assert error.reason == "unknown key"
    (error,) = validate_dotted({"mode": "turbo"}).errors
    assert "turbo" in error.reason


# -- warnings ---------------------------------------------------------------------------------------


def test_tls_off_in_production_is_a_warning_not_an_error() -> None:
    result = validate_dotted({**profile_overrides("production"), "http.tokens": [TOKEN]})
    assert result.config is not None
    assert [w.path for w in result.warnings] == ["security.tls_enabled"]


def test_auth_without_tokens_is_a_warning() -> None:
    result = validate_dotted({"http.auth_required": True})
    assert result.config is not None
    assert not result.errors
    assert [w.path for w in result.warnings] == ["http.tokens"]
    assert "no token" in result.warnings[0].reason
    assert not validate_dotted({"http.auth_required": True, "http.tokens": [TOKEN]}).warnings


@pytest.mark.parametrize(
    ("dotted", "path"),
    [
        ({"profile": "production", "http.auth_required": False}, "http.auth_required"),
        ({"profile": "production", "security.audit_enabled": False}, "security.audit_enabled"),
        ({"dispatch.runner_lost_after_ms": 10_000}, "dispatch.runner_lost_after_ms"),
        ({"http.rate_limit_per_s": 200.0, "http.rate_limit_burst": 100}, "http.rate_limit_burst"),
        (
            {"http.cors_origins": ["*"], "http.auth_required": True, "http.tokens": [TOKEN]},
            "http.cors_origins",
        ),
    ],
)
def test_other_warnings(dotted: dict[str, Any], path: str) -> None:
    result = validate_dotted(dotted)
    assert result.config is not None
    assert path in [w.path for w in result.warnings]


def test_warnings_of_valid_keys_come_with_errors() -> None:
    result = validate_dotted({"http.auth_required": True, "dispatch.accept_timeout_ms": 1})
    assert [e.path for e in result.errors] == ["dispatch.accept_timeout_ms"]
    assert [w.path for w in result.warnings] == ["http.tokens"]


# -- profiles ---------------------------------------------------------------------------------------

#: the only warnings a profile's own defaults may produce (a deployment adds tokens and TLS)
PROFILE_WARNINGS = {
    "development": set(),
    "testing": set(),
    "staging": {"http.tokens"},
    "production": {"http.tokens", "security.tls_enabled"},
}


@pytest.mark.parametrize("profile", list(PROFILES))
def test_every_profile_validates_with_its_defaults(profile: str) -> None:
    # the ancestor's enabled profiles failed their own validation (100 µs -> 0 ms, TLS without
    # certificate paths); ours must load as they are
    loaded = load_config(profile=profile, environ={})
    assert loaded.config.profile == profile
    assert {w.path for w in loaded.warnings} == PROFILE_WARNINGS[profile]
    for key, value in PROFILES[profile].items():
        assert flatten(loaded.config)[key] == value
        assert loaded.sources[key] == "profile"


def test_profiles_only_name_known_keys() -> None:
    keys = known_keys()
    for profile, overrides in PROFILES.items():
        assert set(overrides) <= keys, profile


def test_the_profile_and_its_differences() -> None:
    assert load_config(profile="staging", environ={}).config.mode == IntegrationMode.HYBRID
    prod = load_config(profile="production", environ={}).config
    assert prod.http.auth_required
    assert prod.observability.log_level == "warning"
    assert prod.performance.ack_wait_s == 60.0
    assert load_config(profile="testing", environ={}).config.dispatch.accept_timeout_ms == 2000


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'prod'"):
        load_config(profile="prod", environ={})


# -- layering and sources ---------------------------------------------------------------------------


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "valkyrie.toml"
    path.write_text(text)
    return path


def test_layers_win_in_order_and_sources_say_which(tmp_path: Path) -> None:
    key = "dispatch.accept_timeout_ms"
    assert load_config(environ={}).sources[key] == "default"
    loaded = load_config(profile="testing", environ={})
    assert (loaded.config.dispatch.accept_timeout_ms, loaded.sources[key]) == (2000, "profile")
    file = toml(tmp_path, "[dispatch]\naccept_timeout_ms = 3000\nmax_queue_scan = 7\n")
    loaded = load_config(profile="testing", file=file, environ={})
    assert (loaded.config.dispatch.accept_timeout_ms, loaded.sources[key]) == (3000, "file")
    env = {"VALKYRIE_DISPATCH__ACCEPT_TIMEOUT_MS": "4000", "VALKYRIE_MODE": "hybrid"}
    loaded = load_config(profile="testing", file=file, environ=env)
    assert (loaded.config.dispatch.accept_timeout_ms, loaded.sources[key]) == (4000, "env")
    assert loaded.sources["dispatch.max_queue_scan"] == "file"
    assert loaded.sources["mode"] == "env"
    assert loaded.config.mode == IntegrationMode.HYBRID
    assert loaded.sources["observability.log_level"] == "profile"
    assert loaded.sources["health.stale_after_ms"] == "default"
    # runtime (a revision from the config bucket) is on top of everything
    live = LiveConfig(loaded)
    revision = ConfigRevision(revision=1, at_ms=1, changed_by="t", values={key: 4500})
    assert live.apply(revision) == []
    assert live.current.dispatch.accept_timeout_ms == 4500
    assert live.sources()[key] == "runtime"
    assert live.sources()["dispatch.max_queue_scan"] == "file"
    assert set(live.sources()) == known_keys()


def test_runtime_layer_in_load_config() -> None:
    loaded = load_config(environ={}, runtime={"dispatch.max_queue_scan": 3})
    assert loaded.config.dispatch.max_queue_scan == 3
    assert loaded.sources["dispatch.max_queue_scan"] == "runtime"
    assert loaded.base()["dispatch.max_queue_scan"] == 2000


def test_dotted_keys_in_a_file(tmp_path: Path) -> None:
    file = toml(tmp_path, 'mode = "fallback"\ndispatch.max_queue_scan = 9\n')
    loaded = load_config(file=file, environ={})
    assert loaded.config.mode == IntegrationMode.FALLBACK
    assert loaded.config.dispatch.max_queue_scan == 9


def test_the_profile_can_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    file = toml(tmp_path, 'profile = "staging"\n')
    assert load_config(file=file, environ={}).config.mode == IntegrationMode.HYBRID
    loaded = load_config(file=file, environ={"VALKYRIE_PROFILE": "testing"})
    assert loaded.config.profile == "testing"
    assert loaded.sources["profile"] == "env"


def test_the_structured_env_name_beats_the_legacy_one() -> None:
    env = {"VALKYRIE_ACCEPT_TIMEOUT_MS": "700", "VALKYRIE_DISPATCH__ACCEPT_TIMEOUT_MS": "800"}
    assert env_layer(env)["dispatch.accept_timeout_ms"] == 800
    assert env_layer(dict(reversed(env.items())))["dispatch.accept_timeout_ms"] == 800
    assert env_layer({"VALKYRIE_ACCEPT_TIMEOUT_MS": "700"}) == {"dispatch.accept_timeout_ms": 700}


def test_env_values_are_json_else_strings() -> None:
    layer = env_layer(
        {
            "VALKYRIE_FEATURES__EXPLAIN": "false",
            # looks numeric, is not JSON: stays a string (nothing binds to it)
            "VALKYRIE_HTTP__HOST": "0.0.0.0",
            "VALKYRIE_HTTP__CORS_ORIGINS": '["https://ci.example"]',
            "VALKYRIE_NATS_URL": "nats://x:4222",  # a process setting, not a config key
        }
    )
    assert layer == {
        "features.explain": False,
        "http.host": "0.0.0.0",
        "http.cors_origins": ["https://ci.example"],
    }


def test_a_misspelt_env_name_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"VALKYRIE_DISPATCH__ACEPT_TIMEOUT_MS": "100"})
    assert [e.path for e in info.value.errors] == ["dispatch.acept_timeout_ms"]  # type: ignore[attr-defined]


def test_an_invalid_layer_fails_with_every_path(tmp_path: Path) -> None:
    file = toml(tmp_path, "[dispatch]\naccept_timeout_ms = 1\n[http]\nport = -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(file=file, environ={"VALKYRIE_MODE": "turbo"})
    errors = info.value.errors  # type: ignore[attr-defined]
    assert sorted(e.path for e in errors) == ["dispatch.accept_timeout_ms", "http.port", "mode"]
    assert "dispatch.accept_timeout_ms" in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(file=toml(tmp_path, "[dispatch\n"), environ={})


def test_flatten_and_unflatten() -> None:
    dotted = flatten(ValkyrieConfig())
    assert set(dotted) == known_keys()
    assert msgspec.convert(unflatten(dotted), ValkyrieConfig) == ValkyrieConfig()
    # an empty table adds nothing (it used to become an unknown key "dispatch")
    assert flatten({"dispatch": {}, "mode": "full"}) == {"mode": "full"}
    assert validate_dotted(flatten({"dispatch": {}})).config is not None


# -- durations --------------------------------------------------------------------------------------


def _numeric(tp: mi.Type) -> list[mi.IntType | mi.FloatType]:
    if isinstance(tp, mi.IntType | mi.FloatType):
        return [tp]
    if isinstance(tp, mi.UnionType):
        return [t for t in tp.types if isinstance(t, mi.IntType | mi.FloatType)]
    return []


def _durations() -> list[tuple[str, mi.IntType | mi.FloatType]]:
    out: list[tuple[str, mi.IntType | mi.FloatType]] = []
    for info in iter_keys():
        name = info.key.rsplit(".", 1)[-1]
        if name.endswith(("_ms", "_s")) and not name.endswith("_per_s"):
            numeric = _numeric(info.type)
            assert numeric, f"{info.key} is named as a duration but is not a number"
            out.extend((info.key, t) for t in numeric)
    return out


def test_no_duration_can_be_zero_unless_zero_is_documented() -> None:
    durations = _durations()
    assert len(durations) >= 15  # the walk really found the durations
    for key, tp in durations:
        excludes_zero = (tp.ge is not None and tp.ge > 0) or (tp.gt is not None and tp.gt >= 0)
        if key in ZERO_ALLOWED:
            assert tp.ge == 0, f"{key} is listed as allowing 0 but its bound is {tp}"
        else:
            assert excludes_zero, f"{key} accepts 0 (or below): give it a lower bound above 0"
        assert tp.le is not None or tp.lt is not None or tp.ge is not None or tp.gt is not None


def test_zero_allowed_keys_exist_and_really_take_zero() -> None:
    keys = known_keys()
    for key in ZERO_ALLOWED:
        assert key in keys
        assert validate_dotted({key: 0}).config is not None


@pytest.mark.parametrize(
    "key", [k for k, _ in _durations() if k not in ZERO_ALLOWED and "[]" not in k]
)
def test_zero_is_refused_for_each_duration(key: str) -> None:
    assert [e.path for e in validate_dotted({key: 0}).errors] == [key]


@pytest.mark.parametrize("key", [k for k, t in _durations() if isinstance(t, mi.IntType)])
def test_integer_durations_refuse_fractions_instead_of_rounding(key: str) -> None:
    if "[]" in key:
        pytest.skip("list item")
    assert key in [e.path for e in validate_dotted({key: 0.4}).errors]


# -- live keys --------------------------------------------------------------------------------------


def test_every_key_is_live_or_says_why_not() -> None:
    for key in known_keys():
        live, why = is_live(key)
        if not live:
            assert why, key
            assert why != "read once at start", f"{key}: give a specific reason"


@pytest.mark.parametrize(
    ("key", "live"),
    [
        ("mode", True),
        ("dispatch.max_queue_scan", True),
        ("http.tokens", True),
        ("http.port", False),
        ("http.host", False),
        ("performance.handler_concurrency", False),
        ("profile", False),
        ("security.tls_enabled", False),
        ("observability.metrics_port", False),
        ("observability.log_level", True),
    ],
)
def test_liveness_of_some_keys(key: str, live: bool) -> None:
    assert is_live(key)[0] is live


def test_live_prefixes_name_real_keys() -> None:
    keys = known_keys()
    for prefix in LIVE_KEYS:
        assert any(k == prefix or k.startswith(prefix) for k in keys), prefix


# -- docs -------------------------------------------------------------------------------------------


def test_docs_table_matches_the_model() -> None:
    text = DOC_PATH.read_text()
    assert render_doc(text) == text, (
        "docs/configuration.md is out of date: run python -m valkyrie.config.doc --write"
    )


def test_docs_list_every_key() -> None:
    text = DOC_PATH.read_text()
    for key in known_keys():
        assert f"| `{key}` |" in text, key


def test_the_drift_check_notices_a_change() -> None:
    text = DOC_PATH.read_text()
    drifted = text.replace("| `dispatch.max_queue_scan` |", "| `dispatch.max_queue_scn` |")
    assert drifted != text
    assert render_doc(drifted) != drifted
    with pytest.raises(ValueError, match="markers"):
        render_doc("# no markers\n")


def test_docs_profile_table_lists_what_each_profile_changes() -> None:
    lines = DOC_PATH.read_text().splitlines()
    for profile, overrides in PROFILES.items():
        (row,) = [line for line in lines if line.startswith(f"| `{profile}` |")]
        for key in overrides:
            assert f"`{key}`" in row, (profile, key)
