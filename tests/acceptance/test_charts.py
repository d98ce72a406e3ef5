"""The board's charts in real headless Chromium against a real server: throughput and lead time per lane,
cost per delivered task by family, drawn from data agents produced over the HTTP API; screenshot saved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.live_server import Live, chromium, clone_database, serve
from tests.acceptance.test_board import ARTIFACTS, WAIT_MS, Agent, sign_in
from tests.helpers import review_flow

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

WORKFLOW = review_flow("charts-dev")


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    dsn = clone_database(pg_server, template_db)
    with serve(dsn, tmp_path_factory.mktemp("charts")) as lv:
        for f in ("role:dev", "role:reviewer"):
            lv.admin("POST", "/v1/features", {"name": f}, 201)
        lv.admin("POST", "/v1/workflows", WORKFLOW, 201)
        lv.admin("POST", "/v1/projects", {"slug": "charts"}, 201)
        for lane in ("web", "api"):
            lv.admin("POST", "/v1/lanes", {"project": "charts", "key": lane, "workflow": "charts-dev"}, 201)
        fams = {"cheap": ["lane:web", "lane:api", "role:dev"], "pricey": ["lane:web", "lane:api", "role:dev"],
                "judges": ["lane:web", "lane:api", "role:reviewer"]}
        for key, feats in fams.items():
            lv.admin("POST", "/v1/families", {"key": key, "features": feats}, 201)
        yield lv


@pytest.fixture(scope="module")
def browser(live: Live) -> Iterator[Any]:
    with chromium() as b:
        yield b


def deliver(dev: Agent, judge: Agent, lane: str, cost: str) -> None:
    tid = dev.create(lane, f"{lane} work")
    got, lease = dev.claim(lane)
    assert got == tid
    ev = dev.verb(tid, "advance", lease=lease, to="review")["event"]
    dev.call("POST", f"/v1/tasks/{tid}/usage", {"model": "m", "input_tokens": 1000, "output_tokens": 100,
                                                 "cost": cost, "currency": "USD", "event": ev["id"]})
    got, lease = judge.claim(lane)
    assert got == tid
    judge.verb(tid, "advance", lease=lease, to="done")  # the judges report nothing: unknown, not zero


def test_charts_render_throughput_lead_time_and_cost_per_delivered_task(live: Live, browser: Any) -> None:
    cheap, pricey, judge = Agent(live, "cheap"), Agent(live, "pricey"), Agent(live, "judges")
    for lane in ("web", "api", "web"):
        deliver(cheap, judge, lane, "0.40")
    deliver(pricey, judge, "api", "3.10")

    ctx = browser.new_context(viewport={"width": 1440, "height": 1000}, base_url=live.url)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.set_default_timeout(WAIT_MS)
    try:
        sign_in(page, live, "charts")
        charts = page.locator("#charts")
        throughput = charts.locator('figure[data-chart^="Throughput"]')
        expect(throughput.locator("svg circle.pt").first).to_be_visible()
        # One series per lane, and every drawn point a non-zero number of finished tasks.
        lanes = set(throughput.locator("svg circle.pt").evaluate_all("els => els.map(e => e.dataset.lane)"))
        assert lanes == {"web", "api"}
        values = throughput.locator("svg circle.pt").evaluate_all("els => els.map(e => Number(e.dataset.value))")
        assert sum(values) == 4 and all(v > 0 for v in values)
        expect(throughput.locator(".legend li")).to_have_count(2)
        lead = charts.locator('figure[data-chart^="Lead time"]')
        leads = lead.locator("svg circle.pt").evaluate_all("els => els.map(e => Number(e.dataset.value))")
        assert len(leads) == 2 and all(v > 0 for v in leads)
        # Cost per delivered task: a bar per family that reported a cost; the judges delivered without one.
        cost = charts.locator('figure[data-chart^="Cost per delivered task"]')
        bars = cost.locator("rect.bar[data-family]")
        expect(bars).to_have_count(2)
        per = dict(zip(bars.evaluate_all("els => els.map(e => e.dataset.family)"),
                       bars.evaluate_all("els => els.map(e => Number(e.dataset.value))"), strict=True))
        assert per == {"cheap": 0.4, "pricey": 3.1}
        widths = bars.evaluate_all("els => els.map(e => Number(e.getAttribute('width')))")
        assert widths[list(per).index("pricey")] > widths[list(per).index("cheap")] > 0
        expect(cost.locator("rect.bar.unknown")).to_have_count(1)
        expect(cost).to_contain_text("judges")
        expect(cost).to_contain_text("unknown")
        # The daily view draws from the same rollup.
        charts.locator("button.chart-bucket").click()
        expect(charts.locator(".panel-note")).to_contain_text("Daily")
        expect(charts.locator('figure[data-chart^="Throughput"] svg circle.pt')).to_have_count(2)
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator("#charts-panel").screenshot(path=str(ARTIFACTS / "board-charts.png"))
        page.screenshot(path=str(ARTIFACTS / "board-with-charts.png"), full_page=True)
        assert (Path(ARTIFACTS) / "board-charts.png").stat().st_size > 0
        assert not errors, errors
    finally:
        ctx.close()
