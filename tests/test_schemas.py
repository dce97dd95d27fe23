"""The wire contract without NATS: generated JSON Schemas, v1 conversion, error paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

import schemas
from schemas import (
    AffinityRule,
    FieldError,
    JobSubmission,
    LegacyJobV1,
    LegacyRequirementsV1,
    Requirements,
    RoutingHints,
    collect_errors,
    convert_or_errors,
    json_type_name,
    v1_to_v2,
)

JSON_DIR = Path(schemas.__file__).parent / "json"


def test_json_schema_files_match_the_structs() -> None:
    wanted = schemas.json_schemas()
    on_disk = {p.name for p in JSON_DIR.glob("*.schema.json")}
    hint = "schemas/json/ is out of date: run `python -m schemas` and commit the result"
    assert on_disk == set(wanted), f"{hint} (files differ: {sorted(on_disk ^ set(wanted))})"
    stale = [
        name
        for name, schema in wanted.items()
        if (JSON_DIR / name).read_text() != json.dumps(schema, indent=2, sort_keys=True) + "\n"
    ]
    assert not stale, f"{hint} (stale: {', '.join(stale)})"


def test_catalog_covers_submissions_and_verdicts() -> None:
    assert schemas.CATALOG["job-submission"] is JobSubmission
    assert schemas.CATALOG["job-submission-v1"] is LegacyJobV1
    schema = schemas.json_schema("job-submission")
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("/job-submission.schema.json")
    assert "$defs" in schema


# -- v1 -> v2 ---------------------------------------------------------------------------------


def test_v1_to_v2_maps_every_documented_field() -> None:
    job = LegacyJobV1(
        type="Build",
        payload={"command": ["make"]},
        job_id="legacy-1",
        priority=1,
        pipeline="pipe-9",
        environment="prod",
        requirements=LegacyRequirementsV1(
            cpu_cores=4,
            memory_mb=8192,
            storage_gb=20,
            gpu_count=2,
            max_execution_time=90,
            required_capabilities=["docker", "gpu"],
        ),
        metadata={"team": "core"},
        timeout=30,
        idempotency_key="idem-1",
    )
    spec = v1_to_v2(job, received_at_ms=1_000_000)
    assert spec == JobSubmission(
        job_type="build",
        priority=1,
        payload={"command": ["make"]},
        requirements=Requirements(
            cpu_cores=4,
            memory_mb=8192,
            storage_gb=20,
            gpu_count=2,
            max_execution_time_s=90,
            required_capabilities=["docker", "gpu"],
        ),
        metadata={"team": "core", "pipeline_id": "pipe-9", "environment": "prod"},
        deadline_at_ms=1_000_000 + 30_000,
        job_id="legacy-1",
        idempotency_key="idem-1",
    )


def test_v1_to_v2_minimal_body_gets_v2_defaults() -> None:
    spec = v1_to_v2(LegacyJobV1(type="TEST"), received_at_ms=5)
    assert spec == JobSubmission(job_type="test")
    assert spec.deadline_at_ms is None
    assert spec.requirements == Requirements()
    assert spec.metadata == {}


@pytest.mark.parametrize(
    ("v1_type", "v2_type"), [("Build", "build"), ("DEPLOY", "deploy"), ("shell", "shell")]
)
def test_v1_type_is_lower_cased(v1_type: str, v2_type: str) -> None:
    assert v1_to_v2(LegacyJobV1(type=v1_type), received_at_ms=0).job_type == v2_type


def test_v1_timeout_is_relative_to_receipt() -> None:
    job = LegacyJobV1(type="build", timeout=2)
    assert v1_to_v2(job, received_at_ms=10_000).deadline_at_ms == 12_000
    assert v1_to_v2(job, received_at_ms=20_000).deadline_at_ms == 22_000


def test_v1_conversion_does_not_alias_the_input() -> None:
    job = LegacyJobV1(type="build", pipeline="p", metadata={"a": "b"})
    spec = v1_to_v2(job, received_at_ms=0)
    assert job.metadata == {"a": "b"}
    assert spec.metadata == {"a": "b", "pipeline_id": "p"}


# -- convert_or_errors --------------------------------------------------------------------------


def _paths(errors: list[FieldError]) -> list[str]:
    return [e.path for e in errors]


def test_convert_or_errors_returns_the_struct_when_valid() -> None:
    spec, errors = convert_or_errors(JobSubmission, {"job_type": "build", "priority": 0})
    assert errors == []
    assert spec == JobSubmission(job_type="build", priority=0)


@pytest.mark.parametrize(
    ("doc", "paths"),
    [
        ([], ["$"]),
        ("text", ["$"]),
        ({}, ["$.job_type"]),
        ({"job_type": "b", "priority": "1"}, ["$.priority"]),
        ({"job_type": "b", "requirements": []}, ["$.requirements"]),
        (
            {"job_type": "b", "requirements": {"cpu_cores": -0.5, "storage_gb": "x"}},
            ["$.requirements.cpu_cores", "$.requirements.storage_gb"],
        ),
        (
            {"job_type": "b", "requirements": {"preferred_regions": ["eu", 1, "us", None]}},
            ["$.requirements.preferred_regions[1]", "$.requirements.preferred_regions[3]"],
        ),
        (
            {"job_type": "b", "metadata": {"ok": "1", "bad": 2, "a b": [], "": {}}},
            ["$.metadata.bad", '$.metadata["a b"]', '$.metadata[""]'],
        ),
        (
            {
                "job_type": "b",
                "routing_hints": {
                    "affinity_rules": [
                        {"rule_type": "required", "key": "os", "values": ["linux"]},
                        {"rule_type": "never", "values": "linux"},
                        7,
                    ]
                },
            },
            [
                "$.routing_hints.affinity_rules[1].rule_type",
                "$.routing_hints.affinity_rules[1].key",
                "$.routing_hints.affinity_rules[1].values",
                "$.routing_hints.affinity_rules[2]",
            ],
        ),
        (
            {"job_type": "b", "qos_requirements": {"max_latency_ms": -1}},
            ["$.qos_requirements.max_latency_ms"],
        ),
        ({"job_type": "b", "performance_targets": 3}, ["$.performance_targets"]),
    ],
)
def test_convert_or_errors_names_every_path(doc: Any, paths: list[str]) -> None:
    spec, errors = convert_or_errors(JobSubmission, doc)
    assert spec is None
    assert _paths(errors) == paths
    assert all(e.reason for e in errors)


def test_error_reasons_say_what_was_expected() -> None:
    _, errors = convert_or_errors(JobSubmission, {"job_type": "b", "priority": "high"})
    assert errors == [FieldError(path="$.priority", reason="Expected `int`, got `str`")]
    _, errors = convert_or_errors(JobSubmission, {"priority": 1})
    assert errors == [FieldError(path="$.job_type", reason="required field is missing")]


def test_collect_errors_agrees_with_msgspec_on_valid_input() -> None:
    doc = {
        "job_type": "b",
        "routing_hints": {
            "affinity_rules": [{"rule_type": "required", "key": "k", "values": ["v"]}]
        },
        "metadata": {"x.y": "z"},
    }
    assert collect_errors(JobSubmission, doc) == []
    spec = msgspec.convert(doc, JobSubmission)
    assert spec.routing_hints == RoutingHints(
        affinity_rules=[AffinityRule(rule_type="required", key="k", values=["v"])]
    )


def test_collect_errors_uses_the_given_root_path() -> None:
    errors = collect_errors(Requirements, {"gpu_count": -1}, "$.requirements")
    assert _paths(errors) == ["$.requirements.gpu_count"]


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (None, "null"),
        (True, "boolean"),
        (1, "number"),
        (1.5, "number"),
        ("s", "string"),
        ([], "array"),
        ({}, "object"),
    ],
)
def test_json_type_name(value: object, name: str) -> None:
    assert json_type_name(value) == name


class _Cat(msgspec.Struct, tag="cat"):
    lives: int


class _Dog(msgspec.Struct, tag="dog"):
    name: str


class _Pets(msgspec.Struct):
    first: _Cat | _Dog
    others: list[_Cat | _Dog] = msgspec.field(default_factory=list)


def test_tagged_unions_are_located_through_msgspec() -> None:
    doc = {
        "first": {"type": "cat", "lives": "nine"},
        "others": [{"type": "dog", "name": "rex"}, {"type": "dog", "name": 1}, {"type": "cow"}],
    }
    pets, errors = convert_or_errors(_Pets, doc)
    assert pets is None
    assert _paths(errors) == ["$.first.lives", "$.others[1].name", "$.others[2].type"]
