"""Issue #14's attacks, each against `valkyrie up`'s own secured server: refused by the server
(a permission violation) or by the handler; and what each identity may do still works."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from schemas import (
    CancelJob,
    ConfigChange,
    JobFinished,
    JobResult,
    JobState,
    RunnerCapabilities,
    RunnerHeartbeat,
    RunnerRegistration,
)
from tests._helpers import audits_of, dead_letters, wait_until
from tests._security_helpers import Attacker, Secured, secured_up
from valkyrie import Bus, Client, ConfigError, ConnectError, Settings, connect
from valkyrie.bus.codec import RUNNER_DECODER, encode, now_ms
from valkyrie.bus.credentials import Credentials, auth_dir
from valkyrie.client.admin import Admin
from valkyrie.client.config import ConfigClient
from valkyrie.config.model import ValkyrieConfig
from valkyrie.runner import JobContext, Runner
from valkyrie.security.embedded import embedded_server, reload_embedded, secured_server
from valkyrie.security.store import AuthStore

pytestmark = [pytest.mark.nats, pytest.mark.security, pytest.mark.slow]
_VERDICT = msgspec.json.Decoder(dict)


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    with secured_up(tmp_path_factory.mktemp("secured")) as secured:
        secured.store.add_runner("r1")
        secured.store.add_runner("r2")
        secured.store.add_submitter("ci")
        secured.store.add_submitter("other")
        assert reload_embedded(secured.settings)
        yield secured


@asynccontextmanager
async def as_(inst: Secured, identity: str) -> AsyncIterator[Bus]:
    bus = await connect(inst.settings, credentials=inst.creds(identity), name=f"test-{identity}")
    try:
        yield bus
    finally:
        await bus.close()


@asynccontextmanager
async def attacker(inst: Secured, identity: str) -> AsyncIterator[Attacker]:
    who = await Attacker.connect(inst.url, inst.creds(identity))
    try:
        yield who
    finally:
        await who.close()


@asynccontextmanager
async def running_job(inst: Secured) -> AsyncIterator[str]:
    """Runner r1 (its own credentials) running a job admin submitted, until the block ends."""
    release = anyio.Event()

    async def hold(ctx: JobContext) -> JobResult:
        with anyio.move_on_after(60):
            await release.wait()
        return JobResult(exit_code=0, output_tail="the real result")

    async with as_(inst, "runner-r1") as rbus, as_(inst, "admin") as abus:
        reg = RunnerRegistration(
            runner_id="r1",
            capabilities=RunnerCapabilities(job_types=["held"]),
            max_concurrent_jobs=4,
            heartbeat_interval_ms=200,
        )
        runner = Runner(rbus, reg, hold, drain_timeout_s=5)
        async with anyio.create_task_group() as tg:
            await tg.start(runner.run)
            client = Client(abus)
            verdict = await client.submit({"job_type": "held", "payload": {"n": 1}})
            assert verdict is not None
            assert verdict.job_id is not None
            await client.wait_for_job(
                verdict.job_id, states=frozenset({JobState.RUNNING}), timeout_s=20
            )
            yield verdict.job_id
            release.set()
            runner.drain()


# -- who may connect at all ---------------------------------------------------------------------


async def test_an_anonymous_connection_is_refused_by_up(inst: Secured) -> None:
    nc = NatsClient()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nc.connect(inst.url, allow_reconnect=False, connect_timeout=3)
    await nc.close()
    with pytest.raises(ConnectError, match="requires credentials"):
        await connect(inst.settings.__class__.from_env({}, nats_url=inst.url, connect_timeout_s=2))


def test_the_cli_finds_admin_and_ops_in_the_data_dir(inst: Secured) -> None:
    env = inst.env()
    ok = subprocess.run(
        [sys.executable, "-m", "valkyrie", "jobs", "ls"], env=env, capture_output=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    env["VALKYRIE_NATS_IDENTITY"] = "ops"
    read_only = subprocess.run(
        [sys.executable, "-m", "valkyrie", "config", "set", "mode", "disabled"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert read_only.returncode != 0  # ops may not change the config: not stored


# -- what works ---------------------------------------------------------------------------------


async def test_a_runner_with_its_own_credentials_runs_a_job_to_the_end(inst: Secured) -> None:
    async with running_job(inst) as job_id:
        pass  # the runner is told to finish the job as the block ends
    async with as_(inst, "admin") as bus:
        record = await Client(bus).wait_for_job(job_id, timeout_s=20)
    assert record.state == JobState.SUCCEEDED
    assert record.result is not None
    assert record.result.output_tail == "the real result"
    assert record.submitted_by == "admin"


async def test_a_submitter_submits_and_reads_its_own_job(inst: Secured) -> None:
    async with as_(inst, "submitter-ci") as bus:
        client = Client(bus, requested_by="submitter-ci:pipeline-7")
        verdict = await client.submit({"job_type": "nobody-runs-this"})
        assert verdict is not None
        assert verdict.accepted
        assert verdict.job_id
        record = await client.get_job(verdict.job_id)
        assert record.submitted_by == "submitter-ci:pipeline-7"
        await Admin(bus, actor="someone-else").cancel_job(verdict.job_id)
        done = await client.wait_for_job(verdict.job_id, timeout_s=20)
        assert done.state == JobState.CANCELLED
        assert "(by submitter-ci)" in (done.reason or "")


async def test_the_gateway_submits_as_itself_for_the_http_caller(inst: Secured) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{inst.http_port}") as http:
        created = await http.post("/api/v2/jobs", json={"job_type": "nobody-runs-this"})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    async with as_(inst, "admin") as bus:
        assert (await Client(bus).get_job(job_id)).submitted_by == "http:anonymous"

        async def audited() -> bool:
            return any(e.data.get("job_id") == job_id for e in await audits_of(bus))

        await wait_until(audited, timeout_s=10)
        audit = next(e for e in await audits_of(bus) if e.data.get("job_id") == job_id)
        assert audit.type == "audit.job_submit"
        assert audit.data["bus_identity"] == "gateway"


# -- the attacks ----------------------------------------------------------------------------------


async def test_a_runner_cannot_submit_nor_read_dispatches(inst: Secured) -> None:
    async with attacker(inst, "runner-r2") as r2:
        for subject in ("valkyrie.jobs.submit", "valkyrie.jobs.submit.admin"):
            assert "publish" in await r2.refuses_publish(subject, {"job_type": "x"})
        for subject in ("valkyrie.dispatch.>", "valkyrie.dispatch.r1", "_INBOX.>"):
            assert "subscription" in await r2.refuses_subscribe(subject)
    async with attacker(inst, "ops") as ops:
        assert "subscription" in await ops.refuses_subscribe("valkyrie.dispatch.>")


async def test_nobody_but_its_handler_reads_kv_or_uses_the_jetstream_api(inst: Secured) -> None:
    get_job = "$JS.API.DIRECT.GET.KV_valkyrie_jobs.$KV.valkyrie_jobs.any"
    get_runner = "$JS.API.DIRECT.GET.KV_valkyrie_runners.$KV.valkyrie_runners.r1"
    secrets = "$JS.API.DIRECT.GET.KV_valkyrie_secrets.$KV.valkyrie_secrets.any"
    delete = "$JS.API.STREAM.DELETE.VALKYRIE_EVENTS"
    for identity, subjects in {
        "runner-r2": [get_job, get_runner, delete, "$JS.API.INFO"],
        "submitter-ci": [get_runner, secrets, delete, "$JS.API.CONSUMER.CREATE.VALKYRIE_EVENTS"],
        "ops": [secrets, delete, "$JS.API.STREAM.PURGE.VALKYRIE_SUBMIT"],
        "admin": [secrets, delete],
        "gateway": [secrets, delete, "$JS.API.CONSUMER.DELETE.VALKYRIE_EVENTS.dispatcher"],
        "intake": [delete, "$JS.API.CONSUMER.MSG.NEXT.VALKYRIE_EVENTS.dispatcher"],
    }.items():
        async with attacker(inst, identity) as who:
            for subject in subjects:
                refusal = await who.refuses_request(subject, b"")
                assert subject.lower() in refusal.lower(), (identity, refusal)


async def test_a_runner_cannot_finish_another_runners_job(inst: Secured) -> None:
    async with running_job(inst) as job_id:
        forged = JobFinished(
            job_id=job_id,
            attempt=1,
            runner_id="r1",
            at_ms=now_ms(),
            outcome="succeeded",
            result=JobResult(exit_code=0, output_tail="forged"),
        )
        async with attacker(inst, "runner-r2") as r2:
            refusal = await r2.refuses_publish("valkyrie.updates.r1", forged)
            assert "valkyrie.updates.r1" in refusal
            # on its own subject, naming the other runner in the body: the handler refuses it
            await r2.nc.jetstream().publish("valkyrie.updates.r2", encode(forged))
        async with as_(inst, "admin") as bus:

            async def refused() -> bool:
                letters = await dead_letters(bus, "results")
                return any("a runner may speak only for itself" in d.reason for d in letters)

            await wait_until(refused, timeout_s=15)
            record = await Client(bus).get_job(job_id)
            assert record.state == JobState.RUNNING
            assert record.runner_id == "r1"


async def test_a_runner_cannot_take_over_nor_keep_alive_another_runner(inst: Secured) -> None:
    async with running_job(inst) as job_id, attacker(inst, "runner-r2") as r2:
        takeover = RunnerRegistration(runner_id="r1", session_id="impostor")
        for subject in ("valkyrie.runners.register.r1", "valkyrie.runners.register"):
            assert "publish" in await r2.refuses_request(subject, encode(takeover))
        answer = await r2.nc.request("valkyrie.runners.register.r2", encode(takeover), timeout=5)
        verdict = _VERDICT.decode(answer.data)
        assert not verdict["accepted"]
        assert "speak only for itself" in verdict["errors"][0]["reason"]
        beat = RunnerHeartbeat(runner_id="r1", sent_at_ms=now_ms(), session_id="x")
        assert "publish" in await r2.refuses_publish("valkyrie.runners.heartbeat.r1", beat)
        deregister = {"runner_id": "r1"}
        for subject in ("valkyrie.runners.deregister.r1", "valkyrie.runners.admin.deregister"):
            assert "publish" in await r2.refuses_request(subject, encode(deregister))
        async with as_(inst, "admin") as bus:
            record = await Client(bus).get_job(job_id)
            assert record.runner_id == "r1"
            assert record.attempt == 1
            runners = await bus.kv("runners")
            r1 = RUNNER_DECODER.decode((await runners.get("r1")).value or b"")
            assert r1.registration.session_id != "impostor"


async def test_a_forged_heartbeat_does_not_keep_a_dead_runner_alive(inst: Secured) -> None:
    async with attacker(inst, "runner-r2") as r2:
        # r2 beats on its own subject for r1 (never registered here: nothing to keep alive)
        beat = RunnerHeartbeat(runner_id="r1", sent_at_ms=now_ms(), session_id="s")
        await r2.publish("valkyrie.runners.heartbeat.r2", beat)
    async with as_(inst, "admin") as bus:
        runners = await bus.kv("runners")
        try:
            entry = await runners.get("r2")
        except nats.js.errors.KeyNotFoundError:
            entry = None
        assert entry is None  # the body named r1: ignored, not recorded as r2's either


async def test_cancels_and_config_changes_come_from_the_proven_identity(inst: Secured) -> None:
    async with as_(inst, "admin") as bus:
        verdict = await Client(bus).submit({"job_type": "nobody-runs-this"})
        assert verdict is not None
        assert verdict.job_id is not None
        admins_job = verdict.job_id
    async with attacker(inst, "submitter-other") as other:
        cancel = CancelJob(job_id=admins_job, requested_by="cli:admin")
        assert "publish" in await other.refuses_publish("valkyrie.jobs.cancel.admin", cancel)
        change = ConfigChange(set={"http.auth_required": True}, requested_by="admin")
        for subject in ("valkyrie.config.change", "valkyrie.config.change.admin"):
            assert "publish" in await other.refuses_publish(subject, change)
        # on its own subject: a submitter may cancel only its own jobs
        await other.nc.jetstream().publish("valkyrie.jobs.cancel.submitter-other", encode(cancel))
    async with as_(inst, "admin") as bus:

        async def refused() -> bool:
            letters = await dead_letters(bus, "canceller")
            return any("only the jobs it submitted" in d.reason for d in letters)

        await wait_until(refused, timeout_s=15)
        assert (await Client(bus).get_job(admins_job)).state == JobState.QUEUED
        # the admin's own change is recorded as the admin's, whatever the body claims
        verdict2 = await ConfigClient(bus, actor="mallory").change(
            set_values={"dispatch.max_queue_scan": 99}
        )
        assert verdict2.accepted
        current = await ConfigClient(bus).current()
        assert current is not None
        assert current.changed_by == "admin"


async def test_only_the_config_handler_writes_the_config_bucket(inst: Secured) -> None:
    for identity in ("admin", "gateway", "ops", "submitter-ci", "runner-r2", "monitor"):
        async with attacker(inst, identity) as who:
            refusal = await who.refuses_request("$KV.valkyrie_config.current", b"{}")
            assert "$kv.valkyrie_config.current" in refusal.lower()


async def test_audit_and_events_cannot_be_forged(inst: Secured) -> None:
    forged = {"id": "x", "type": "audit.job_cancel", "subject_id": "admin"}
    for identity in ("runner-r2", "submitter-ci", "ops", "admin"):
        async with attacker(inst, identity) as who:
            for subject in ("valkyrie.audit.admin.job_cancel", "valkyrie.events.job.x.succeeded"):
                assert "publish" in await who.refuses_publish(subject, forged)
    async with as_(inst, "admin") as bus:
        assert all(e.data.get("bus_identity") in (None, "gateway") for e in await audits_of(bus))


async def test_a_reply_goes_only_to_the_senders_own_inbox(inst: Secured) -> None:
    async with as_(inst, "runner-r1") as r1bus, attacker(inst, "submitter-ci") as ci:
        heard: list[bytes] = []

        async def note(msg: Msg) -> None:
            heard.append(msg.data)

        await r1bus.nc.subscribe("valkyrie.dispatch.r1", cb=note)
        await r1bus.nc.flush()
        for target in ("valkyrie.dispatch.r1", "_INBOX_admin.stolen", "_INBOX.x"):
            await ci.nc.jetstream().publish(
                "valkyrie.jobs.submit.submitter-ci",
                encode({"job_type": "nobody-runs-this"}),
                headers={"Valkyrie-Reply-To": target},
            )
        async with as_(inst, "admin") as bus:

            async def stored() -> bool:
                jobs = await Client(bus).list_jobs()
                return sum(j.submitted_by == "submitter-ci" for j in jobs) >= 3

            await wait_until(stored, timeout_s=15)
        await anyio.sleep(0.5)
        assert heard == []  # no verdict was published on the runner's dispatch subject


async def test_revoking_a_runner_disconnects_it_for_good(inst: Secured) -> None:
    inst.store.add_runner("doomed")
    assert reload_embedded(inst.settings)
    async with attacker(inst, "runner-doomed") as doomed:
        await doomed.publish("valkyrie.runners.heartbeat.doomed", {"runner_id": "doomed"})
        inst.store.revoke("runner-doomed")
        assert reload_embedded(inst.settings)
        await wait_until(lambda: _closed(doomed), timeout_s=10)
        assert any("Authorization Violation" in e for e in doomed.errors) or doomed.nc.is_closed
    with pytest.raises(ConfigError, match="does not exist"):
        await Attacker.connect(inst.url, inst.creds("runner-doomed"))  # its seed is gone too


async def _closed(who: Attacker) -> bool:
    return who.nc.is_closed or not who.nc.is_connected


async def test_securing_keeps_the_store_an_open_server_left_and_encrypts_it(
    tmp_path: Path,
) -> None:
    settings = Settings.from_env(
        {}, data_dir=str(tmp_path), embedded_port=0, prefix="keep", events_max_bytes=2**23
    )
    server = embedded_server(settings)
    await server.astart()
    try:
        bus = await connect(msgspec.structs.replace(settings, nats_url=server.url))
        await bus.provision(ValkyrieConfig())
        await bus.js.publish("keep.events.job.x.queued", b"a secret in clear")
        await bus.close()
    finally:
        await server.astop()
    secured = secured_server(settings)  # what valkyrie up does on its next start
    await secured.astart()
    try:
        creds = Credentials(
            identity="provisioner", nkey_file=AuthStore(auth_dir(settings)).creds("provisioner")
        )
        url = msgspec.structs.replace(settings, nats_url=secured.url)
        bus = await connect(url, credentials=creds)
        try:
            info = await bus.js.stream_info("KEEP_EVENTS")
            assert info.state.messages == 1  # kept, now in the VALKYRIE account
        finally:
            await bus.close()
    finally:
        await secured.astop()
    jetstream = tmp_path / "nats" / "jetstream"
    stored = b"".join(p.read_bytes() for p in jetstream.rglob("*.blk"))
    assert stored
    assert b"a secret in clear" not in stored  # encrypted at rest
    assert not (jetstream / "jetstream" / "$G").exists()
