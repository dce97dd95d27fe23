"""Headless Chromium from Debian's packages, driven by Selenium through Debian's chromedriver.

No browser is ever downloaded: the system ``chromium`` and ``chromedriver`` are used
(``scripts/install-test-tools`` installs them; ``.ci/run`` runs it). Missing ones fail the test,
in CI always; elsewhere ``VALKYRIE_TEST_NO_BROWSER=1`` skips instead (and says so).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests._helpers import ROOT

#: the flags that work on these machines (a closed network, root, no GPU)
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def _binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    missing = "chromium" if not chromium else "chromedriver"
    hint = f"{missing} is not installed: run scripts/install-test-tools (Debian's chromium, chromium-driver)"
    if os.environ.get("CI") or os.environ.get("VALKYRIE_TEST_NO_BROWSER") != "1":
        pytest.fail(hint)
    pytest.skip(hint + " (VALKYRIE_TEST_NO_BROWSER=1)")


def artefacts_dir() -> Path:
    """Where screenshots go: ``$VALKYRIE_TEST_ARTIFACTS``, else ``.test-artifacts/`` here."""
    where = Path(os.environ.get("VALKYRIE_TEST_ARTIFACTS") or ROOT / ".test-artifacts")
    where.mkdir(parents=True, exist_ok=True)
    return where


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """A headless Chromium with a fresh profile, closed afterwards."""
    binary, driver_path = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="valkyrie-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    # Selenium Manager must not go looking for (or downloading) a driver or browser
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(
    driver: WebDriver, check: Callable[[WebDriver], object], *, timeout_s: float = 20.0
) -> object:
    """Poll ``check`` until it returns something truthy (fails the test after ``timeout_s``).

    The console replaces a view's HTML when its events arrive, so an element found a moment ago
    may be gone: ``check`` is simply asked again then (find and read in the same ``check``).
    """
    wait = WebDriverWait(
        driver,
        timeout_s,
        poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException,),
    )
    return wait.until(check)


def click(driver: WebDriver, css: str, *, timeout_s: float = 20.0) -> None:
    """Click the element ``css`` selects, finding it again if the view was just re-rendered."""

    def attempt(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True

    wait_for(driver, attempt, timeout_s=timeout_s)


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save a PNG of the page to the artefacts directory and print where."""
    path = artefacts_dir() / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path
