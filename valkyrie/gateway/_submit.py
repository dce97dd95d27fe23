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


@dataclass(frozen=True, slots=True)
class Submitted:
    """The outcome of an accepted submission."""

    record: JobRecord
    duplicate: bool
    api_version: str
    warnings: list[FieldError]


async def submit_from_request(
    request: Request[Any, Any, Any], idempotency_key: str | None, *, strict: bool = False
) -> Submitted:
    """Validate the body like intake does, publish it, and return the job intake recorded.

    With ``strict``, fields the contract does not know are refused (here and by intake).

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
        parsed = parse_submission(
            body,
            received_at_ms=now_ms(),
            max_bytes=limit,
            max_metadata_entries=gateway.config.limits.max_metadata_entries,
            strict=strict,
        )
    except SchemaError as e:
        raise ProblemError(422, "the submission is invalid", errors=e.errors) from e
    warnings = list(parsed.warnings)
    client = gateway.client()
    verdict = await client.submit(body, timeout_s=gateway.timeout_s, strict=strict)
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
