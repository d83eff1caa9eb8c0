"""Headless Chromium for the page tests (Debian's ``chromium`` + ``chromium-driver``, driven by Selenium).

``open_offline`` loads a file:// page with the network switched off and collects the browser's console
messages and every request it tried, so a test can assert a page is self-contained.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


def find_browser() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) or None."""
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver") or (os.path.exists("/usr/lib/chromium/chromedriver") and "/usr/lib/chromium/chromedriver") or None
    return (binary, driver) if binary and driver else None


def require_browser() -> tuple[str, str]:
    """The browser, or a skip; in CI (CI=true) a missing browser or Selenium fails instead."""
    found = find_browser()
    try:
        import selenium  # noqa: F401
    except ImportError:
        found = None
    if found is None:
        msg = "headless Chromium + chromedriver + selenium needed (apt-get install chromium chromium-driver; pip install -e '.[test]')"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


@contextlib.contextmanager
def chromium(width: int = 1320, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, the network emulated offline."""
    binary, driver_path = require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    profile = tempfile.mkdtemp(prefix="e1min-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0}
        )
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def load(driver: Any, page: Path) -> dict[str, list]:
    """Open ``page``; returns its console messages, the URLs it requested and the requests that failed."""
    driver.get_log("performance")  # drop what came before
    driver.get(page.resolve().as_uri())
    driver.execute_script("return document.readyState")
    console = driver.get_log("browser")
    requested, failed = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requested.append(msg["params"]["request"]["url"])
        elif msg["method"] == "Network.loadingFailed":
            failed.append(msg["params"])
    return {"console": console, "requested": requested, "failed": failed}
