"""The web console over HTTP: the same auth and scopes as the API, and views that read cheaply."""

from __future__ import annotations

import anyio
import pytest

from schemas import JobState
from tests._gateway_helpers import auth_environ, bearer, gateway
from tests._helpers import wait_until
from tests._sched_helpers import submit
from valkyrie import Client, Settings
from valkyrie.gateway.console import _data
from valkyrie.gateway.console._html import age, esc, link, table
from valkyrie.testing import SimulatedRunner


def test_html_helpers_escape_everything() -> None:
    assert esc("<b>&'\"") == "&lt;b&gt;&amp;&#x27;&quot;"
    assert esc(esc("<")) == "&lt;"  # already safe: not escaped twice
    assert link("/console/queue", "<x>", {"labels": "os=a&b", "region": None}) == (
        '<a href="/console/queue?labels=os%3Da%26b" data-nav>&lt;x&gt;</a>'
    )
    assert "<td>&lt;script&gt;</td>" in table(["a"], [("<script>",)])
    assert age(850) == "850 ms"
    assert age(12_340) == "12.3 s"
    assert age(245_000) == "4 min 05 s"
    assert age(7_380_000) == "2 h 03 min"


@pytest.mark.nats
async def test_the_shell_is_open_and_the_fragments_need_jobs_read(settings: Settings) -> None:
    async with gateway(settings, environ=auth_environ()) as gw:
        shell = await gw.http.get("/console/queue")
        assert shell.status_code == 200
        assert shell.headers["content-type"].startswith("text/html")
        csp = shell.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        assert '<script src="/console-static/console.js"' in shell.text
        script = await gw.http.get("/console-static/console.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert (await gw.http.get("/console-static/other.js")).status_code == 404
        for path in ("overview", "queue", "jobs", "runners", "events"):
            anonymous = await gw.http.get(f"/console/fragments/{path}")
            assert anonymous.status_code == 401, path
            seen = await gw.http.get(f"/console/fragments/{path}", headers=bearer("reader"))
            assert seen.status_code == 200, (path, seen.text)
            assert seen.headers["cache-control"] == "no-store"


@pytest.mark.nats
async def test_actions_show_only_for_tokens_that_may_use_them(settings: Settings) -> None:
    async with gateway(settings, environ=auth_environ()) as gw, anyio.create_task_group() as tg:
        stop = anyio.Event()
        await tg.start(SimulatedRunner(gw.bus, "c1", capacity=1).run, stop)
        job_id = await submit(Client(gw.bus), labels={"os": "plan9"})

        async def listed() -> bool:
            page = await gw.http.get("/console/fragments/queue", headers=bearer("reader"))
            return job_id in page.text and "rejected because their labels" in page.text

        await wait_until(listed, timeout_s=10)
        as_reader = await gw.http.get("/console/fragments/queue", headers=bearer("reader"))
        assert 'data-action="cancel"' not in as_reader.text
        as_writer = await gw.http.get("/console/fragments/queue", headers=bearer("writer"))
        assert f'data-action="cancel" data-job-id="{job_id}"' in as_writer.text
        runners = await gw.http.get("/console/fragments/runners", headers=bearer("writer"))
        assert 'data-runner-id="c1"' in runners.text
        assert 'data-action="drain"' not in runners.text
        runners = await gw.http.get("/console/fragments/runners", headers=bearer("admin"))
        assert 'data-action="drain" data-runner-id="c1" data-drain="true"' in runners.text
        job = await gw.http.get(f"/console/fragments/job/{job_id}", headers=bearer("reader"))
        assert 'data-job-state="queued"' in job.text
        assert "their labels do not match" in job.text
        assert 'data-event="job.queued"' in job.text
        missing = await gw.http.get("/console/fragments/job/nope", headers=bearer("reader"))
        assert missing.status_code == 404
        stop.set()
        tg.cancel_scope.cancel()


@pytest.mark.nats
async def test_recent_jobs_page_backwards_through_the_bucket(settings: Settings) -> None:
    async with gateway(settings, handlers=["intake"]) as gw:
        client = Client(gw.bus)
        ids = [await submit(client, metadata={"n": str(n)}) for n in range(7)]
        first = await _data.recent_jobs(gw.bus, before=None, limit=3, states=None)
        assert [r.id for r in first.jobs] == ids[::-1][:3]
        assert first.before is not None
        second = await _data.recent_jobs(gw.bus, before=first.before, limit=3, states=None)
        assert [r.id for r in second.jobs] == ids[::-1][3:6]
        rest = await _data.recent_jobs(gw.bus, before=second.before, limit=3, states=None)
        assert [r.id for r in rest.jobs] == ids[:1]
        assert rest.before is None
        none = await _data.recent_jobs(gw.bus, before=None, limit=3, states={JobState.SUCCEEDED})
        assert none.jobs == []
        assert none.before is None
        page = await gw.http.get("/console/fragments/jobs?limit=3")
        assert page.status_code == 200
        assert all(i in page.text for i in ids[::-1][:3])
        assert f"before={first.before}" in page.text
