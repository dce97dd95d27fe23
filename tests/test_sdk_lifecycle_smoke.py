"""``benchmarks/sdk_lifecycle.py --quick`` runs: real SDK runners, every job succeeds, counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import ROOT

pytestmark = [pytest.mark.nats, pytest.mark.slow, pytest.mark.timeout(240)]


def test_sdk_lifecycle_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "sdk.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/sdk_lifecycle.py", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    figures = json.loads(out.read_text())["results"]
    valkyrie = figures["valkyrie"]
    assert valkyrie["succeeded"] == valkyrie["jobs"] == 50
    # what the SDK path stores per job: at least the submission, the runner's two updates
    # (started, finished), the record's writes and the events of every step
    by_stream = valkyrie["stored_per_job_by_stream"]
    assert by_stream["VALKYRIE_UPDATES"] == 2.0
    assert by_stream["VALKYRIE_SUBMIT"] == 1.0
    assert by_stream["VALKYRIE_EVENTS"] >= 5.0  # queued, dispatched, accepted, started, succeeded
    assert figures["raw"]["stored_per_job"] == 2.0
