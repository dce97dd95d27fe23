"""A runner leaving cleanly is forgotten; while its last slots are still held it is asked back."""

from __future__ import annotations

import msgspec
import nats.js.errors
import pytest

from schemas import RegistrationVerdict
from tests._helpers import events_of, running
from tests._runner_fakes import new_runner_id, registration
from valkyrie import Bus, Settings
from valkyrie._codec import RUNNER_DECODER, encode
from valkyrie._kvstore import cas_update
from valkyrie._lifecycle import assign_slot, release_slot

pytestmark = pytest.mark.nats
_VERDICT = msgspec.json.Decoder(RegistrationVerdict)


async def _deregister(bus: Bus, rid: str, session_id: str | None) -> RegistrationVerdict:
    body = encode({"runner_id": rid, "session_id": session_id})
    reply = await bus.nc.request(bus.names.runner_admin("deregister"), body, timeout=5)
    return _VERDICT.decode(reply.data)


async def test_deregistration_waits_for_the_last_slot_releases(settings: Settings) -> None:
    async with running(settings, ["registry"]) as bus:
        rid = new_runner_id()
        reg = registration(rid)
        answer = await bus.nc.request(bus.names.register, encode(reg), timeout=5)
        assert _VERDICT.decode(answer.data).accepted
        kv = await bus.kv("runners")
        await cas_update(kv, rid, RUNNER_DECODER, lambda r: assign_slot(r, "job-1", 1))

        held = await _deregister(bus, rid, reg.session_id)
        assert not held.accepted
        assert held.retry_after_ms == 200
        assert "holds 1 job" in held.errors[0].reason

        await cas_update(kv, rid, RUNNER_DECODER, lambda r: release_slot(r, "job-1", 1))
        done = await _deregister(bus, rid, reg.session_id)
        assert done.accepted
        with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
            await kv.get(rid)
        assert [e.type for e in await events_of(bus, f"runner.{rid}.*")][-1] == (
            "runner.deregistered"
        )

        # nothing to wait for: an unknown runner is refused for good
        gone = await _deregister(bus, rid, reg.session_id)
        assert not gone.accepted
        assert gone.retry_after_ms is None
