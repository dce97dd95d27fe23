"""RFC 9457 problem details: the one error shape of the HTTP bridge, and the handlers producing it.

Every error names what went wrong (``type`` is a stable URI per kind of problem) and, for input
errors, every offending field with the same ``{path, reason}`` pairs the bus verdicts carry.
"""

from __future__ import annotations

import http
import logging
from typing import Any

import msgspec
import nats.errors
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from schemas import MAX_JSON_DEPTH, FieldError
from valkyrie.errors import BusError, NotFoundError, NoVerdictError, StorageFullError

__all__ = [
    "COMMON",
    "FULL_RETRY_AFTER_S",
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "ProblemError",
    "exception_handlers",
    "problem_responses",
]

log = logging.getLogger("valkyrie.gateway")

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: statuses every API route may answer with besides its own
COMMON = (401, 403, 429, 503)
_TYPE_BASE = "https://valkyrie.dev/problems/"

#: status -> the problem type slug used when a raiser does not choose a more specific one
_DEFAULT_SLUGS = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "body-too-large",
    415: "unsupported-media-type",
    422: "validation-error",
    429: "rate-limited",
    500: "internal-error",
    503: "bus-unavailable",
    504: "no-verdict",
    507: "storage-full",
}


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem document (``application/problem+json``).

    ``errors`` lists each offending input field as a JSON path (``$.requirements.cpu_cores``,
    ``query.limit``) with the reason, when the problem is about input.
    """

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] = msgspec.field(default_factory=list)


class ProblemError(Exception):
    """Raised anywhere in the gateway to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        slug: str | None = None,
        errors: list[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.slug = slug or _DEFAULT_SLUGS.get(status, "error")
        self.errors = errors or []
        self.headers = headers or {}
        super().__init__(detail or http.HTTPStatus(status).phrase)


_ENCODER = msgspec.json.Encoder()


def problem_response(
    request: Request[Any, Any, Any] | None,
    status: int,
    detail: str | None = None,
    *,
    slug: str | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[bytes]:
    """A ``application/problem+json`` response."""
    problem = Problem(
        type=_TYPE_BASE + (slug or _DEFAULT_SLUGS.get(status, "error")),
        title=http.HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=request.url.path if request is not None else None,
        errors=errors or [],
    )
    return Response(
        _ENCODER.encode(problem),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def _on_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[bytes]:
    return problem_response(
        request, exc.status, exc.detail, slug=exc.slug, errors=exc.errors, headers=exc.headers
    )


def _sent_name(request: Request[Any, Any, Any], source: str, key: str) -> str:
    """The name the client used for parameter ``key``.

    Litestar reports the Python parameter's (``resume_after``, ``idempotency_key``); the client
    sent another (``last_event_id``, ``Idempotency-Key``).
    """
    handler = request.scope.get("route_handler")
    try:
        kwarg = handler.parsed_fn_signature.parameters[key].kwarg_definition
    except (AttributeError, KeyError):
        return key
    alias = getattr(kwarg, source, None) or getattr(kwarg, "name", None)
    return alias if isinstance(alias, str) and alias else key


def _on_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    # Litestar raises this for query, path and header parameters (bodies are decoded here): they
    # are well-formed requests with invalid values, hence 422 with every parameter named as sent.
    errors: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            raw = item.get("source") or "query"
            source = str(getattr(raw, "value", raw))
            key = _sent_name(request, source, str(item.get("key") or ""))
            errors.append(
                FieldError(
                    path=f"{source}.{key}" if key else source,
                    reason=str(item.get("message") or "invalid"),
                )
            )
    return problem_response(
        request, 422, "invalid request parameters", slug="invalid-parameters", errors=errors
    )


def _on_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    headers = dict(exc.headers or {})
    return problem_response(request, status, exc.detail or None, headers=headers or None)


def _on_not_found(request: Request[Any, Any, Any], exc: NotFoundError) -> Response[bytes]:
    return problem_response(request, 404, str(exc))


def _on_no_verdict(request: Request[Any, Any, Any], exc: NoVerdictError) -> Response[bytes]:
    # Not a 503: the job is stored and will be taken in; a client retrying as after a 503
    # without an Idempotency-Key would submit it a second time.
    stored = f"stored (stream sequence {exc.seq})" if exc.seq is not None else "stored earlier"
    return problem_response(
        request,
        504,
        f"the submission is {stored}, but intake gave no verdict in time: it will be taken in "
        f"when an intake handler runs; do not resubmit it without an Idempotency-Key ({exc})",
    )


#: how long a client is asked to wait after JetStream was full
FULL_RETRY_AFTER_S = 30


def _on_full(request: Request[Any, Any, Any], exc: StorageFullError) -> Response[bytes]:
    log.warning("JetStream full for %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        request, 507, str(exc), headers={"Retry-After": str(FULL_RETRY_AFTER_S)}
    )


def _on_bus(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.warning("bus unavailable for %s %s: %r", request.method, request.url.path, exc)
    return problem_response(
        request,
        503,
        f"the message bus did not answer: {exc}",
        headers={"Retry-After": "1"},
    )


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request, 500, "internal error (logged by the gateway)")


def exception_handlers() -> ExceptionHandlersMap:
    """Exception type -> handler; Litestar picks the most specific one by the exception's MRO."""
    return {
        ProblemError: _on_problem,
        ValidationException: _on_validation,
        HTTPException: _on_http,
        NotFoundError: _on_not_found,
        NoVerdictError: _on_no_verdict,
        StorageFullError: _on_full,
        BusError: _on_bus,
        nats.errors.Error: _on_bus,
        TimeoutError: _on_bus,
        Exception: _on_unexpected,
    }


_DESCRIPTIONS = {
    400: f"Broken JSON, a missing body, or JSON nested deeper than {MAX_JSON_DEPTH} levels.",
    401: "No or unknown bearer token (when `http.auth_required`).",
    403: "The token lacks the scope this route needs.",
    404: "No such job or runner.",
    409: "The request conflicts with the current state (e.g. the job already finished, or an "
    "`Idempotency-Key` reused with a different body).",
    413: "The body exceeds `http.max_body_bytes` (or `limits.submission_max_bytes`).",
    415: "The body is not `application/json`.",
    422: "The body or a parameter is invalid; `errors` names every field.",
    429: "Rate limited; retry after the `Retry-After` seconds. Submissions: the tenant has as "
    "many jobs queued as its cap allows (`tenant-quota`).",
    503: "NATS is unavailable or did not answer in time.",
    504: "Submissions: stored, but intake gave no verdict in time (the job will be taken in; "
    "do not resubmit without an `Idempotency-Key`).",
    507: "JetStream is full: nothing was stored (jobs already accepted are not affected); retry "
    "after the `Retry-After` seconds.",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI response entries (problem documents) for ``statuses``."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            description=_DESCRIPTIONS.get(status, http.HTTPStatus(status).phrase),
            media_type=PROBLEM_MEDIA_TYPE,
            generate_examples=False,
        )
        for status in statuses
    }
