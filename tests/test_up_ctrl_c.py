"""Ctrl-C on ``valkyrie up`` with its embedded server: a terminal signals the whole foreground
process group, and the server must outlive the handlers' clean shutdown, not quit first."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._helpers import ROOT, free_port, kill_embedded_server

pytestmark = pytest.mark.slow


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
def test_ctrl_c_stops_up_cleanly_and_its_server_last(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALKYRIE_")}
    env.update(
        {
            "VALKYRIE_DATA_DIR": str(tmp_path / "data"),
            "VALKYRIE_EMBEDDED_PORT": str(nats_port),
            "VALKYRIE_METRICS_PORT": "0",
            "VALKYRIE_EVENTS_MAX_BYTES": str(8 * 1024 * 1024),
        }
    )
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        # a session of its own, as a terminal's foreground job: the group is what Ctrl-C signals
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "valkyrie",
                "up",
                "--runners",
                "1",
                "--http-port",
                str(http_port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "valkyrie is up" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        assert _listening(nats_port)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            kill_embedded_server(tmp_path / "data")
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "Traceback" not in text, text
    # the handlers finished with the server still there (it used to quit first: every open pull
    # ended with "Server Shutdown" and the handlers spent their shutdown reconnecting)
    assert "Server Shutdown" not in text, text
    assert "reconnecting" not in text, text
    assert not _listening(nats_port), "the embedded server outlived valkyrie up"
