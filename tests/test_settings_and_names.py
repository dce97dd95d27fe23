"""Settings from the environment and the names built from a prefix (no NATS)."""

from __future__ import annotations

import pytest

from valkyrie import ConfigError, Names, Settings


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
            "VALKYRIE_ACK_WAIT_S": "2.5",
            "VALKYRIE_REPLICAS": "3",
            "VALKYRIE_SUBMISSION_MAX_BYTES": "65536",
            "VALKYRIE_DATA_DIR": "/var/lib/valkyrie",
        }
    )
    assert settings.nats_url == "nats://a:4222,nats://b:4222"
    assert settings.prefix == "ci-eu"
    assert settings.embedded_port == 4333
    assert settings.storage == "memory"
    assert settings.ack_wait_s == 2.5
    assert settings.replicas == 3
    assert settings.submission_max_bytes == 65536
    assert settings.data_dir == "/var/lib/valkyrie"


def test_only_valkyrie_variables_are_read() -> None:
    settings = Settings.from_env({"NATS_URL": "nats://x:1", "PREFIX": "other", "prefix": "p"})
    assert settings == Settings()


def test_overrides_win_and_none_overrides_are_skipped() -> None:
    env = {"VALKYRIE_PREFIX": "from-env", "VALKYRIE_NATS_URL": "nats://env:4222"}
    settings = Settings.from_env(env, prefix="from-arg", nats_url=None, metrics_port=0)
    assert settings.prefix == "from-arg"
    assert settings.nats_url == "nats://env:4222"
    assert settings.metrics_port == 0


def test_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VALKYRIE_PREFIX", "from-process")
    monkeypatch.setenv("VALKYRIE_MAX_DELIVER", "7")
    settings = Settings.from_env()
    assert settings.prefix == "from-process"
    assert settings.max_deliver == 7


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
        ("VALKYRIE_ACK_WAIT_S", "soon", "ack_wait_s"),
        ("VALKYRIE_SUBMISSION_MAX_BYTES", "10", "submission_max_bytes"),
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
