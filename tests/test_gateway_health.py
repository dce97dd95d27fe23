"""The gateway reports its own health like a worker process does, and says goodbye on stop."""

from __future__ import annotations

import anyio
import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from schemas import HealthReport
from tests._gateway_helpers import served
from valkyrie import Settings

pytestmark = pytest.mark.nats

_REPORT = msgspec.json.Decoder(HealthReport)


async def test_the_gateway_reports_its_health_and_says_goodbye(
    nats_url: str, settings: Settings
) -> None:
    reports: list[HealthReport] = []
    first, goodbye = anyio.Event(), anyio.Event()

    async def on_report(msg: Msg) -> None:
        report = _REPORT.decode(msg.data)
        reports.append(report)
        first.set()
        if report.stopping:
            goodbye.set()

    # a connection of its own: it must still hear the goodbye after the gateway's bus is closed
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(f"{settings.prefix}.health.gateway", cb=on_report)
        await nc.flush()
        environ = {"VALKYRIE_HEALTH__REPORT_INTERVAL_MS": "200"}
        async with served(settings, handlers=[], environ=environ) as gw:
            with anyio.fail_after(10):
                await first.wait()
            report = reports[-1]
            assert report.component == "gateway"
            assert report.handlers == ["gateway"]
            assert report.status == "healthy", report
            assert report.checks["http"].status == "healthy"
            assert report.checks["http"].detail == gw.url
            assert not report.stopping
        with anyio.fail_after(5):
            await goodbye.wait()
        assert reports[-1].stopping
        assert reports[-1].instance == report.instance
    finally:
        await nc.close()
