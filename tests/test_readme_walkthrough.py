"""README's "Five minutes with Valkyrie", run as a newcomer runs it, its outputs checked.

A real ``valkyrie up --runners 2`` starts in a process of its own, on ports that are not the
defaults (a second shell must find it anyway: it is given no ``VALKYRIE_*`` variable, only the
same home directory). Then every ``$ command`` of the walkthrough's console blocks runs in that
second shell, in order, and its output must have the shape the README shows: the same lines, once
ids, runner names, times, numbers and paths are set aside. Job ids the README shows are mapped to
the real ones as they appear, so later commands use the right ones.

The rest of the first-run experience is checked on the same installation: `config show
--effective` shows the running control plane's own values, the gateway's config API its real
port, `runners ls` live heartbeats, `up` one log format, and Ctrl-C says what it waits for.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests._helpers import ROOT, free_port, kill_embedded_server

# one installation for the module, its tests in order: one worker runs them all
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300), pytest.mark.xdist_group("readme")]

README = ROOT / "README.md"
BIN = Path(sys.executable).parent
HOST = socket.gethostname()
ID = re.compile(r"\b[0-9a-f]{32}\b")


def walkthrough() -> list[tuple[str, list[str]]]:
    """The console blocks of "Five minutes with Valkyrie": (command, expected output) pairs."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Five minutes with Valkyrie", 1)[1].split("\n### ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps and line.strip():
                steps[-1][1].append(line)
    return steps


#: what varies from run to run, set aside (in this order)
_VARIES = [
    (re.compile(r"^… |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ "), "<time> "),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?"), "<time>"),
    (ID, "<id>"),
    (re.compile(rf"\b(?:vm|{re.escape(HOST)})-[0-9a-f]{{6}}\b"), "<runner>"),
    (re.compile(r"\b[0-9a-f]{12}\b"), "<hex>"),
    (re.compile(r"\b(cli|admin):[\w.-]+"), r"\1:<user>"),
    (re.compile(r"\b[A-Za-z0-9]{22}\b"), "<nuid>"),  # a service instance's id
    (re.compile(r"(?<![\w<])/[^\s)]+"), "<path>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
    (re.compile(r"-{2,}"), "--"),
    (re.compile(r"\s+"), " "),
]


def shape(line: str) -> str:
    for pattern, placeholder in _VARIES:
        line = pattern.sub(placeholder, line)
    return line.strip()


def shapes(lines: list[str]) -> Counter[str]:
    return Counter(shape(line) for line in lines if line.strip())


@dataclass
class Newcomer:
    """The installation under test and the second shell's environment."""

    home: Path
    up: subprocess.Popen[bytes]
    log: Path
    shell_env: dict[str, str]
    nats_port: int
    http_port: int
    ids: dict[str, str] = field(default_factory=dict)

    def run(self, command: str) -> list[str]:
        for sample, real in self.ids.items():
            command = command.replace(sample, real)
        done = subprocess.run(
            ["bash", "-c", command],
            env=self.shell_env,
            cwd=self.home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
            check=False,
        )
        return done.stdout.decode(errors="replace").splitlines()

    def up_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def _wait_for(check: object, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    home = tmp_path_factory.mktemp("home")
    base = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "LANG": "C.UTF-8",
    }
    nats_port, http_port = free_port(), free_port()
    up_env = {
        **base,
        # not the defaults: the second shell, without these, must still find the installation
        "VALKYRIE_EMBEDDED_PORT": str(nats_port),
        "VALKYRIE_HTTP__PORT": str(http_port),
        "VALKYRIE_OBSERVABILITY__METRICS_PORT": "0",
        "VALKYRIE_EVENTS_MAX_BYTES": str(8 * 1024 * 1024),
    }
    log = home / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [str(BIN / "valkyrie"), "up", "--runners", "2"],
            env=up_env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    person = Newcomer(home, up, log, base, nats_port, http_port)
    try:
        _wait_for(
            lambda: "valkyrie is up" in log.read_text(errors="replace") or up.poll() is not None,
            "valkyrie up did not start",
        )
        assert up.poll() is None, log.read_text(errors="replace")
        yield person
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)
            kill_embedded_server(home / ".local" / "share" / "valkyrie")


def test_the_walkthrough_outputs_have_the_readme_shape(newcomer: Newcomer) -> None:
    steps = walkthrough()
    assert steps[0][0] == "./scripts/valkyrie up --runners 2"
    shown = shapes(steps[0][1])
    up_lines = newcomer.up_lines()
    ready = next(i for i, line in enumerate(up_lines) if "valkyrie is up" in line)
    # every line the README shows is one `up` prints, and it shows all that `up` prints first
    assert shown <= shapes(up_lines), (shown, up_lines)
    assert shapes(up_lines[: ready + 1]) <= shown, (shown, up_lines)
    for command, expected in steps[1:]:
        time.sleep(1)  # a person's pace: a job started by the last command is running by now
        actual = newcomer.run(command)
        assert shapes(actual) == shapes(expected), (command, expected, actual)
        # the ids the README shows are these ids from now on
        for sample_line, real_line in zip(expected, actual, strict=False):
            for sample, real in zip(ID.findall(sample_line), ID.findall(real_line), strict=False):
                newcomer.ids.setdefault(sample, real)


def test_a_second_shell_finds_the_running_installation(newcomer: Newcomer) -> None:
    record = json.loads((newcomer.home / ".local/share/valkyrie/up.json").read_text())
    assert record["nats_url"] == f"nats://127.0.0.1:{newcomer.nats_port}"
    assert record["http_url"] == f"http://127.0.0.1:{newcomer.http_port}"
    assert record["pid"] == newcomer.up.pid
    # this shell has no VALKYRIE_* at all, and gets the running control plane's own config
    effective = json.loads(
        "\n".join(newcomer.run("valkyrie config show --effective --json 2>/dev/null"))
    )
    assert effective["http.port"] == {"value": newcomer.http_port, "source": "env"}
    said = newcomer.run("valkyrie config show --effective http.port 2>&1 >/dev/null")
    assert said[0].startswith(f"values the running `valkyrie up` (pid {newcomer.up.pid}) runs")
    view = httpx.get(f"{record['http_url']}/api/v2/config/valkyrie", timeout=10).json()
    assert view["config"]["http"]["port"] == newcomer.http_port


def test_runners_ls_shows_the_live_heartbeat(newcomer: Newcomer) -> None:
    rows = [line.split() for line in newcomer.run("valkyrie runners ls")[2:]]
    assert len(rows) == 2
    for row in rows:
        age = next(cell for cell in row if cell.endswith("s"))
        # the live heartbeat (1 s interval), not the record's (written at most every 5 s)
        assert float(age[:-1]) < 2.5, rows


def test_up_speaks_one_log_format_and_ctrl_c_says_what_it_waits_for(newcomer: Newcomer) -> None:
    job = newcomer.run("valkyrie submit -- sleep 15")[0]
    _wait_for(
        lambda: "running" in " ".join(newcomer.run(f"valkyrie jobs show {job} | head -2")),
        "the job did not start",
    )
    os.killpg(newcomer.up.pid, signal.SIGINT)
    assert newcomer.up.wait(60) == 0
    lines = newcomer.up_lines()
    logged = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)\s+\S+: ")
    odd = [
        line for line in lines if not logged.match(line) and not line.startswith("valkyrie is up")
    ]
    assert not odd, odd
    waiting = [line for line in lines if "draining: waiting for 1 running job(s)" in line]
    assert len(waiting) >= 2, lines  # at once, then every few seconds
    assert job in waiting[0]
    assert not (newcomer.home / ".local/share/valkyrie/up.json").exists()
    # and the job was let finish
    assert any(f"{job} attempt 1 succeeded" in line for line in lines), lines
