"""Monitor: fold health reports, consumer lag and the runner pool into one status; fall back and recover.

Every ``health.report_interval_ms`` the monitor evaluates the latest report of every instance,
the backlog of every durable consumer and the runner pool (rules: :mod:`valkyrie.domain.health`),
writes the summary to the stats bucket with a compare-and-set and announces the status changes
its write recorded, so several monitors can run. With ``features.auto_fallback`` on it switches
the mode to ``fallback`` and back through the config handler, never over an operator's choice
(rules: :mod:`valkyrie.domain.fallback`). See docs/health.md.
"""

from __future__ import annotations

import logging
import time

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskGroup, TaskStatus

from schemas import (
    ConfigRevision,
    FallbackActivated,
    FallbackOverridden,
    FallbackRecord,
    FallbackRecovered,
    HealthStatus,
    HealthSummary,
)
from valkyrie import BusError, HandlerContext
from valkyrie.bus import new_id, now_ms
from valkyrie.client import ConfigClient
from valkyrie.config import IntegrationMode
from valkyrie.domain.fallback import (
    AUTO_ACTOR,
    FallbackAction,
    RecordFate,
    Streak,
    decide_fallback,
    fallback_reason,
    fallback_record,
    is_automatic_fallback,
    last_mode_change,
    may_fall_back_from,
    needs_mode_history,
    reconcile_record,
    recovery_reason,
    restore_target,
)
from valkyrie.domain.health import (
    config_handler_alive,
    health_changes,
    runner_pool,
    should_forget,
    summarize,
)
from valkyrie.runtime import (
    HandlerBase,
    HealthGauges,
    HealthReports,
    HealthStore,
    RunnerGauges,
    RunnerStates,
    consumer_lags,
)

__all__ = ["MonitorWorker", "create"]

log = logging.getLogger("valkyrie.monitor")

#: how long a mode switch may wait for the config handler's verdict
SWITCH_TIMEOUT_S = 5.0
#: bound on one evaluation (a few small requests); a slower one is abandoned and retried next time
EVALUATE_TIMEOUT_S = 10.0


class MonitorWorker(HandlerBase):
    """Evaluates the installation's health; run one or more per installation."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self.instance = new_id()[:12]
        self._reports = HealthReports(ctx.bus)
        self._seen = self._reports.seen
        self._runners = RunnerStates()
        self._streak = Streak()
        self._switching = False
        self._warned_no_config = False
        # (config revision it was looked up at, the newest mode-changing revision)
        self._mode_change: tuple[int, ConfigRevision | None] | None = None
        self._gauges = HealthGauges(ctx.registry)
        self._runner_gauges = RunnerGauges(ctx.registry)

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Monitor until ``stop`` is set."""
        self._store = await HealthStore.open(self._bus)
        async with self._reports.listening(), anyio.create_task_group() as tg:
            view = await self._ctx.views.runners()
            view.add_listener(self._runners.hear)
            view.add_listener(self._runner_gauges.hear)
            tg.start_soon(self._loop, stop, tg)
            task_status.started()
            await stop.wait()
            tg.cancel_scope.cancel()

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
        record = await self._store.fallback()
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
        written = await self._store.replace_summary(summary)
        if written is None:
            log.info("health summary not written: other monitors kept writing first")
        else:
            await self._announce(*written, summary)
        self._gauges.export(summary)
        await self._steer(summary, record, change, tg)
        return summary

    async def _latest_mode_change(self) -> ConfigRevision | None:
        return last_mode_change(await ConfigClient(self._bus).history())

    async def _mode_change_for(
        self, mode: str, record: FallbackRecord | None
    ) -> ConfigRevision | None:
        if not needs_mode_history(mode, record):
            return None  # read once per config revision, and only to judge a fallback
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
            await self._store.forget_fallback()
            return None
        who = change.changed_by if change is not None else "?"
        held = msgspec.structs.replace(record, state="overridden")
        await self._store.put_fallback(held)
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

    async def _announce(
        self, previous: HealthSummary | None, revision: int, summary: HealthSummary
    ) -> None:
        """Announce every status change since ``previous`` (``revision``: the write that made it)."""
        for event in health_changes(previous, summary, summary_revision=revision):
            log.log(
                _level(event.to), "health: %s %s -> %s", event.subject_id, event.from_, event.to
            )
            await self._events.emit(event)

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
            await self._store.forget_fallback()  # healthy again: the operator's override is done
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
        if not config_handler_alive(self._seen, now_ms(), cfg.health):
            # a change request would wait in the commands stream and switch the mode whenever a
            # config handler next starts, long after the cause: better not to ask at all
            if not self._warned_no_config:
                log.warning("would %s, but no config handler is reporting", action.value)
                self._warned_no_config = True
            return
        self._warned_no_config = False
        self._switching = True
        tg.start_soon(self._switch, action, summary)

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

    def _base_mode(self) -> str:
        return str(self._ctx.config.loaded.base().get("mode", IntegrationMode.FULL.value))

    async def _mode_now(self, client: ConfigClient) -> tuple[str, dict[str, object]]:
        """The mode in force per the config bucket (not this process's copy, which may lag)."""
        current = await client.current()
        values = dict(current.values) if current is not None else {}
        return str(values.get("mode", self._base_mode())), values

    async def _fall_back(self, summary: HealthSummary) -> None:
        client = ConfigClient(self._bus, actor=AUTO_ACTOR)
        mode, values = await self._mode_now(client)
        if not may_fall_back_from(mode):
            return  # another monitor switched already, or the mode is not ours to change
        reason = fallback_reason(summary, self._streak)
        verdict = await client.change(
            set_values={"mode": IntegrationMode.FALLBACK.value},
            reason=reason,
            timeout_s=SWITCH_TIMEOUT_S,
        )
        if not verdict.accepted:
            log.error("automatic fallback refused: %s", verdict.errors)
            return
        await self._store.put_fallback(
            fallback_record(mode, values, verdict.revision or 0, now_ms(), reason, self.instance)
        )
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
        record = await self._store.fallback()
        change = await self._latest_mode_change()
        # judged again on fresh data: an operator may have stepped in since the evaluation
        if not is_automatic_fallback(mode, record, change):
            return
        value, target = restore_target(record, change, self._base_mode())
        reason = recovery_reason(self._streak, target)
        verdict = await client.change(
            set_values={"mode": value}, reason=reason, timeout_s=SWITCH_TIMEOUT_S
        )
        if not verdict.accepted:
            log.error("automatic recovery refused: %s", verdict.errors)
            return
        await self._store.forget_fallback()
        self._streak = Streak()
        log.warning("recovered from automatic fallback: mode %s again", target)
        await self._events.emit(
            FallbackRecovered(mode=target, config_revision=verdict.revision, reason=reason)
        )


def _level(status: HealthStatus) -> int:
    return logging.INFO if status == "healthy" else logging.WARNING


def create(ctx: HandlerContext) -> MonitorWorker:
    """Entry point: build the monitor."""
    return MonitorWorker(ctx)
