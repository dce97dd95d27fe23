"""v2 runner routes: list, read, drain/undrain, register (forwarded to the registry)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import nats.errors
from litestar import Request, get, post, put
from litestar.params import FromPath, QueryParameter

from schemas import (
    FieldError,
    RegistrationVerdict,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
    SafeDecoder,
    convert_or_errors,
    is_ancestor_registration,
    registration_from_ancestor,
    unknown_fields,
)
from valkyrie.bus.codec import RUNNER_DECODER, encode
from valkyrie.bus.kv import get_versioned
from valkyrie.domain.health import AVAILABLE_RUNNER_STATES
from valkyrie.errors import NotFoundError
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import Gateway, GatewayDep, identity_of, valid_id
from valkyrie.gateway._kvread import bucket_values
from valkyrie.gateway._models import (
    Pagination,
    RunnerList,
    RunnerStatusChange,
    RunnerStatusResponse,
)
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses
from valkyrie.gateway._routes_jobs import states_pattern

__all__ = ["ROUTES", "all_runners", "fetch_runner", "runner_capabilities"]

_VERDICT = SafeDecoder(RegistrationVerdict)
#: a runner counts as healthy when it heartbeats and takes work


async def all_runners(gateway: Gateway) -> list[RunnerRecord]:
    """Every runner record, by id."""
    records = await bucket_values(gateway.bus, "runners", RUNNER_DECODER)
    return sorted(records, key=lambda r: r.registration.runner_id)


async def fetch_runner(gateway: Gateway, runner_id: str) -> RunnerRecord:
    """One runner's record.

    Raises:
        ProblemError: 404 when there is no such runner.
    """
    if not valid_id(runner_id):
        raise ProblemError(404, f"no runner {runner_id!r}")
    found = await get_versioned(await gateway.bus.kv("runners"), runner_id, RUNNER_DECODER)
    if found is None:
        raise ProblemError(404, f"no runner {runner_id!r}")
    return found.value


def runner_capabilities(record: RunnerRecord) -> set[str]:
    """Everything a runner offers that a ``capabilities`` filter can name (lower-cased)."""
    caps = record.registration.capabilities
    offered = {*caps.job_types, *caps.languages, *caps.frameworks, *caps.custom}
    offered.update(f"{k}={v}" for k, v in caps.custom.items())
    return {c.lower() for c in offered}


@get(
    "/api/v2/runners",
    opt=route_opt("jobs:read"),
    summary="List runners",
    description=(
        "Filters: `status` (runner states, comma-separated), `region`, `capabilities` (comma "
        "list; a runner must offer every one among its job types, languages, frameworks and "
        "custom capabilities). Counts are over the filtered runners."
    ),
    responses=problem_responses(422, *COMMON),
    tags=["runners"],
)
async def list_runners(
    gateway: GatewayDep,
    status: Annotated[
        str | None,
        QueryParameter(
            description="Comma-separated runner states, e.g. `active,busy`.",
            required=False,
            schema_extra=states_pattern(RunnerState),
        ),
    ] = None,
    region: Annotated[str | None, QueryParameter(required=False)] = None,
    capabilities: Annotated[str | None, QueryParameter(required=False)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    offset: Annotated[int, QueryParameter(ge=0)] = 0,
) -> RunnerList:
    """A page of runners with pool figures."""
    states: set[RunnerState] | None = None
    if status:
        states, bad = set(), []
        for part in (p.strip() for p in status.split(",") if p.strip()):
            try:
                states.add(RunnerState(part))
            except ValueError:
                bad.append(part)
        if bad:
            raise ProblemError(
                422,
                "unknown runner state(s)",
                slug="invalid-parameters",
                errors=[
                    FieldError(
                        path="query.status",
                        reason=f"{b!r} is not one of {', '.join(s.value for s in RunnerState)}",
                    )
                    for b in bad
                ],
            )
    region = region or None  # an empty filter (`region=`) is no filter
    wanted = {c.strip().lower() for c in (capabilities or "").split(",") if c.strip()}
    everything = await all_runners(gateway)
    matching = [
        r
        for r in everything
        if (states is None or r.state in states)
        and (region is None or r.registration.location.region == region)
        and wanted <= runner_capabilities(r)
    ]
    live = [r for r in matching if r.state != RunnerState.OFFLINE]
    capacity = sum(r.registration.max_concurrent_jobs for r in live)
    used = sum(len(r.assigned_jobs) for r in live)
    page = matching[offset : offset + limit]
    return RunnerList(
        runners=page,
        total_count=len(everything),
        filtered_count=len(matching),
        healthy_count=sum(1 for r in matching if r.state in AVAILABLE_RUNNER_STATES),
        total_capacity=capacity,
        used_capacity=used,
        current_utilization=round(used / capacity, 4) if capacity else 0.0,
        pagination=Pagination(
            limit=limit, offset=offset, has_more=offset + len(page) < len(matching)
        ),
    )


@get(
    "/api/v2/runners/{runner_id:str}",
    opt=route_opt("jobs:read"),
    summary="A runner's record",
    responses=problem_responses(404, *COMMON),
    tags=["runners"],
)
async def get_runner(runner_id: FromPath[str], gateway: GatewayDep) -> RunnerRecord:
    """The runner's record (from the runners KV bucket)."""
    return await fetch_runner(gateway, runner_id)


@put(
    "/api/v2/runners/{runner_id:str}/status",
    opt=route_opt("runners:admin", audit="runner_status"),
    summary="Drain or undrain a runner",
    description='Body `{"status": "draining"|"active"}` or `{"drain": true|false}`.',
    responses=problem_responses(400, 404, 413, 415, 422, *COMMON),
    tags=["runners"],
)
async def set_runner_status(
    runner_id: FromPath[str], request: Request[Any, Any, Any], gateway: GatewayDep
) -> RunnerStatusResponse:
    """Ask the registry to drain (no new work) or undrain the runner."""
    _, obj = await json_body(request)
    change, errors = convert_or_errors(RunnerStatusChange, obj)
    if change is None:
        raise ProblemError(422, "invalid status change", errors=errors)
    if (change.status is None) == (change.drain is None):
        raise ProblemError(
            422,
            'give exactly one of "status" and "drain"',
            errors=[FieldError(path="$", reason='exactly one of "status" and "drain" is required')],
        )
    drain = change.drain if change.drain is not None else change.status == "draining"
    if not valid_id(runner_id):
        raise ProblemError(404, f"no runner {runner_id!r}")
    try:
        verdict = await gateway.admin(identity_of(request)).set_drain(runner_id, drain=drain)
    except NotFoundError as e:
        raise ProblemError(404, f"no runner {runner_id!r}") from e
    return RunnerStatusResponse(runner_id=runner_id, state=verdict.state, drain_requested=drain)


@post(
    "/api/v2/runners/register",
    opt=route_opt("runners:admin", audit="runner_register"),
    status_code=200,
    summary="Register a runner",
    description=(
        "The body is a `RunnerRegistration`, or a registration in the ancestor's shape "
        "(`capabilities.supported_job_types`, `geographic_location`, `endpoint`, ...), converted "
        "first; it is forwarded as the registry's core request and its verdict returned, with "
        "`warnings` naming each field ignored (and, for the ancestor's shape, what was done with "
        "it). 422 when the body is invalid or the registry refuses it."
    ),
    responses=problem_responses(400, 413, 415, 422, *COMMON),
    tags=["runners"],
)
async def register_runner(
    request: Request[Any, Any, Any], gateway: GatewayDep
) -> RegistrationVerdict:
    """Register (or re-register) a runner."""
    body, obj = await json_body(request)
    if is_ancestor_registration(obj):
        ancestor = registration_from_ancestor(obj)
        registration, errors = convert_or_errors(RunnerRegistration, ancestor.body)
        errors = ancestor.rename_errors(errors)
        warnings = ancestor.warnings
        body = encode(ancestor.body)
    else:
        registration, errors = convert_or_errors(RunnerRegistration, obj)
        warnings = [
            FieldError(path=path, reason="unknown field, ignored")
            for path in unknown_fields(RunnerRegistration, obj)
        ]
    if registration is None:
        raise ProblemError(422, "invalid registration", errors=errors)
    try:
        reply = await gateway.bus.nc.request(
            gateway.bus.names.register_as(registration.runner_id), body, timeout=gateway.timeout_s
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
        raise ProblemError(
            503,
            "no registry answered the registration: is `valkyrie up` running?",
            headers={"Retry-After": "1"},
        ) from e
    verdict = _VERDICT.decode(reply.data)
    if not verdict.accepted:
        raise ProblemError(422, "the registry refused the registration", errors=verdict.errors)
    return msgspec.structs.replace(verdict, warnings=[*verdict.warnings, *warnings])


ROUTES = [list_runners, get_runner, set_runner_status, register_runner]
