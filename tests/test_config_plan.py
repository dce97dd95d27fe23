"""Planning runtime config changes (pure): overrides, diffs, and every reason for a refusal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import ConfigChange, FieldError
from valkyrie.config.load import known_keys, load_config
from valkyrie.config.model import LIVE_KEYS
from valkyrie.config.validate import ValidationResult, validate_dotted
from valkyrie.domain.config_plan import ConfigPlan, plan_change

BASE = load_config(environ={}).base()
KEYS = known_keys()


def plan(current: dict[str, Any] | None = None, **kwargs: Any) -> ConfigPlan:
    return plan_change(
        ConfigChange(**kwargs),
        current or {},
        BASE,
        {0: {}, 1: {"mode": "hybrid"}},
        known_keys=KEYS,
        validate=validate_dotted,
    )


@pytest.mark.timeout(10)
def test_plan_a_live_change() -> None:
    new, diff, errors, warnings = plan(set={"dispatch.max_queue_scan": 10})
    assert (new, errors, warnings) == ({"dispatch.max_queue_scan": 10}, [], [])
    assert diff == {"dispatch.max_queue_scan": {"old": 2000, "new": 10}}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("key", ["http.port", "performance.handler_concurrency", "profile"])
def test_plan_refuses_a_key_that_cannot_change_live(key: str) -> None:
    new, _, errors, _ = plan(set={key: 1234 if key != "profile" else "testing"})
    assert new is None
    assert [e.path for e in errors] == [key]
    assert errors[0].reason.startswith("cannot change live: ")


@pytest.mark.timeout(10)
def test_plan_refuses_a_non_live_override_even_at_its_current_value() -> None:
    # another process's base may differ (file, environment): the override would change it live
    new, _, errors, _ = plan(set={"http.port": BASE["http.port"]})
    assert new is None
    assert [e.path for e in errors] == ["http.port"]


@pytest.mark.timeout(10)
def test_plan_reports_every_problem_of_a_change() -> None:
    new, _, errors, _ = plan(
        set={"http.port": 1, "dispatch.accept_timeout_ms": 0, "dispatch.nope": 1, "mode": "x"}
    )
    assert new is None
    assert sorted(e.path for e in errors) == [
        "dispatch.accept_timeout_ms",
        "dispatch.nope",
        "http.port",
        "mode",
    ]


@pytest.mark.timeout(10)
def test_plan_unset_replace_and_rollback() -> None:
    current = {"dispatch.max_queue_scan": 10, "mode": "fallback"}
    new, diff, errors, _ = plan(current, set={"dispatch.max_queue_scan": None})
    assert (new, errors) == ({"mode": "fallback"}, [])
    assert diff == {"dispatch.max_queue_scan": {"old": 10, "new": 2000}}
    new, diff, _, _ = plan(current, replace={"mode": "full", "dispatch": {"max_queue_scan": 5}})
    assert new == {"dispatch.max_queue_scan": 5}  # values equal to the base are not overrides
    new, diff, _, _ = plan(current, rollback_to=1)
    assert new == {"mode": "hybrid"}
    assert diff["mode"] == {"old": "fallback", "new": "hybrid"}
    new, _, errors, _ = plan(current, rollback_to=7)
    assert new is None
    assert [e.path for e in errors] == ["rollback_to"]


def test_plan_refuses_unknown_keys_and_still_shows_the_diff() -> None:
    new, diff, errors, _ = plan(set={"dispatch.nope": 1, "dispatch.max_queue_scan": 7})
    assert new is None
    assert errors == [FieldError(path="dispatch.nope", reason="unknown key")]
    assert diff == {"dispatch.max_queue_scan": {"old": 2000, "new": 7}}


def test_a_change_that_changes_nothing_plans_no_diff() -> None:
    current = {"dispatch.max_queue_scan": 10}
    assert plan(current, set={"dispatch.max_queue_scan": 10}) == ConfigPlan(current, {}, [], [])


def test_the_other_keys_are_validated_with_the_refused_ones_left_alone() -> None:
    seen: list[dict[str, Any]] = []

    def spy(dotted: Mapping[str, Any]) -> ValidationResult:
        seen.append(dict(dotted))
        return validate_dotted(dotted)

    new, _, errors, _ = plan_change(
        ConfigChange(set={"http.port": 1, "dispatch.nope": 2, "health.stale_after_ms": 1}),
        {},
        BASE,
        {},
        known_keys=KEYS,
        validate=spy,
    )
    assert new is None
    assert [e.path for e in errors] == ["dispatch.nope", "http.port", "health.stale_after_ms"]
    (checked,) = seen
    assert checked["http.port"] == BASE["http.port"]
    assert "dispatch.nope" not in checked
    assert checked["health.stale_after_ms"] == 1


def test_the_validators_warnings_come_with_an_accepted_plan() -> None:
    warning = FieldError(path="dispatch.max_queue_scan", reason="unusually small")

    def warns(dotted: Mapping[str, Any]) -> ValidationResult:
        result = validate_dotted(dotted)
        return ValidationResult(result.config, result.errors, [warning])

    planned = plan_change(
        ConfigChange(set={"dispatch.max_queue_scan": 1}),
        {},
        BASE,
        {},
        known_keys=KEYS,
        validate=warns,
    )
    assert planned == ConfigPlan({"dispatch.max_queue_scan": 1}, planned.diff, [], [warning])


_LIVE_INTS = {
    "dispatch.accept_timeout_ms": st.integers(50, 600_000),
    "dispatch.max_queue_scan": st.integers(1, 1_000_000),
    "dispatch.execution_grace_ms": st.integers(0, 3_600_000),
    "scheduling.candidate_sample": st.integers(1, 100_000),
}


@settings(max_examples=100, deadline=None)
@given(
    current=st.fixed_dictionaries({}, optional=_LIVE_INTS),
    change=st.fixed_dictionaries(
        {}, optional={k: st.one_of(st.none(), v) for k, v in _LIVE_INTS.items()}
    ),
)
def test_live_changes_are_planned_exactly(current: dict[str, Any], change: dict[str, Any]) -> None:
    assert all(any(k.startswith(p) for p in LIVE_KEYS) for k in _LIVE_INTS)
    new, diff, errors, _ = plan(current, set=change)
    assert errors == []
    assert new is not None
    expected = {**current, **{k: v for k, v in change.items() if v is not None}}
    assert new == {k: v for k, v in expected.items() if change.get(k, 0) is not None}
    before, after = {**BASE, **current}, {**BASE, **new}
    assert diff == {
        k: {"old": before[k], "new": after[k]} for k in sorted(after) if before[k] != after[k]
    }
