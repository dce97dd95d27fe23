"""Service discovery: every handler process answers $SRV.PING/INFO/STATS as a NATS micro service."""

from __future__ import annotations

import json
from typing import Any

import anyio
import anyio.lowlevel
import nats.errors
import pytest

from tests._helpers import wait_until
from tests._metrics_helpers import plane_with_registry
from tests._sched_helpers import submit
from valkyrie import Bus, Client, ConfigClient, Settings, __version__
from valkyrie.bus.names import Names
from valkyrie.cli._status import service_rows
from valkyrie.runtime import discover, discover_handlers

pytestmark = pytest.mark.nats


async def ask(bus: Bus, subject: str, *, quiet_s: float = 0.3) -> list[dict[str, Any]]:
    """Every answer to a request on ``subject`` (what `nats micro ping|info|stats` does)."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    answers: list[dict[str, Any]] = []
    try:
        await bus.nc.publish(subject, b"", reply=inbox)
        while True:
            try:
                msg = await sub.next_msg(timeout=quiet_s if answers else 3.0)
            except nats.errors.TimeoutError:
                return answers
            answers.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()


def test_the_discovery_subjects_are_listed_in_one_place() -> None:
    subjects = Names("acme").srv_subjects()
    assert "$SRV.PING" in subjects
    assert "$SRV.STATS.acme" in subjects
    assert "$SRV.INFO.acme.*" in subjects
    assert len(subjects) == 9
    assert Names("acme").srv_subject("PING") == "$SRV.PING.acme"


async def test_ping_lists_every_running_handler(settings: Settings) -> None:
    everything = sorted(discover_handlers())
    async with (
        plane_with_registry(settings) as (bus, _),
        plane_with_registry(settings, ["dispatcher"]),
    ):
        name = bus.names.service_name
        pings = await ask(bus, f"$SRV.PING.{name}")
        assert len(pings) == 2
        assert {p["type"] for p in pings} == {"io.nats.micro.v1.ping_response"}
        assert {p["name"] for p in pings} == {name}
        handlers = sorted({h for p in pings for h in p["metadata"]["handlers"].split(",")})
        assert handlers == everything
        by_handlers = {p["metadata"]["handlers"]: p for p in pings}
        assert set(by_handlers) == {",".join(everything), "dispatcher"}
        for ping in pings:
            assert ping["metadata"]["valkyrie_version"] == __version__
            assert ping["metadata"]["config_revision"] == "0"
            assert ping["metadata"]["mode"] == "full"
        # the bare `$SRV.PING` (`nats micro ls`) reaches them too, among any other services
        everyone = await ask(bus, "$SRV.PING")
        assert {p["id"] for p in pings} <= {p["id"] for p in everyone}
        # INFO names each handler as an endpoint, with the subject it consumes
        infos = await ask(bus, f"$SRV.INFO.{name}")
        endpoints = {e["name"]: e for i in infos for e in i["endpoints"]}
        assert set(endpoints) == set(everything)
        assert endpoints["intake"]["subject"].split(",") == [
            bus.names.submit,
            bus.names.submit_as("*"),
        ]
    # a process that stopped answers no more
    async with plane_with_registry(settings, ["registry"]) as (bus, _):
        pings = await ask(bus, f"$SRV.PING.{bus.names.service_name}")
        assert [p["metadata"]["handlers"] for p in pings] == ["registry"]


async def test_stats_count_each_handlers_work_and_follow_the_config(settings: Settings) -> None:
    async with plane_with_registry(settings) as (bus, _):
        client = Client(bus)
        for _ in range(3):
            await submit(client, labels={"os": "plan9"})
        name = bus.names.service_name

        async def counted() -> bool:
            (stats,) = await ask(bus, f"$SRV.STATS.{name}")
            intake = next(e for e in stats["endpoints"] if e["name"] == "intake")
            return bool(intake["num_requests"] == 3)

        await wait_until(counted, timeout_s=10)
        (stats,) = await ask(bus, f"$SRV.STATS.{name}")
        assert stats["type"] == "io.nats.micro.v1.stats_response"
        intake = next(e for e in stats["endpoints"] if e["name"] == "intake")
        assert intake["num_errors"] == 0
        assert intake["data"]["outcomes"] == {"ack": 3}
        assert intake["data"]["jobs"] == {"queued": 3}
        assert intake["processing_time"] > 0
        assert intake["average_processing_time"] > 0
        verdict = await ConfigClient(bus).change(set_values={"mode": "hybrid"}, reason="test")
        assert verdict.accepted, verdict.errors

        async def revised() -> bool:
            (ping,) = await ask(bus, f"$SRV.PING.{name}")
            meta = ping["metadata"]
            return bool(meta["mode"] == "hybrid" and meta["config_revision"] == "1")

        await wait_until(revised, timeout_s=10)
        # `valkyrie status` reads the same answers
        found = await discover(bus)
        assert len(found) == 1
        (row,) = service_rows(found)
        assert row[1] == ",".join(sorted(discover_handlers()))
        assert row[3] == "1"
        assert row[4] == "hybrid"
        assert isinstance(row[6], int)
        assert row[6] >= 3
        await anyio.lowlevel.checkpoint()
