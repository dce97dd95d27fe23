from __future__ import annotations

import pytest

from schemas import JobState
from tests._helpers import running, wait_until
from valkyrie import BusError, Client, NoVerdictError, Settings

pytestmark = pytest.mark.nats


async def test_submit_is_recorded_queued(settings: Settings) -> None:
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)
        verdict = await client.submit({"job_type": "build", "payload": {"command": ["true"]}})
        assert verdict is not None
        assert verdict.accepted
        assert verdict.job_id
        record = await client.get_job(verdict.job_id)
        assert record.state == JobState.QUEUED
        assert record.spec.job_type == "build"


async def test_a_stored_submission_without_a_verdict_says_so(settings: Settings) -> None:
    """No intake yet: the submission is stored (NoVerdictError with its stream sequence, not a
    bare BusError, so callers know not to submit it again) and taken in once intake runs."""
    async with running(settings, []) as bus:
        client = Client(bus)
        with pytest.raises(NoVerdictError) as caught:
            await client.submit({"job_type": "shell", "metadata": {"late": "yes"}}, timeout_s=0.5)
        assert isinstance(caught.value, BusError)
        seq = caught.value.seq
        assert seq is not None
        assert f"seq {seq}" in str(caught.value)
        info = await bus.js.stream_info(bus.names.stream("submit"))
        assert info.state.last_seq == seq
    async with running(settings, ["intake"]) as bus:
        client = Client(bus)

        async def taken_in() -> bool:
            return bool(await client.list_jobs())

        await wait_until(taken_in, timeout_s=10)
        jobs = await client.list_jobs()
        assert [j.spec.metadata for j in jobs] == [{"late": "yes"}]
        assert jobs[0].source_seq == seq
