"""One runner-pool rule: the monitor, ``valkyrie status`` and the gateway agree on the same runners."""

from __future__ import annotations

import anyio
import pytest

from schemas import HealthSummary, RunnerPool, RunnerRecord, RunnerRegistration, RunnerState
from tests._gateway_helpers import gateway
from tests._helpers import config_for_test, running
from valkyrie import Bus, Settings
from valkyrie.bus.codec import encode, now_ms
from valkyrie.cli._status import gather
from valkyrie.domain.health import runner_pool_detail
from valkyrie.runtime.healthstore import HealthStore

pytestmark = pytest.mark.nats

ENV = {
    "VALKYRIE_HEALTH__REPORT_INTERVAL_MS": "200",
    "VALKYRIE_HEALTH__STALE_AFTER_MS": "1500",
    "VALKYRIE_HEALTH__KV_LATENCY_DEGRADED_MS": "2000",
    "VALKYRIE_HEALTH__KV_LATENCY_UNHEALTHY_MS": "5000",
    "VALKYRIE_FEATURES__AUTO_FALLBACK": "false",
}
ACT, BUSY, DRAIN, OFF = (
    RunnerState.ACTIVE,
    RunnerState.BUSY,
    RunnerState.DRAINING,
    RunnerState.OFFLINE,
)


async def put_runners(bus: Bus, states: list[RunnerState]) -> None:
    """Runner records as the registry and supervisor would leave them (none of them runs here)."""
    kv = await bus.kv("runners")
    for n, state in enumerate(states):
        record = RunnerRecord(
            registration=RunnerRegistration(runner_id=f"r{n}"),
            state=state,
            registered_at_ms=now_ms(),
            last_heartbeat_at_ms=now_ms(),
        )
        await kv.put(f"r{n}", encode(record))


async def monitor_summary(bus: Bus, runners: int) -> HealthSummary:
    store = await HealthStore.open(bus)
    with anyio.fail_after(20):
        while True:
            _, summary = await store.summary()
            if summary is not None and summary.runner_pool.total == runners:
                return summary
            await anyio.sleep(0.1)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("states", "minimum", "available", "status"),
    [
        # draining and offline runners take no work: 2 of 5 available against a minimum of 3
        ([ACT, BUSY, DRAIN, OFF, OFF], 3, 2, "degraded"),
        # nothing can run at all
        ([DRAIN, OFF], 1, 0, "unhealthy"),
        # a fully loaded pool is alive and working
        ([BUSY, BUSY], 2, 2, "healthy"),
    ],
)
async def test_monitor_status_and_gateway_agree_on_the_runner_pool(
    settings: Settings,
    states: list[RunnerState],
    minimum: int,
    available: int,
    status: str,
) -> None:
    env = {**ENV, "VALKYRIE_HEALTH__MIN_ACTIVE_RUNNERS": str(minimum)}
    config = config_for_test(settings, environ=env)
    async with gateway(settings, handlers=["config"], environ=env) as gw:
        await put_runners(gw.bus, states)
        view = (await gw.http.get("/api/v2/performance/health")).json()
        (check,) = [c for c in view["checks"] if c["component"] == "runner_pool"]
        # no monitor yet: `valkyrie status` evaluates the reports and the pool itself
        gathered = await gather(gw.bus, config, wait_s=0.6)
        assert gathered.source == "local"
        assert gathered.summary is not None
        local = gathered.summary.runner_pool
        async with running(settings, ["monitor"], config=config):
            monitored = (await monitor_summary(gw.bus, len(states))).runner_pool

    assert local == monitored
    assert monitored == RunnerPool(
        total=len(states),
        available=available,
        active=states.count(ACT),
        busy=states.count(BUSY),
        draining=states.count(DRAIN),
        offline=states.count(OFF),
        min_active=minimum,
        status=status,  # type: ignore[arg-type]
    )
    assert (check["status"], check["message"]) == (status, runner_pool_detail(monitored))
