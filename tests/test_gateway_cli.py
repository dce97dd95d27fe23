"""``valkyrie gateway`` and ``valkyrie up --http-port`` as real processes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests._helpers import free_port, spawn, stop_process
from valkyrie import Settings

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready: {log.read_text()}")


def test_gateway_command_serves_and_stops(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    proc = spawn(["gateway", "--port", str(port)], settings, log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log)
        assert httpx.get(f"{url}/api/v2/integration/capabilities").status_code == 200
    finally:
        code = stop_process(proc)
    assert code == 0, log.read_text()


def test_up_also_serves_the_api(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    proc = spawn(["up", "--http-port", str(port)], settings, log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log)
        submitted = httpx.post(f"{url}/api/v2/jobs", json={"job_type": "build"}, timeout=10)
        assert submitted.status_code == 201, submitted.text
        job = httpx.get(f"{url}/api/v2/jobs/{submitted.json()['job_id']}")
        assert job.json()["state"] == "queued"
    finally:
        code = stop_process(proc)
    assert code == 0, log.read_text()
    assert "HTTP API on" in log.read_text()
