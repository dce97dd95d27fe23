"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (NATS and streams reachable), ``/metrics``."""

from __future__ import annotations

from typing import Literal

import anyio
import msgspec
import nats.errors
import nats.js.errors
from litestar import Response, get
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from valkyrie.gateway._context import GatewayDep
from valkyrie.gateway._problems import ProblemError, problem_responses

__all__ = ["ROUTES", "Liveness", "Readiness"]

#: streams a ready gateway can reach (the ones its routes read or write)
_STREAMS = ("submit", "commands", "events")


class Liveness(msgspec.Struct, kw_only=True):
    """The process answers."""

    status: Literal["alive"] = "alive"


class Readiness(msgspec.Struct, kw_only=True):
    """NATS is connected and the streams answer."""

    status: Literal["ready"]
    streams: list[str]


@get("/healthz", summary="Liveness probe", tags=["ops"])
async def healthz() -> Liveness:
    """200 while the process serves requests (it checks nothing else)."""
    return Liveness()


@get(
    "/readyz",
    summary="Readiness probe",
    description="200 when NATS is connected and the streams answer, else 503.",
    responses=problem_responses(503),
    tags=["ops"],
)
async def readyz(gateway: GatewayDep) -> Readiness:
    """Whether requests can be served now."""
    bus = gateway.bus
    if not bus.nc.is_connected:
        raise ProblemError(503, "not connected to NATS", headers={"Retry-After": "1"})
    names = [bus.names.stream(s) for s in _STREAMS]
    try:
        with anyio.fail_after(min(2.0, gateway.timeout_s)):
            for name in names:
                await bus.js.stream_info(name)
    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as e:
        raise ProblemError(
            503, f"JetStream streams unreachable: {e!r}", headers={"Retry-After": "1"}
        ) from e
    return Readiness(status="ready", streams=names)


@get(
    "/metrics",
    summary="Prometheus metrics",
    media_type=CONTENT_TYPE_LATEST,
    responses={
        200: ResponseSpec(
            data_container=str,
            media_type="text/plain",
            description="Prometheus text format.",
            generate_examples=False,
        )
    },
    tags=["ops"],
)
async def metrics(gateway: GatewayDep) -> Response[bytes]:
    """The registry the gateway was given, in the Prometheus text format."""
    return Response(generate_latest(gateway.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [healthz, readyz, metrics]
