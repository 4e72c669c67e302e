"""Browser tests: Playwright drives Debian's Chromium (never a downloaded browser) against the real stack.

Every page is cut off from everything but the gateway (`page.route`), so each test also shows that the page
works air-gapped; a request anywhere else fails the test. Each test leaves a full-page screenshot in
var/artifacts/browser/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import API_KEYS, ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "var" / "artifacts" / "browser"
JOB_TIMEOUT_MS = 90_000  # a few small jobs on a shared 2-core CPU

expect.set_options(timeout=JOB_TIMEOUT_MS)


@pytest.fixture(scope="package")
def browser():
    """One Chromium for tests/browser, closed when the package is done: the sync API keeps an asyncio loop
    running in this thread while it is open, and later tests call asyncio.run()."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Traffic:
    """What the page asked for: every URL, and those refused because they were not the gateway's."""

    origin: str
    requested: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed_pictures: list[str] = field(default_factory=list)  # images and frames the gateway refused


@pytest.fixture
def traffic(real_stack) -> Traffic:
    return Traffic(origin=real_stack.url)


@pytest.fixture
def page(browser, real_stack, traffic, request) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(JOB_TIMEOUT_MS)

    def only_the_gateway(route):
        url = route.request.url
        traffic.requested.append(url)
        if url == traffic.origin or url.startswith(traffic.origin + "/"):
            route.continue_()
        else:
            traffic.blocked.append(url)
            route.abort("internetdisconnected")

    page.route("**/*", only_the_gateway)
    page.on("pageerror", lambda error: traffic.errors.append(str(error)))

    def check_picture(response):
        if re.search(r"/v1/jobs/[^/]+/(images|frames)/", response.url) and response.status >= 400:
            traffic.failed_pictures.append(f"{response.status} {response.url}")

    page.on("response", check_picture)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert not traffic.blocked, f"the page reached past the gateway: {traffic.blocked}"
    assert not traffic.errors, f"uncaught errors in the page: {traffic.errors}"
    assert not traffic.failed_pictures, f"pictures the page asked for too early or wrongly: {traffic.failed_pictures}"


def give_key(page: Page, key: str = API_KEYS[0]) -> None:
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


@pytest.fixture
def opened(page, real_stack) -> Page:
    """The page at /, with an API key given and the model list loaded."""
    page.goto(real_stack.url + "/")
    give_key(page)
    expect(page.locator("#key-dialog")).to_be_hidden()
    expect(page.locator("#status-models")).to_contain_text(real_stack.model)
    return page


def wait_done(page: Page, prefix: str) -> None:
    """Until the panel's job has ended; fails on anything but success."""
    status = page.locator(f"#{prefix}-status")
    expect(status).to_have_text(re.compile(r"^(Done|Cancelled|Failed|Not started|Lost)"), timeout=JOB_TIMEOUT_MS)
    expect(status).to_have_text(re.compile(r"^Done"), timeout=1)
