"""/docs (Swagger UI) and /redoc (ReDoc) render in real headless Chromium from a real server with every
request to anything but the server aborted: the pages need nothing from the internet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.acceptance.live_server import Live, chromium, clone_database, serve

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

WAIT_MS = 20_000


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    dsn = clone_database(pg_server, template_db)
    with serve(dsn, tmp_path_factory.mktemp("docs")) as lv:
        yield lv


@pytest.fixture(scope="module")
def browser(live: Live) -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(live: Live, browser: Any) -> Iterator[Any]:
    """A page whose requests reach the server only; whatever else it asks for is aborted and recorded."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=live.url)
    pg = ctx.new_page()
    aborted: list[str] = []
    failed: list[str] = []
    errors: list[str] = []

    def only_the_server(route: Any) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            aborted.append(route.request.url)
            route.abort()

    pg.route("**/*", only_the_server)
    pg.on("requestfailed", lambda req: failed.append(req.url))
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.set_default_timeout(WAIT_MS)
    try:
        yield pg
        assert not aborted, f"the page asked for something outside the server: {aborted}"
        assert not failed, failed
        assert not errors, errors
    finally:
        ctx.close()


def test_swagger_ui_lists_the_operations_offline(page: Any) -> None:
    page.goto("/docs")
    page.locator(".opblock").first.wait_for()  # the page's default timeout: the bundle is large
    for method, path in (("post", "/v1/claims"), ("post", "/v1/families"), ("get", "/v1/board"),
                         ("delete", "/v1/tokens/{jti}")):
        block = page.locator(f".opblock-{method}").filter(
            has=page.locator(f'.opblock-summary-path[data-path="{path}"]'))
        expect(block).to_be_visible()
    assert page.locator(".opblock").count() >= 40
    # The guide at the top renders its Markdown: the error table and the lease section.
    info = page.locator(".information-container")
    expect(info.locator("h2", has_text="Leases")).to_be_visible()
    expect(info.locator("table code", has_text="lease_lost")).to_be_visible()
    # An operation opens with its refusals, problem+json.
    page.locator(".opblock-post").filter(
        has=page.locator('.opblock-summary-path[data-path="/v1/families"]')).locator(".opblock-summary").click()
    responses = page.locator(".responses-table .response")
    expect(responses.filter(has_text="409")).to_be_visible()
    expect(page.get_by_text("application/problem+json").first).to_be_attached()


def test_redoc_renders_the_operation_list_offline(page: Any) -> None:
    page.goto("/redoc")
    page.locator("[role=menuitem]").first.wait_for()
    menu = page.locator("[role=menuitem]")
    expect(menu.filter(has_text="register a feature").first).to_be_visible()
    expect(page.locator("h2", has_text="create a family").first).to_be_attached()
    expect(page.locator("h2", has_text="Leases").first).to_be_visible()
    assert page.get_by_text("/v1/claims").count() >= 1
