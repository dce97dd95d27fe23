"""Job intake as pure domain logic: parse and check a submission, derive ids, build the record."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from schemas import (
    FieldError,
    JobRecord,
    JobState,
    JobSubmission,
    LegacyJobV1,
    convert_or_errors,
    json_type_name,
    v1_to_v2,
)
from valkyrie._errors import SchemaError

__all__ = [
    "ParsedSubmission",
    "check_submission",
    "idempotency_token",
    "job_id_for",
    "parse_submission",
    "queued_record",
]

_ID_NAMESPACE = uuid.UUID("6f1c3a52-8a0e-4d55-9a53-0b1f7a9a1e11")
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
MAX_METADATA_ENTRIES = 64


@dataclass(frozen=True, slots=True)
class ParsedSubmission:
    """A valid submission, normalised to v2, and which API form it arrived in."""

    spec: JobSubmission
    api_version: Literal["v1", "v2"]


def parse_submission(data: bytes, *, received_at_ms: int, max_bytes: int) -> ParsedSubmission:
    """Decode a v2 or v1 body and check it; v1 is detected by a ``type`` key without ``job_type``.

    Raises:
        SchemaError: with every problem found, each naming its field.
    """
    if len(data) > max_bytes:
        raise SchemaError(
            [FieldError(path="$", reason=f"submission is {len(data)} bytes; the limit is {max_bytes}")]
        )
    try:
        obj = _decoder.decode(data)
    except msgspec.DecodeError as e:
        raise SchemaError([FieldError(path="$", reason=f"invalid JSON: {e}")]) from e
    if not isinstance(obj, dict):
        raise SchemaError(
            [FieldError(path="$", reason=f"Expected `object`, got `{json_type_name(obj)}`")]
        )
    if "job_type" not in obj and "type" in obj:
        legacy, errors = convert_or_errors(LegacyJobV1, obj)
        if legacy is None:
            raise SchemaError(errors)
        parsed = ParsedSubmission(v1_to_v2(legacy, received_at_ms=received_at_ms), "v1")
    else:
        spec, errors = convert_or_errors(JobSubmission, obj)
        if spec is None:
            raise SchemaError(errors)
        parsed = ParsedSubmission(spec, "v2")
    problems = check_submission(parsed.spec, now_ms=received_at_ms)
    if problems:
        raise SchemaError(problems)
    return parsed


def check_submission(spec: JobSubmission, *, now_ms: int) -> list[FieldError]:
    """Rules the types cannot express; returns every violation."""
    errors: list[FieldError] = []
    if not spec.job_type.strip():
        errors.append(FieldError(path="$.job_type", reason="must not be blank"))
    if spec.deadline_at_ms is not None and spec.deadline_at_ms <= now_ms:
        errors.append(
            FieldError(
                path="$.deadline_at_ms",
                reason=f"deadline {spec.deadline_at_ms} is in the past (now {now_ms})",
            )
        )
    if len(spec.metadata) > MAX_METADATA_ENTRIES:
        errors.append(
            FieldError(path="$.metadata", reason=f"at most {MAX_METADATA_ENTRIES} entries")
        )
    hints = spec.routing_hints
    if hints is not None:
        both = sorted(set(hints.preferred_runners) & set(hints.excluded_runners))
        if both:
            errors.append(
                FieldError(
                    path="$.routing_hints.excluded_runners",
                    reason=f"runner(s) {', '.join(both)} are both preferred and excluded",
                )
            )
        for i, rule in enumerate(hints.affinity_rules):
            if rule.rule_type != "anti_affinity" and not rule.values:
                errors.append(
                    FieldError(
                        path=f"$.routing_hints.affinity_rules[{i}].values",
                        reason=f"a {rule.rule_type} rule needs at least one value",
                    )
                )
    policy = spec.retry_policy
    if policy is not None and policy.max_backoff_ms < policy.initial_backoff_ms:
        errors.append(
            FieldError(
                path="$.retry_policy.max_backoff_ms",
                reason="must be at least initial_backoff_ms",
            )
        )
    return errors


def idempotency_token(spec: JobSubmission, msg_id: str | None) -> str | None:
    """The idempotency bucket key for a submission: its key, else its ``Nats-Msg-Id``, hashed."""
    raw = (
        f"key:{spec.idempotency_key}"
        if spec.idempotency_key
        else (f"msgid:{msg_id}" if msg_id else None)
    )
    if raw is None:
        return None
    return hashlib.sha256(raw.encode()).hexdigest()


def job_id_for(spec: JobSubmission, *, source: str) -> str:
    """The job id: the client's, or one derived from where the message sits in its stream.

    Deriving it from ``source`` (stream identity + sequence) makes a redelivered message produce the
    same id, which is what makes intake idempotent.
    """
    if spec.job_id:
        return spec.job_id
    return uuid.uuid5(_ID_NAMESPACE, source).hex


def queued_record(
    job_id: str,
    parsed: ParsedSubmission,
    *,
    now_ms: int,
    source_seq: int | None,
) -> JobRecord:
    """The record of a newly accepted job."""
    return JobRecord(
        id=job_id,
        state=JobState.QUEUED,
        spec=parsed.spec,
        api_version=parsed.api_version,
        submitted_at_ms=now_ms,
        updated_at_ms=now_ms,
        source_seq=source_seq,
    )
