"""Health reporting of worker processes, and the probes the monitor and ``valkyrie status`` share.

Every process that runs handlers runs one :class:`HealthReporter`: each ``health.report_interval_ms``
(and at once after every applied config revision) it publishes a :class:`~schemas.HealthReport` on
``<prefix>.health.<component>`` (core NATS, fire and forget). The checks are cheap on purpose: a
flag, one KV read and a set lookup per report.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import CheckResult, ConsumerLag, HealthReport, RunnerRecord, SafeDecoder
from valkyrie.bus.codec import RUNNER_DECODER, encode, new_id, now_ms
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import Versioned
from valkyrie.bus.names import Names
from valkyrie.config.live import CONFIG_KEY, LiveConfig
from valkyrie.domain.health import Seen, kv_latency_check, note_report, worst
from valkyrie.errors import BusError

__all__ = [
    "Durable",
    "HealthReporter",
    "HealthReports",
    "RunnerStates",
    "component_name",
    "consumer_lags",
    "durables",
    "list_runner_states",
]

log = logging.getLogger("valkyrie.health")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-+]")
_REPORT = SafeDecoder(HealthReport)


def component_name(handlers: Iterable[str]) -> str:
    """The component a process reports as: its handler names joined with ``+``.

    Anything that could not be one subject token is replaced, since the name ends the subject.
    """
    return _UNSAFE.sub("_", "+".join(handlers)) or "none"


@dataclass(frozen=True, slots=True)
class Durable:
    """A durable consumer whose backlog the monitor watches."""

    name: str
    stream: str
    #: the subjects it takes (a legacy subject and the identities' ones, for some)
    filter_subjects: tuple[str, ...]
    #: On a work-queue stream every stored message on the filter waits for this consumer, so the
    #: backlog of a consumer not created yet is the stream's count on its filter.
    work_queue: bool


def durables(names: Names) -> list[Durable]:
    """Every durable consumer of the standard handlers (their names are the handler names)."""
    return [
        Durable("intake", names.stream("submit"), names.submissions(), True),
        Durable("results", names.stream("updates"), (names.updates("*"),), True),
        Durable("canceller", names.stream("commands"), names.cancels(), True),
        Durable("config", names.stream("commands"), names.config_changes(), True),
        Durable("dispatcher", names.stream("events"), (names.event("job", "*", "queued"),), False),
    ]


async def _lag(bus: Bus, durable: Durable, timeout_s: float) -> ConsumerLag:
    base = ConsumerLag(durable=durable.name, stream=durable.stream)
    try:
        with anyio.fail_after(timeout_s):
            try:
                info = await bus.js.consumer_info(durable.stream, durable.name, timeout=timeout_s)
                return msgspec.structs.replace(base, pending=int(info.num_pending or 0))
            except nats.js.errors.NotFoundError:
                if not durable.work_queue:
                    return msgspec.structs.replace(base, detail="no consumer yet")
                waiting = 0
                for subject in durable.filter_subjects:
                    stream = await bus.js.stream_info(durable.stream, subjects_filter=subject)
                    waiting += sum((stream.state.subjects or {}).values())
                return msgspec.structs.replace(base, pending=waiting, detail="no consumer yet")
    except nats.js.errors.NotFoundError:
        return msgspec.structs.replace(base, detail="stream not found")
    except (nats.errors.Error, TimeoutError, OSError) as e:
        return msgspec.structs.replace(base, detail=f"not measured: {e!r}")


async def consumer_lags(bus: Bus, *, timeout_s: float = 2.0) -> list[ConsumerLag]:
    """The backlog of every durable in :func:`durables` (status not yet derived)."""
    return [await _lag(bus, d, timeout_s) for d in durables(bus.names)]


async def list_runner_states(bus: Bus) -> list[str]:
    """The state of every runner in the runners bucket, read once (for one-off callers)."""
    kv = await bus.kv("runners")
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    states: list[str] = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            continue
        if entry.value:
            try:
                states.append(RUNNER_DECODER.decode(entry.value).state.value)
            except msgspec.DecodeError:
                continue
    return states


class HealthReports:
    """The latest health report of every instance, heard on ``<prefix>.health.>``."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        #: instance id -> its latest report and when it arrived (this process's clock)
        self.seen: dict[str, Seen] = {}

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = _REPORT.decode(msg.data)
        except msgspec.DecodeError as e:
            log.debug("unreadable health report on %s: %s", msg.subject, e)
            return
        note_report(self.seen, report, now_ms())

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[HealthReports]:
        """Hear reports inside the block."""
        sub = await self._bus.nc.subscribe(self._bus.names.health(">"), cb=self._on_report)
        try:
            yield self
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()


class RunnerStates:
    """The runners' states, kept current from the process's shared runner view (cheap to count)."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def hear(self, runner_id: str, versioned: Versioned[RunnerRecord] | None) -> None:
        """A listener for the process's shared :class:`~valkyrie.runtime.views.RunnerView`."""
        if versioned is None:
            self.states.pop(runner_id, None)
        else:
            self.states[runner_id] = versioned.value.state.value


class HealthReporter:
    """Publishes this process's health until cancelled; says goodbye when stopped on purpose.

    Args:
        bus: the connection.
        live: the process's live config (interval, thresholds, revision).
        handlers: the handler names this process runs (for the gateway: ``["gateway"]``).
        stop: set when the process shuts down on purpose; handlers ending after it are expected.
        checks: more checks of this component, by name, each evaluated for every report.
    """

    def __init__(
        self,
        bus: Bus,
        live: LiveConfig,
        handlers: Sequence[str],
        stop: anyio.Event,
        *,
        checks: Mapping[str, Callable[[], CheckResult]] | None = None,
    ) -> None:
        self._extra = dict(checks or {})
        self.component = component_name(handlers)
        self.instance = new_id()[:12]
        self._bus = bus
        self._live = live
        self._handlers = list(handlers)
        self._stop = stop
        self._running: set[str] = set()
        self._ended: set[str] = set()
        self._all_started = False
        self._started_at_ms = now_ms()
        self._host = socket.gethostname()
        self._wake = anyio.Event()
        live.on_change(lambda _old, _new: self.poke())

    def poke(self) -> None:
        """Publish a report now rather than at the next interval."""
        self._wake.set()

    def track(
        self, name: str, run: Callable[..., Awaitable[None]]
    ) -> Callable[..., Coroutine[Any, Any, None]]:
        """Wrap a worker's ``run`` so that the ``handlers`` check knows whether it still runs."""

        async def tracked(
            stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
        ) -> None:
            self._running.add(name)
            try:
                await run(stop, task_status=task_status)
            finally:
                self._running.discard(name)
                self._ended.add(name)

        return tracked

    def started(self) -> None:
        """Every worker has started: report it at once."""
        self._all_started = True
        self.poke()

    # -- checks -----------------------------------------------------------------------------------
    def _nats_check(self) -> CheckResult:
        nc = self._bus.nc
        if nc.is_connected:
            url = nc.connected_url
            # host and port only: the URL may carry credentials (user:password@, token@)
            where = f"{url.hostname}:{url.port}" if url is not None else "?"
            return CheckResult(status="healthy", detail=f"connected to {where}")
        if nc.is_reconnecting:
            return CheckResult(status="unhealthy", detail="reconnecting")
        return CheckResult(status="unhealthy", detail="not connected")

    async def _kv_check(self) -> CheckResult:
        health = self._live.current.health
        # a read slower than twice the unhealthy threshold tells nothing more: stop waiting
        limit_s = min(max(2 * health.kv_latency_unhealthy_ms / 1000, 0.5), 10.0)
        began = time.perf_counter()
        with anyio.move_on_after(limit_s) as scope:
            try:
                kv = await self._bus.kv("config")
                await kv.get(CONFIG_KEY)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                pass  # an answer all the same: no revision was written yet
            except (nats.errors.Error, BusError, OSError) as e:
                return kv_latency_check(None, health, f"config KV read failed: {e!r}")
        if scope.cancelled_caught:
            return kv_latency_check(None, health, f"config KV read: no answer within {limit_s:g}s")
        return kv_latency_check((time.perf_counter() - began) * 1000, health)

    def _handlers_check(self) -> CheckResult:
        dead = sorted(self._ended - self._running)
        if dead and not self._stop.is_set():
            return CheckResult(
                status="unhealthy",
                value=float(len(self._running)),
                detail=f"stopped unexpectedly: {', '.join(dead)}",
            )
        if not self._all_started and not self._stop.is_set():
            return CheckResult(status="healthy", value=float(len(self._running)), detail="starting")
        return CheckResult(status="healthy", value=float(len(self._running)))

    def _config_check(self) -> CheckResult:
        errors = self._live.last_error
        if errors:
            listed = "; ".join(f"{e.path}: {e.reason}" for e in errors[:3])
            return CheckResult(
                status="degraded",
                value=float(self._live.revision),
                detail=f"refused the latest config revision ({listed})",
            )
        return CheckResult(status="healthy", value=float(self._live.revision))

    async def report(self, *, stopping: bool = False) -> HealthReport:
        """This process's health now."""
        checks = {
            "nats": self._nats_check(),
            "kv_latency_ms": await self._kv_check(),
            "handlers": self._handlers_check(),
            "config": self._config_check(),
            **{name: check() for name, check in self._extra.items()},
        }
        return HealthReport(
            component=self.component,
            instance=self.instance,
            at_ms=now_ms(),
            status=worst(c.status for c in checks.values()),
            config_revision=self._live.revision,
            checks=checks,
            handlers=list(self._handlers),
            host=self._host,
            pid=os.getpid(),
            started_at_ms=self._started_at_ms,
            stopping=stopping,
        )

    async def _publish(self, *, stopping: bool = False) -> None:
        report = await self.report(stopping=stopping)
        await self._bus.nc.publish(self._bus.names.health(self.component), encode(report))

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Report every interval and after every config revision, until cancelled."""
        task_status.started()
        while True:
            # a fresh event before publishing: a poke that lands meanwhile triggers the next one
            self._wake = anyio.Event()
            try:
                await self._publish()
            except (nats.errors.Error, OSError) as e:
                log.debug("health report not sent (%r)", e)
            except Exception:
                # health reporting must never take the handlers down with it
                log.exception("health report failed")
            interval_s = self._live.current.health.report_interval_ms / 1000
            with anyio.move_on_after(interval_s):
                await self._wake.wait()

    async def goodbye(self, *, timeout_s: float = 2.0) -> None:
        """Publish a last report marked ``stopping`` so the monitor forgets this instance."""
        with anyio.move_on_after(timeout_s):
            try:
                await self._publish(stopping=True)
                await self._bus.nc.flush(timeout=max(int(timeout_s), 1))
            except (nats.errors.Error, OSError) as e:
                log.debug("goodbye report not sent (%r)", e)
