"""When a runner's slot counts as free: from the moment its ``JobFinished`` is being published.

The control plane frees the slot when it stores the ``JobFinished`` and may dispatch the next job
before the runner sees its own publish acknowledged (docs/runners.md, "When a slot is free"). The
SDK must take that dispatch, not refuse it as over capacity.
"""

from __future__ import annotations

from typing import Any

import anyio

from schemas import Dispatch, JobResult, JobSubmission
from valkyrie.bus.codec import now_ms
from valkyrie.bus.names import Names
from valkyrie.runner._attempts import Attempts, Timing
from valkyrie.runner._context import JobContext


class HeldFinishes:
    """A JetStream context that stores everything at once, except ``finished`` updates, whose
    acknowledgement waits until released."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.finishing = anyio.Event()
        self.msg_ids: list[str] = []

    async def publish(self, subject: str, body: bytes, **kwargs: Any) -> None:
        msg_id = kwargs.get("headers", {}).get("Nats-Msg-Id", "")
        self.msg_ids.append(msg_id)
        if msg_id.endswith(".finished"):
            self.finishing.set()
            await self.release.wait()


def dispatch(job_id: str) -> Dispatch:
    now = now_ms()
    return Dispatch(
        job_id=job_id,
        attempt=1,
        runner_id="r1",
        spec=JobSubmission(job_type="shell"),
        dispatched_at_ms=now,
        accept_by_at_ms=now + 5000,
    )


async def quick(ctx: JobContext) -> JobResult:
    return JobResult(exit_code=0)


async def test_a_slot_is_free_once_its_result_is_being_reported() -> None:
    js = HeldFinishes()
    attempts = Attempts(
        runner_id="r1",
        capacity=1,
        handler=quick,
        js=js,  # type: ignore[arg-type]
        names=Names(),
        timing=Timing(
            kill_grace_s=1,
            stop_timeout_s=1,
            publish_retry_s=5,
            log_flush_interval_s=0.05,
            log_batch_lines=10,
        ),
        draining=lambda: False,
        changed=lambda: None,
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            attempts.group = tg
            attempts.take(dispatch("job-1"), tg)
            await js.finishing.wait()
            # job-1's JobFinished is on its way, not acknowledged yet: its slot is free
            assert attempts.busy() == 0
            assert ("job-1", 1) in attempts.jobs
            attempts.take(dispatch("job-2"), tg)
            assert ("job-2", 1) in attempts.jobs
            js.release.set()
            await attempts.wait_idle()
    assert not any(i.endswith(".rejected") for i in js.msg_ids), js.msg_ids
    assert js.msg_ids.count("job-2.1.finished") == 1
