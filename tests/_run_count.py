"""Fail the run when a collected test did not run, or when two tests share an id.

Under pytest-xdist a test is known to the workers by its id alone: two items with one id (as
schemathesis once made, one per API operation) were collected as 26 and run as one, and the
run still passed. This plugin makes that impossible to miss: at the end of the run every
collected test must have run, once, under an id of its own (a teardown report is the proof, for
passed, failed and skipped tests alike), else the run fails, listing the ids shared by several
tests and the ids that never ran.

A run that only collects, or is interrupted, is not checked; one stopped early on purpose (``-x``,
``--maxfail``) is checked for shared ids only. Registered by ``tests/conftest.py``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from _pytest.nodeid import NodeId

__all__ = ["RunCount", "xdist_group_ids"]


def xdist_group_ids(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each ``xdist_group`` test the ``@group`` id suffix ``--dist=loadgroup`` schedules by.

    pytest-xdist 3.8 writes it to ``item._nodeid``, which pytest 9 no longer reads (an item's
    id is its ``_id``): the suffix was lost, so every grouped test (the chaos tests, the README
    walkthrough) went to any worker. Run after xdist's own hook.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        groups = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


class RunCount:
    """The plugin: see the module docstring."""

    def __init__(self) -> None:
        self.collected: Counter[str] = Counter()
        self.ran: set[str] = set()
        self.problem: str | None = None

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """What a run without workers collected (the ids final: every plugin has seen them)."""
        self.collected = Counter(item.nodeid for item in session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: object, ids: Sequence[str]) -> None:
        """What a worker collected (every worker collects the same; the controller nothing)."""
        self.collected = Counter(ids)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Every test that ran ends with a teardown report (the controller gets the workers')."""
        if report.when == "teardown":
            self.ran.add(report.nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Compare what was collected with what ran; fail the run when they differ."""
        config = session.config
        if hasattr(config, "workerinput"):
            return  # a worker: the controller checks the whole run
        if config.option.collectonly or exitstatus in (
            pytest.ExitCode.INTERRUPTED,
            pytest.ExitCode.USAGE_ERROR,
        ):
            return
        maxfail = config.option.maxfail
        stopped = bool(
            session.shouldstop or session.shouldfail or (maxfail and session.testsfailed >= maxfail)
        )
        twins = sorted(nodeid for nodeid, n in self.collected.items() if n > 1)
        # a run stopped on purpose (-x, --maxfail) leaves tests unrun: that is not news
        missing = [] if stopped else sorted(set(self.collected) - self.ran)
        if not twins and not missing:
            return
        lines = [f"{session.testscollected} test(s) collected, {len(self.ran)} ran under an id"]
        if twins:
            lines.append(
                "ids naming several tests (under pytest-xdist only one of each runs; give each a "
                "unique id):"
            )
            lines += [f"  {self.collected[t]} x {t}" for t in twins[:20]]
        if missing:
            lines.append("never run:")
            lines += [f"  {m}" for m in missing[:20]]
        self.problem = "\n".join(lines)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        """Say why the run failed although every test that ran passed."""
        if self.problem is not None:
            terminalreporter.section("collected but not run", sep="=", red=True, bold=True)
            terminalreporter.line(self.problem)
