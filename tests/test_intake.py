from __future__ import annotations

import pytest

from schemas import JobState
from tests._helpers import running
from valkyrie import Client, Settings

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
