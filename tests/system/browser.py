"""Real headless Chromium for the page tests: Playwright driving Debian's /usr/bin/chromium.

Use the fixtures by importing them into a test module (``from tests.system.browser import page  # noqa: F401``)
or call ``chromium_page()`` directly. Each test gets a fresh user-data-dir (no cookie or cache from another
test). ``screenshot(page, name)`` saves a PNG under the artifacts directory: ``$DLORCH_ARTIFACTS`` or
``tests/artifacts/`` (gitignored). Playwright's own browser download is never used (``make chromium``
installs Debian's).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = os.environ.get("DLORCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("DLORCH_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")


def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@contextlib.contextmanager
def chromium_page(width: int = 1280, height: int = 860, timeout_ms: int = 15_000) -> Iterator["object"]:
    """A Playwright page in a fresh headless Chromium profile; closed (profile deleted) on leaving."""
    if not Path(CHROMIUM).exists() and shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: `make chromium` (apt-get install -y chromium) installs it")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="dlorch-chromium-")
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                viewport={"width": width, "height": height}, accept_downloads=True)
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(timeout_ms)
                page.console_errors = []  # what the page's scripts threw or logged as errors
                page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
                page.on("pageerror", lambda e: page.console_errors.append(str(e)))
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(page, name: str) -> Path:
    """Save the page as ``<artifacts>/<name>.png`` and return the path."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture
def page():
    """A fresh headless Chromium page (its profile deleted afterwards)."""
    with chromium_page() as pg:
        yield pg
