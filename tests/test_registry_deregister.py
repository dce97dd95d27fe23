"""A runner leaving cleanly is forgotten; while its last slots are still held it is asked back."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import nats.js.errors
import pytest

from schemas import RegistrationVerdict, RunnerRecord
from tests._helpers import events_of, queued_job, running, spawn_runner, stop_process, wait_until
from tests._runner_fakes import new_runner_id, registration
from valkyrie import Bus, Settings
from valkyrie.bus.codec import RUNNER_DECODER, encode
from valkyrie.bus.kv import cas_update, kv_create
from valkyrie.domain.lifecycle import assign_slot, dispatch_job, release_slot

pytestmark = pytest.mark.nats
_VERDICT = msgspec.json.Decoder(RegistrationVerdict)


def _assign(record: RunnerRecord, *, job_id: str) -> RunnerRecord | None:
    return assign_slot(record, job_id, 1)


async def _deregister(bus: Bus, rid: str, session_id: str | None) -> RegistrationVerdict:
    body = encode({"runner_id": rid, "session_id": session_id})
    reply = await bus.nc.request(bus.names.runner_admin("deregister"), body, timeout=5)
    return _VERDICT.decode(reply.data)


async def test_deregistration_waits_for_the_last_slot_releases(settings: Settings) -> None:
    async with running(settings, ["registry"]) as bus:
        rid = new_runner_id()
        reg = registration(rid, capacity=2)
        answer = await bus.nc.request(bus.names.register, encode(reg), timeout=5)
        assert _VERDICT.decode(answer.data).accepted
        kv = await bus.kv("runners")
        # a job really on the runner (its record says so), and an orphan slot: a job that went
        # to another runner (a dispatcher that crashed between its two writes)
        job = dispatch_job(queued_job("dereg"), rid, now_ms=2_000)
        elsewhere = dispatch_job(queued_job("elsewhere"), "another-runner", now_ms=2_000)
        jobs = await bus.kv("jobs")
        for record in (job, elsewhere):
            await kv_create(jobs, record.id, encode(record))
            await cas_update(kv, rid, RUNNER_DECODER, functools.partial(_assign, job_id=record.id))

        slots = RUNNER_DECODER.decode((await kv.get(rid)).value or b"").assigned_jobs
        assert set(slots) == {job.id, elsewhere.id}
        held = await _deregister(bus, rid, reg.session_id)
        assert not held.accepted
        assert held.retry_after_ms == 200
        assert "holds 1 job" in held.errors[0].reason  # the orphan does not count

        await cas_update(kv, rid, RUNNER_DECODER, lambda r: release_slot(r, job.id, 1))
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


async def test_a_simulated_runner_process_stopped_by_sigterm_is_forgotten(
    settings: Settings, tmp_path: Path
) -> None:
    """SIGTERM is a clean exit (SIGKILL, a crash, is what chaos tests use for lost runners)."""
    async with running(settings, ["registry"]) as bus:
        kv = await bus.kv("runners")
        proc = spawn_runner("sim-term", settings, tmp_path)

        async def registered() -> bool:
            try:
                await kv.get("sim-term")
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return False
            return True

        await wait_until(registered, timeout_s=30)
        assert await anyio.to_thread.run_sync(stop_process, proc) == 0
        with pytest.raises((nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)):
            await kv.get("sim-term")
        kinds = [e.type for e in await events_of(bus, "runner.sim-term.*")]
        assert kinds[-1] == "runner.deregistered"
