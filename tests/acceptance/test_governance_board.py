"""The board's governance part in real Chromium: the Needs-you inbox lists a task the substrate blocked and a
recommendation; an overseer unblocks and lifts a ban from the page. Screenshots go to test-artifacts/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.acceptance.live_server import Live, chromium, clone_database, serve
from tests.acceptance.test_board import ARTIFACTS, WAIT_MS, Agent, sign_in
from tests.helpers import review_flow

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect

LOOP = review_flow("gov-loop")
FLAT = {"key": "gov-flat", "stages": [{"key": "todo", "initial": True, "max_attempts": 1},
                                      {"key": "done", "terminal": True}],
        "transitions": [{"from": "todo", "to": "done", "kind": "advance", "required_features": ["role:dev"]}]}


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    dsn = clone_database(pg_server, template_db)
    with serve(dsn, tmp_path_factory.mktemp("govboard")) as lv:
        for f in ("role:dev", "role:reviewer"):
            lv.admin("POST", "/v1/features", {"name": f}, 201)
        lv.admin("POST", "/v1/workflows", LOOP, 201)
        lv.admin("POST", "/v1/workflows", FLAT, 201)
        # One reject bans, one ban recommends a permanent one: the whole story in one loop.
        lv.admin("PUT", "/v1/governance/policies/feature/role:dev",
                 {"strike_threshold": 1, "recommend_after_bans": 1}, 200)
        yield lv


@pytest.fixture(scope="module")
def browser(live: Live) -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def page(live: Live, browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1440, "height": 1200}, base_url=live.url)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.set_default_timeout(WAIT_MS)
    try:
        yield pg
        assert not errors, errors
    finally:
        ctx.close()


def test_needs_you_inbox_unblock_and_lift_from_the_page(page: Any, live: Live) -> None:
    project = f"g{uuid.uuid4().hex[:6]}"
    lane, flat = f"{project}-dev", f"{project}-flat"
    live.admin("POST", "/v1/projects", {"slug": project}, 201)
    live.admin("POST", "/v1/lanes", {"project": project, "key": lane, "workflow": "gov-loop"}, 201)
    live.admin("POST", "/v1/lanes", {"project": project, "key": flat, "workflow": "gov-flat"}, 201)
    live.admin("POST", "/v1/families", {"key": f"{project}-dev", "features": [f"lane:{lane}", f"lane:{flat}",
                                                                             "role:dev"]}, 201)
    live.admin("POST", "/v1/families", {"key": f"{project}-rev", "features": [f"lane:{lane}", "role:reviewer"]},
               201)
    dev, rev = Agent(live, f"{project}-dev"), Agent(live, f"{project}-rev")

    # The substrate blocks a task (max attempts 1) ...
    stuck = dev.create(flat, "needs an API key")
    t, lease = dev.claim(flat)
    assert t == stuck
    assert dev.verb(stuck, "release", lease=lease, reason="no key")["code"] == "blocked"
    # ... and one rejected delivery bans the producer and recommends a permanent ban.
    work = dev.create(lane, "sloppy work")
    t, lease = dev.claim(lane)
    dev.verb(work, "advance", lease=lease, to="review")
    t, lease = rev.claim(lane)
    rev.verb(work, "reject", lease=lease, to="todo", reason="no tests")
    assert dev.call("POST", "/v1/claims", {"lane": lane}, 403)["code"] == "not_eligible"  # banned from role:dev
    trail = live.admin("GET", "/v1/governance/trail", None, 200)["items"]
    ban_entry = next(e for e in trail if e["action"] == "reflexive_ban")
    assert ban_entry["family"] == f"{project}-dev" and f"rejected by {project}-rev" in ban_entry["reason"], trail

    sign_in(page, live, project)
    inbox = page.locator("#inbox")
    blocked = inbox.locator(f'li[data-inbox="blocked"][data-task-id="{stuck}"]')
    expect(blocked).to_contain_text("blocked by the substrate")
    expect(blocked).to_contain_text("only a human can unblock it")
    rec = inbox.locator(f'li[data-inbox="recommendation"][data-family="{project}-dev"]')
    expect(rec).to_contain_text(f"Permanent ban: {project}-dev from role:dev")
    ban = page.locator(f'#gov-bans li[data-ban="{project}-dev/role:dev"]')
    expect(ban).to_contain_text("temporary")
    expect(page.locator(f'#gov-strikes li[data-strike="{project}-dev/role:dev"]')).to_contain_text("1 ban")
    expect(page.locator('#gov-trail li[data-action="reflexive_ban"]').first).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#inbox-panel").screenshot(path=str(ARTIFACTS / "governance-inbox.png"))
    page.screenshot(path=str(ARTIFACTS / "governance-board.png"), full_page=True)

    # The overseer unblocks with a note, from the inbox.
    blocked.get_by_role("button", name="Unblock needs an API key").click()
    blocked.get_by_role("textbox").fill("the key is in the vault now")
    blocked.get_by_role("button", name="Unblock needs an API key", exact=True).click()
    expect(inbox.locator(f'li[data-inbox="blocked"][data-task-id="{stuck}"]')).to_have_count(0)
    task = live.admin("GET", f"/v1/tasks/{stuck}")
    assert task["state"] == "ready"

    # ... and lifts the ban from the governance panel.
    ban.get_by_role("button", name=f"Lift {project}-dev role:dev").click()
    ban.get_by_role("textbox").fill("talked to the operator")
    ban.get_by_role("button", name=f"Lift {project}-dev role:dev", exact=True).click()
    expect(page.locator(f'#gov-bans li[data-ban="{project}-dev/role:dev"]')).to_have_count(0)
    expect(page.locator('#gov-trail li[data-action="lift"]').first).to_contain_text("talked to the operator")
    expect(page.locator('#gov-trail li[data-action="unblock"]').first).to_contain_text("the key is in the vault now")
    # A permanent ban is a person's act too, from the same panel.
    form = page.locator("#gov-ban-form")
    form.get_by_label("ban: family").fill(f"{project}-rev")
    form.get_by_label("ban: feature").fill("role:reviewer")
    form.get_by_label("ban: reason").fill("approves without reading")
    form.get_by_role("button", name="Ban permanently").click()
    expect(page.locator(f'#gov-bans li[data-ban="{project}-rev/role:reviewer"]')).to_contain_text("permanent")
    page.locator("#governance-panel").screenshot(path=str(ARTIFACTS / "governance-after-lift.png"))
    assert dev.call("POST", "/v1/claims", {"lane": lane})["code"] == "claimed"  # the lift gave the role back
