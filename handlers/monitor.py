"""Monitor: fold health reports, consumer lag and the runner pool into one status; fall back and recover.

Every worker process reports on ``<prefix>.health.<component>``; the monitor keeps the latest report
per instance and, every ``health.report_interval_ms``, evaluates them (liveness, each report's
checks, the config revision), the backlog of every durable consumer and the runner pool
(:mod:`valkyrie.domain.health` holds the rules). The result is written to the stats bucket under
``health`` with a compare-and-set, and every status change of a component or of the whole is an
event, emitted by whichever monitor's write recorded it, so several monitors can run.

With ``features.auto_fallback`` on, an installation that stays unhealthy or degraded for
``failure_threshold`` evaluations in mode ``full`` or ``hybrid`` is switched to ``fallback`` through
the config handler (``requested_by`` ``health-monitor``); once it has been healthy for
``recovery_threshold`` evaluations the monitor puts the previous mode back, but only if the fallback
in force is still its own. See docs/health.md.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.msg import Msg
from prometheus_client import Gauge

from schemas import (
    HEALTH_CHANGED,
    HEALTH_STATUSES,
    ConfigRevision,
    FallbackActivated,
    FallbackOverridden,
    FallbackRecord,
    FallbackRecovered,
    HealthReport,
    HealthStatus,
    HealthSummary,
)
from valkyrie import BusError, HandlerContext
from valkyrie.bus.codec import encode, new_id, now_ms
from valkyrie.client.config import ConfigClient
from valkyrie.config.model import IntegrationMode
from valkyrie.domain.health import (
    AUTO_ACTOR,
    CONSUMER_LAG_COMPONENT,
    RUNNER_POOL_COMPONENT,
    FallbackAction,
    RecordFate,
    Seen,
    Streak,
    component_statuses,
    decide_fallback,
    is_automatic_fallback,
    last_mode_change,
    reconcile_record,
    restore_target,
    runner_pool,
    should_forget,
    summarize,
    transitions,
)
from valkyrie.runtime.base import HandlerBase
from valkyrie.runtime.health import RunnerStates, consumer_lags

__all__ = ["FALLBACK_KEY", "HEALTH_KEY", "MonitorWorker", "create"]

log = logging.getLogger("valkyrie.monitor")

#: stats bucket keys
HEALTH_KEY = "health"
FALLBACK_KEY = "fallback"
#: how long a mode switch may wait for the config handler's verdict
SWITCH_TIMEOUT_S = 5.0
#: bound on one evaluation (a few small requests); a slower one is abandoned and retried next time
EVALUATE_TIMEOUT_S = 10.0

_REPORT = msgspec.json.Decoder(HealthReport)
_SUMMARY = msgspec.json.Decoder(HealthSummary)
_RECORD = msgspec.json.Decoder(FallbackRecord)
_RANK = {status: n for n, status in enumerate(HEALTH_STATUSES)}


class MonitorWorker(HandlerBase):
    """Evaluates the installation's health; run one or more per installation."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self.instance = new_id()[:12]
        self._seen: dict[str, Seen] = {}
        self._runners = RunnerStates()
        self._streak = Streak()
        self._switching = False
        self._warned_no_config = False
        # (stats KV revision, summary) of the last summary written or read; None = read it first
        self._stored: tuple[int, HealthSummary | None] | None = None
        # (config revision it was looked up at, the newest mode-changing revision)
        self._mode_change: tuple[int, ConfigRevision | None] | None = None
        self._status_gauge = Gauge(
            "valkyrie_health_status",
            "Health per component as the monitor sees it: 0 healthy, 1 degraded, 2 unhealthy.",
            ["component"],
            registry=ctx.registry,
        )
        self._pending_gauge = Gauge(
            "valkyrie_consumer_pending",
            "Messages waiting for a durable consumer, as the monitor last measured them.",
            ["consumer"],
            registry=ctx.registry,
        )

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Monitor until ``stop`` is set."""
        bus = self._bus
        self._stats = await bus.kv("stats")
        sub = await bus.nc.subscribe(bus.names.health(">"), cb=self._on_report)
        try:
            async with anyio.create_task_group() as tg:
                view = await self._ctx.views.runners()
                view.add_listener(self._runners.hear)
                tg.start_soon(self._loop, stop, tg)
                task_status.started()
                await stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()

    async def _on_report(self, msg: Msg) -> None:
        try:
            report = _REPORT.decode(msg.data)
        except msgspec.DecodeError as e:
            log.debug("unreadable health report on %s: %s", msg.subject, e)
            return
        if report.stopping:
            self._seen.pop(report.instance, None)
            return
        known = self._seen.get(report.instance)
        if known is not None and known.report.at_ms > report.at_ms:
            return  # an older report overtaken by a newer one
        self._seen[report.instance] = Seen(report, now_ms())

    async def _loop(self, stop: anyio.Event, tg: TaskGroup) -> None:
        # one round of reports must be in before judging, or a fresh monitor would call every
        # component missing and flap the shared summary
        warm_until = (
            time.monotonic() + 2 * self._ctx.config.current.health.report_interval_ms / 1000
        )
        while not stop.is_set():
            with anyio.move_on_after(self._ctx.config.current.health.report_interval_ms / 1000):
                await stop.wait()
            if stop.is_set() or time.monotonic() < warm_until:
                continue
            try:
                with anyio.fail_after(EVALUATE_TIMEOUT_S):
                    await self.evaluate(tg)
            except TimeoutError:
                log.warning("health evaluation took over %gs; skipped", EVALUATE_TIMEOUT_S)
            except (nats.errors.Error, BusError, OSError) as e:
                log.warning("health evaluation failed (%r); retrying next interval", e)
            except Exception:
                # a bug in one evaluation must not end monitoring
                log.exception("health evaluation failed")

    # -- evaluation -------------------------------------------------------------------------------
    async def evaluate(self, tg: TaskGroup | None = None) -> HealthSummary:
        """Evaluate once: store the summary, announce transitions, steer the mode (with ``tg``)."""
        live = self._ctx.config
        cfg = live.current
        health = cfg.health
        now = now_ms()
        for instance, seen in list(self._seen.items()):
            if should_forget(seen, now, health):
                log.info("forgetting %s (%s): silent too long", seen.report.component, instance)
                del self._seen[instance]
        consumers = await consumer_lags(self._bus)
        pool = runner_pool(self._runners.states.values(), health.min_active_runners)
        mode = cfg.mode.value
        record = await self._read_record()
        change = await self._mode_change_for(mode, record)
        record = await self._reconcile(record, mode, change)
        summary = summarize(
            self._seen,
            now_ms=now,
            health=health,
            mode=mode,
            config_revision=live.revision,
            revision_settled=(time.time() - live.applied_at) * 1000 > health.stale_after_ms,
            consumers=consumers,
            pool=pool,
            monitor=self.instance,
            fallback=record,
        )
        await self._store(summary)
        self._export(summary)
        await self._steer(summary, record, change, tg)
        return summary

    async def _read_record(self) -> FallbackRecord | None:
        try:
            entry = await self._stats.get(FALLBACK_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if not entry.value:
            return None
        try:
            return _RECORD.decode(entry.value)
        except msgspec.DecodeError:
            return None

    async def _forget_record(self) -> None:
        try:
            await self._stats.delete(FALLBACK_KEY)
        except nats.js.errors.KeyNotFoundError:
            pass

    async def _latest_mode_change(self) -> ConfigRevision | None:
        return last_mode_change(await ConfigClient(self._bus).history())

    async def _mode_change_for(
        self, mode: str, record: FallbackRecord | None
    ) -> ConfigRevision | None:
        # the history is only needed to judge a fallback; read it once per config revision
        if mode != IntegrationMode.FALLBACK.value and (record is None or record.state != "active"):
            return None
        revision = self._ctx.config.revision
        if self._mode_change is None or self._mode_change[0] != revision:
            self._mode_change = (revision, await self._latest_mode_change())
        return self._mode_change[1]

    async def _reconcile(
        self, record: FallbackRecord | None, mode: str, change: ConfigRevision | None
    ) -> FallbackRecord | None:
        fate = reconcile_record(
            record, mode=mode, change=change, config_revision=self._ctx.config.revision
        )
        if record is None or fate is RecordFate.KEEP:
            return record
        if fate is RecordFate.FORGET:
            await self._forget_record()
            return None
        who = change.changed_by if change is not None else "?"
        held = msgspec.structs.replace(record, state="overridden")
        await self._stats.put(FALLBACK_KEY, encode(held))
        log.warning(
            "mode changed by %s during an automatic fallback: no automatic fallback until healthy",
            who,
        )
        await self._events.emit(
            FallbackOverridden(
                changed_by=who,
                mode=mode,
                previous_mode=record.previous_mode,
                fallback_revision=record.config_revision,
            )
        )
        return held

    async def _read_summary(self) -> tuple[int, HealthSummary | None]:
        try:
            entry = await self._stats.get(HEALTH_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return 0, None
        revision = int(entry.revision or 0)
        try:
            return revision, _SUMMARY.decode(entry.value) if entry.value else None
        except msgspec.DecodeError:
            return revision, None

    async def _store(self, summary: HealthSummary) -> None:
        """Write ``summary`` over the stored one (compare-and-set) and announce what changed."""
        for _ in range(3):
            if self._stored is None:
                self._stored = await self._read_summary()
            last, previous = self._stored
            try:
                if last:
                    revision = await self._stats.update(HEALTH_KEY, encode(summary), last=last)
                else:
                    revision = await self._stats.create(HEALTH_KEY, encode(summary))
            except nats.js.errors.KeyWrongLastSequenceError:
                # another monitor wrote meanwhile: compare with what it recorded instead
                self._stored = None
                continue
            self._stored = (int(revision), summary)
            await self._announce(previous, summary, int(revision))
            return
        log.info("health summary not written: other monitors kept writing first")

    async def _announce(
        self, previous: HealthSummary | None, summary: HealthSummary, revision: int
    ) -> None:
        before = component_statuses(previous) if previous is not None else {}
        for name, old, new in transitions(before, component_statuses(summary)):
            log.log(_level(new), "health: %s %s -> %s", name, old, new)
            await self._events.emit(
                HEALTH_CHANGED[new](
                    subject_id=name,
                    from_=old,
                    to=new,
                    details=_details(summary, name),
                    mode=summary.mode,
                    config_revision=summary.config_revision,
                    summary_revision=revision,
                )
            )
        old_overall: HealthStatus = previous.status if previous is not None else "healthy"
        if summary.status != old_overall:
            log.log(_level(summary.status), "health: overall %s -> %s", old_overall, summary.status)
            await self._events.emit(
                HEALTH_CHANGED[summary.status](
                    subject_id="overall",
                    from_=old_overall,
                    to=summary.status,
                    reasons=summary.reasons,
                    mode=summary.mode,
                    config_revision=summary.config_revision,
                    summary_revision=revision,
                )
            )

    def _export(self, summary: HealthSummary) -> None:
        for name, status in component_statuses(summary).items():
            self._status_gauge.labels(name).set(_RANK[status])
        self._status_gauge.labels("overall").set(_RANK[summary.status])
        for lag in summary.consumers:
            if lag.pending is not None:
                self._pending_gauge.labels(lag.durable).set(lag.pending)

    # -- automatic fallback -----------------------------------------------------------------------
    async def _steer(
        self,
        summary: HealthSummary,
        record: FallbackRecord | None,
        change: ConfigRevision | None,
        tg: TaskGroup | None,
    ) -> None:
        cfg = self._ctx.config.current
        self._streak = self._streak.observe(summary.status)
        if summary.status == "healthy" and record is not None and record.state == "overridden":
            await self._forget_record()  # healthy again: the operator's override has done its job
            record = None
        action = decide_fallback(
            self._streak,
            mode=cfg.mode.value,
            auto_fallback=cfg.features.auto_fallback,
            automatic=is_automatic_fallback(cfg.mode.value, record, change),
            held=record is not None and record.state == "overridden",
            health=cfg.health,
        )
        if action is FallbackAction.NONE or self._switching or tg is None:
            return
        if not self._config_handler_alive():
            # a change request would wait in the commands stream and switch the mode whenever a
            # config handler next starts, long after the cause: better not to ask at all
            if not self._warned_no_config:
                log.warning("would %s, but no config handler is reporting", action.value)
                self._warned_no_config = True
            return
        self._warned_no_config = False
        self._switching = True
        tg.start_soon(self._switch, action, summary)

    def _config_handler_alive(self) -> bool:
        now = now_ms()
        stale = self._ctx.config.current.health.stale_after_ms
        return any(
            "config" in s.report.handlers and now - s.received_at_ms <= stale
            for s in self._seen.values()
        )

    async def _switch(self, action: FallbackAction, summary: HealthSummary) -> None:
        try:
            with anyio.fail_after(SWITCH_TIMEOUT_S + 5):
                if action is FallbackAction.FALLBACK:
                    await self._fall_back(summary)
                else:
                    await self._recover()
        except (BusError, nats.errors.Error, TimeoutError, OSError) as e:
            log.warning("automatic %s failed (%r); retrying next evaluation", action.value, e)
        finally:
            self._switching = False

    async def _mode_now(self, client: ConfigClient) -> tuple[str, dict[str, object]]:
        """The mode in force per the config bucket (not this process's copy, which may lag)."""
        current = await client.current()
        values = dict(current.values) if current is not None else {}
        base = str(self._ctx.config.loaded.base().get("mode", IntegrationMode.FULL.value))
        return str(values.get("mode", base)), values

    async def _fall_back(self, summary: HealthSummary) -> None:
        client = ConfigClient(self._bus, actor=AUTO_ACTOR)
        mode, values = await self._mode_now(client)
        if mode not in (IntegrationMode.FULL.value, IntegrationMode.HYBRID.value):
            return  # another monitor switched already, or the mode is not ours to change
        reason = (
            f"automatic fallback: overall {summary.status} for {self._streak.failing} consecutive "
            f"evaluations: " + ("; ".join(summary.reasons[:3]) or summary.status)
        )
        verdict = await client.change(
            set_values={"mode": IntegrationMode.FALLBACK.value},
            reason=reason,
            timeout_s=SWITCH_TIMEOUT_S,
        )
        if not verdict.accepted:
            log.error("automatic fallback refused: %s", verdict.errors)
            return
        record = FallbackRecord(
            previous_mode=mode,
            previous_override="mode" in values,
            config_revision=verdict.revision or 0,
            at_ms=now_ms(),
            reason=reason,
            monitor=self.instance,
        )
        await self._stats.put(FALLBACK_KEY, encode(record))
        self._streak = Streak()
        log.warning("switched to fallback mode (was %s): %s", mode, reason)
        await self._events.emit(
            FallbackActivated(
                previous_mode=mode,
                config_revision=verdict.revision,
                reason=reason,
                reasons=summary.reasons,
            )
        )

    async def _recover(self) -> None:
        client = ConfigClient(self._bus, actor=AUTO_ACTOR)
        mode, _ = await self._mode_now(client)
        record = await self._read_record()
        change = await self._latest_mode_change()
        # judged again on fresh data: an operator may have stepped in since the evaluation
        if not is_automatic_fallback(mode, record, change):
            return
        base = str(self._ctx.config.loaded.base().get("mode", IntegrationMode.FULL.value))
        value, target = restore_target(record, change, base)
        reason = (
            f"automatic recovery: healthy for {self._streak.healthy} consecutive evaluations; "
            f"back to {target}"
        )
        verdict = await client.change(
            set_values={"mode": value}, reason=reason, timeout_s=SWITCH_TIMEOUT_S
        )
        if not verdict.accepted:
            log.error("automatic recovery refused: %s", verdict.errors)
            return
        await self._forget_record()
        self._streak = Streak()
        log.warning("recovered from automatic fallback: mode %s again", target)
        await self._events.emit(
            FallbackRecovered(mode=target, config_revision=verdict.revision, reason=reason)
        )


def _level(status: HealthStatus) -> int:
    return logging.INFO if status == "healthy" else logging.WARNING


def _details(summary: HealthSummary, component: str) -> list[str]:
    if component == CONSUMER_LAG_COMPONENT:
        return [f"{c.durable}: {c.detail}" for c in summary.consumers if c.status != "healthy"]
    if component == RUNNER_POOL_COMPONENT:
        pool = summary.runner_pool
        return [f"{pool.available} available, minimum {pool.min_active}"]
    return [
        f"{c.instance} {name}: {check.detail or check.status}"
        for c in summary.components
        if c.component == component
        for name, check in c.failing.items()
    ]


def create(ctx: HandlerContext) -> MonitorWorker:
    """Entry point: build the monitor."""
    return MonitorWorker(ctx)
