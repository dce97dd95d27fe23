"""Requests that used to break the server: deep nesting, malformed config keys, and reused
idempotency keys or job ids with another body, over HTTP and on the bus."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from schemas import MAX_JSON_DEPTH, ConfigVerdict, JobState, RegistrationVerdict, too_deep
from tests._gateway_helpers import gateway, problem
from valkyrie import Client, Settings
from valkyrie.bus.codec import encode
from valkyrie.client.config import ConfigClient
from valkyrie.client.jobs import REPLY_TO_HEADER
from valkyrie.domain.intake import read_token, request_digest, token_for

pytestmark = pytest.mark.nats

JSON = {"content-type": "application/json"}


def nested(depth: int) -> str:
    """A JSON value ``depth`` levels of arrays deep."""
    return "[" * depth + "]" * depth


def submission(payload_depth: int) -> str:
    """A submission whose body nests ``payload_depth + 1`` levels (the body object is one)."""
    return '{"job_type": "deep", "payload": ' + nested(payload_depth) + "}"


def test_depth_is_measured_on_the_text() -> None:
    assert not too_deep(nested(MAX_JSON_DEPTH))
    assert too_deep(nested(MAX_JSON_DEPTH + 1))
    assert too_deep(nested(100_000))
    # brackets inside strings are not nesting; escaped quotes do not end a string
    assert not too_deep(json.dumps({"s": "[" * 500, "t": '\\"[' * 200}))
    mixed = '{"a": ' * 40 + "[" * 30 + "]" * 30 + "}" * 40
    assert too_deep(mixed)
    assert not too_deep(mixed, 70)


# one for every route that takes a body; the deep document is sent as the whole body
BODY_ROUTES = [
    ("POST", "/api/v2/jobs"),
    ("POST", "/api/v1/jobs"),
    ("POST", "/api/v2/runners/register"),
    ("PUT", "/api/v2/runners/r1/status"),
    ("PUT", "/api/v2/config/valkyrie"),
    ("PUT", "/api/v2/config/valkyrie?merge=true"),
    ("POST", "/api/v2/config/valkyrie/validate"),
    ("POST", "/api/v2/integration/fallback"),
]


async def test_deep_bodies_are_refused_on_every_route_and_nothing_is_stored(
    settings: Settings,
) -> None:
    async with gateway(settings) as gw:
        for method, path in BODY_ROUTES:
            for depth in (MAX_JSON_DEPTH + 1, 968, 100_000):
                response = await gw.http.request(
                    method, path, content='{"a": ' + nested(depth - 1) + "}", headers=JSON
                )
                assert response.status_code == 400, (method, path, depth, response.text)
                body = problem(response)
                assert body["type"].endswith("/too-deep")
                assert body["errors"][0]["path"] == "$"
                assert str(MAX_JSON_DEPTH) in body["errors"][0]["reason"]
        # submissions just past the limit and far past it: refused, and nothing stored
        for depth in (MAX_JSON_DEPTH, 967, 968, 969, 5000):
            response = await gw.http.post("/api/v2/jobs", content=submission(depth), headers=JSON)
            assert response.status_code == 400, (depth, response.text)
        info = await gw.bus.js.stream_info(gw.bus.names.stream("submit"))
        assert (info.state.messages, info.state.last_seq) == (0, 0)
        # at the limit: accepted, and every read of it works
        ok = await gw.http.post(
            "/api/v2/jobs", content=submission(MAX_JSON_DEPTH - 1), headers=JSON
        )
        assert ok.status_code == 201, ok.text
        job_id = ok.json()["job_id"]
        listed = await gw.http.get("/api/v2/jobs")
        assert listed.status_code == 200
        assert [j["id"] for j in listed.json()["jobs"]] == [job_id]
        assert (await gw.http.get(f"/api/v2/jobs/{job_id}")).status_code == 200
        assert (await gw.http.delete(f"/api/v2/jobs/{job_id}")).status_code == 202


async def test_deep_documents_are_refused_on_the_bus_too(settings: Settings) -> None:
    async with gateway(settings) as gw:
        client = Client(gw.bus)
        verdict = await client.submit(submission(2000).encode())
        assert verdict is not None
        assert not verdict.accepted
        assert verdict.errors[0].path == "$"
        assert "nested deeper" in verdict.errors[0].reason
        assert await client.list_jobs() == []
        # a config change, published as raw bytes (ConfigClient would not build one)
        inbox = gw.bus.nc.new_inbox()
        sub = await gw.bus.nc.subscribe(inbox, max_msgs=1)
        deep_change = '{"set": {"mode": ' + nested(5000) + "}}"
        await gw.bus.js.publish(
            gw.bus.names.config_change, deep_change.encode(), headers={REPLY_TO_HEADER: inbox}
        )
        answer = msgspec.json.decode((await sub.next_msg(timeout=10)).data, type=ConfigVerdict)
        assert not answer.accepted
        assert "nested deeper" in answer.errors[0].reason
        assert (await gw.http.get("/api/v2/config/valkyrie")).json()["revision"] == 0
        # a registration too deep to decode is refused like any unreadable one, not a crash
        deep_registration = '{"runner_id": "r1", "labels": ' + nested(100_000) + "}"
        reply = await gw.bus.nc.request(
            gw.bus.names.register, deep_registration.encode(), timeout=5
        )
        refused = msgspec.json.decode(reply.data, type=RegistrationVerdict)
        assert not refused.accepted
        assert refused.errors[0].path == "$"


async def test_a_stored_deep_job_does_not_break_the_list(settings: Settings) -> None:
    """A record stored before the limit (written here straight into the bucket) is left out of
    the list, and reading it alone is a clear 409, never a 500."""
    async with gateway(settings) as gw:
        ok = await gw.http.post("/api/v2/jobs", json={"job_type": "fine"})
        assert ok.status_code == 201
        record = ok.json()["job"]
        deep = json.dumps({**record, "id": "deep-one"}, separators=(",", ":")).replace(
            '"payload":null', '"payload":' + nested(960)
        )
        assert too_deep(deep, 900)
        kv = await gw.bus.kv("jobs")
        await kv.put("deep-one", deep.encode())
        listed = await gw.http.get("/api/v2/jobs")
        assert listed.status_code == 200, listed.text
        assert [j["id"] for j in listed.json()["jobs"]] == [record["id"]]
        for response in (
            await gw.http.get("/api/v2/jobs/deep-one"),
            await gw.http.get("/api/v1/jobs/deep-one"),
            await gw.http.delete("/api/v2/jobs/deep-one"),
        ):
            assert response.status_code == 409, response.text
            assert problem(response)["type"].endswith("/unreadable-record")


EMPTY_KEYS: list[Any] = [
    {"features": {"": [], "zzz": True}},
    {"features": [], "features.zzz": True},
    {"": 1},
    {"features..x": 1},
    {"dispatch": {"a.b": 1}},
]


async def test_malformed_config_keys_are_errors_not_crashes(settings: Settings) -> None:
    async with gateway(settings) as gw:
        for doc in EMPTY_KEYS:
            validated = await gw.http.post("/api/v2/config/valkyrie/validate", json=doc)
            assert validated.status_code == 200, (doc, validated.text)
            assert validated.json()["valid"] is False
            assert validated.json()["errors"]
            for path in ("/api/v2/config/valkyrie", "/api/v2/config/valkyrie?merge=true"):
                changed = await gw.http.put(path, json=doc)
                assert changed.status_code == 422, (doc, path, changed.text)
                assert problem(changed)["errors"]
        # the config handler, reached on the bus without the gateway's checks
        config = ConfigClient(gw.bus)
        for doc in EMPTY_KEYS:
            for verdict in (
                await config.change(replace=doc),
                await config.change(set_values=doc),
            ):
                assert not verdict.accepted, doc
                assert verdict.errors, doc
        assert (await gw.http.get("/api/v2/config/valkyrie")).json()["revision"] == 0


async def test_a_reused_key_or_job_id_with_another_body_is_refused(settings: Settings) -> None:
    async with gateway(settings) as gw:
        key = {"Idempotency-Key": "deploy-7"}
        first = await gw.http.post(
            "/api/v2/jobs", json={"job_type": "a", "priority": 1}, headers=key
        )
        assert first.status_code == 201
        job_id = first.json()["job_id"]
        # the same body (keys in another order, the key in the body instead): the first job
        same = await gw.http.post(
            "/api/v2/jobs",
            content=b'{"priority": 1, "job_type": "a", "idempotency_key": "deploy-7"}',
            headers=JSON,
        )
        assert same.status_code == 200, same.text
        assert (same.json()["job_id"], same.json()["duplicate"]) == (job_id, True)
        assert same.json()["state"] == first.json()["state"]
        # another body: 422 per the IETF Idempotency-Key draft, naming the first job
        for route, body in (
            ("/api/v2/jobs", {"job_type": "a", "priority": 2}),
            ("/api/v1/jobs", {"type": "a"}),
        ):
            other = await gw.http.post(route, json=body, headers=key)
            assert other.status_code == 422, other.text
            refused = problem(other)
            assert refused["type"].endswith("/idempotency-key-reused")
            assert refused["errors"][0]["path"] == "$.idempotency_key"
            assert job_id in refused["errors"][0]["reason"]
        # a client job id: the same
        made = await gw.http.post("/api/v2/jobs", json={"job_type": "a", "job_id": "mine-1"})
        assert made.status_code == 201
        again = await gw.http.post("/api/v2/jobs", json={"job_type": "a", "job_id": "mine-1"})
        assert (again.status_code, again.json()["duplicate"]) == (200, True)
        clash = await gw.http.post("/api/v2/jobs", json={"job_type": "b", "job_id": "mine-1"})
        assert clash.status_code == 422
        assert problem(clash)["errors"][0]["path"] == "$.job_id"
        jobs = (await gw.http.get("/api/v2/jobs")).json()["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted([job_id, "mine-1"])
        assert (await gw.http.get("/api/v2/jobs/mine-1")).json()["spec"]["job_type"] == "a"


async def test_the_bus_verdict_refuses_a_reused_key_with_another_body(settings: Settings) -> None:
    async with gateway(settings) as gw:
        client = Client(gw.bus)
        first = await client.submit({"job_type": "a", "idempotency_key": "k-1"})
        assert first is not None
        assert first.accepted
        assert first.job_id
        repeat = await client.submit({"job_type": "a", "idempotency_key": "k-1"})
        assert repeat is not None
        assert (repeat.accepted, repeat.duplicate, repeat.job_id) == (True, True, first.job_id)
        assert repeat.state is not None  # the first job's state, not null
        other = await client.submit({"job_type": "zzz", "idempotency_key": "k-1"})
        assert other is not None
        assert (other.accepted, other.duplicate, other.job_id) == (False, True, first.job_id)
        assert other.errors[0].path == "$.idempotency_key"
        # the token keeps the first job's id and its request digest
        kv = await gw.bus.kv("idempotency")
        token = token_for("k-1", None)
        assert token is not None
        stored = (await kv.get(token)).value
        assert stored is not None
        assert read_token(stored) == (first.job_id, request_digest({"job_type": "a"}))
        # a Nats-Msg-Id repeat the stream drops: the client compares the digest itself
        one = await client.submit({"job_type": "m"}, msg_id="msg-1")
        assert one is not None
        assert one.accepted
        dropped_same = await client.submit({"job_type": "m"}, msg_id="msg-1")
        assert dropped_same is not None
        assert (dropped_same.accepted, dropped_same.job_id) == (True, one.job_id)
        assert dropped_same.state in set(JobState)
        dropped_other = await client.submit({"job_type": "n"}, msg_id="msg-1")
        assert dropped_other is not None
        assert not dropped_other.accepted
        assert dropped_other.errors[0].path == "header.Nats-Msg-Id"
        assert len(await client.list_jobs()) == 2


def test_the_digest_ignores_key_order_and_the_key_itself() -> None:
    a = request_digest({"job_type": "x", "payload": {"b": 1, "a": [1, 2]}})
    b = request_digest(
        msgspec.json.decode(
            b'{"payload": {"a": [1, 2], "b": 1}, "idempotency_key": "k", "job_type": "x"}'
        )
    )
    assert a == b
    assert a != request_digest({"job_type": "x", "payload": {"b": 1, "a": [2, 1]}})
    assert a != request_digest({"job_type": "x", "payload": {"b": 1.0, "a": [1, 2]}})
    assert encode({"b": 1, "a": 2}) != encode({"a": 2, "b": 1})  # why the digest sorts keys


def test_the_digest_holds_no_secret_value() -> None:
    # a stored hash of a short password would let a reader of the record guess it
    body = {"job_type": "x", "secret_env": {"DB_PASSWORD": "hunter2"}}
    digest = request_digest(body)
    assert digest == request_digest({"job_type": "x", "secret_env": {"DB_PASSWORD": "other"}})
    assert digest != request_digest({"job_type": "x", "secret_env": {"API_TOKEN": "hunter2"}})
    assert digest != request_digest({"job_type": "x"})
    assert body["secret_env"] == {"DB_PASSWORD": "hunter2"}  # the body itself is untouched


async def test_strict_submissions_refuse_unknown_fields(settings: Settings) -> None:
    typo = {"job_type": "x", "requirments": {"cpu_cores": 1}, "requirements": {"cpu_core": 2}}
    async with gateway(settings) as gw:
        lenient = await gw.http.post("/api/v2/jobs", json=typo)
        assert lenient.status_code == 201
        assert lenient.json()["warnings"] == [
            {"path": "$.requirments", "reason": "unknown field, ignored"},
            {"path": "$.requirements.cpu_core", "reason": "unknown field, ignored"},
        ]
        for route in ("/api/v2/jobs", "/api/v1/jobs"):
            strict = await gw.http.post(route, json=typo, params={"strict": "true"})
            assert strict.status_code == 422, strict.text
            assert {e["path"] for e in problem(strict)["errors"]} == {
                "$.requirments",
                "$.requirements.cpu_core",
            }
        # the ancestor's names are converted, not unknown: strict accepts them
        ancestor = await gw.http.post(
            "/api/v2/jobs",
            json={"job_type": "x", "requirements": {"max_execution_time": 60}},
            params={"strict": "true"},
        )
        assert ancestor.status_code == 201, ancestor.text
        client = Client(gw.bus)
        refused = await client.submit(typo, strict=True)
        assert refused is not None
        assert not refused.accepted
        assert all("strict" in e.reason for e in refused.errors)
        accepted = await client.submit(typo)
        assert accepted is not None
        assert accepted.accepted
        assert [w.path for w in accepted.warnings] == ["$.requirments", "$.requirements.cpu_core"]
