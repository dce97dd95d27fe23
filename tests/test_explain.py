"""``explain``: why a job is pending (every cause code) or why it went where it went (pure rules).

Over the bus, through the client, the gateway's CLI and with live config: test_explain_e2e.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from schemas import (
    JobDispatched,
    JobRecord,
    JobState,
    JobSubmission,
    RunnerCapabilities,
    RunnerRecord,
    RunnerRegistration,
    RunnerResources,
    RunnerState,
    RunnerUp,
)
from tests._sched_helpers import MEASURED_BAD
from valkyrie.domain.explain import QueueFacts, explain_dispatched, explain_queued

pytestmark = pytest.mark.timeout(60)


NOW = 1_700_000_000_000
FULL = QueueFacts(mode="full", advanced=True, effective_priority=2, position=0, length=1)


def runner(rid: str = "r1", **changes: Any) -> RunnerRecord:
    """A linux build runner with one free slot; ``changes`` replace record fields."""
    record = RunnerRecord(
        registration=RunnerRegistration(
            runner_id=rid,
            capabilities=RunnerCapabilities(job_types=["build"], languages=["python"]),
            resources=RunnerResources(cpu_cores=4, memory_mb=8192, storage_gb=50, gpu_count=0),
            max_concurrent_jobs=1,
            labels={"os": "linux"},
        ),
        state=RunnerState.ACTIVE,
        registered_at_ms=NOW,
        last_heartbeat_at_ms=NOW,
    )
    return msgspec.structs.replace(record, **changes)


def queued(**spec: Any) -> JobRecord:
    spec.setdefault("job_type", "build")
    return JobRecord(
        id="j1",
        state=JobState.QUEUED,
        spec=msgspec.convert(spec, JobSubmission),
        submitted_at_ms=NOW - 1000,
        updated_at_ms=NOW - 1000,
    )


#: cause -> (job spec, runner changes, a suggestion that must be offered)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str | None]] = {
    "job_type": ({"job_type": "deploy"}, {}, "1 runner(s) match without the job type 'deploy'"),
    "labels": (
        {"labels": {"os": "windows"}},
        {},
        "1 runner(s) match without labels {'os': 'windows'}",
    ),
    "capabilities": (
        {"requirements": {"required_capabilities": ["cuda"]}},
        {},
        "1 runner(s) match without required capabilities ['cuda']",
    ),
    "cpu": ({"requirements": {"cpu_cores": 16}}, {}, "1 runner(s) match with cpu_cores"),
    "memory": ({"requirements": {"memory_mb": 65536}}, {}, "1 runner(s) match with less memory"),
    "storage": ({"requirements": {"storage_gb": 500}}, {}, "with less storage_gb"),
    "gpu": ({"requirements": {"gpu_count": 1}}, {}, "1 runner(s) match with fewer GPUs"),
    "excluded": (
        {"routing_hints": {"excluded_runners": ["r1"]}},
        {},
        "1 runner(s) match if they were not excluded",
    ),
    "affinity": (
        {
            "routing_hints": {
                "affinity_rules": [{"rule_type": "required", "key": "os", "values": ["windows"]}]
            }
        },
        {},
        "without the required affinity rule",
    ),
    "anti_affinity": (
        {
            "routing_hints": {
                "affinity_rules": [{"rule_type": "anti_affinity", "key": "os", "values": ["linux"]}]
            }
        },
        {},
        "without the anti-affinity rule",
    ),
    "qos_latency": (
        {"qos_requirements": {"max_latency_ms": 100}},
        {"stats": MEASURED_BAD},
        "without qos_requirements.max_latency_ms",
    ),
    "qos_reliability": (
        {"qos_requirements": {"reliability_threshold": 0.9}},
        {"stats": MEASURED_BAD},
        "without qos_requirements.reliability_threshold",
    ),
    "qos_throughput": (
        {"qos_requirements": {"min_throughput_bytes_per_s": 10**6}},
        {},
        "without qos_requirements.min_throughput_bytes_per_s",
    ),
    "draining": ({}, {"drain_requested": True}, "1 runner(s) match once they are undrained"),
    "offline": ({}, {"state": RunnerState.OFFLINE}, "1 runner(s) match once they come back online"),
    "capacity": ({}, {"assigned_jobs": {"other": 1}}, None),
}


@pytest.mark.parametrize("cause", list(CASES))
def test_each_constraint_is_named_with_what_would_help(cause: str) -> None:
    spec, changes, suggestion = CASES[cause]
    e = explain_queued(queued(**spec), [runner(**changes)], FULL, now_ms=NOW)
    assert e.causes == [cause]
    assert [(g.constraint, g.count, g.runners) for g in e.rejected] == [(cause, 1, ["r1"])]
    assert e.summary.startswith("no runner can take it: 1 runner(s) rejected because ")
    assert e.rejected[0].detail in e.summary
    if suggestion is not None:
        assert any(suggestion in s for s in e.suggestions), e.suggestions
    else:
        assert e.suggestions == []  # a busy runner needs no change to the job
    assert e.state == "queued"
    assert e.mode == "full"
    assert (e.queue_position, e.queue_length, e.effective_priority) == (0, 1, 2)


def test_details_name_the_values_asked_for() -> None:
    e = explain_queued(
        queued(job_type="deploy", labels={"os": "bsd"}), [runner()], FULL, now_ms=NOW
    )
    assert e.rejected[0].detail == "they do not take job type 'deploy'"
    e = explain_queued(queued(requirements={"cpu_cores": 16}), [runner()], FULL, now_ms=NOW)
    assert e.rejected[0].detail == "they have fewer than 16.0 CPU cores"


def test_no_runners() -> None:
    e = explain_queued(queued(), [], FULL, now_ms=NOW)
    assert e.causes == ["no_runners"]
    assert e.summary == "no runner is registered"
    assert e.rejected == []
    assert e.estimated_start_at_ms is None


def test_runners_are_grouped_by_the_first_constraint_they_fail() -> None:
    runners = [
        runner("a", drain_requested=True),
        runner("b", state=RunnerState.OFFLINE),
        runner("c"),  # labels only
        runner("d", assigned_jobs={"x": 1}),  # labels and capacity
        msgspec.structs.replace(
            runner("e"),
            registration=msgspec.structs.replace(
                runner("e").registration, labels={"os": "windows"}
            ),
        ),
    ]
    e = explain_queued(queued(labels={"os": "windows"}), runners, FULL, now_ms=NOW)
    assert {g.constraint: g.runners for g in e.rejected} == {
        "offline": ["b"],
        "draining": ["a"],
        "labels": ["c", "d"],
    }
    assert e.causes == ["offline", "draining", "labels"]  # in checking order
    assert e.summary == "1 runner(s) can take it; it is waiting its turn"
    # only runners one change away are counted in suggestions
    assert "1 runner(s) match without labels {'os': 'windows'}" in e.suggestions
    assert "labels offered: os=linux (4), os=windows (1)" in e.suggestions


def test_the_headline_is_about_the_live_runners_not_an_offline_one() -> None:
    runners = [
        runner("gone", state=RunnerState.OFFLINE),
        runner("a"),
        runner("b"),
        runner("c", drain_requested=True),
    ]
    e = explain_queued(queued(labels={"gpu": "a100"}), runners, FULL, now_ms=NOW)
    assert e.rejected[0].constraint == "offline"  # the groups stay in checking order
    assert e.summary == (
        "no runner can take it: 2 runner(s) rejected because their labels do not match "
        "{'gpu': 'a100'} (1 more offline)"
    )
    alone = explain_queued(queued(), [runner("gone", state=RunnerState.OFFLINE)], FULL, now_ms=NOW)
    assert alone.summary == "no runner can take it: 1 runner(s) rejected because they are offline"


def test_capacity_gives_the_queue_position_and_an_estimate() -> None:
    busy = [runner("a", assigned_jobs={"x": 1}), runner("b", assigned_jobs={"y": 1})]
    facts = dataclasses.replace(FULL, position=3, length=5, avg_duration_ms=10_000)
    e = explain_queued(queued(), busy, facts, now_ms=NOW)
    assert e.causes == ["capacity"]
    assert (e.queue_position, e.queue_length) == (3, 5)
    # two slots, three jobs ahead: the 4th job starts in the second round after a slot frees
    assert e.estimated_start_at_ms == NOW + 20_000
    assert e.predicted_finish_at_ms == NOW + 30_000
    # first in line still waits for a running job to end (it used to say "now")
    first = explain_queued(queued(), busy, dataclasses.replace(facts, position=0), now_ms=NOW)
    assert first.estimated_start_at_ms == NOW + 10_000
    # a feasible runner: the first in line starts now
    free = explain_queued(queued(), [runner()], dataclasses.replace(facts, position=0), now_ms=NOW)
    assert free.estimated_start_at_ms == NOW
    assert free.predicted_finish_at_ms == NOW + 10_000


def test_mode_disabled_retry_backoff_and_preferred_wait() -> None:
    disabled = dataclasses.replace(FULL, mode="disabled", advanced=False)
    e = explain_queued(queued(), [runner()], disabled, now_ms=NOW)
    assert e.causes == ["mode_disabled"]
    assert e.summary == "1 runner(s) can take it; placement is paused (mode disabled)"
    assert e.estimated_start_at_ms is None

    record = msgspec.structs.replace(queued(), not_before_at_ms=NOW + 5000, attempt=1)
    e = explain_queued(record, [runner()], FULL, now_ms=NOW)
    assert e.causes == ["retry_backoff"]
    assert e.estimated_start_at_ms == NOW + 5000  # not before the backoff ends

    waiting = dataclasses.replace(FULL, waiting_for_preferred=True)
    job = queued(routing_hints={"preferred_runners": ["busy"], "preferred_wait_s": 30})
    e = explain_queued(job, [runner(), runner("busy", assigned_jobs={"x": 1})], waiting, now_ms=NOW)
    assert e.causes == ["preferred_wait", "capacity"]
    assert "waits for a busy preferred runner" in e.summary


def test_without_advanced_placement_affinity_and_qos_are_not_checked() -> None:
    spec = {
        "routing_hints": {
            "affinity_rules": [{"rule_type": "anti_affinity", "key": "os", "values": ["linux"]}]
        },
        "qos_requirements": {"max_latency_ms": 100},
    }
    bad = runner(stats=MEASURED_BAD)
    assert explain_queued(queued(**spec), [bad], FULL, now_ms=NOW).causes == ["anti_affinity"]
    fallback = dataclasses.replace(FULL, mode="fallback", advanced=False)
    e = explain_queued(queued(**spec), [bad], fallback, now_ms=NOW)
    assert e.causes == []
    assert e.summary.startswith("1 runner(s) can take it")


def test_dispatched_job_explains_its_score_against_the_runners_up() -> None:
    record = msgspec.structs.replace(queued(), state=JobState.RUNNING, runner_id="r2", attempt=1)
    decision = JobDispatched(
        subject_id=record.id,
        attempt=1,
        runner_id="r2",
        score=0.81,
        runners_up=[RunnerUp(runner_id="r1", score=0.7), RunnerUp(runner_id="r3", score=0.5)],
        candidates=6,
        rejected={"labels": 2, "capacity": 1},
        slots_used=1,
        capacity=2,
        queued_ms=12,
        effective_priority=2,
        boosted=False,
        tenant="default",
        mode="full",
        preferred=False,
    )
    e = explain_dispatched(record, decision)
    assert e.summary == "placed on r2 with score 0.81; runners-up: r1 (0.7), r3 (0.5)"
    assert e.placement == msgspec.to_builtins(decision.data())
    assert e.placement is not None
    assert e.placement["runners_up"][0] == {"runner_id": "r1", "score": 0.7}
    assert "predicted_finish_at_ms" not in e.placement  # absent, not null, while unknown
    assert [(g.constraint, g.count) for g in e.rejected] == [("capacity", 1), ("labels", 2)]
    assert e.rejected[1].detail == "their labels do not match"
    preferred = explain_dispatched(record, msgspec.structs.replace(decision, preferred=True))
    assert "(a preferred runner: those go first)" in preferred.summary
    assert explain_dispatched(record, None).summary == "placed on r2"
