"""Bad submissions: each gets a verdict naming every bad field, an event and a dead letter."""

from __future__ import annotations

import json
import re
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import strategies as st

from schemas import FieldError, JobState, JobSubmission
from tests._helpers import (
    config_for_test,
    dead_letters,
    events_of,
    job_count,
    running,
    settings_for,
    wait_until,
)
from valkyrie import REPLY_TO_HEADER, Client, SchemaError
from valkyrie.domain.intake import (
    ParsedSubmission,
    check_submission,
    idempotency_token,
    job_id_for,
    parse_submission,
    queued_record,
)

#: the limit the NATS test runs with (the smallest allowed is 1024)
MAX_BYTES = 4096
NOW_MS = 1_700_000_000_000


def _body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _v2(**fields: Any) -> bytes:
    return _body({"job_type": "build", **fields})


#: (case id, body, the exact paths the verdict must name)
BAD: list[tuple[str, bytes, list[str]]] = [
    ("broken-json", b'{"job_type": "build",', ["$"]),
    ("trailing-garbage", b'{"job_type": "build"} x', ["$"]),
    ("not-utf8", b'{"job_type": "\xff\xfe"}', ["$"]),
    ("empty-body", b"", ["$"]),
    ("json-array", _body([{"job_type": "build"}]), ["$"]),
    ("json-string", _body("build"), ["$"]),
    ("json-null", b"null", ["$"]),
    ("missing-job-type", _body({"payload": {"command": ["true"]}}), ["$.job_type"]),
    ("job-type-not-string", _body({"job_type": 42}), ["$.job_type"]),
    ("job-type-empty", _body({"job_type": ""}), ["$.job_type"]),
    ("job-type-blank", _body({"job_type": "   "}), ["$.job_type"]),
    ("priority-too-high", _v2(priority=5), ["$.priority"]),
    ("priority-negative", _v2(priority=-1), ["$.priority"]),
    ("priority-string", _v2(priority="high"), ["$.priority"]),
    ("priority-boolean", _v2(priority=True), ["$.priority"]),
    ("requirements-not-object", _v2(requirements="big"), ["$.requirements"]),
    ("negative-cpu", _v2(requirements={"cpu_cores": -1}), ["$.requirements.cpu_cores"]),
    ("negative-memory", _v2(requirements={"memory_mb": -512}), ["$.requirements.memory_mb"]),
    ("memory-as-string", _v2(requirements={"memory_mb": "1G"}), ["$.requirements.memory_mb"]),
    (
        "zero-execution-time",
        _v2(requirements={"max_execution_time_s": 0}),
        ["$.requirements.max_execution_time_s"],
    ),
    (
        "capability-not-string",
        _v2(requirements={"required_capabilities": ["docker", 7]}),
        ["$.requirements.required_capabilities[1]"],
    ),
    (
        "unknown-priority-class",
        _v2(qos_requirements={"priority_class": "diamond"}),
        ["$.qos_requirements.priority_class"],
    ),
    (
        "reliability-above-one",
        _v2(qos_requirements={"reliability_threshold": 1.5}),
        ["$.qos_requirements.reliability_threshold"],
    ),
    (
        "unknown-affinity-rule-type",
        _v2(routing_hints={"affinity_rules": [{"rule_type": "sometimes", "key": "os"}]}),
        ["$.routing_hints.affinity_rules[0].rule_type"],
    ),
    (
        "affinity-rule-missing-key",
        _v2(routing_hints={"affinity_rules": [{"rule_type": "required", "values": ["a"]}]}),
        ["$.routing_hints.affinity_rules[0].key"],
    ),
    (
        "affinity-rule-not-object",
        _v2(routing_hints={"affinity_rules": ["os=linux"]}),
        ["$.routing_hints.affinity_rules[0]"],
    ),
    (
        "affinity-weight-too-high",
        _v2(
            routing_hints={
                "affinity_rules": [
                    {"rule_type": "preferred", "key": "os", "values": ["l"], "weight": 101}
                ]
            }
        ),
        ["$.routing_hints.affinity_rules[0].weight"],
    ),
    (
        "affinity-rule-without-values",
        _v2(
            routing_hints={
                "affinity_rules": [
                    {"rule_type": "anti_affinity", "key": "zone"},
                    {"rule_type": "required", "key": "os", "values": []},
                ]
            }
        ),
        ["$.routing_hints.affinity_rules[1].values"],
    ),
    (
        "preferred-and-excluded-overlap",
        _v2(routing_hints={"preferred_runners": ["r1", "r2"], "excluded_runners": ["r2"]}),
        ["$.routing_hints.excluded_runners"],
    ),
    (
        "runner-id-invalid",
        _v2(routing_hints={"preferred_runners": ["ok-1", "not ok"]}),
        ["$.routing_hints.preferred_runners[1]"],
    ),
    ("deadline-in-the-past", _v2(deadline_at_ms=1_000), ["$.deadline_at_ms"]),
    ("deadline-negative", _v2(deadline_at_ms=-5), ["$.deadline_at_ms"]),
    ("job-id-with-dot", _v2(job_id="job.1"), ["$.job_id"]),
    ("job-id-with-wildcard", _v2(job_id="job*"), ["$.job_id"]),
    ("job-id-leading-dash", _v2(job_id="-job"), ["$.job_id"]),
    ("job-id-too-long", _v2(job_id="j" * 129), ["$.job_id"]),
    (
        "max-backoff-below-initial",
        _v2(retry_policy={"initial_backoff_ms": 5000, "max_backoff_ms": 1000}),
        ["$.retry_policy.max_backoff_ms"],
    ),
    ("zero-max-attempts", _v2(retry_policy={"max_attempts": 0}), ["$.retry_policy.max_attempts"]),
    ("metadata-value-not-string", _v2(metadata={"team": 7}), ["$.metadata.team"]),
    ("metadata-dotted-key", _v2(metadata={"ci.run": None}), ['$.metadata["ci.run"]']),
    ("metadata-not-object", _v2(metadata=["team=core"]), ["$.metadata"]),
    ("metadata-too-many", _v2(metadata={f"k{i}": "v" for i in range(65)}), ["$.metadata"]),
    ("label-value-not-string", _v2(labels={"os": ["linux"]}), ["$.labels.os"]),
    ("empty-idempotency-key", _v2(idempotency_key=""), ["$.idempotency_key"]),
    ("correlation-id-too-long", _v2(correlation_id="c" * 257), ["$.correlation_id"]),
    ("oversized", _v2(payload="x" * MAX_BYTES), ["$"]),
    ("v1-type-not-string", _body({"type": 5, "payload": {}}), ["$.type"]),
    ("v1-type-blank", _body({"type": "  ", "payload": {}}), ["$.type"]),
    (
        "v1-zero-execution-time",
        _body({"type": "Build", "requirements": {"max_execution_time": 0}}),
        ["$.requirements.max_execution_time"],
    ),
    ("v1-zero-timeout", _body({"type": "Build", "timeout": 0}), ["$.timeout"]),
    ("v1-pipeline-not-string", _body({"type": "Build", "pipeline": 12}), ["$.pipeline"]),
    (
        "several-errors",
        _body(
            {
                "job_type": 7,
                "priority": 9,
                "requirements": {"cpu_cores": -1, "gpu_count": "two"},
                "metadata": {"a": 1},
                "deadline_at_ms": 1,
                "routing_hints": {"preferred_runners": ["r1"], "excluded_runners": ["r1"]},
                "retry_policy": {"initial_backoff_ms": 10, "max_backoff_ms": 5},
            }
        ),
        [
            "$.job_type",
            "$.priority",
            "$.requirements.cpu_cores",
            "$.requirements.gpu_count",
            "$.metadata.a",
            "$.deadline_at_ms",
            "$.routing_hints.excluded_runners",
            "$.retry_policy.max_backoff_ms",
        ],
    ),
    (
        "v1-several-errors",
        _body({"type": " ", "priority": 7, "requirements": {"cpu_cores": "many"}}),
        ["$.priority", "$.requirements.cpu_cores", "$.type"],
    ),
]


def test_bad_cases_are_distinct_and_many() -> None:
    assert len(BAD) >= 20
    assert len({case_id for case_id, _, _ in BAD}) == len(BAD)
    assert len({body for _, body, _ in BAD}) == len(BAD)  # dead letters are matched by body


@pytest.mark.parametrize(("body", "paths"), [(b, p) for _, b, p in BAD], ids=[c for c, _, _ in BAD])
def test_parse_submission_names_every_bad_field(body: bytes, paths: list[str]) -> None:
    with pytest.raises(SchemaError) as caught:
        parse_submission(body, received_at_ms=NOW_MS, max_bytes=MAX_BYTES)
    assert sorted(e.path for e in caught.value.errors) == sorted(paths)
    assert all(e.reason for e in caught.value.errors)


@pytest.mark.nats
async def test_bad_submissions_are_rejected_dead_lettered_and_the_worker_keeps_serving(
    nats_url: str, prefix: str
) -> None:
    settings = settings_for(nats_url, prefix)
    config = config_for_test(settings, limits__submission_max_bytes=MAX_BYTES)
    async with running(settings, ["intake"], config=config) as bus:
        client = Client(bus)
        for case_id, body, paths in BAD:
            verdict = await client.submit(body)
            assert verdict is not None, case_id
            assert not verdict.accepted, case_id
            assert verdict.job_id is None, case_id
            assert sorted(e.path for e in verdict.errors) == sorted(paths), case_id

        # the worker still serves after every kind of bad input
        ok = await client.submit({"job_type": "build", "payload": {"command": ["true"]}})
        assert ok is not None
        assert ok.accepted
        assert ok.job_id is not None
        assert (await client.get_job(ok.job_id)).state == JobState.QUEUED

        async def all_dead_lettered() -> bool:
            return len(await dead_letters(bus)) >= len(BAD)

        await wait_until(all_dead_lettered, timeout_s=15)
        letters = await dead_letters(bus)
        rejected = await events_of(bus, "intake.*.rejected")
        assert await job_count(bus) == 1

    assert len(letters) == len(BAD)
    by_payload = {letter.payload: letter for letter in letters}
    assert len(by_payload) == len(BAD)
    assert len(rejected) == len(BAD)
    event_by_seq = {event.data["stream_seq"]: event for event in rejected}
    for case_id, body, paths in BAD:
        letter = by_payload.get(body)
        assert letter is not None, f"{case_id}: no dead letter carries the body sent"
        assert letter.handler == "intake", case_id
        assert letter.original_subject == f"{prefix}.jobs.submit", case_id
        assert letter.reason.startswith("invalid submission"), case_id
        assert sorted(e.path for e in letter.errors) == sorted(paths), case_id
        assert letter.deliveries == 1, case_id
        assert REPLY_TO_HEADER in letter.headers, case_id
        assert letter.stream_seq is not None, case_id

        event = event_by_seq.get(letter.stream_seq)
        assert event is not None, f"{case_id}: no intake.rejected event"
        assert event.type == "intake.rejected", case_id
        assert sorted(e["path"] for e in event.data["errors"]) == sorted(paths), case_id


@pytest.mark.nats
async def test_rejection_verdict_lists_every_error_at_once(nats_url: str, prefix: str) -> None:
    _, body, paths = BAD[[case_id for case_id, _, _ in BAD].index("several-errors")]
    assert len(paths) >= 5
    async with running(settings_for(nats_url, prefix), ["intake"]) as bus:
        verdict = await Client(bus).submit(body)
    assert verdict is not None
    assert not verdict.accepted
    assert sorted(e.path for e in verdict.errors) == sorted(paths)  # each once, none missing
    assert all(e.reason for e in verdict.errors)


# -- the pure intake logic ----------------------------------------------------------------------


def _parse(doc: Any, *, now_ms: int = NOW_MS) -> ParsedSubmission:
    return parse_submission(_body(doc), received_at_ms=now_ms, max_bytes=MAX_BYTES)


def test_parse_v2_body() -> None:
    parsed = _parse({"job_type": "build", "priority": 0, "labels": {"os": "linux"}})
    assert parsed.api_version == "v2"
    assert parsed.spec == JobSubmission(job_type="build", priority=0, labels={"os": "linux"})


def test_parse_detects_v1_by_type_without_job_type() -> None:
    parsed = _parse({"type": "Build", "timeout": 5, "pipeline": "p"})
    assert parsed.api_version == "v1"
    assert parsed.spec.job_type == "build"
    assert parsed.spec.deadline_at_ms == NOW_MS + 5_000
    assert parsed.spec.metadata == {"pipeline_id": "p"}
    # with job_type present the body is v2 and a stray `type` is ignored
    both = _parse({"job_type": "test", "type": "Build"})
    assert both.api_version == "v2"
    assert both.spec.job_type == "test"


def test_parse_size_limit_is_inclusive() -> None:
    base = _body({"job_type": "build", "payload": ""})
    fits = _body({"job_type": "build", "payload": "x" * (MAX_BYTES - len(base))})
    assert len(fits) == MAX_BYTES
    assert parse_submission(fits, received_at_ms=NOW_MS, max_bytes=MAX_BYTES).spec.payload
    with pytest.raises(SchemaError) as caught:
        parse_submission(fits + b" ", received_at_ms=NOW_MS, max_bytes=MAX_BYTES)
    assert [e.path for e in caught.value.errors] == ["$"]
    assert str(MAX_BYTES) in caught.value.errors[0].reason


def test_deadline_must_be_after_receipt() -> None:
    assert _parse({"job_type": "b", "deadline_at_ms": NOW_MS + 1}).spec.deadline_at_ms
    with pytest.raises(SchemaError):
        _parse({"job_type": "b", "deadline_at_ms": NOW_MS})


def _spec(**fields: Any) -> JobSubmission:
    return msgspec.convert({"job_type": "build", **fields}, JobSubmission)


def test_check_submission_accepts_a_sound_spec() -> None:
    spec = _spec(
        deadline_at_ms=NOW_MS + 60_000,
        metadata={f"k{i}": "v" for i in range(64)},
        routing_hints={
            "preferred_runners": ["r1"],
            "excluded_runners": ["r2"],
            "affinity_rules": [
                {"rule_type": "anti_affinity", "key": "zone"},
                {"rule_type": "preferred", "key": "os", "values": ["linux"], "weight": 5},
            ],
        },
        retry_policy={"initial_backoff_ms": 100, "max_backoff_ms": 100},
    )
    assert check_submission(spec, now_ms=NOW_MS) == []


def test_check_submission_reports_every_rule_broken() -> None:
    spec = _spec(
        job_type="\t",
        deadline_at_ms=NOW_MS - 1,
        metadata={f"k{i}": "v" for i in range(65)},
        routing_hints={
            "preferred_runners": ["r2", "r1"],
            "excluded_runners": ["r1", "r2", "r3"],
            "affinity_rules": [
                {"rule_type": "required", "key": "os"},
                {"rule_type": "anti_affinity", "key": "zone"},
                {"rule_type": "preferred", "key": "arch"},
            ],
        },
        retry_policy={"initial_backoff_ms": 101, "max_backoff_ms": 100},
    )
    errors = check_submission(spec, now_ms=NOW_MS)
    assert [e.path for e in errors] == [
        "$.job_type",
        "$.deadline_at_ms",
        "$.metadata",
        "$.routing_hints.excluded_runners",
        "$.routing_hints.affinity_rules[0].values",
        "$.routing_hints.affinity_rules[2].values",
        "$.retry_policy.max_backoff_ms",
    ]
    assert "r1, r2" in errors[3].reason


def test_idempotency_token_prefers_the_key() -> None:
    keyed = _spec(idempotency_key="k1")
    assert idempotency_token(keyed, "m1") == idempotency_token(keyed, "m2")
    assert idempotency_token(keyed, None) == idempotency_token(_spec(idempotency_key="k1"), None)
    assert idempotency_token(keyed, None) != idempotency_token(_spec(idempotency_key="k2"), None)
    plain = _spec()
    assert idempotency_token(plain, None) is None
    assert idempotency_token(plain, "m1") != idempotency_token(plain, "m2")
    # a key and a message id never collide even when spelled alike
    assert idempotency_token(_spec(idempotency_key="x"), None) != idempotency_token(plain, "x")


def test_job_id_is_the_clients_or_derived_from_the_source() -> None:
    assert job_id_for(_spec(job_id="mine-1"), source="s-1") == "mine-1"
    derived = job_id_for(_spec(), source="abc-1")
    assert derived == job_id_for(_spec(job_type="other"), source="abc-1")  # redelivery: same id
    assert derived != job_id_for(_spec(), source="abc-2")
    assert re.fullmatch(r"[0-9a-f]{32}", derived)


def test_queued_record() -> None:
    parsed = _parse({"type": "Build"})
    record = queued_record("j1", parsed, now_ms=NOW_MS, source_seq=7)
    assert record.id == "j1"
    assert record.state == JobState.QUEUED
    assert record.spec == parsed.spec
    assert record.api_version == "v1"
    assert record.submitted_at_ms == record.updated_at_ms == NOW_MS
    assert record.source_seq == 7
    assert record.attempt == 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(
    [f.encode_name for f in msgspec.structs.fields(JobSubmission)] + ["type", "timeout", "x"]
)


def _errors_of(data: bytes) -> list[FieldError] | None:
    """``None`` when ``data`` is accepted, else the errors; any other exception propagates."""
    try:
        parse_submission(data, received_at_ms=NOW_MS, max_bytes=MAX_BYTES)
    except SchemaError as e:
        return e.errors
    return None


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.dictionaries(_fields, _json_values, max_size=6))
def test_any_json_object_is_parsed_or_rejected_with_paths(doc: dict[str, Any]) -> None:
    errors = _errors_of(_body(doc))
    if errors is not None:
        assert errors
        assert all(err.path.startswith("$") and err.reason for err in errors)
        assert len({err.path for err in errors}) == len(errors)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.binary(max_size=64))
def test_any_bytes_are_parsed_or_rejected(data: bytes) -> None:
    errors = _errors_of(data)
    assert errors is None or errors
