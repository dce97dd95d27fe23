"""`valkyrie auth …` on a data dir of its own (no server: the reload path says so)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from valkyrie.cli import cli


def run(data: Path, *args: str) -> Result:
    env = {"VALKYRIE_DATA_DIR": str(data), "VALKYRIE_NATS_URL": "", "VALKYRIE_PREFIX": "valkyrie"}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def keys(data: Path) -> dict[str, str]:
    index = json.loads((data / "auth" / "identities.json").read_text())
    return {name: entry["public_key"] for name, entry in index["identities"].items()}


def test_init_then_issue_rotate_and_revoke(tmp_path: Path) -> None:
    first = run(tmp_path, "auth", "init")
    assert first.exit_code == 0, first.output
    assert "13 identities created" in first.output  # 12 roles and sys
    assert "nothing to do" in run(tmp_path, "auth", "init").output

    issued = run(tmp_path, "auth", "runner", "r1")
    assert issued.exit_code == 0, issued.output
    seed = tmp_path / "auth" / "creds" / "runner-r1.nk"
    assert str(seed) in issued.output
    assert "no embedded server runs" in issued.output  # nothing to reload: it says what to do
    assert "--creds runner-r1.nk runner" in issued.output

    before = keys(tmp_path)["runner-r1"]
    assert run(tmp_path, "auth", "runner", "r1").exit_code == 0  # again: rotation
    assert keys(tmp_path)["runner-r1"] != before
    assert run(tmp_path, "auth", "submitter", "ci").exit_code == 0
    listed = run(tmp_path, "auth", "ls").output
    for name in ("admin", "ops", "runner-r1", "submitter-ci", "provisioner", "sys"):
        assert name in listed

    refused = run(tmp_path, "auth", "revoke", "dispatcher")
    assert refused.exit_code == 10
    assert "rotate it" in refused.output
    assert run(tmp_path, "auth", "revoke", "runner-r1").exit_code == 0
    assert "runner-r1" not in keys(tmp_path)
    assert not seed.exists()
    assert run(tmp_path, "auth", "revoke", "runner-r1").exit_code == 10  # no such identity


def test_nothing_issued_before_init(tmp_path: Path) -> None:
    result = run(tmp_path, "auth", "runner", "r1")
    assert result.exit_code == 10
    assert "valkyrie auth init" in result.output


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ""])
def test_an_id_that_cannot_be_a_subject_token_is_refused(tmp_path: Path, bad: str) -> None:
    run(tmp_path, "auth", "init")
    result = run(tmp_path, "auth", "runner", bad)
    assert result.exit_code == 10
    assert "identity" in result.output


def test_nats_config_for_a_cluster_node(tmp_path: Path) -> None:
    run(tmp_path, "auth", "init")
    out = tmp_path / "n1.conf"
    result = run(
        tmp_path,
        "auth",
        "nats-config",
        "--server-name",
        "n1",
        "--cluster",
        "valkyrie",
        "--route",
        "nats-2:6222",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600
    password = (tmp_path / "auth" / "route.password").read_text().strip()
    assert f"nats-route://valkyrie-route:{password}@nats-2:6222" in text
    assert "cipher: chachapoly" in text
    assert keys(tmp_path)["admin"] in text
    assert run(tmp_path, "auth", "nats-config", "--route", "x:6222").exit_code == 2
