"""Per-job costs of a phase, read from the server: stored messages and round trips.

*Stored messages per job*: the sum over every stream of the account (KV buckets are the streams
``KV_*``) of the growth of its ``last_seq`` across the phase, divided by the jobs dispatched.

*Round trips per job*: JetStream API requests (the server's ``api.total`` from ``/jsz``, or the
account's from ``$JS.API.INFO`` when the server has no monitoring port) plus acknowledged
publishes (stored messages on streams whose publishers wait for a PubAck, pipelined or not:
every stream but those a system feeds with core publishes), divided by the jobs. A lower bound:
the server counts neither KV reads by direct get, nor pull requests, nor core request/replies
apart from other messages. ``server_msgs_in/out_per_job`` (``/varz``: every message into and out
of the server, acks, pull requests, deliveries and replies included) bounds them from above.

The benchmark's own requests inside the window (the settle polls) are counted here and taken
off; stream lists and monitoring reads sit outside the window (streams are read before the
counters at the start and after them at the end).
"""

from __future__ import annotations

import json
import socket
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import anyio.to_thread
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from valkyrie import NatsServer

#: nats-py's STREAM.LIST pages hold this many streams
_PAGE = 256


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for the server's monitoring endpoint)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class MonitoredServer(NatsServer):
    """The embedded nats-server with its HTTP monitoring endpoint (``/jsz``, ``/varz``) on."""

    monitor_port: int = 0

    def _config(self) -> str:
        return super()._config() + f"http: {self.host}:{self.monitor_port}\n"

    @property
    def monitor_url(self) -> str:
        """Base URL of the monitoring endpoint."""
        return f"http://{self.host}:{self.monitor_port}"


@dataclass(frozen=True)
class Counters:
    """What the server had counted at one moment."""

    last_seq: dict[str, int]
    api_total: int | None
    in_msgs: int | None
    out_msgs: int | None


def _get_json(url: str) -> dict[str, Any]:
    # the monitoring URL is the loopback server this benchmark started
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
        doc: dict[str, Any] = json.load(resp)
        return doc


@dataclass
class CostMeter:
    """Reads the counters before and after a phase; ``own_api`` counts the benchmark's requests."""

    js: JetStreamContext
    monitor_url: str | None
    own_api: int = 0
    source: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.source = "jsz+varz" if self.monitor_url else "account_info"

    def tally(self, requests: int = 1) -> None:
        """The benchmark is about to make ``requests`` JetStream API requests inside a window."""
        self.own_api += requests

    async def _streams(self) -> dict[str, int]:
        out: dict[str, int] = {}
        offset = 0
        while True:
            page = await self.js.streams_info(offset)
            for info in page:
                if info.config.name:
                    out[info.config.name] = info.state.last_seq
            if len(page) < _PAGE:
                return out
            offset += len(page)

    async def _server(self) -> tuple[int | None, int | None, int | None]:
        if self.monitor_url is None:
            try:
                api = (await self.js.account_info()).api
            except (nats.errors.Error, nats.js.errors.Error):
                return None, None, None
            # the INFO request that read the figure is counted in it
            return (api.total - 1 if api is not None else None), None, None
        base = self.monitor_url
        jsz = await anyio.to_thread.run_sync(_get_json, f"{base}/jsz")
        varz = await anyio.to_thread.run_sync(_get_json, f"{base}/varz")
        return int(jsz["api"]["total"]), int(varz["in_msgs"]), int(varz["out_msgs"])

    async def start(self) -> Counters:
        """Counters at the start of a window (streams first, so their listing is outside it)."""
        seqs = await self._streams()
        api, msgs_in, msgs_out = await self._server()
        self.own_api = 0
        return Counters(seqs, api, msgs_in, msgs_out)

    async def end(self) -> Counters:
        """Counters at the end of a window (server first, streams after)."""
        api, msgs_in, msgs_out = await self._server()
        seqs = await self._streams()
        return Counters(seqs, api, msgs_in, msgs_out)

    def per_job(
        self, a: Counters, b: Counters, jobs: int, unacked: frozenset[str]
    ) -> dict[str, Any]:
        """Costs between ``a`` and ``b`` per job (``jobs`` dispatched in the window)."""
        by_stream = {
            name: seq - a.last_seq.get(name, 0)
            for name, seq in sorted(b.last_seq.items())
            if seq - a.last_seq.get(name, 0) > 0
        }
        stored = sum(by_stream.values())
        acked = sum(n for name, n in by_stream.items() if name not in unacked)
        own = self.own_api
        api = (
            b.api_total - a.api_total - own
            if a.api_total is not None and b.api_total is not None
            else None
        )

        def delta(x: int | None, y: int | None) -> int | None:
            # each of the benchmark's own requests is one message in and one reply out
            return y - x - own if x is not None and y is not None else None

        msgs_in, msgs_out = delta(a.in_msgs, b.in_msgs), delta(a.out_msgs, b.out_msgs)

        def each(total: int | None) -> float | None:
            return round(total / jobs, 2) if total is not None and jobs else None

        return {
            "jobs": jobs,
            "stored_messages_per_job": each(stored),
            "round_trips_per_job": each(api + acked if api is not None else None),
            "api_requests_per_job": each(api),
            "acked_publishes_per_job": each(acked),
            "server_msgs_in_per_job": each(msgs_in),
            "server_msgs_out_per_job": each(msgs_out),
            "stored_by_stream": by_stream,
            "stored_by_stream_per_job": {k: each(v) for k, v in by_stream.items()},
            "unacked_streams": sorted(unacked),
            "benchmark_api_requests_excluded": own,
            "counters": self.source,
        }

    def per_second(self, a: Counters, b: Counters, seconds: float) -> dict[str, Any]:
        """Background costs with no jobs (heartbeats, timers): per second of the window."""
        stored = sum(max(0, seq - a.last_seq.get(name, 0)) for name, seq in b.last_seq.items())
        api = (
            b.api_total - a.api_total - self.own_api
            if a.api_total is not None and b.api_total is not None
            else None
        )
        return {
            "seconds": round(seconds, 3),
            "stored_messages_per_s": round(stored / seconds, 2) if seconds else None,
            "api_requests_per_s": round(api / seconds, 2) if api is not None and seconds else None,
        }
