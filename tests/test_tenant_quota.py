"""The per-tenant cap on queued jobs: counted from the queue ledger, refused clearly."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import JobSubmission
from tests._gateway_helpers import gateway, problem
from tests._helpers import config_for_test, dead_letters, events_of, running, wait_until
from valkyrie import Bus, Client, Settings
from valkyrie.config.model import LimitsConfig
from valkyrie.domain.intake import queue_quota_error
from valkyrie.runtime import QueueLedger


def test_the_cap_and_its_overrides() -> None:
    spec = JobSubmission(job_type="build", metadata={"project_id": "a"})
    limits = LimitsConfig(max_queued_per_tenant=3, tenant_max_queued={"vip": 10, "muted": 0})

    def error(queued: int, tenant: str) -> Any:
        return queue_quota_error(
            spec, queued, tenant=tenant, tenant_key="project_id", limits=limits
        )

    assert error(2, "a") is None
    over = error(3, "a")
    assert over is not None
    assert over.path == "$.metadata.project_id"
    assert "tenant 'a' has 3 jobs queued, its cap is 3 (limits.max_queued_per_tenant)" in (
        over.reason
    )
    assert error(9, "vip") is None
    assert "limits.tenant_max_queued['muted']" in error(0, "muted").reason
    unlimited = LimitsConfig(max_queued_per_tenant=None)
    assert (
        queue_quota_error(spec, 10**6, tenant="a", tenant_key="project_id", limits=unlimited)
        is None
    )


def job(tenant: str, **extra: Any) -> dict[str, Any]:
    return {"job_type": "build", "metadata": {"project_id": tenant}, **extra}


async def held(bus: Bus, tenant: str, n: int) -> None:
    async def enough() -> bool:
        return (await QueueLedger.read(bus, timeout_s=1)).tenants.get(tenant, 0) >= n

    await wait_until(enough, timeout_s=15, interval_s=0.2)


@pytest.mark.nats
async def test_a_tenant_at_its_cap_is_refused_and_others_are_not(settings: Settings) -> None:
    config = config_for_test(
        settings, limits__max_queued_per_tenant=3, limits__tenant_max_queued={"muted": 0}
    )
    async with running(settings, ["intake", "dispatcher"], config=config) as bus:
        client = Client(bus)
        accepted = []
        for i in range(3):  # no runner: they stay queued
            verdict = await client.submit(job("a", idempotency_key=f"a-{i}"))
            assert verdict is not None
            assert verdict.accepted
            accepted.append(verdict.job_id)
        await held(bus, "a", 3)
        refused = await client.submit(job("a"))
        assert refused is not None
        assert not refused.accepted
        assert refused.refusal == "quota"
        assert refused.errors[0].path == "$.metadata.project_id"
        assert "its cap is 3" in refused.errors[0].reason
        # a resubmission of an accepted job is still answered as the duplicate it is
        again = await client.submit(job("a", idempotency_key="a-0"))
        assert again is not None
        assert again.duplicate
        assert again.job_id == accepted[0]
        # other tenants are not affected; a tenant whose cap is 0 queues nothing
        other = await client.submit(job("b"))
        assert other is not None
        assert other.accepted
        muted = await client.submit(job("muted"))
        assert muted is not None
        assert muted.refusal == "quota"
        rejected = [e for e in await events_of(bus, "intake.>") if e.type == "intake.rejected"]
        assert [e.data["refusal"] for e in rejected] == ["quota", "quota"]
        assert not await dead_letters(bus)  # its sender submits again later


@pytest.mark.nats
async def test_over_http_the_cap_is_a_429(settings: Settings) -> None:
    environ = {"VALKYRIE_LIMITS__MAX_QUEUED_PER_TENANT": "1"}
    async with gateway(settings, environ=environ, handlers=["intake", "dispatcher"]) as gw:
        first = await gw.http.post("/api/v2/jobs", json=job("t"))
        assert first.status_code == 201, first.text
        await held(gw.bus, "t", 1)
        second = await gw.http.post("/api/v2/jobs", json=job("t"))
        assert second.status_code == 429
        body = problem(second)
        assert body["type"].endswith("/tenant-quota")
        assert "its cap is 1" in body["errors"][0]["reason"]
        assert int(second.headers["retry-after"]) >= 1
