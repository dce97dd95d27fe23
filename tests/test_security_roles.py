"""The permission table, the identity rules, the generated files: no server needed (but one
binary check that the rendered configuration is one nats-server accepts)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from schemas import AttemptRecord, JobRecord, JobState, JobSubmission
from valkyrie import Names
from valkyrie.bus.credentials import JWT_MARKER, Credentials, discover
from valkyrie.bus.server import find_nats_server
from valkyrie.config.load import config_for
from valkyrie.config.settings import Settings
from valkyrie.domain.identity import (
    attempt_runners,
    inbox_prefix,
    log_refusal,
    reply_allowed,
    requester,
    runner_mismatch,
)
from valkyrie.errors import ConfigError
from valkyrie.runtime.app import serving
from valkyrie.security import AuthStore, ServerSpec, permissions, role_of, server_conf
from valkyrie.security.doc import DOC_PATH, render_doc
from valkyrie.security.roles import CONTROL_PLANE, ROLES
from valkyrie.security.store import FIXED_IDENTITIES

N = Names()
EVERYONE = [*FIXED_IDENTITIES, "runner-r1", "runner-r2", "submitter-ci"]


def perms(identity: str) -> tuple[set[str], set[str]]:
    p = permissions(identity, N, identities=EVERYONE)
    return set(p.publish), set(p.subscribe)


def test_every_role_has_a_row_and_an_identity() -> None:
    assert set(ROLES) == {*FIXED_IDENTITIES, "runner", "submitter"}
    assert role_of("runner-r1") == "runner"
    assert role_of("submitter-ci") == "submitter"
    for bad in ("runner", "runner-", "root", "submitter"):
        with pytest.raises(ConfigError):
            role_of(bad)


def test_a_runner_has_only_its_own_subjects_and_no_jetstream_api() -> None:
    pub, sub = perms("runner-r1")
    assert pub == {
        "valkyrie.runners.register.r1",
        "valkyrie.runners.heartbeat.r1",
        "valkyrie.runners.deregister.r1",
        "valkyrie.updates.r1",
        "valkyrie.logs.r1.*",
    }
    assert sub == {"valkyrie.dispatch.r1", "valkyrie.control.r1", "_INBOX_runner-r1.>"}
    assert not permissions("runner-r1", N).allow_responses


@pytest.mark.parametrize("identity", EVERYONE)
def test_nobody_may_use_wildcards_over_the_api_or_anyone_elses_inbox(identity: str) -> None:
    pub, sub = perms(identity)
    for subject in pub | sub:
        assert subject not in (">", "$JS.API.>", "$JS.>", "$KV.>", "_INBOX.>", "valkyrie.>")
        assert not subject.startswith(("$JS.API.STREAM.DELETE", "$JS.API.STREAM.PURGE"))
        assert not subject.startswith("$JS.API.CONSUMER.DELETE.VALKYRIE_")
    assert {s for s in sub if s.startswith("_INBOX")} == {f"{inbox_prefix(identity)}.>"}


def test_only_the_provisioner_creates_streams_and_only_config_writes_config() -> None:
    for identity in EVERYONE:
        pub, _ = perms(identity)
        creates = {s for s in pub if ".STREAM.CREATE." in s or ".STREAM.UPDATE." in s}
        assert bool(creates) == (identity == "provisioner"), identity
        assert ("$KV.valkyrie_config.>" in pub) == (identity == "config"), identity


def test_only_the_dispatcher_reads_secrets_and_only_some_audit() -> None:
    for identity in EVERYONE:
        pub, sub = perms(identity)
        reads = any(s.startswith("$JS.API.DIRECT.GET.KV_valkyrie_secrets") for s in pub)
        assert reads == (identity == "dispatcher"), identity
        assert ("valkyrie.audit.>" in pub) == (identity in CONTROL_PLANE), identity
        dispatches = any(s.startswith("valkyrie.dispatch.") for s in sub)
        assert dispatches == (identity == "runner-r1" or identity == "runner-r2"), identity


def test_a_handlers_durable_consumer_is_its_own() -> None:
    for identity in EVERYONE:
        pub, _ = perms(identity)
        pulls = {s for s in pub if s.startswith(("$JS.API.CONSUMER.MSG.NEXT.", "$JS.ACK."))}
        for subject in pulls:
            assert subject.split(".")[-1 if "MSG.NEXT" in subject else -2] == identity, subject


def test_submitters_read_by_key_only_and_get_verdicts_on_their_inbox() -> None:
    pub, _sub = perms("submitter-ci")
    assert not any("CONSUMER" in s for s in pub)  # no consumers: no deliveries aimed elsewhere
    assert "valkyrie.jobs.submit.submitter-ci" in pub
    assert "valkyrie.jobs.cancel.submitter-ci" in pub
    assert "_INBOX_submitter-ci.>" in perms("intake")[0]
    assert "_INBOX_submitter-ci.>" not in perms("config")[0]  # submitters change no config
    assert "_INBOX_monitor.>" in perms("config")[0]


def test_identity_rules() -> None:
    assert requester(None, "cli:alice") == "cli:alice"  # open installation: the claim
    assert requester("admin", "cli:admin") == "admin"
    assert requester("admin", "admin:alice") == "admin:alice"
    assert requester("gateway", "http:bob") == "http:bob"
    assert requester("submitter-ci", "http:bob") == "submitter-ci"
    assert requester("monitor", "monitor:auto") == "monitor:auto"
    assert reply_allowed("_INBOX_admin.abc.1", "admin")
    assert not reply_allowed("_INBOX_admin.abc", "submitter-ci")
    assert not reply_allowed("valkyrie.dispatch.r1", "admin")
    assert reply_allowed("_INBOX.abc", None)
    assert not reply_allowed("_INBOX_x.abc", None)
    assert runner_mismatch("r1", "r1") is None
    assert runner_mismatch(None, "r1") is None
    assert "speak only for itself" in (runner_mismatch("r2", "r1") or "")


def test_log_lines_count_only_from_the_attempts_runner() -> None:
    record = JobRecord(
        id="j",
        state=JobState.RUNNING,
        spec=JobSubmission(job_type="x"),
        submitted_at_ms=1,
        updated_at_ms=1,
        attempt=2,
        runner_id="r2",
        attempts=[AttemptRecord(attempt=1, runner_id="r1", dispatched_at_ms=1)],
    )
    runners = attempt_runners(record)
    assert runners == {1: "r1", 2: "r2"}
    assert log_refusal("r2", "r2", 2, runners) is None
    assert log_refusal("r1", "r1", 2, runners) is not None  # r1 no longer runs it
    assert log_refusal("r3", "r2", 2, runners) is not None  # body names another


def test_store_files_are_private_and_seeds_never_reach_the_config(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    created = store.init("valkyrie")
    assert set(created) == {*FIXED_IDENTITIES, "sys"}
    assert store.init("valkyrie") == []  # idempotent, seeds kept
    runner = store.add_runner("r1")
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(runner.parent.stat().st_mode) == 0o700
    for path in (runner, store.index_file, store.conf_file, store.key_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    conf = store.conf_file.read_text()
    for identity in store.identities():
        seed = store.creds(identity.name).read_text().strip()
        assert seed.startswith("SU")
        assert seed not in conf
        assert identity.public_key in conf
    with pytest.raises(ConfigError, match="prefix"):
        store.init("other")
    with pytest.raises(ConfigError, match="rotate"):
        store.revoke("intake")
    store.revoke("runner-r1")
    assert not runner.exists()
    assert "runner-r1" not in store.conf_file.read_text()


def test_the_rendered_configuration_is_one_nats_server_accepts(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    store.init("valkyrie")
    store.add_runner("r1")
    store.add_submitter("ci")
    spec = ServerSpec(
        server_name="n1",
        listen="127.0.0.1:4222",
        store_dir=str(tmp_path / "js"),
        jetstream_key=store.jetstream_key(),
    )
    conf = tmp_path / "n1.conf"
    conf.write_text(server_conf(spec, store.accounts()))
    checked = subprocess.run(
        [find_nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_credentials_come_from_settings_then_the_data_dir(tmp_path: Path) -> None:
    seed = tmp_path / "runner-r9.nk"
    seed.write_text("SUAEXAMPLE\n")
    explicit = Credentials.from_settings(Settings.from_env({}, nats_creds=str(seed)))
    assert explicit.identity == "runner-r9"
    assert explicit.nkey_file == seed
    assert explicit.options()["inbox_prefix"] == "_INBOX_runner-r9"
    jwt = tmp_path / "ops.creds"
    jwt.write_text(f"{JWT_MARKER}\nabc\n")
    assert Credentials.from_settings(Settings.from_env({}, nats_creds=str(jwt))).creds_file == jwt
    settings = Settings.from_env({}, data_dir=str(tmp_path / "data"))
    assert not discover(settings, "admin").authenticated  # nothing generated: open
    AuthStore(tmp_path / "data" / "auth").init("valkyrie")
    found = discover(settings, "admin")
    assert found.identity == "admin"
    assert found.nkey_file is not None
    with pytest.raises(ConfigError, match="does not exist"):
        Credentials(identity="x", nkey_file=tmp_path / "missing.nk").options()


def test_docs_security_md_lists_every_roles_permissions() -> None:
    text = DOC_PATH.read_text()
    assert render_doc(text) == text, (
        "docs/security.md is out of date: run python -m valkyrie.security.doc --write"
    )


async def test_production_refuses_to_start_without_nats_auth_and_tls(tmp_path: Path) -> None:
    open_bus_settings = Settings.from_env(
        {}, data_dir=str(tmp_path / "a"), nats_url="nats://127.0.0.1:1", profile="production"
    )
    config = config_for(open_bus_settings).config
    with pytest.raises(ConfigError, match=r"without NATS authentication .* and TLS"):
        async with serving(open_bus_settings, embed=False, config=config):
            pass
    secured = Settings.from_env(
        {}, data_dir=str(tmp_path / "b"), embedded_port=0, profile="production"
    )
    with pytest.raises(ConfigError, match="without TLS to NATS") as caught:
        async with serving(secured, embed=True, config=config):
            pass
    assert "authentication" not in str(caught.value)  # the embedded server is secured
