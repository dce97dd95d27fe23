"""The web console in a real browser against ``valkyrie up --runners 2`` (with auth required).

Also the issue's "done when": a job on a label no runner has reads 1 in the queue-depth series of
its label set, its oldest-age series grows, the console shows it with its reason, and service
discovery lists every running handler.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests._browser import chromium, click, screenshot, wait_for
from tests._gateway_helpers import TOKENS, auth_environ
from tests._helpers import (
    ROOT,
    config_for_test,
    env_for,
    free_port,
    settings_for,
    spawn,
    stop_process,
    unique_prefix,
)
from tests._metrics_helpers import parse, value
from valkyrie import Settings
from valkyrie.runtime import discover_handlers

# one `valkyrie up` for the module: its tests run on one xdist worker, in file order
pytestmark = [
    pytest.mark.nats,
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.xdist_group("console-browser"),
]

IMPOSSIBLE_GROUP = {"job_type": "shell", "region": "-", "labels": "os=plan9"}


@dataclass
class Up:
    """``valkyrie up --runners 2`` in a subprocess: where its API and metrics are."""

    url: str
    metrics_url: str
    settings: Settings
    log: Path

    def headers(self, token: str = "writer") -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKENS[token][0]}"}

    def submit(self, body: dict[str, Any]) -> str:
        response = httpx.post(f"{self.url}/api/v2/jobs", json=body, headers=self.headers())
        assert response.status_code == 201, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v2/jobs/{job_id}", headers=self.headers("reader"))
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found


@pytest.fixture(scope="module")
def up(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    settings = settings_for(nats_url, unique_prefix())
    http_port, metrics_port = free_port(), free_port()
    config = config_for_test(
        settings,
        environ=auth_environ(),
        observability__metrics_port=metrics_port,
    )
    log = tmp_path_factory.mktemp("up") / "up.log"
    proc = spawn(["up", "--runners", "2", "--http-port", str(http_port)], settings, log, config)
    started = Up(
        f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics", settings, log
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                runners = httpx.get(
                    f"{started.url}/api/v2/runners", headers=started.headers("reader")
                )
                if runners.status_code == 200 and len(runners.json()["runners"]) == 2:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield started
    finally:
        stop_process(proc)


def _queue_series(up: Up) -> tuple[float | None, float | None]:
    _, samples = parse(httpx.get(up.metrics_url).text)
    return (
        value(samples, "valkyrie_queue_depth_jobs", **IMPOSSIBLE_GROUP),
        value(samples, "valkyrie_queue_oldest_age_seconds", **IMPOSSIBLE_GROUP),
    )


def _use_token(driver: WebDriver, name: str) -> None:
    """Give the console a token through its form (shown by the first refused request)."""
    # the form is part of the page shell (never re-rendered)
    wait_for(driver, lambda d: d.find_element(By.ID, "token-form").is_displayed())
    driver.find_element(By.CSS_SELECTOR, "#token-form input").send_keys(TOKENS[name][0])
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()


def _open(driver: WebDriver, url: str, token: str) -> None:
    driver.get(url)
    # a fresh tab has no token: the first fragment is refused (401) and the form shows up
    _use_token(driver, token)
    wait_for(driver, lambda d: d.find_element(By.ID, "view").get_attribute("data-loaded"))


def test_done_when_a_job_nobody_can_take_shows_in_metrics_console_and_discovery(up: Up) -> None:
    job_id = up.submit(
        {"job_type": "shell", "labels": {"os": "plan9"}, "payload": {"command": ["true"]}}
    )
    deadline = time.monotonic() + 15
    depth, first_age = _queue_series(up)
    while depth != 1:
        assert time.monotonic() < deadline, f"queue depth for os=plan9 is {depth}"
        time.sleep(0.2)
        depth, first_age = _queue_series(up)
    assert first_age is not None
    time.sleep(1.5)
    depth, later_age = _queue_series(up)
    assert depth == 1
    assert later_age is not None
    assert later_age >= first_age + 1.0, (first_age, later_age)
    with chromium() as driver:
        _open(driver, f"{up.url}/console/queue?labels=os%3Dplan9", "reader")
        row = f'#queue-jobs tr[data-job-id="{job_id}"]'
        reason = wait_for(driver, lambda d: d.find_element(By.CSS_SELECTOR, f"{row} .reason").text)
        assert "rejected because their labels do not match {'os': 'plan9'}" in str(reason)
        # a reader sees no cancel button
        assert not driver.find_elements(By.CSS_SELECTOR, "button[data-action=cancel]")
        screenshot(driver, "console-queue")
        # the job's own page explains it in full
        click(driver, f"{row} a")
        summary = wait_for(
            driver,
            lambda d: (
                d.find_element(By.CSS_SELECTOR, f'.job[data-job-id="{job_id}"]')
                and d.find_element(By.CSS_SELECTOR, "p.summary").text
            ),
        )
        assert "no runner can take it" in str(summary)
        assert driver.find_elements(By.CSS_SELECTOR, '#timeline tr[data-event="job.queued"]')
        screenshot(driver, "console-job-queued")
    # `nats micro ls`'s question, asked by `valkyrie status`: every handler answers
    status = subprocess.run(
        [sys.executable, "-m", "valkyrie", "status"],
        env=env_for(up.settings, config_for_test(up.settings)),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert "PROCESS" in status.stdout, status.stdout + status.stderr
    handlers = set(discover_handlers())
    table = status.stdout[status.stdout.index("PROCESS") :]
    listed = {part for token in table.split() for part in token.split(",") if part in handlers}
    assert listed == handlers, status.stdout


def test_a_job_goes_from_queued_to_succeeded_live(up: Up) -> None:
    with chromium() as driver:
        _open(driver, f"{up.url}/console", "reader")
        # both runners busy for a moment, so the next job waits in the queue first
        for _ in range(2):
            up.submit({"job_type": "shell", "payload": {"command": ["sleep", "6"]}})
        job_id = up.submit({"job_type": "shell", "payload": {"command": ["echo", "hello console"]}})
        # the token stays in the tab: the job's page loads at once
        driver.get(f"{up.url}/console/jobs/{job_id}")
        job = f'.job[data-job-id="{job_id}"]'
        state = wait_for(
            driver, lambda d: d.find_element(By.CSS_SELECTOR, job).get_attribute("data-job-state")
        )
        assert state in ("queued", "dispatched"), state
        driver.execute_script("window.__sameDocument = true")
        # no reload: the live event stream brings every change
        wait_for(driver, lambda d: d.find_element(By.ID, "live").get_attribute("data-live") == "on")
        wait_for(
            driver,
            lambda d: (
                d.find_element(By.CSS_SELECTOR, job).get_attribute("data-job-state") == "succeeded"
            ),
            timeout_s=30,
        )
        assert driver.execute_script("return window.__sameDocument === true")
        log = wait_for(driver, lambda d: d.find_element(By.ID, "log").text)
        assert "hello console" in str(log)
        events = wait_for(
            driver,
            lambda d: [
                e.get_attribute("data-event")
                for e in d.find_elements(By.CSS_SELECTOR, "#timeline tr[data-event]")
            ],
        )
        assert isinstance(events, list)
        assert events[0] == "job.queued"
        assert events[-1] == "job.succeeded"
        assert "job.dispatched" in events
        # the side panel heard them live too
        assert driver.find_elements(
            By.CSS_SELECTOR, f'#events li[data-type="job.succeeded"][data-subject="{job_id}"]'
        )
        screenshot(driver, "console-job-succeeded")
    assert up.job(job_id)["state"] == "succeeded"


def test_cancel_a_job_from_the_console(up: Up) -> None:
    job_id = up.submit(
        {"job_type": "shell", "labels": {"os": "plan9"}, "payload": {"command": ["true"]}}
    )
    with chromium() as driver:
        _open(driver, f"{up.url}/console/jobs/{job_id}", "writer")
        job = f'.job[data-job-id="{job_id}"]'
        button = f'{job} button[data-action="cancel"]'
        click(driver, button)
        # it asks first: the button is armed, and a second click within 5 s confirms
        wait_for(
            driver, lambda d: d.find_element(By.CSS_SELECTOR, button).get_attribute("data-armed")
        )
        driver.find_element(By.CSS_SELECTOR, button).click()
        wait_for(
            driver,
            lambda d: (
                d.find_element(By.CSS_SELECTOR, job).get_attribute("data-job-state") == "cancelled"
            ),
        )
        screenshot(driver, "console-job-cancelled")
    assert up.job(job_id)["state"] == "cancelled"


def test_runners_and_overview_pages(up: Up) -> None:
    with chromium() as driver:
        _open(driver, f"{up.url}/console/runners", "admin")
        rows = wait_for(
            driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runners tr[data-runner-id]"))
        )
        assert rows == 2
        assert driver.find_elements(By.CSS_SELECTOR, 'button[data-action="drain"]')
        click(driver, 'nav a[data-view="overview"]')
        health = wait_for(
            driver,
            lambda d: d.find_element(By.CSS_SELECTOR, "[data-health]").get_attribute("data-health"),
        )
        assert health in ("healthy", "degraded", "unhealthy")
        mode = wait_for(
            driver,
            lambda d: d.find_element(By.CSS_SELECTOR, "[data-mode]").get_attribute("data-mode"),
        )
        assert mode == "full"
        screenshot(driver, "console-overview")
