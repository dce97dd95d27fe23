"""Settings from the environment and the names built from a prefix (no NATS)."""

from __future__ import annotations

import re

import msgspec
import pytest

from tests._helpers import ROOT
from valkyrie import ConfigError, Names, Settings
from valkyrie.config.load import LEGACY_ENV, known_keys, load_config


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.nats_url is None
    assert settings.prefix == "valkyrie"


def test_environment_values_are_parsed_to_their_types() -> None:
    settings = Settings.from_env(
        {
            "VALKYRIE_NATS_URL": "nats://a:4222,nats://b:4222",
            "VALKYRIE_PREFIX": "ci-eu",
            "VALKYRIE_EMBEDDED_PORT": "4333",
            "VALKYRIE_STORAGE": "memory",
            "VALKYRIE_CONNECT_TIMEOUT_S": "2.5",
            "VALKYRIE_REPLICAS": "3",
            "VALKYRIE_EVENTS_MAX_BYTES": "2097152",
            "VALKYRIE_DATA_DIR": "/var/lib/valkyrie",
        }
    )
    assert settings.nats_url == "nats://a:4222,nats://b:4222"
    assert settings.prefix == "ci-eu"
    assert settings.embedded_port == 4333
    assert settings.storage == "memory"
    assert settings.connect_timeout_s == 2.5
    assert settings.replicas == 3
    assert settings.events_max_bytes == 2097152
    assert settings.data_dir == "/var/lib/valkyrie"


def test_only_valkyrie_variables_are_read() -> None:
    settings = Settings.from_env({"NATS_URL": "nats://x:1", "PREFIX": "other", "prefix": "p"})
    assert settings == Settings()


def test_overrides_win_and_none_overrides_are_skipped() -> None:
    env = {"VALKYRIE_PREFIX": "from-env", "VALKYRIE_NATS_URL": "nats://env:4222"}
    settings = Settings.from_env(env, prefix="from-arg", nats_url=None, replicas=3)
    assert settings.prefix == "from-arg"
    assert settings.nats_url == "nats://env:4222"
    assert settings.replicas == 3


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VALKYRIE_PREFIX", "from-process")
    monkeypatch.setenv("VALKYRIE_DUPLICATE_WINDOW_S", "7")
    settings = Settings.from_env()
    assert settings.prefix == "from-process"
    assert settings.duplicate_window_s == 7


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="nats_ulr"):
        Settings.from_env({}, nats_ulr="nats://typo:4222")


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("VALKYRIE_EMBEDDED_PORT", "not-a-port", "embedded_port"),
        ("VALKYRIE_EMBEDDED_PORT", "70000", "embedded_port"),
        ("VALKYRIE_STORAGE", "disk", "storage"),
        ("VALKYRIE_REPLICAS", "0", "replicas"),
        ("VALKYRIE_LOGS_MAX_AGE_S", "soon", "logs_max_age_s"),
        ("VALKYRIE_EVENTS_MAX_BYTES", "10", "events_max_bytes"),
        ("VALKYRIE_DUPLICATE_WINDOW_S", "0", "duplicate_window_s"),
        ("VALKYRIE_CONNECT_TIMEOUT_S", "0", "connect_timeout_s"),
    ],
)
def test_bad_value_raises_config_error(variable: str, value: str, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert field in message
    assert "VALKYRIE_" in message  # tells where to look


def test_no_tunable_is_a_setting_too() -> None:
    """Every tunable has one definition, in the runtime config: no setting repeats a key."""
    settings = {f.name for f in msgspec.structs.fields(Settings)}
    assert not settings & set(LEGACY_ENV)
    leaves = {key.rsplit(".", 1)[-1] for key in known_keys()}
    # the profile setting names the layer to load and the key records it; nothing else is in both
    assert settings & leaves == {"profile"}


def test_operations_doc_lists_every_setting_and_every_alias() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Settings and environment variables", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(VALKYRIE_[A-Z_]+)` \| ([^|]+) \|", section, re.MULTILINE))
    settings = {f"VALKYRIE_{f.name.upper()}" for f in msgspec.structs.fields(Settings)}
    aliases = {f"VALKYRIE_{name.upper()}": f"`{key}`" for name, key in LEGACY_ENV.items()}
    assert set(rows) == settings | set(aliases)
    assert {name: rows[name].strip() for name in aliases} == aliases


def test_legacy_variables_are_config_aliases_not_settings() -> None:
    env = {"VALKYRIE_ACK_WAIT_S": "2.5", "VALKYRIE_SUBMISSION_MAX_BYTES": "65536"}
    assert Settings.from_env(env) == Settings()
    config = load_config(environ=env).config
    assert config.performance.ack_wait_s == 2.5
    assert config.limits.submission_max_bytes == 65536


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("VALKYRIE_ACK_WAIT_S", "soon", "performance.ack_wait_s"),
        ("VALKYRIE_SUBMISSION_MAX_BYTES", "10", "limits.submission_max_bytes"),
        ("VALKYRIE_EVENTS_MAX_AGE_S", "30", "observability.events_max_age_s"),
    ],
)
def test_a_bad_legacy_variable_is_refused_with_its_key(variable: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={variable: value})
    assert key in str(caught.value)


def test_config_error_is_a_valkyrie_error() -> None:
    from valkyrie import ValkyrieError

    with pytest.raises(ValkyrieError):
        Settings.from_env({"VALKYRIE_STORAGE": "tape"})


# -- Names --------------------------------------------------------------------------------------


def test_default_names() -> None:
    names = Names()
    assert names.prefix == "valkyrie"
    assert names.submit == "valkyrie.jobs.submit"
    assert names.stream("submit") == "VALKYRIE_SUBMIT"
    assert names.bucket("jobs") == "valkyrie_jobs"
    assert names.dead("intake") == "valkyrie.dead.intake"
    assert names.event("job", "abc", "queued") == "valkyrie.events.job.abc.queued"
    assert names.events("job.*.queued") == "valkyrie.events.job.*.queued"


def test_names_follow_the_prefix() -> None:
    names = Names("ci-eu_2")
    assert names.submit == "ci-eu_2.jobs.submit"
    assert names.cancel == "ci-eu_2.jobs.cancel"
    assert names.heartbeat("r1") == "ci-eu_2.runners.heartbeat.r1"
    assert names.updates() == "ci-eu_2.updates.*"
    # stream and bucket names cannot hold '-': it becomes '_'
    assert names.stream("events") == "CI_EU_2_EVENTS"
    assert names.bucket("idempotency") == "ci_eu_2_idempotency"


@pytest.mark.parametrize(
    "prefix",
    ["", "a.b", "a b", "a*", "a>", "jobs.>", "tab\there", "new\nline", "trailing\n", "ünï", "a/b"],
)
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        Names(prefix)


@pytest.mark.parametrize("prefix", ["valkyrie", "a", "A1", "ci_eu", "ci-eu", "0"])
def test_valid_prefix_is_accepted(prefix: str) -> None:
    assert Names(prefix).submit == f"{prefix}.jobs.submit"
