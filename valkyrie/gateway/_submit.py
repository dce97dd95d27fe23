"""Submitting a job over HTTP: the same decoding and checks as intake, then ``Client.submit``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request

from schemas import FieldError, JobRecord
from valkyrie.bus.codec import encode, now_ms
from valkyrie.domain.intake import parse_submission
from valkyrie.errors import SchemaError
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import gateway_of
from valkyrie.gateway._problems import ProblemError

__all__ = ["Submitted", "submit_from_request"]

#: ancestor field names a v2 body may still carry (the bus ignores them) -> what replaced them
_RENAMED = {
    "$.deadline": "deadline_at_ms (milliseconds since the epoch)",
    "$.requirements.max_execution_time": "requirements.max_execution_time_s",
    "$.qos_requirements.max_latency": "qos_requirements.max_latency_ms",
    "$.qos_requirements.min_throughput": "qos_requirements.min_throughput_bytes_per_s",
    "$.performance_targets.max_dispatch_latency": "performance_targets.max_dispatch_latency_ms",
    "$.performance_targets.target_completion_time": "performance_targets.target_completion_time_s",
}


@dataclass(frozen=True, slots=True)
class Submitted:
    """The outcome of an accepted submission."""

    record: JobRecord
    duplicate: bool
    api_version: str
    warnings: list[FieldError]


def _with_hints(warnings: tuple[FieldError, ...]) -> list[FieldError]:
    """Intake's unknown-field warnings, naming the field that replaced an ancestor's."""
    hinted = []
    for warning in warnings:
        hint = _RENAMED.get(warning.path)
        reason = f"{warning.reason} (use {hint})" if hint else warning.reason
        hinted.append(FieldError(path=warning.path, reason=reason))
    return hinted


async def submit_from_request(
    request: Request[Any, Any, Any], idempotency_key: str | None
) -> Submitted:
    """Validate the body like intake does, publish it, and return the job intake recorded.

    Raises:
        ProblemError: 400/413/415 (body), 422 (invalid, or rejected by intake), 503 (bus).
    """
    gateway = gateway_of(request)
    body, obj = await json_body(request)
    if idempotency_key is not None and isinstance(obj, dict):
        given = obj.get("idempotency_key")
        if given is not None and given != idempotency_key:
            raise ProblemError(
                422,
                "the body's idempotency_key differs from the Idempotency-Key header",
                errors=[
                    FieldError(
                        path="$.idempotency_key", reason="differs from the Idempotency-Key header"
                    )
                ],
            )
        if given is None:
            obj["idempotency_key"] = idempotency_key
            body = encode(obj)
    limit = gateway.config.limits.submission_max_bytes
    if len(body) > limit:
        raise ProblemError(
            413,
            f"the submission is {len(body)} bytes; the limit is {limit} (limits.submission_max_bytes)",
        )
    try:
        parsed = parse_submission(body, received_at_ms=now_ms(), max_bytes=limit)
    except SchemaError as e:
        raise ProblemError(422, "the submission is invalid", errors=e.errors) from e
    warnings = _with_hints(parsed.warnings)
    client = gateway.client()
    verdict = await client.submit(body, timeout_s=gateway.timeout_s)
    assert verdict is not None  # wait_verdict is on
    if not verdict.accepted and verdict.duplicate and verdict.job_id is not None:
        # the IETF Idempotency-Key draft: a key reused with another body is 422, not the job
        raise ProblemError(
            422,
            f"this submission repeats job {verdict.job_id}'s idempotency key (or job id) with a "
            "different body; resubmit the same body to get that job, or use a new key",
            slug="idempotency-key-reused",
            errors=verdict.errors,
        )
    if not verdict.accepted or verdict.job_id is None:
        raise ProblemError(
            422, "intake rejected the submission", slug="rejected", errors=verdict.errors
        )
    record = await client.get_job(verdict.job_id)
    return Submitted(record, verdict.duplicate, parsed.api_version, warnings)
