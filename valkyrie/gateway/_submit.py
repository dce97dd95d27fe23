"""Submitting a job over HTTP: the same decoding and checks as intake, then ``Client.submit``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request

from schemas import FieldError, JobRecord, Refusal
from valkyrie.bus.codec import encode, now_ms
from valkyrie.domain.intake import parse_submission
from valkyrie.errors import SchemaError
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import AUDIT_JOB_ID, gateway_of, identity_of
from valkyrie.gateway._problems import FULL_RETRY_AFTER_S, ProblemError

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


#: how long a tenant over its queue cap is asked to wait (the queue ledger's own delay is ~1 s)
QUOTA_RETRY_AFTER_S = 5


def _refused(refusal: Refusal | None, errors: list[FieldError]) -> ProblemError:
    """The problem for a submission intake refused (``refusal`` says why)."""
    if refusal == "quota":
        return ProblemError(
            429,
            "the tenant has as many jobs queued as its cap allows: submit again later",
            slug="tenant-quota",
            errors=errors,
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )
    if refusal == "storage_full":
        return ProblemError(
            507,
            "JetStream is full: nothing was stored (jobs already accepted are not affected)",
            errors=errors,
            headers={"Retry-After": str(FULL_RETRY_AFTER_S)},
        )
    return ProblemError(422, "intake rejected the submission", slug="rejected", errors=errors)


async def submit_from_request(
    request: Request[Any, Any, Any], idempotency_key: str | None
) -> Submitted:
    """Validate the body like intake does, publish it, and return the job intake recorded.

    Raises:
        ProblemError: 400/413/415 (body), 422 (invalid, or rejected by intake), 429 (the
            tenant's queue cap), 503 (bus), 507 (JetStream full).
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
    client = gateway.client(identity_of(request))
    verdict = await client.submit(body, timeout_s=gateway.timeout_s)
    assert verdict is not None  # wait_verdict is on
    if not verdict.accepted or verdict.job_id is None:
        raise _refused(verdict.refusal, verdict.errors)
    request.scope.setdefault("state", {})[AUDIT_JOB_ID] = verdict.job_id
    record = await client.get_job(verdict.job_id)
    return Submitted(record, verdict.duplicate, parsed.api_version, warnings)
