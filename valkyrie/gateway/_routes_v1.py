"""The ancestor's v1 routes, answered in its shapes and vocabulary over the same bus operations."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, delete, get, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, QueryParameter

from schemas import JobState, RunnerRecord
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._context import GatewayDep, gateway_of
from valkyrie.gateway._models import (
    V1CancelResponse,
    V1JobStatus,
    V1RunnerList,
    V1RunnerSummary,
    V1Status,
    V1SubmitResponse,
)
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses
from valkyrie.gateway._routes_jobs import IdempotencyKey, Strict, fetch_job, request_cancel
from valkyrie.gateway._routes_runners import all_runners
from valkyrie.gateway._submit import submit_from_request

__all__ = ["ROUTES", "V1_STATUS"]

#: our states in the ancestor's status vocabulary (queued/dispatched/running/completed/failed/...)
V1_STATUS: dict[JobState, V1Status] = {
    JobState.QUEUED: "queued",
    JobState.DISPATCHED: "dispatched",
    JobState.ACCEPTED: "dispatched",
    JobState.RUNNING: "running",
    JobState.SUCCEEDED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.TIMED_OUT: "timeout",
    JobState.EXPIRED: "timeout",
}


def _seconds(at_ms: int | None) -> str | None:
    return str(at_ms // 1000) if at_ms is not None else None


def _require_v1(request: Request[Any, Any, Any]) -> None:
    if not gateway_of(request).config.features.legacy_v1_api:
        raise ProblemError(
            404,
            "the legacy v1 API is switched off (features.legacy_v1_api)",
            slug="legacy-api-disabled",
        )


@post(
    "/api/v1/jobs",
    opt=route_opt("jobs:write", audit="job_submit"),
    status_code=201,
    summary="Submit a job (v1)",
    description=(
        'The ancestor\'s body `{"type": ..., "payload": ...}` (plus `pipeline`, `environment`, '
        "`requirements`, `timeout`, …), converted like the bus converts it."
    ),
    responses={
        200: ResponseSpec(
            data_container=V1SubmitResponse,
            description="A retry: the original job.",
            generate_examples=False,
        ),
        **problem_responses(400, 404, 413, 415, 422, 504, 507, *COMMON),
    },
    tags=["v1"],
)
async def submit_v1(
    request: Request[Any, Any, Any], idempotency_key: IdempotencyKey = None, strict: Strict = False
) -> Response[V1SubmitResponse]:
    """Submit a job through the legacy API."""
    _require_v1(request)
    done = await submit_from_request(request, idempotency_key, strict=strict)
    message = (
        "Duplicate of an earlier submission: the original job"
        if done.duplicate
        else "Job submitted via legacy API"
    )
    return Response(
        V1SubmitResponse(job_id=done.record.id, status="submitted", message=message),
        status_code=200 if done.duplicate else 201,
        headers={"Location": f"/api/v1/jobs/{done.record.id}"},
    )


@get(
    "/api/v1/jobs/{job_id:str}",
    opt=route_opt("jobs:read"),
    summary="A job's status (v1)",
    responses=problem_responses(404, 409, *COMMON),
    tags=["v1"],
)
async def get_v1(
    job_id: FromPath[str], request: Request[Any, Any, Any], gateway: GatewayDep
) -> V1JobStatus:
    """The job's status in the ancestor's shape."""
    _require_v1(request)
    record = await fetch_job(gateway, job_id)
    result = record.result
    return V1JobStatus(
        job_id=record.id,
        status=V1_STATUS[record.state],
        message=record.reason or f"job is {record.state.value}",
        runner_id=record.runner_id,
        created_at=_seconds(record.submitted_at_ms),
        started_at=_seconds(record.started_at_ms or record.accepted_at_ms),
        completed_at=_seconds(record.finished_at_ms),
        exit_code=result.exit_code if result else None,
        error=result.error if result else None,
    )


@delete(
    "/api/v1/jobs/{job_id:str}",
    opt=route_opt("jobs:write", audit="job_cancel"),
    status_code=200,
    summary="Cancel a job (v1)",
    responses=problem_responses(404, 409, *COMMON),
    tags=["v1"],
)
async def cancel_v1(
    job_id: FromPath[str], request: Request[Any, Any, Any], gateway: GatewayDep
) -> V1CancelResponse:
    """Request cancellation; ``status`` is ``cancelled`` once a queued job ends at once."""
    _require_v1(request)
    record = await request_cancel(request, gateway, job_id)
    return V1CancelResponse(
        job_id=record.id,
        status="cancelling",
        message="Cancellation requested; the job ends as soon as its runner confirms",
    )


def _v1_runner(record: RunnerRecord) -> V1RunnerSummary:
    reg = record.registration
    caps = reg.capabilities
    return V1RunnerSummary(
        runner_id=reg.runner_id,
        status=record.state,
        capabilities=sorted({*caps.job_types, *caps.languages, *caps.frameworks}),
        current_load=record.load,
        max_capacity=reg.max_concurrent_jobs,
        region=reg.location.region,
        last_seen=str(record.last_heartbeat_at_ms // 1000),
    )


@get(
    "/api/v1/runners",
    opt=route_opt("jobs:read"),
    summary="List runners (v1)",
    responses=problem_responses(404, *COMMON),
    tags=["v1"],
)
async def runners_v1(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    status: Annotated[str | None, QueryParameter(required=False)] = None,
) -> V1RunnerList:
    """Every runner in the ancestor's shape (optionally one ``status``)."""
    _require_v1(request)
    records = await all_runners(gateway)
    runners = [_v1_runner(r) for r in records if not status or r.state.value == status]
    return V1RunnerList(
        runners=runners, count=len(runners), message=f"{len(runners)} runner(s) registered"
    )


ROUTES = [submit_v1, get_v1, cancel_v1, runners_v1]
