"""The console's routes: the page shell and its static files (open), and its fragments (``jobs:read``).

The shell holds no data, so it needs no token: the console's script fetches every fragment with the
caller's bearer token (kept in the tab's ``sessionStorage``) through the same guard, scopes and
rate limits as the API. Cancel and drain call the API routes themselves (``jobs:write``,
``runners:admin``); a fragment shows their buttons only to a caller who holds the scope. Nothing is
sent with ambient credentials (no cookie), so another site cannot make a browser act here; the
Content-Security-Policy allows only this origin's script and style.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Annotated, Any

import anyio
from litestar import Request, Response, get
from litestar.params import FromPath, QueryParameter

from schemas import JobExplanation, QueueListRequest
from valkyrie.bus.codec import now_ms
from valkyrie.errors import BusError, NotFoundError
from valkyrie.gateway._auth import Scope, route_opt
from valkyrie.gateway._context import Gateway, GatewayDep, identity_of
from valkyrie.gateway._problems import ProblemError
from valkyrie.gateway._routes_jobs import fetch_job, parse_states
from valkyrie.gateway.console import _data, _views
from valkyrie.gateway.console._html import Html
from valkyrie.runtime.discovery import discover
from valkyrie.runtime.healthstore import HealthStore

__all__ = ["ROUTES"]

_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_STATIC = {"console.js": "text/javascript", "console.css": "text/css"}
_RUNNER_STATES = ("active", "busy", "draining", "offline")


@functools.cache
def _asset(folder: str, name: str) -> bytes:
    return files("valkyrie.gateway.console").joinpath(folder, name).read_bytes()


def _html(body: str, *, cache: str = "no-store") -> Response[bytes]:
    return Response(
        body.encode(),
        media_type="text/html; charset=utf-8",
        headers={**_HEADERS, "Cache-Control": cache},
    )


def _can(request: Request[Any, Any, Any], gateway: Gateway, scope: Scope) -> bool:
    """Whether the caller may use ``scope`` (any caller may when auth is not required)."""
    if not gateway.config.http.auth_required:
        return True
    return scope in identity_of(request).scopes


def _opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


@get(["/console", "/console/{path:path}"], include_in_schema=False)
async def shell() -> Response[bytes]:
    """The console page (the same shell for every console path: its script loads the view)."""
    return _html(_asset("templates", "shell.html").decode(), cache="no-cache")


@get("/console-static/{name:str}", include_in_schema=False)
async def static(name: FromPath[str]) -> Response[bytes]:
    """The console's script and style."""
    media = _STATIC.get(name)
    if media is None:
        raise ProblemError(404, f"no console file {name!r}")
    return Response(
        _asset("static", name),
        media_type=media,
        headers={**_HEADERS, "Cache-Control": "no-cache"},
    )


#: every fragment needs the scope the API's read routes need
_READ = route_opt("jobs:read")


@get("/console/fragments/overview", opt=_READ, include_in_schema=False)
async def overview(gateway: GatewayDep) -> Response[bytes]:
    """Health and mode, the queue by group, the runner pool, the running processes."""
    bus = gateway.bus
    store = await HealthStore.open(bus)
    _, summary = await store.summary()
    now = now_ms()
    fresh = summary is not None and now - summary.at_ms <= max(
        summary.stale_after_ms, 2 * summary.report_interval_ms, 5_000
    )
    services: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def find() -> None:
            services.extend(await discover(bus, timeout_s=0.6, quiet_s=0.15))

        tg.start_soon(find)
        page = await _data.queue_page(gateway, QueueListRequest(limit=1))
    ledger = page.ledger
    groups = [
        (g.job_type, g.region, g.labels, g.count, g.oldest_queued_at_ms) for g in ledger.groups[:20]
    ]
    body = _views.overview_view(
        summary=summary,
        fresh=fresh,
        mode=gateway.config.mode.value,
        revision=gateway.live.revision,
        queue_held=ledger.held,
        queue_oldest_ms=now - ledger.oldest_queued_at_ms if ledger.oldest_queued_at_ms else None,
        groups=groups,
        services=services,
        now_ms=now,
    )
    return _html(body)


@get("/console/fragments/queue", opt=_READ, include_in_schema=False)
async def queue(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    job_type: Annotated[str | None, QueryParameter(required=False, max_length=256)] = None,
    region: Annotated[str | None, QueryParameter(required=False, max_length=256)] = None,
    labels: Annotated[str | None, QueryParameter(required=False, max_length=256)] = None,
    tenant: Annotated[str | None, QueryParameter(required=False, max_length=256)] = None,
    after: Annotated[str | None, QueryParameter(required=False, max_length=200)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
) -> Response[bytes]:
    """The queue by group, and a page of queued jobs with their reasons (filters, cursor)."""
    ask = QueueListRequest(
        job_type=_opt(job_type),
        region=_opt(region),
        labels=labels.strip() if labels is not None else None,
        tenant=_opt(tenant),
        after=_opt(after),
        limit=limit,
    )
    page = await _data.queue_page(gateway, ask)
    body = _views.queue_view(
        page, ask, can_cancel=_can(request, gateway, "jobs:write"), now_ms=now_ms()
    )
    return _html(body)


@get("/console/fragments/jobs", opt=_READ, include_in_schema=False)
async def jobs(
    gateway: GatewayDep,
    states_: Annotated[
        str | None, QueryParameter(name="state", required=False, max_length=256)
    ] = None,
    before: Annotated[int | None, QueryParameter(required=False, ge=1)] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
) -> Response[bytes]:
    """Recently changed jobs, newest first (``before``: the cursor of an older page)."""
    states = parse_states(_opt(states_))
    page = await _data.recent_jobs(gateway.bus, before=before, limit=limit, states=states)
    return _html(_views.jobs_view(page, _opt(states_), now_ms=now_ms()))


@get("/console/fragments/job/{job_id:str}", opt=_READ, include_in_schema=False)
async def job(
    job_id: FromPath[str], request: Request[Any, Any, Any], gateway: GatewayDep
) -> Response[bytes]:
    """One job: record, explanation, timeline, log."""
    record = await fetch_job(gateway, job_id)
    explanation: JobExplanation | None = None
    explain_error: str | None = None
    try:
        found = await gateway.client().explain(job_id, timeout_s=min(3.0, gateway.timeout_s))
        if found.error:
            explain_error = found.error
        else:
            explanation = found
    except (BusError, NotFoundError) as e:
        explain_error = f"no explanation: {e}"
    events, events_cut = await _data.job_events(gateway.bus, record)
    logs, logs_cut = await _data.job_logs(gateway.bus, record)
    body = _views.job_view(
        record,
        explanation=explanation,
        explain_error=explain_error,
        events=events,
        events_cut=events_cut,
        logs=logs,
        logs_cut=logs_cut,
        can_cancel=_can(request, gateway, "jobs:write"),
        now_ms=now_ms(),
    )
    return _html(body)


@get("/console/fragments/runners", opt=_READ, include_in_schema=False)
async def runners(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    state_: Annotated[
        str | None, QueryParameter(name="state", required=False, max_length=32)
    ] = None,
    pool: Annotated[str | None, QueryParameter(required=False, max_length=256)] = None,
    q: Annotated[str | None, QueryParameter(required=False, max_length=128)] = None,
    offset: Annotated[int, QueryParameter(ge=0)] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
) -> Response[bytes]:
    """A page of runners with state, slots and heartbeat age (filters: state, pool, id)."""
    wanted = _opt(state_)
    if wanted is not None and wanted not in _RUNNER_STATES:
        raise ProblemError(422, f"state must be one of {', '.join(_RUNNER_STATES)}")
    records = await _data.runners(gateway)
    body = _views.runners_view(
        records,
        state=wanted,
        pool=_opt(pool),
        query=_opt(q),
        offset=offset,
        limit=limit,
        can_admin=_can(request, gateway, "runners:admin"),
        now_ms=now_ms(),
    )
    return _html(body)


@get("/console/fragments/events", opt=_READ, include_in_schema=False)
async def events() -> Response[bytes]:
    """The live event view (the script fills it from ``/api/v2/events``)."""
    return _html(
        Html(
            '<section><h2>Live events</h2><p class="note">Every event as it is stored '
            "(the same stream as <code>valkyrie tail</code>).</p>"
            '<ol id="events-full" class="events"></ol></section>'
        )
    )


ROUTES = [shell, static, overview, queue, jobs, job, runners, events]
