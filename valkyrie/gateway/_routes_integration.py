"""v2 integration routes: mode and health, capabilities, and the fallback switch."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from litestar import Request, get, post

from schemas import FieldError, JobState, RunnerState, convert_or_errors
from valkyrie.config.model import IntegrationMode
from valkyrie.gateway._auth import SCOPES, auth_required, route_opt
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import Gateway, GatewayDep, identity_of
from valkyrie.gateway._models import FallbackRequest, FallbackResponse
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses
from valkyrie.gateway._routes_config import wait_applied
from valkyrie.gateway._routes_perf import health_report

__all__ = ["ROUTES", "Capabilities", "IntegrationStatus", "previous_mode"]


class IntegrationStatus(msgspec.Struct, kw_only=True):
    """The integration mode in force, the config revision and overall health."""

    integration_mode: str
    fallback_mode: bool
    revision: int
    health: str
    valkyrie_version: str | None
    api_versions: list[str]
    configuration_status: str
    last_config_reload_ms: int


class Capabilities(msgspec.Struct, kw_only=True):
    """What this installation offers, from its config."""

    api_versions: list[str]
    modes: list[str]
    current_mode: str
    features: dict[str, bool]
    auth_required: bool
    scopes: list[str]
    idempotency: bool
    event_streaming: dict[str, Any]
    limits: dict[str, float]
    job_states: list[str]
    runner_states: list[str]
    priorities: dict[str, int]


def _api_versions(gateway: Gateway) -> list[str]:
    return ["v1", "v2"] if gateway.config.features.legacy_v1_api else ["v2"]


@get(
    "/api/v2/integration/status",
    opt=route_opt("jobs:read"),
    summary="Integration mode, revision and health",
    responses=problem_responses(*COMMON),
    tags=["integration"],
)
async def integration_status(gateway: GatewayDep) -> IntegrationStatus:
    """Mode, config revision and overall health."""
    try:
        own: str | None = version("valkyrie")
    except PackageNotFoundError:
        own = None
    report = await health_report(gateway)
    mode = gateway.config.mode
    return IntegrationStatus(
        integration_mode=mode.value,
        fallback_mode=mode == IntegrationMode.FALLBACK,
        revision=gateway.live.revision,
        health=report.overall_status,
        valkyrie_version=own,
        api_versions=_api_versions(gateway),
        configuration_status="refused" if gateway.live.last_error else "valid",
        last_config_reload_ms=int(gateway.live.applied_at * 1000),
    )


@get(
    "/api/v2/integration/capabilities",
    opt=route_opt("jobs:read"),
    summary="Capabilities",
    responses=problem_responses(*COMMON),
    tags=["integration"],
)
async def capabilities(gateway: GatewayDep) -> Capabilities:
    """API versions, modes and feature flags as configured now."""
    config = gateway.config
    flags = msgspec.structs.asdict(config.features)
    return Capabilities(
        api_versions=_api_versions(gateway),
        modes=[m.value for m in IntegrationMode],
        current_mode=config.mode.value,
        features={k: bool(v) for k, v in flags.items()},
        auth_required=auth_required(config.http, gateway.host),
        scopes=list(SCOPES),
        idempotency=True,
        event_streaming={
            "path": "/api/v2/events",
            "format": "text/event-stream",
            "resumable": True,
        },
        limits={
            "max_body_bytes": config.http.max_body_bytes,
            "submission_max_bytes": config.limits.submission_max_bytes,
            "rate_limit_per_s": config.http.rate_limit_per_s,
            "rate_limit_burst": config.http.rate_limit_burst,
        },
        job_states=[s.value for s in JobState],
        runner_states=[s.value for s in RunnerState],
        priorities={"critical": 0, "high": 1, "normal": 2, "low": 3, "background": 4},
    )


async def previous_mode(gateway: Gateway, request: Request[Any, Any, Any]) -> str:
    """The mode in force before fallback: the newest revision whose mode was not ``fallback``.

    The gateway keeps no state of its own, so the config history (kept by the bus) says it.
    """
    base_mode = str(gateway.live.loaded.base().get("mode", IntegrationMode.FULL.value))
    history = await gateway.config_client(identity_of(request)).history()
    for revision in reversed(history):
        mode = str(revision.values.get("mode", base_mode))
        if mode != IntegrationMode.FALLBACK.value:
            return mode
    return base_mode if base_mode != IntegrationMode.FALLBACK.value else IntegrationMode.FULL.value


@post(
    "/api/v2/integration/fallback",
    opt=route_opt("config:admin", audit="integration_fallback"),
    status_code=200,
    summary="Switch fallback mode on or off",
    description=(
        '`{"enable": true}` sets `mode=fallback` (least-loaded placement only) through a config '
        'change; `{"enable": false}` restores the mode in force before it.'
    ),
    responses=problem_responses(400, 413, 415, 422, *COMMON),
    tags=["integration"],
)
async def fallback(request: Request[Any, Any, Any], gateway: GatewayDep) -> FallbackResponse:
    """Enter or leave fallback mode (a config change, audited like any other)."""
    _, obj = await json_body(request, required=False)
    wanted, errors = convert_or_errors(FallbackRequest, obj if obj is not None else {})
    if wanted is None:
        raise ProblemError(422, "invalid fallback request", errors=errors)
    current = gateway.config.mode
    fallback_value = IntegrationMode.FALLBACK.value
    if wanted.enable == (current == IntegrationMode.FALLBACK):
        return FallbackResponse(
            fallback_mode=wanted.enable,
            integration_mode=current.value,
            previous_mode=None,
            revision=gateway.live.revision,
            message=f"already in {current.value} mode; nothing changed",
        )
    if wanted.enable:
        target, previous = fallback_value, current.value
    else:
        target, previous = await previous_mode(gateway, request), current.value
    base_mode = gateway.live.loaded.base().get("mode", IntegrationMode.FULL.value)
    verdict = await gateway.config_client(identity_of(request)).change(
        set_values={"mode": None if target == base_mode else target},
        reason=f"fallback {'enabled' if wanted.enable else 'disabled'} over HTTP",
        timeout_s=gateway.timeout_s,
    )
    if not verdict.accepted:
        raise ProblemError(
            422,
            "the config handler refused the mode change",
            errors=verdict.errors or [FieldError(path="mode", reason="refused")],
        )
    if verdict.revision is not None:
        await wait_applied(gateway.live, verdict.revision, min(2.0, gateway.timeout_s))
    return FallbackResponse(
        fallback_mode=target == fallback_value,
        integration_mode=target,
        previous_mode=previous,
        revision=verdict.revision,
        message=f"mode changed from {previous} to {target}",
    )


ROUTES = [integration_status, capabilities, fallback]
