"""The runner SDK against a real nats-server, with the control plane played by the test."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.msg import Msg

from schemas import (
    FieldError,
    JobFinished,
    JobResult,
    RegistrationVerdict,
    RunnerCommand,
)
from tests._runner_fakes import (
    FakeControlPlane,
    fake_control_plane,
    new_runner_id,
    registration,
    started,
)
from valkyrie import Bus
from valkyrie.runner import JobContext, JobError, RegistrationRejected, Runner
from valkyrie.runner._logs import LogPublisher

nats = pytest.mark.nats


def kinds(cp: FakeControlPlane, job_id: str) -> list[str | int | None]:
    return [u.__struct_config__.tag for u in cp.updates_of(job_id)]


async def succeed(ctx: JobContext) -> JobResult:
    await ctx.log("hello")
    return JobResult(exit_code=0)


class Gate:
    """A handler that runs until released (or stopped) and remembers what it saw."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.entered = anyio.Event()
        self.calls = 0
        self.stop_reasons: list[str | None] = []

    async def __call__(self, ctx: JobContext) -> JobResult:
        self.calls += 1
        self.entered.set()
        with anyio.move_on_after(20):
            async with anyio.create_task_group() as tg:

                async def on_stop() -> None:
                    await ctx.stop_requested.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(on_stop)
                await self.release.wait()
                tg.cancel_scope.cancel()
        self.stop_reasons.append(ctx.stop_reason)
        return JobResult(exit_code=0)


@nats
async def test_registers_with_retry_then_heartbeats(bus: Bus) -> None:
    rid = new_runner_id()
    async with fake_control_plane(bus, rid, answer=False) as cp:
        runner = Runner(bus, registration(rid, capacity=2), succeed, drain_timeout_s=5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run)
            await anyio.sleep(0.5)  # nobody answers yet: the runner keeps retrying
            assert cp.registrations == []
            await cp.answer_registrations()
            reg = await cp.registered()
            assert reg.runner_id == rid
            assert reg.session_id == runner.session_id
            beat = await cp.heartbeat()
            assert beat.session_id == runner.session_id
            assert beat.load == 0.0
            assert beat.running_jobs == []
            assert not beat.draining
            runner.drain()
        await cp.wait_for(lambda: cp.heartbeats[-1].draining)


@nats
async def test_job_updates_in_order_with_batched_logs(bus: Bus) -> None:
    rid = new_runner_id()

    async def chatty(ctx: JobContext) -> JobResult:
        for i in range(250):
            await ctx.log(f"line {i}")
        await ctx.log("warning one", "stderr")
        await ctx.log("after\nthe warning")
        return JobResult(exit_code=0)

    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), chatty):
        await cp.dispatch("job-a", {"anything": 1})
        finished = await cp.finished("job-a")
        assert finished.outcome == "succeeded"
        # it starts the job at once: `started` is its acceptance too (no separate `accepted`)
        assert kinds(cp, "job-a") == ["started", "finished"]
        assert [h["Nats-Msg-Id"] for h in cp.headers_of("job-a")] == [
            "job-a.1.started",
            "job-a.1.finished",
        ]
        batches = await cp.logs("job-a")
        assert len(batches) <= 8, "lines must be batched, not published one by one"
        assert [b.seq for b in batches] == sorted({b.seq for b in batches})
        lines = [line for b in batches for line in b.lines]
        assert lines == [*(f"line {i}" for i in range(250)), "warning one", "after", "the warning"]
        assert {b.stream for b in batches if "warning one" in b.lines} == {"stderr"}
        assert all(b.attempt == 1 and b.runner_id == rid for b in batches)
        tail = finished.result.output_tail.splitlines()
        assert len(tail) == 50
        assert tail[-1] == "the warning"
        assert finished.result.exit_code == 0


@nats
@pytest.mark.parametrize(
    ("error", "expected"),
    [(RuntimeError("boom"), "boom"), (JobError("no compiler on this runner"), "no compiler")],
)
async def test_handler_failure_is_an_error_outcome(
    bus: Bus, error: Exception, expected: str
) -> None:
    rid = new_runner_id()

    async def broken(ctx: JobContext) -> JobResult:
        await ctx.log("about to fail")
        raise error

    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), broken):
        await cp.dispatch("job-b", None)
        finished = await cp.finished("job-b")
        assert finished.outcome == "error"
        assert expected in (finished.result.error or "")
        assert finished.result.output_tail == "about to fail"


@nats
async def test_nonzero_exit_code_is_failed(bus: Bus) -> None:
    rid = new_runner_id()

    async def fails(ctx: JobContext) -> JobResult:
        return JobResult(exit_code=2)

    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), fails):
        await cp.dispatch("job-c", None)
        finished = await cp.finished("job-c")
        assert finished.outcome == "failed"
        assert finished.result.exit_code == 2


@nats
async def test_capacity_is_respected(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), gate):
        await cp.dispatch("job-1", None)
        await cp.started("job-1")
        beat = await cp.heartbeat(lambda h: h.running_jobs == ["job-1"])
        assert beat.load == 1.0
        await cp.dispatch("job-2", None)
        rejected = await cp.finished("job-2")
        assert rejected.outcome == "rejected"
        assert "capacity" in (rejected.result.error or "")
        assert cp.headers_of("job-2") == [{"Nats-Msg-Id": "job-2.1.rejected"}]
        gate.release.set()
        assert (await cp.finished("job-1")).outcome == "succeeded"
    assert gate.calls == 1


@nats
async def test_duplicate_dispatch_is_ignored(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), gate):
        dispatch = cp.make_dispatch("job-d", None)
        await cp.send_dispatch(dispatch)
        await cp.send_dispatch(dispatch)
        await cp.started("job-d")
        await anyio.sleep(0.3)
        gate.release.set()
        await cp.finished("job-d")
        await cp.send_dispatch(dispatch)  # a late repeat of an attempt that already ended
        await anyio.sleep(0.5)
        assert kinds(cp, "job-d") == ["started", "finished"]
    assert gate.calls == 1


@nats
async def test_cancel_reports_cancelled(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), gate):
        await cp.dispatch("job-e", None)
        await cp.started("job-e")
        await cp.command(
            RunnerCommand(command="cancel", job_id="job-e", attempt=1, reason="user asked")
        )
        finished = await cp.finished("job-e")
        assert finished.outcome == "cancelled"
        assert finished.result.error == "user asked"
        assert gate.stop_reasons == ["cancel"]
        lines = await cp.log_lines("job-e", "system")
        assert any("stopping the job (cancel)" in line for line in lines)


@nats
async def test_abandon_stops_without_reporting(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), gate) as runner:
        await cp.dispatch("job-f", None)
        await cp.started("job-f")
        await cp.command(RunnerCommand(command="abandon", job_id="job-f"))
        await cp.wait_for(lambda: gate.stop_reasons == ["abandon"])
        await cp.wait_for(lambda: not runner.running_jobs)
        await anyio.sleep(0.5)
        assert kinds(cp, "job-f") == ["started"]
        await cp.heartbeat(lambda h: h.running_jobs == [] and h.load == 0.0)


@nats
async def test_timeout_cancels_a_handler_that_ignores_the_stop(bus: Bus) -> None:
    rid = new_runner_id()

    async def stubborn(ctx: JobContext) -> JobResult:
        await anyio.sleep(30)
        return JobResult(exit_code=0)

    options = {"kill_grace_s": 0.2, "stop_timeout_s": 0.3}
    async with (
        fake_control_plane(bus, rid) as cp,
        started(bus, registration(rid), stubborn, **options),
    ):
        begin = anyio.current_time()
        await cp.dispatch("job-g", None, max_execution_time_s=1)
        finished = await cp.finished("job-g")
        assert finished.outcome == "timed_out"
        assert "max_execution_time_s=1" in (finished.result.error or "")
        assert anyio.current_time() - begin < 5


@nats
async def test_drain_command_then_undrain(bus: Bus) -> None:
    rid = new_runner_id()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), succeed):
        await cp.command(RunnerCommand(command="drain"))
        await cp.heartbeat(lambda h: h.draining)
        await cp.dispatch("job-h", None)
        assert (await cp.finished("job-h")).outcome == "rejected"
        await cp.command(RunnerCommand(command="undrain"))
        await cp.heartbeat(lambda h: not h.draining)
        await cp.dispatch("job-i", None)
        assert (await cp.finished("job-i")).outcome == "succeeded"


@nats
async def test_drain_finishes_running_jobs_then_returns(bus: Bus) -> None:
    rid = new_runner_id()

    async def slow(ctx: JobContext) -> JobResult:
        await anyio.sleep(0.8)
        return JobResult(exit_code=0)

    async with fake_control_plane(bus, rid) as cp:
        runner = Runner(bus, registration(rid, capacity=2), slow, drain_timeout_s=10)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                await tg.start(runner.run)
            await cp.dispatch("job-j", None)
            await cp.started("job-j")
            runner.drain()
            await cp.dispatch("job-k", None)
            with anyio.fail_after(10):
                assert (await cp.finished("job-k")).outcome == "rejected"
        # run() has returned: the running job was finished first
        assert (await cp.finished("job-j")).outcome == "succeeded"
        await cp.wait_for(lambda: cp.heartbeats and cp.heartbeats[-1].running_jobs == [])
        assert cp.heartbeats[-1].draining


@nats
async def test_drain_timeout_stops_jobs(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp:
        runner = Runner(bus, registration(rid), gate, drain_timeout_s=0.3, kill_grace_s=1)
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                await tg.start(runner.run)
            await cp.dispatch("job-l", None)
            await cp.started("job-l")
            runner.drain()
        finished = await cp.finished("job-l")
        assert finished.outcome == "error"
        assert "shut down" in (finished.result.error or "")
        assert gate.stop_reasons == ["shutdown"]


@nats
async def test_rejected_registration_raises(bus: Bus) -> None:
    rid = new_runner_id()
    async with fake_control_plane(bus, rid) as cp:
        cp.verdict = lambda reg: RegistrationVerdict(
            accepted=False,
            errors=[FieldError(path="$.labels", reason="label 'x' is not allowed")],
        )
        runner = Runner(bus, registration(rid), succeed)
        with anyio.fail_after(10), pytest.raises(RegistrationRejected, match="label 'x'"):
            await runner.run()


@nats
async def test_registers_again_after_reconnect_and_abandons(bus: Bus) -> None:
    rid = new_runner_id()
    gate = Gate()
    async with fake_control_plane(bus, rid) as cp, started(bus, registration(rid), gate):
        await cp.dispatch("job-m", None)
        await cp.started("job-m")
        cp.verdict = lambda reg: RegistrationVerdict(
            accepted=True, runner_id=reg.runner_id, abandon_jobs=["job-m"]
        )
        # What nats-py does on a reconnect; the runner watches this counter.
        bus.nc.stats["reconnects"] += 1
        again = await cp.registered(count=2)
        assert again.session_id == cp.registrations[0].session_id
        await cp.wait_for(lambda: gate.stop_reasons == ["abandon"])
        await anyio.sleep(0.5)
        assert not any(isinstance(u, JobFinished) for u in cp.updates_of("job-m"))


class StuckJetStream:
    """A JetStream context whose publishes never complete (NATS unreachable)."""

    async def publish(self, *args: object, **kwargs: object) -> None:
        await anyio.sleep(3600)


async def test_log_lines_are_dropped_not_blocking_when_publishing_is_stuck() -> None:
    logs = LogPublisher(
        StuckJetStream(),  # type: ignore[arg-type]
        "x.logs.j",
        job_id="j",
        attempt=1,
        runner_id="r",
        batch_lines=1,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(logs.run)
        with anyio.fail_after(5):
            for i in range(400):
                logs.write(f"line {i}", "stdout")
                await logs.wait_for_room(timeout_s=0.2)  # waits once, then no more
        assert logs.dropped > 0
        await logs.close(timeout_s=0.1)
        tg.cancel_scope.cancel()


@nats
@pytest.mark.parametrize(
    ("answers", "asked"),
    [
        # slot releases still in flight: refused twice with retry_after_ms, then accepted
        ([(False, 50, []), (False, 50, []), (True, None, [])], 3),
        # refused for good (a newer session took over): asked once
        ([(False, None, [FieldError(path="$.runner_id", reason="newer session")])], 1),
    ],
)
async def test_deregistration_asks_again_when_told_to(
    bus: Bus, answers: list[tuple[bool, int | None, list[FieldError]]], asked: int
) -> None:
    rid = new_runner_id()
    requests: list[bytes] = []

    async def answer(msg: Msg) -> None:
        requests.append(msg.data)
        accepted, retry_after_ms, errors = answers[min(len(requests), len(answers)) - 1]
        verdict = RegistrationVerdict(
            accepted=accepted, runner_id=rid, retry_after_ms=retry_after_ms, errors=errors
        )
        await msg.respond(msgspec.json.encode(verdict))

    sub = await bus.nc.subscribe(bus.names.deregister(rid), cb=answer)
    try:
        async with fake_control_plane(bus, rid):
            runner = Runner(bus, registration(rid), succeed, drain_timeout_s=1)
            async with anyio.create_task_group() as tg:
                with anyio.fail_after(10):
                    await tg.start(runner.run)
                runner.drain()
        assert len(requests) == asked
        assert all(msgspec.json.decode(r)["runner_id"] == rid for r in requests)
    finally:
        await sub.unsubscribe()
