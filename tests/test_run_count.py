"""tests/_run_count.py fails a run in which a collected test did not run, or two tests share an
id, under pytest-xdist as well as without it (each case is an inner pytest run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import ROOT

pytestmark = pytest.mark.slow

CONFTEST = """
import pytest
from tests._run_count import RunCount


def pytest_configure(config):
    config.pluginmanager.register(RunCount(), "valkyrie-run-count")
"""

#: two tests, nothing odd
PLAIN = """
def test_one():
    pass


def test_two():
    pass
"""

#: one test, which the conftest below collects as two items with one id, as schemathesis once did
TWINS = """
def test_first():
    pass
"""
TWINS_CONFTEST = """
import pytest


def pytest_pycollect_makeitem(collector, name, obj):
    if name == "test_first":
        return [
            pytest.Function.from_parent(collector, name="test_first", callobj=obj),
            pytest.Function.from_parent(collector, name="test_first", callobj=obj),
        ]
    return None
"""

#: a plugin that swallows one test: collected, never run
SWALLOW_CONFTEST = """
def pytest_runtest_protocol(item, nextitem):
    if item.name == "test_two":
        return True  # handled: no reports at all
    return None
"""


def run(tmp_path: Path, files: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)},
        check=False,
    )


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_complete_run_passes(tmp_path: Path, workers: list[str]) -> None:
    done = run(tmp_path, {"conftest.py": CONFTEST, "test_x.py": PLAIN}, *workers)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_two_tests_with_one_id_fail_the_run(tmp_path: Path, workers: list[str]) -> None:
    done = run(tmp_path, {"conftest.py": CONFTEST + TWINS_CONFTEST, "test_x.py": TWINS}, *workers)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ids naming several tests" in done.stdout
    assert "2 x test_x.py::test_first" in done.stdout


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_collected_test_that_never_ran_fails_the_run(tmp_path: Path, workers: list[str]) -> None:
    done = run(tmp_path, {"conftest.py": CONFTEST + SWALLOW_CONFTEST, "test_x.py": PLAIN}, *workers)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "collected but not run" in done.stdout
    assert "test_x.py::test_two" in done.stdout
    # stopping early on purpose is not a failure of this kind
    stopped = run(
        tmp_path,
        {"conftest.py": CONFTEST, "test_x.py": "def test_a():\n    assert False\n" + PLAIN},
        "-x",
        *workers,
    )
    assert stopped.returncode in (1, 2)  # xdist reports -x as an interruption
    assert "collected but not run" not in stopped.stdout
