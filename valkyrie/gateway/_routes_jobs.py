"""v2 job routes: submit, read, cancel, list."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, FromQuery, HeaderParameter, QueryParameter

from schemas import TERMINAL_STATES, FieldError, JobExplanation, JobRecord, JobState
from valkyrie.errors import NotFoundError, SchemaError
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._context import Gateway, GatewayDep, identity_of, valid_id
from valkyrie.gateway._models import CancelResponse, JobList, Pagination, SubmitResponse
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses
from valkyrie.gateway._submit import submit_from_request

__all__ = [
    "ROUTES",
    "IdempotencyKey",
    "Strict",
    "fetch_job",
    "parse_states",
    "request_cancel",
    "states_pattern",
]

#: the ``Idempotency-Key`` header of the submit routes (v2 and v1)
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=512,
        required=False,
        description="Makes a retried POST return the original job (same id) instead of a new one.",
    ),
]

#: the ``strict`` query parameter of the submit routes (v2 and v1)
Strict = Annotated[
    bool,
    QueryParameter(
        description=(
            "Refuse (422) fields the contract does not know instead of ignoring them with a "
            "warning each, so that a typo such as `deadlin_at_ms` for `deadline_at_ms` cannot pass."
        ),
    ),
]


async def fetch_job(gateway: Gateway, job_id: str) -> JobRecord:
    """The job's record.

    Raises:
        ProblemError: 404 when there is no such job, 409 when its stored record cannot be read.
    """
    if not valid_id(job_id):
        raise ProblemError(404, f"no job {job_id!r}")
    try:
        return await gateway.client().get_job(job_id)
    except NotFoundError as e:
        raise ProblemError(404, f"no job {job_id!r}") from e
    except SchemaError as e:
        raise ProblemError(409, str(e), slug="unreadable-record", errors=e.errors) from e


async def request_cancel(
    request: Request[Any, Any, Any], gateway: Gateway, job_id: str
) -> JobRecord:
    """Store a cancel request for a job that is not finished; return its record as it was.

    Raises:
        ProblemError: 404 unknown job, 409 already finished.
    """
    record = await fetch_job(gateway, job_id)
    if record.state in TERMINAL_STATES:
        raise ProblemError(
            409, f"job {job_id!r} already finished ({record.state.value})", slug="job-finished"
        )
    who = identity_of(request)
    await gateway.admin(who).cancel_job(job_id, reason=f"cancelled over HTTP by {who.name}")
    return record


def states_pattern(states: type[enum.StrEnum]) -> dict[str, str]:
    """The OpenAPI ``pattern`` of a comma-separated list of ``states``.

    It documents what the route takes (the route itself names each unknown state in its 422).
    """
    one = "|".join(s.value for s in states)
    return {"pattern": f"^(?:(?:{one})(?:,(?:{one}))*)?$"}


def parse_states(raw: str | None) -> set[JobState] | None:
    """``queued,running`` -> the states; ``None`` for no filter.

    Raises:
        ProblemError: 422 naming each unknown state.
    """
    if not raw:
        return None
    states: set[JobState] = set()
    bad: list[str] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            states.add(JobState(part))
        except ValueError:
            bad.append(part)
    if bad:
        raise ProblemError(
            422,
            "unknown job state(s)",
            slug="invalid-parameters",
            errors=[
                FieldError(
                    path="query.status",
                    reason=f"{b!r} is not one of {', '.join(s.value for s in JobState)}",
                )
                for b in bad
            ],
        )
    return states


@post(
    "/api/v2/jobs",
    opt=route_opt("jobs:write", audit="job_submit"),
    status_code=201,
    summary="Submit a job (v2 or v1 body)",
    description=(
        "The body is a `JobSubmission` (or a v1 `{type, payload}` body), validated exactly like "
        "the bus validates it. 201 for a new job; 200 with `duplicate: true` and the original job "
        "when the idempotency key (header or body) was seen before."
    ),
    responses={
        200: ResponseSpec(
            data_container=SubmitResponse,
            description="A retry: the original job.",
            generate_examples=False,
        ),
        **problem_responses(400, 413, 415, 422, 504, 507, *COMMON),
    },
    tags=["jobs"],
)
async def submit_job(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    idempotency_key: IdempotencyKey = None,
    strict: Strict = False,
) -> Response[SubmitResponse]:
    """Submit a job."""
    done = await submit_from_request(request, idempotency_key, strict=strict)
    body = SubmitResponse(
        job_id=done.record.id,
        state=done.record.state,
        duplicate=done.duplicate,
        api_version="v1" if done.api_version == "v1" else "v2",
        job=done.record,
        warnings=done.warnings,
    )
    return Response(
        body,
        status_code=200 if done.duplicate else 201,
        headers={"Location": f"/api/v2/jobs/{done.record.id}"},
    )


@get(
    "/api/v2/jobs/{job_id:str}",
    opt=route_opt("jobs:read"),
    summary="A job's record",
    responses=problem_responses(404, 409, *COMMON),
    tags=["jobs"],
)
async def get_job(job_id: FromPath[str], gateway: GatewayDep) -> JobRecord:
    """The job's current record (from the jobs KV bucket)."""
    return await fetch_job(gateway, job_id)


@delete(
    "/api/v2/jobs/{job_id:str}",
    opt=route_opt("jobs:write", audit="job_cancel"),
    status_code=202,
    summary="Cancel a job",
    description=(
        "Stores a cancel request (a queued job ends at once; a running one gets its runner's "
        "grace period). 409 when the job already finished."
    ),
    responses=problem_responses(404, 409, *COMMON),
    tags=["jobs"],
)
async def cancel_job(
    job_id: FromPath[str], request: Request[Any, Any, Any], gateway: GatewayDep
) -> CancelResponse:
    """Request cancellation."""
    record = await request_cancel(request, gateway, job_id)
    return CancelResponse(job_id=record.id, cancel_requested=True, state=record.state, job=record)


@get(
    "/api/v2/jobs/{job_id:str}/explain",
    opt=route_opt("jobs:read"),
    summary="Why a job is pending, or why it went where it went",
    description=(
        "For a queued job: which constraint rejected which runners (grouped, with counts), what "
        "would make it placeable, its queue position and estimated start. For a placed job: its "
        "runner's score against the runners-up. Answered by a dispatcher over the bus; 503 when "
        "none runs."
    ),
    responses=problem_responses(404, *COMMON),
    tags=["jobs"],
)
async def explain_job(job_id: FromPath[str], gateway: GatewayDep) -> JobExplanation:
    """The dispatcher's explanation of a job (``<prefix>.jobs.explain``)."""
    if not valid_id(job_id):
        raise ProblemError(404, f"no job {job_id!r}")
    try:
        explanation = await gateway.client().explain(job_id)
    except NotFoundError as e:
        raise ProblemError(404, f"no job {job_id!r}") from e
    if explanation.error:
        raise ProblemError(503, f"no explanation: {explanation.error}")
    return explanation


_STATE_ORDER = {state: n for n, state in enumerate(JobState)}


@get(
    "/api/v2/jobs",
    opt=route_opt("jobs:read"),
    summary="List jobs",
    responses=problem_responses(422, *COMMON),
    tags=["jobs"],
)
async def list_jobs(
    gateway: GatewayDep,
    status: Annotated[
        str | None,
        QueryParameter(
            description="Comma-separated states, e.g. `queued,running`.",
            required=False,
            schema_extra=states_pattern(JobState),
        ),
    ] = None,
    runner_id: Annotated[str | None, QueryParameter(required=False)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    offset: Annotated[int, QueryParameter(ge=0)] = 0,
    sort_by: FromQuery[Literal["submitted_at", "priority", "state"]] = "submitted_at",
    sort_order: FromQuery[Literal["asc", "desc"]] = "desc",
) -> JobList:
    """A page of jobs, filtered and sorted."""
    states = parse_states(status)
    runner_id = runner_id or None  # an empty filter (`runner_id=`) is no filter
    everything = await gateway.client().list_jobs()
    matching = [
        r
        for r in everything
        if (states is None or r.state in states) and (runner_id is None or r.runner_id == runner_id)
    ]

    def key(r: JobRecord) -> tuple[int, int, str]:
        if sort_by == "priority":
            return (r.spec.priority, r.submitted_at_ms, r.id)
        if sort_by == "state":
            return (_STATE_ORDER[r.state], r.submitted_at_ms, r.id)
        return (r.submitted_at_ms, 0, r.id)

    matching.sort(key=key, reverse=sort_order == "desc")
    page = matching[offset : offset + limit]
    return JobList(
        jobs=page,
        total_count=len(everything),
        filtered_count=len(matching),
        pagination=Pagination(
            limit=limit, offset=offset, has_more=offset + len(page) < len(matching)
        ),
    )


ROUTES = [submit_job, get_job, cancel_job, list_jobs, explain_job]
