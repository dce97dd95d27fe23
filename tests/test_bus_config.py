"""What the bus takes from the process's loaded config: TLS from the caller, retention to provision,
and the live input limits a client applies."""

from __future__ import annotations

import pytest

from tests._config_helpers import change, control_plane
from tests._helpers import config_for_test
from valkyrie import Bus, Client, Settings, connect, open_bus

pytestmark = pytest.mark.nats


async def test_connect_reads_no_config(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # a config that cannot load (TLS on without a certificate): connect() must not even look
    monkeypatch.setenv("VALKYRIE_SECURITY__TLS_ENABLED", "true")
    bus = await connect(settings)
    try:
        assert bus.nc.is_connected
    finally:
        await bus.close()


async def test_the_events_retention_is_provisioned_from_the_config(settings: Settings) -> None:
    config = config_for_test(settings, observability__events_max_age_s=3600).config
    async with open_bus(settings, embed=False, config=config) as (bus, _):
        info = await bus.js.stream_info(bus.names.stream("events"))
        assert info.config.max_age == 3600


async def test_a_duplicate_of_a_submission_a_live_limit_refused_is_refused_too(
    settings: Settings, bus: Bus
) -> None:
    """The answer to a submission the stream dropped as a duplicate reads the limits intake runs
    now (a runtime revision), not the defaults: a body over the live limit was refused."""
    body = {"job_type": "build", "payload": {"blob": "x" * 4000}}
    async with control_plane(settings, ["intake", "config"]) as (plane, live):
        await change(plane, live, limits__submission_max_bytes=2048)
        # without a config of its own (the revision in force over the defaults), and with one
        for n, client in enumerate((Client(bus), Client(bus, config=live))):
            msg_id = f"big-{n}"
            first = await client.submit(body, msg_id=msg_id, timeout_s=5)
            assert first is not None
            assert not first.accepted
            again = await client.submit(body, msg_id=msg_id, timeout_s=5)
            assert again is not None
            assert again.duplicate
            assert not again.accepted
            assert [e.path for e in again.errors] == ["$"]
