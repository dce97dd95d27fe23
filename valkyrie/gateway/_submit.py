"""Submitting a job over HTTP: the same decoding and checks as intake, then ``Client.submit``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Request

from schemas import FieldError, JobRecord, SubmitVerdict
from valkyrie.bus.codec import encode, now_ms
from valkyrie.domain.intake import parse_submission
from valkyrie.errors import SchemaError
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import AUDIT_JOB_ID, gateway_of, identity_of
from valkyrie.gateway._problems import FULL_RETRY_AFTER_S, ProblemError

__all__ = ["Submitted", "submit_from_request"]


@dataclass(frozen=True, slots=True)
class Submitted:
    """The outcome of an accepted submission."""

    record: JobRecord
    duplicate: bool
    api_version: str
    warnings: list[FieldError]


#: how long a tenant over its queue cap is asked to wait (the queue ledger's own delay is ~1 s)
QUOTA_RETRY_AFTER_S = 5


def _refused(verdict: SubmitVerdict) -> ProblemError:
    """The problem for a submission intake refused (``verdict.refusal`` says why)."""
    refusal, errors = verdict.refusal, verdict.errors
    if refusal == "conflict":
        # the IETF Idempotency-Key draft: a key reused with another body is 422, not the job
        return ProblemError(
            422,
            f"this submission repeats job {verdict.job_id}'s idempotency key (or job id) with a "
            "different body; resubmit the same body to get that job, or use a new key",
            slug="idempotency-key-reused",
            errors=errors,
        )
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
    request: Request[Any, Any, Any], idempotency_key: str | None, *, strict: bool = False
) -> Submitted:
    """Validate the body like intake does, publish it, and return the job intake recorded.

    With ``strict``, fields the contract does not know are refused (here and by intake).

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
    client = gateway.client(identity_of(request))
    verdict = await client.submit(body, timeout_s=gateway.timeout_s, strict=strict)
    assert verdict is not None  # wait_verdict is on
    if not verdict.accepted or verdict.job_id is None:
        raise _refused(verdict)
    request.scope.setdefault("state", {})[AUDIT_JOB_ID] = verdict.job_id
    record = await client.get_job(verdict.job_id)
    return Submitted(record, verdict.duplicate, parsed.api_version, warnings)
