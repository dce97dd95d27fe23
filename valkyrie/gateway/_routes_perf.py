"""Performance figures, health and diagnostics, computed from the event stream and the buckets."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import time
from typing import Annotated, Any, Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from litestar import get
from litestar.params import QueryParameter

from schemas import (
    HEALTH_STATUSES,
    HealthStatus,
    HealthSummary,
    JobDispatched,
    JobState,
    typed_event,
)
from valkyrie.bus.codec import now_ms
from valkyrie.domain.health import runner_pool, runner_pool_detail
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._context import Gateway, GatewayDep
from valkyrie.gateway._kvread import stream_events
from valkyrie.gateway._problems import COMMON, problem_responses
from valkyrie.runtime.health import list_runner_states
from valkyrie.runtime.healthstore import HealthStore

__all__ = [
    "ROUTES",
    "Diagnostics",
    "GatewayCheck",
    "HealthView",
    "LatencySummary",
    "PerformanceMetrics",
    "Throughput",
    "health_report",
]

_RANK: dict[str, int] = {status: n for n, status in enumerate(HEALTH_STATUSES)}
#: jobs' terminal event types -> whether they count as a success in ``success_rate``
_OUTCOMES = {
    "job.succeeded": True,
    "job.failed": False,
    "job.timed_out": False,
    "job.expired": False,
    "job.cancelled": None,  # asked for: neither a success nor a failure of the system
}
#: events read per metrics call at most (a guard against a huge window on a busy system)
MAX_EVENTS = 200_000


class LatencySummary(msgspec.Struct, kw_only=True):
    """Percentiles (nearest rank) of queue-to-dispatch latency, in milliseconds."""

    count: int
    mean_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None


class Throughput(msgspec.Struct, kw_only=True):
    """Rates over the window, per second."""

    submitted_per_s: float
    dispatched_per_s: float
    finished_per_s: float
    succeeded_per_s: float


class PerformanceMetrics(msgspec.Struct, kw_only=True):
    """Figures computed from the events of the last ``window_s`` seconds and the jobs bucket."""

    window_s: int
    from_ms: int
    to_ms: int
    events_read: int
    truncated: bool
    dispatch_latency: LatencySummary
    throughput: Throughput
    outcomes: dict[str, int]
    success_rate: float | None
    queue_depth: int
    intake_pending: int | None


class GatewayCheck(msgspec.Struct, kw_only=True):
    """One thing the gateway checked itself and its status."""

    component: str
    status: HealthStatus
    message: str
    last_check_ms: int


class HealthView(msgspec.Struct, kw_only=True):
    """Overall health: the worse of the health monitor's summary (when fresh) and the gateway's checks.

    ``source`` says whether a fresh monitor summary was found (``monitor``, included as
    ``monitor``) or the status rests on the gateway's own checks alone (``gateway``).
    """

    overall_status: HealthStatus
    source: Literal["monitor", "gateway"]
    checks: list[GatewayCheck]
    mode: str
    revision: int
    last_updated_ms: int
    reasons: list[str] = msgspec.field(default_factory=list)
    monitor: HealthSummary | None = None


class StreamState(msgspec.Struct, kw_only=True):
    """A stream's size and its consumers' progress."""

    name: str
    reachable: bool
    messages: int = 0
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0
    consumers: list[dict[str, Any]] = msgspec.field(default_factory=list)
    error: str | None = None


class Diagnostics(msgspec.Struct, kw_only=True):
    """What an operator needs to see first: config, versions, connection, streams."""

    config_revision: int
    mode: str
    profile: str
    config_errors: list[dict[str, str]]
    started_at_ms: int
    uptime_s: float
    versions: dict[str, str | None]
    nats: dict[str, Any]
    streams: list[StreamState]


def _percentile(ordered: list[float], q: float) -> float:
    rank = max(1, -(-len(ordered) * q // 100))  # nearest rank: ceil(q/100 * n)
    return ordered[int(rank) - 1]


def latency_summary(values: list[float]) -> LatencySummary:
    """Nearest-rank percentiles of ``values``."""
    if not values:
        return LatencySummary(count=0)
    ordered = sorted(values)
    return LatencySummary(
        count=len(ordered),
        mean_ms=round(sum(ordered) / len(ordered), 3),
        p50_ms=_percentile(ordered, 50),
        p95_ms=_percentile(ordered, 95),
        p99_ms=_percentile(ordered, 99),
        max_ms=ordered[-1],
    )


@get(
    "/api/v2/performance/metrics",
    opt=route_opt("jobs:read"),
    summary="Dispatch latency, throughput, queue depth, success rate",
    description=(
        "Computed on each call from the job events of the last `window_s` seconds (dispatch "
        "latency from `job.*.dispatched` events' `queued_ms`; rates from queued, dispatched and "
        "terminal events) and the jobs bucket (queue depth = jobs in state queued)."
    ),
    responses=problem_responses(422, *COMMON),
    tags=["performance"],
)
async def performance_metrics(
    gateway: GatewayDep, window_s: Annotated[int, QueryParameter(ge=1, le=86_400)] = 300
) -> PerformanceMetrics:
    """Real figures over a window."""
    to_ms = now_ms()
    from_ms = to_ms - window_s * 1000
    since = dt.datetime.fromtimestamp(from_ms / 1000, tz=dt.UTC)
    with anyio.fail_after(gateway.timeout_s):
        events, truncated = await stream_events(gateway.bus, "job.>", since=since, limit=MAX_EVENTS)
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    submitted = dispatched = 0
    for _seq, event in events:
        if event.type == "job.queued" and event.attempt in (0, None):
            submitted += 1
        elif event.type == "job.dispatched":
            dispatched += 1
            try:
                decision = typed_event(event)
            except msgspec.ValidationError:
                continue
            if isinstance(decision, JobDispatched):
                latencies.append(float(decision.queued_ms))
        elif event.type in _OUTCOMES:
            name = event.type.removeprefix("job.")
            outcomes[name] = outcomes.get(name, 0) + 1
    judged = {k: v for k, v in outcomes.items() if _OUTCOMES[f"job.{k}"] is not None}
    succeeded = outcomes.get("succeeded", 0)
    finished = sum(outcomes.values())
    with anyio.fail_after(gateway.timeout_s):
        queued = await gateway.client().list_jobs(states={JobState.QUEUED})
        pending = await _consumer_pending(gateway, "submit", "intake")
    return PerformanceMetrics(
        window_s=window_s,
        from_ms=from_ms,
        to_ms=to_ms,
        events_read=len(events),
        truncated=truncated,
        dispatch_latency=latency_summary(latencies),
        throughput=Throughput(
            submitted_per_s=round(submitted / window_s, 4),
            dispatched_per_s=round(dispatched / window_s, 4),
            finished_per_s=round(finished / window_s, 4),
            succeeded_per_s=round(succeeded / window_s, 4),
        ),
        outcomes=outcomes,
        success_rate=round(succeeded / sum(judged.values()), 4) if sum(judged.values()) else None,
        queue_depth=len(queued),
        intake_pending=pending,
    )


async def _consumer_pending(gateway: Gateway, stream: str, consumer: str) -> int | None:
    try:
        info = await gateway.bus.js.consumer_info(gateway.bus.names.stream(stream), consumer)
    except nats.js.errors.NotFoundError:
        return None
    return int(info.num_pending or 0)


def _check(name: str, status: HealthStatus, message: str) -> GatewayCheck:
    return GatewayCheck(component=name, status=status, message=message, last_check_ms=now_ms())


async def _monitor_summary(gateway: Gateway) -> HealthSummary | None:
    """The health monitor's summary (``stats`` bucket, key ``health``) if present and fresh."""
    _, summary = await (await HealthStore.open(gateway.bus)).summary()
    if summary is None:
        return None
    stale_ms = max(summary.stale_after_ms, gateway.config.health.stale_after_ms)
    if now_ms() - summary.at_ms > stale_ms:
        return None  # the monitor stopped writing: its last word is no longer news
    return summary


async def health_report(gateway: Gateway) -> HealthView:
    """The gateway's checks (NATS, streams, runner pool, config, mode) and the monitor's summary."""
    config = gateway.config
    checks: list[GatewayCheck] = []
    nc = gateway.bus.nc
    if nc.is_connected:
        checks.append(_check("nats", "healthy", "connected"))
    else:
        checks.append(_check("nats", "unhealthy", "not connected (reconnecting)"))
    monitor: HealthSummary | None = None
    try:
        with anyio.fail_after(min(2.0, gateway.timeout_s)):
            await gateway.bus.js.stream_info(gateway.bus.names.stream("events"))
            checks.append(_check("jetstream", "healthy", "streams reachable"))
            monitor = await _monitor_summary(gateway)
            pool = runner_pool(
                await list_runner_states(gateway.bus), config.health.min_active_runners
            )
        checks.append(_check("runner_pool", pool.status, runner_pool_detail(pool)))
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
        checks.append(_check("jetstream", "unhealthy", f"unreachable: {e!r}"))
    if gateway.live.last_error:
        checks.append(
            _check(
                "config",
                "degraded",
                "the latest revision was refused here: "
                + "; ".join(f"{e.path}: {e.reason}" for e in gateway.live.last_error),
            )
        )
    else:
        checks.append(_check("config", "healthy", f"revision {gateway.live.revision}"))
    mode = config.mode.value
    checks.append(
        _check(
            "integration",
            "degraded" if mode in ("fallback", "disabled") else "healthy",
            f"mode is {mode}",
        )
    )
    statuses = [c.status for c in checks] + ([monitor.status] if monitor is not None else [])
    overall = max(statuses, key=lambda s: _RANK[s])
    reasons = [f"{c.component}: {c.message}" for c in checks if c.status != "healthy"]
    if monitor is not None:
        reasons += monitor.reasons
    return HealthView(
        overall_status=overall,
        source="monitor" if monitor is not None else "gateway",
        checks=checks,
        mode=mode,
        revision=gateway.live.revision,
        last_updated_ms=now_ms(),
        reasons=reasons,
        monitor=monitor,
    )


@get(
    "/api/v2/performance/health",
    opt=route_opt("jobs:read"),
    summary="Health summary",
    description=(
        "The health monitor's summary (`stats` bucket, key `health`) when present and fresh, "
        "combined with what the gateway sees: NATS connectivity, streams, the runner pool, the "
        "config and the integration mode."
    ),
    responses=problem_responses(*COMMON),
    tags=["performance"],
)
async def health(gateway: GatewayDep) -> HealthView:
    """Overall and per-component health."""
    return await health_report(gateway)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


async def _stream_states(gateway: Gateway) -> list[StreamState]:
    out: list[StreamState] = []
    for short in ("submit", "commands", "updates", "events", "logs", "dead"):
        name = gateway.bus.names.stream(short)
        try:
            info = await gateway.bus.js.stream_info(name)
            consumers = await gateway.bus.js.consumers_info(name)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            out.append(StreamState(name=name, reachable=False, error=repr(e)))
            continue
        out.append(
            StreamState(
                name=name,
                reachable=True,
                messages=int(info.state.messages),
                bytes=int(info.state.bytes),
                first_seq=int(info.state.first_seq),
                last_seq=int(info.state.last_seq),
                consumers=[
                    {
                        "name": c.name,
                        "num_pending": c.num_pending,
                        "num_ack_pending": c.num_ack_pending,
                        "num_redelivered": c.num_redelivered,
                        "num_waiting": c.num_waiting,
                    }
                    for c in consumers
                    if c.config.durable_name  # ephemeral readers come and go
                ],
            )
        )
    return out


@get(
    "/api/v2/performance/diagnostics",
    opt=route_opt("jobs:read"),
    summary="Diagnostics",
    description="Config revision and mode, uptime, versions, the NATS connection, stream and consumer states.",
    responses=problem_responses(*COMMON),
    tags=["performance"],
)
async def diagnostics(gateway: GatewayDep) -> Diagnostics:
    """State dump for operators."""
    nc = gateway.bus.nc
    server = nc.connected_server_version if nc.is_connected else None
    url = nc.connected_url
    with anyio.fail_after(gateway.timeout_s):
        streams = await _stream_states(gateway)
    return Diagnostics(
        config_revision=gateway.live.revision,
        mode=gateway.config.mode.value,
        profile=gateway.config.profile,
        config_errors=[{"path": e.path, "reason": e.reason} for e in gateway.live.last_error],
        started_at_ms=int(gateway.started_at * 1000),
        uptime_s=round(time.time() - gateway.started_at, 3),
        versions={
            "valkyrie": _version("valkyrie"),
            "python": platform.python_version(),
            "litestar": _version("litestar"),
            "uvicorn": _version("uvicorn"),
            "nats-py": _version("nats-py"),
            "msgspec": _version("msgspec"),
            "nats-server": str(server) if server is not None else None,
        },
        nats={
            "connected": nc.is_connected,
            "url": f"{url.scheme}://{url.hostname}:{url.port}" if url is not None else None,
            "reconnects": int(nc.stats.get("reconnects", 0)),
            "prefix": gateway.bus.names.prefix,
        },
        streams=streams,
    )


ROUTES = [performance_metrics, health, diagnostics]
