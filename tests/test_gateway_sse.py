"""Live events over SSE, served by uvicorn: ids are stream sequences, resume with Last-Event-ID."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

from tests._gateway_helpers import served
from valkyrie import Settings

pytestmark = pytest.mark.nats


@dataclass
class Message:
    id: int | None = None
    event: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)


async def messages(response: httpx.Response) -> AsyncIterator[Message]:
    """SSE messages (comment-only blocks too), as a browser's EventSource would split them."""
    current = Message()
    async for line in response.aiter_lines():
        if line == "":
            yield current
            current = Message()
        elif line.startswith(":"):
            current.comments.append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                current.id = int(value)
            elif name == "event":
                current.event = value
            elif name == "data":
                current.data += value


async def until(stream: AsyncIterator[Message], event_type: str) -> list[Message]:
    seen: list[Message] = []
    with anyio.fail_after(10):
        async for message in stream:
            seen.append(message)
            if message.event == event_type:
                return seen
    raise AssertionError(f"stream ended before {event_type}")


async def test_stream_and_resume(settings: Settings) -> None:
    async with served(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        url = "/api/v2/events"
        async with http.stream("GET", url, params={"filter": "job.>"}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            stream = messages(response)
            first = await anext(stream)
            assert first.comments == ["events job.>"]
            job = (await http.post("/api/v2/jobs", json={"job_type": "build"})).json()["job_id"]
            seen = await until(stream, "job.queued")
        queued = seen[-1]
        assert queued.id is not None
        event = json.loads(queued.data)
        assert event["type"] == "job.queued"
        assert event["subject_id"] == job

        # while disconnected: another job is submitted and cancelled
        other = (await http.post("/api/v2/jobs", json={"job_type": "build"})).json()["job_id"]
        assert (await http.delete(f"/api/v2/jobs/{other}")).status_code == 202
        headers = {"Last-Event-ID": str(queued.id)}
        async with http.stream("GET", url, params={"filter": "job.>"}, headers=headers) as again:
            resumed = await until(messages(again), "job.cancelled")
        events = [m for m in resumed if m.event is not None]
        assert all(m.id is not None and m.id > queued.id for m in events)
        assert [(m.event, json.loads(m.data)["subject_id"]) for m in events] == [
            ("job.queued", other),
            ("job.cancelled", other),
        ]
        # the query parameter works the same for clients that cannot set headers
        params = {"filter": f"job.{other}.>", "last_event_id": "0"}
        async with http.stream("GET", url, params=params) as replay:
            replayed = await until(messages(replay), "job.cancelled")
        assert [m.event for m in replayed if m.event] == ["job.queued", "job.cancelled"]


async def test_heartbeats_keep_idle_streams_alive(settings: Settings) -> None:
    async with served(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        params = {"filter": "runner.>", "heartbeat_s": "0.5"}
        async with http.stream("GET", "/api/v2/events", params=params) as response:
            stream = messages(response)
            with anyio.fail_after(5):
                beats = 0
                async for message in stream:
                    if "heartbeat" in message.comments:
                        beats += 1
                        if beats == 2:
                            break


async def test_bad_filters_and_ids(settings: Settings) -> None:
    async with served(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for params in ({"filter": "job.>.x"}, {"filter": "job..x"}, {"heartbeat_s": "0"}):
            response = await http.get("/api/v2/events", params=params)
            assert response.status_code == 422, params
            assert response.headers["content-type"].startswith("application/problem+json")
        response = await http.get("/api/v2/events", headers={"Last-Event-ID": "abc"})
        assert response.status_code == 422


async def test_open_streams_end_when_the_gateway_stops(settings: Settings) -> None:
    ended = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with served(settings) as gw:
            connected = anyio.Event()

            async def reader() -> None:
                async with (
                    httpx.AsyncClient(base_url=gw.url) as http,
                    http.stream("GET", "/api/v2/events") as response,
                ):
                    connected.set()
                    async for _line in response.aiter_lines():
                        pass
                ended.set()

            tg.start_soon(reader)
            with anyio.fail_after(5):
                await connected.wait()
        with anyio.fail_after(10):
            await ended.wait()
