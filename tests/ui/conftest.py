"""A live service on the bundled models and Debian's chromium driven by Playwright.

Every request a page makes is recorded; a test fails when one goes to a host other than
127.0.0.1 (the page must work with no network). The browser is Debian's (`make system-deps`);
Playwright never downloads one here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Request, expect, sync_playwright
from playwright.sync_api import Page as BrowserPage

from service.config import Settings
from tests.conftest import LiveServer

# The default model and the adversarially trained CE model the gallery also shows.
MODELS = ["mnist-resnet32-rce", "mnist-cnn-ce-at"]
DEFAULT = Settings().default_model
TIMEOUT_MS = 15_000


def chromium_path() -> str:
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("chromium is not installed: `make system-deps` installs Debian's chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=chromium_path(),
            args=["--no-sandbox", "--disable-background-networking"],
            headless=True,
        )
        yield b
        b.close()


def serve(**settings: object) -> LiveServer:
    return LiveServer(
        Settings(model_repository=Path("models"), models=MODELS, grpc_enabled=False, **settings)
    )


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """The service on the bundled models, on a free loopback port."""
    with serve() as s:
        yield s


@dataclass
class Page:
    """A browser tab on the service's page, with every request it made."""

    page: BrowserPage
    url: str
    requests: list[Request] = field(default_factory=list)

    @property
    def hosts(self) -> set[str]:
        return {urlsplit(r.url).hostname or "" for r in self.requests}


def open_page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A tab that records its requests; on closing, fails if one left 127.0.0.1."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    tab = Page(page, base_url)
    page.on("request", lambda r: tab.requests.append(r))
    try:
        yield tab
    finally:
        context.close()
    outside = {h for h in tab.hosts if h != "127.0.0.1"}
    assert not outside, f"the page made requests outside 127.0.0.1: {sorted(outside)}"
    assert tab.requests, "no request recorded: the recorder did not see the page load"


@pytest.fixture
def tab(browser: Browser, server: LiveServer) -> Iterator[Page]:
    """A fresh tab that has loaded /ui, listed the models and opened on the default one (the
    service's `default_model`, not the first in the list: that is mnist-cnn-ce-at)."""
    for t in open_page(browser, server.url):
        t.page.goto(f"{server.url}/ui")
        # (expect, not wait_for_function: the page's CSP forbids the eval that one polls with)
        select = t.page.get_by_test_id("model-select")
        expect(select.locator("option")).to_have_count(len(MODELS))
        expect(select).to_have_value(DEFAULT)
        expect(t.page.locator("body")).to_have_attribute("data-model", DEFAULT)
        yield t
