"""Session fixtures: one real nats-server per test session (or VALKYRIE_TEST_NATS_URL).

Every test that used a ``prefix`` on that server also has its stored events checked against the
typed event catalogue afterwards (tests/_event_catalogue.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import pytest

from tests._event_catalogue import catalogue_problems
from tests._health_helpers import HEALTH_ENV
from tests._helpers import config_for_test, settings_for, unique_prefix
from tests._run_count import RunCount, xdist_group_ids
from valkyrie import Bus, NatsServer, Settings, open_bus


def pytest_configure(config: pytest.Config) -> None:
    # every collected test must run, under xdist too (tests/_run_count.py)
    config.pluginmanager.register(RunCount(), "valkyrie-run-count")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> Generator[None, None, None]:
    yield
    xdist_group_ids(config, items)  # after xdist's own hook (tests/_run_count.py says why)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # nats-py is asyncio-only
    return "asyncio"


def _docker_available() -> bool:
    return shutil.which("docker") is not None and os.path.exists("/var/run/docker.sock")


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A data dir of the session's own: no test (nor a CLI it spawns) may find and use the
    generated credentials of a `valkyrie up` that ran on this host."""
    if "VALKYRIE_DATA_DIR" in os.environ:
        yield
        return
    os.environ["VALKYRIE_DATA_DIR"] = str(tmp_path_factory.mktemp("data-dir"))
    try:
        yield
    finally:
        os.environ.pop("VALKYRIE_DATA_DIR", None)


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a JetStream-enabled server for this session."""
    existing = os.environ.get("VALKYRIE_TEST_NATS_URL")
    if existing:
        yield existing
        return
    if os.environ.get("VALKYRIE_TEST_DOCKER") == "1" and _docker_available():
        from testcontainers.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    store = Path(tempfile.mkdtemp(prefix="valkyrie-test-nats-"))
    server = NatsServer(store_dir=store, port=0, name="valkyrie-test", max_mem="2G", max_file="64G")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(store, ignore_errors=True)


@pytest.fixture
def fast_health(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small health thresholds (tests/_health_helpers.py) for handlers run in this process.

    They read their config layers from the environment.
    """
    for key, value in HEALTH_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture
def settings(nats_url: str, prefix: str) -> Settings:
    return settings_for(nats_url, prefix)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    async with open_bus(settings, embed=False, config=config_for_test(settings).config) as (b, _):
        yield b


#: whether the test's call phase failed (set by the hook below, read by the catalogue check)
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def _events_match_the_catalogue(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used a prefix on the session's server, every event it stored must be
    exactly what its typed Struct (schemas.event_catalog) produces."""
    if not {"prefix", "nats_url"} <= set(request.fixturenames):
        yield
        return
    prefix = request.getfixturevalue("prefix")
    url = request.getfixturevalue("nats_url")
    yield
    if request.node.stash.get(_CALL_FAILED, True):
        return  # failed (or never ran) already: a second report would only add noise
    problems = catalogue_problems(url, prefix)
    if problems:
        shown = "\n  ".join(problems[:20])
        pytest.fail(f"{len(problems)} stored event(s) do not match the catalogue:\n  {shown}")
