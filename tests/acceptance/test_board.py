"""The web board in real headless Chromium (Debian's, driven by Playwright) against a real server.

One server and one browser serve the module; each test works in its own project, so the tests do
not see each other's cards. Every wait is on the DOM (Playwright's expectations), never a sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.acceptance.live_server import Live, chromium, clone_database, serve
from tests.helpers import review_flow

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WAIT_MS = 15_000

WORKFLOW = review_flow("board-dev", first_stage={"max_attempts": 3, "escalate_after": 2},
                       review_stage={"max_rework": 2})

class Agent:
    """An agent of a family, calling the public HTTP API."""

    def __init__(self, live: Live, family: str) -> None:
        self.live = live
        self.token = live.mint(family)["token"]

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self.live.http.request(method, path, json=body, headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == expect, f"{method} {path} → {r.status_code} {r.text}"
        return r.json() if r.content else None

    def create(self, lane: str, title: str, **fields: Any) -> str:
        return str(self.call("POST", "/v1/tasks", {"lane": lane, "title": title, **fields}, 201)["task"]["id"])

    def claim(self, lane: str) -> tuple[str, str]:
        out = self.call("POST", "/v1/claims", {"lane": lane})
        assert out["code"] == "claimed", out
        return str(out["task"]["id"]), str(out["lease"]["id"])

    def verb(self, task: str, verb: str, **body: Any) -> Any:
        return self.call("POST", f"/v1/tasks/{task}/{verb}", body)


class World:
    """A project of its own with lane <p>-dev, families <p>-dev (role:dev) and <p>-rev (role:reviewer)."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.project = f"p{uuid.uuid4().hex[:6]}"
        self.lane = f"{self.project}-dev"
        live.admin("POST", "/v1/projects", {"slug": self.project}, 201)
        live.admin("POST", "/v1/lanes", {"project": self.project, "key": self.lane, "workflow": "board-dev"}, 201)
        live.admin("POST", "/v1/families", {"key": f"{self.project}-dev",
                                            "features": [f"lane:{self.lane}", "role:dev"]}, 201)
        live.admin("POST", "/v1/families", {"key": f"{self.project}-rev",
                                            "features": [f"lane:{self.lane}", "role:reviewer"]}, 201)
        self.dev = Agent(live, f"{self.project}-dev")
        self.rev = Agent(live, f"{self.project}-rev")


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    dsn = clone_database(pg_server, template_db)
    with serve(dsn, tmp_path_factory.mktemp("board")) as lv:
        for f in ("role:dev", "role:reviewer", "area:gpu"):
            lv.admin("POST", "/v1/features", {"name": f}, 201)
        lv.admin("POST", "/v1/workflows", WORKFLOW, 201)
        lv.dsn = dsn  # type: ignore[attr-defined]
        yield lv


@pytest.fixture(scope="module")
def browser(live: Live) -> Iterator[Any]:
    # Playwright's sync API runs an event loop in this thread from here on: `live` (which uses
    # asyncio.run) is set up first, and later database work runs in a thread of its own.
    with chromium() as b:
        yield b


@pytest.fixture
def page(live: Live, browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=live.url)
    pg = ctx.new_page()
    errors: list[str] = []
    urls: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.on("request", lambda req: urls.append(req.url))
    pg.set_default_timeout(WAIT_MS)
    pg.errors, pg.urls = errors, urls
    try:
        yield pg
        assert not errors, errors
        assert not any(live.admin_token in u for u in urls), "the token went into a URL"
    finally:
        ctx.close()


def sign_in(page: Any, live: Live, project: str) -> None:
    page.goto(f"/board/{project}")
    expect(page.locator("#signin")).to_be_visible()
    page.fill("#token", live.admin_token)
    page.press("#token", "Enter")
    expect(page.locator("#live")).to_have_text("live")


def card(page: Any, task: str) -> Any:
    return page.locator(f"#card-{task}")


def column(page: Any, lane: str, stage: str) -> Any:
    return page.locator(f'.lane[data-lane="{lane}"] .column[data-stage="{stage}"]')


def test_sign_in_shows_the_lanes_columns_and_keeps_the_token_out_of_urls(page: Any, live: Live) -> None:
    w = World(live)
    page.goto(f"/board/{w.project}")
    # A token without a seat is refused at the door.
    page.fill("#token", w.dev.token)
    page.click("#signin button[type=submit]")
    expect(page.locator("#signin-error")).to_contain_text("seat")
    sign_in(page, live, w.project)
    lane = page.locator(f'.lane[data-lane="{w.lane}"]')
    expect(lane).to_be_visible()
    expect(lane.locator(".column h3")).to_have_text([re.compile(r"^todo"), re.compile(r"^review"),
                                                      re.compile(r"^done")])
    assert page.evaluate("sessionStorage.getItem('ainarres.token')") == live.admin_token
    assert live.admin_token not in page.url
    # The workflow drawing names the stages and the features each transition needs.
    lane.locator("details.workflow summary").click()
    drawing = lane.locator("svg.wfdraw")
    expect(drawing).to_be_visible()
    expect(drawing.locator(".sname")).to_have_text(["todo", "review", "done"])
    expect(drawing.locator(".tlabel")).to_have_text(["role:dev", "role:reviewer", "reject · role:reviewer"])
    # The session survives a reload of the page; signing out forgets the token.
    page.reload()
    expect(lane).to_be_visible()
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ainarres.token')") is None


def test_cards_move_live_as_agents_work(page: Any, live: Live) -> None:
    w = World(live)
    sign_in(page, live, w.project)
    page.evaluate("window.__sameDocument = true")
    tid = w.dev.create(w.lane, "Write the parser", priority=3)
    expect(column(page, w.lane, "todo").locator(f"#card-{tid}")).to_be_visible()
    expect(card(page, tid)).to_have_attribute("data-state", "ready")

    _, lease = w.dev.claim(w.lane)
    expect(card(page, tid)).to_have_attribute("data-state", "held")
    expect(card(page, tid).locator(".holder")).to_contain_text(f"{w.project}-dev")
    expect(card(page, tid).locator(".lease")).to_have_text(re.compile(r"^lease \d+s$"))

    w.dev.verb(tid, "advance", lease=lease, to="review", note="parser written")
    expect(column(page, w.lane, "review").locator(f"#card-{tid}")).to_be_visible()
    expect(column(page, w.lane, "todo").locator(".card")).to_have_count(0)
    expect(column(page, w.lane, "review").locator("h3 .count")).to_have_text("1")

    _, lease = w.rev.claim(w.lane)
    w.rev.verb(tid, "advance", lease=lease, to="done", note="looks right")
    expect(column(page, w.lane, "done").locator(f"#card-{tid}")).to_be_visible()
    expect(card(page, tid)).to_have_attribute("data-state", "done")
    assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
    expect(page.locator("#feed")).to_contain_text("advance review → done")


def test_drawer_shows_the_timeline_and_works_from_the_keyboard(page: Any, live: Live) -> None:
    w = World(live)
    tid = w.dev.create(w.lane, "Document the API", payload={"spec": "openapi"})
    _, lease = w.dev.claim(w.lane)
    w.dev.verb(tid, "progress", lease=lease, note="half the endpoints",
               artifacts=[{"type": "pr", "uri": "https://example.test/pr/7"}])
    w.dev.verb(tid, "advance", lease=lease, to="review", note="ready for review")
    sign_in(page, live, w.project)

    c = card(page, tid)
    c.focus()
    page.keyboard.press("Enter")
    drawer = page.locator("#drawer")
    expect(drawer).to_be_visible()
    expect(page.locator("#drawer-title")).to_have_text("Document the API")
    timeline = page.locator("#timeline li")
    expect(timeline).to_have_count(4)
    assert timeline.evaluate_all("els => els.map(e => e.dataset.type)") == [
        "created", "claimed", "progress", "transition"]
    expect(drawer.locator("ul.notes")).to_contain_text("half the endpoints")
    link = drawer.locator('ul.artifacts a[href="https://example.test/pr/7"]')
    expect(link).to_have_count(1)
    assert link.get_attribute("rel") == "noopener noreferrer"

    # Live while open: a reviewer's reject lands in the timeline.
    _, lease = w.rev.claim(w.lane)
    w.rev.verb(tid, "reject", lease=lease, to="todo", reason="missing examples")
    expect(timeline).to_have_count(6)
    expect(drawer.locator("ul.notes")).to_contain_text("missing examples")

    page.keyboard.press("Escape")
    expect(drawer).to_be_hidden()
    expect(c).to_be_focused()


def test_blocked_badge_and_unblock_from_the_page(page: Any, live: Live) -> None:
    w = World(live)
    tid = w.dev.create(w.lane, "Migrate the billing table")
    _, lease = w.dev.claim(w.lane)
    sign_in(page, live, w.project)
    w.dev.verb(tid, "block", lease=lease, reason="needs a DBA's approval")
    badge = card(page, tid).locator(".badge.blocked")
    expect(badge).to_have_text("blocked")
    assert badge.get_attribute("title") == "needs a DBA's approval"

    card(page, tid).click()
    expect(page.locator(".blockbox")).to_contain_text("needs a DBA's approval")
    page.fill("#unblock-note", "approved by Dana")
    page.click("#unblock")
    expect(card(page, tid)).to_have_attribute("data-state", "ready")
    expect(card(page, tid).locator(".badge.blocked")).to_have_count(0)
    expect(page.locator(".blockbox")).to_have_count(0)

    task = live.admin("GET", f"/v1/tasks/{tid}", expect=200)
    assert (task["state"], task["blocked"]) == ("ready", False)
    last = live.admin("GET", f"/v1/tasks/{tid}/events", expect=200)["items"][-1]
    assert last["type"] == "unblocked" and last["data"].get("note") == "approved by Dana"


def test_lifting_a_substrate_block_from_the_page_asks_what_was_decided(page: Any, live: Live) -> None:
    """A block the substrate made is a human's decision to lift, its note the reason on the governance trail
    (SPEC §8): the drawer says the note is required, refuses to send without it, and the trail has it after."""
    w = World(live)
    tid = w.dev.create(w.lane, "Flaky migration")
    for _ in range(3):  # the stage's max_attempts: the third release blocks it
        _, lease = w.dev.claim(w.lane)
        out = w.dev.verb(tid, "release", lease=lease, reason="cannot")
    assert out["code"] == "blocked", out
    sign_in(page, live, w.project)
    expect(page.locator(f'#stuck li[data-task-id="{tid}"]')).to_contain_text("only a human can unblock it")

    card(page, tid).click()
    note = page.locator("#unblock-note")
    expect(note).to_have_attribute("placeholder", re.compile("required"))
    page.click("#unblock")
    expect(page.locator(".toast.error")).to_contain_text("say what was decided")
    expect(card(page, tid)).to_have_attribute("data-state", "blocked")
    note.fill("retry: the flaky runner is replaced")
    page.click("#unblock")
    expect(card(page, tid)).to_have_attribute("data-state", "ready")
    trail = live.admin("GET", "/v1/governance/trail", expect=200)["items"]
    entry = next(e for e in trail if e["task_id"] == tid)
    assert (entry["action"], entry["reason"]) == ("unblock", "retry: the flaky runner is replaced")
    assert entry["data"]["blocked_by"] == "substrate"


def _age_hold(dsn: str, task: str, seconds: int) -> None:
    """Make a live hold look silent for `seconds` (its lease still running), as time would."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("UPDATE tasks SET held_since = now() - make_interval(secs => $2), "
                               "progress_at = NULL WHERE id = $1", uuid.UUID(task), seconds)
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def test_stuck_demand_and_families_panels_show_what_the_api_says(page: Any, live: Live) -> None:
    w = World(live)
    silent = w.dev.create(w.lane, "Silent hold")
    w.dev.claim(w.lane)
    _age_hold(live.dsn, silent, 40)  # type: ignore[attr-defined]  # 40 s of a 60 s lease: silent
    w.dev.create(w.lane, "GPU kernel", required_features=["area:gpu"])  # nobody has area:gpu
    w.dev.create(w.lane, "Plain task")
    sign_in(page, live, w.project)

    stuck = live.admin("GET", f"/v1/stuck?project={w.project}", expect=200)["items"]
    assert [s["id"] for s in stuck] == [silent]
    expect(page.locator("#stuck li[data-task-id]")).to_have_count(1)
    expect(page.locator(f'#stuck li[data-task-id="{silent}"]')).to_contain_text("silent hold")
    expect(card(page, silent).locator(".badge.stuck")).to_be_visible()

    demand = live.admin("GET", f"/v1/demand?project={w.project}", expect=200)["items"]
    rows = page.locator("#demand tbody tr")
    expect(rows).to_have_count(len(demand))
    for i, d in enumerate(demand):
        row = rows.nth(i)
        expect(row).to_have_attribute("data-stage", d["stage"])
        expect(row.locator("td.num")).to_have_text(str(d["pending"]))
        if d["capable"]:
            expect(row.locator("td").nth(3)).to_have_text(", ".join(d["capable_families"]))
        else:
            expect(row.locator("td").nth(3)).to_have_text("no capable agent")
    assert any(not d["capable"] and "area:gpu" in d["features"] for d in demand)

    # Disabling a family from the page asks first and refuses its agents from then on.
    fam = page.locator(f'#families li[data-family="{w.project}-rev"]')
    fam.get_by_role("button", name=f"disable family {w.project}-rev").click()
    fam.get_by_role("button", name=f"yes, disable family {w.project}-rev").click()
    expect(fam.locator(".badge.blocked")).to_have_text("disabled")
    assert live.admin("GET", f"/v1/families/{w.project}-rev", expect=200)["disabled"] is True
    w.rev.call("GET", "/v1/me", expect=401)


def test_board_screenshot(page: Any, live: Live) -> None:
    """A populated board saved to test-artifacts/board.png for people to look at."""
    w = World(live)
    ids = [w.dev.create(w.lane, t, priority=p) for t, p in [
        ("Design the schema", 5), ("Write the claim query", 4), ("Add the lease index", 3),
        ("Long-poll claims", 2), ("Metrics endpoint", 1), ("Board drawer", 0), ("GPU kernel", 0)]]
    first, lease1 = w.dev.claim(w.lane)
    w.dev.verb(first, "advance", lease=lease1, to="review", note="schema drafted",
               artifacts=[{"type": "pr", "uri": "https://example.test/pr/1"}])
    second, lease2 = w.dev.claim(w.lane)
    w.dev.verb(second, "block", lease=lease2, reason="waiting on a design decision")
    rid, rlease = w.rev.claim(w.lane)
    w.rev.verb(rid, "advance", lease=rlease, to="done", note="approved")
    w.dev.claim(w.lane)
    w.dev.create(w.lane, "Follow-up after the schema", depends_on=[ids[2]])
    sign_in(page, live, w.project)
    expect(page.locator(".card")).to_have_count(8)
    expect(page.locator(".card .lease")).to_have_count(1)
    page.locator(f'.lane[data-lane="{w.lane}"] details.workflow summary').click()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "board.png"), full_page=True)
    card(page, first).click()
    expect(page.locator("#timeline li")).to_have_count(5)
    page.screenshot(path=str(ARTIFACTS / "board-drawer.png"))
    assert (ARTIFACTS / "board.png").stat().st_size > 10_000


# -- the board on a laptop and on a phone ------------------------------------------------------------

VIEWPORTS = {"laptop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


@pytest.fixture(params=sorted(VIEWPORTS))
def sized(request: pytest.FixtureRequest, live: Live, browser: Any) -> Iterator[tuple[str, Any]]:
    """A page at a laptop's or a phone's viewport (the phone as a phone: mobile, touch, scale 3)."""
    name = request.param
    phone = name == "phone"
    ctx = browser.new_context(viewport=VIEWPORTS[name], base_url=live.url, is_mobile=phone, has_touch=phone,
                              device_scale_factor=3 if phone else 1)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.set_default_timeout(WAIT_MS)
    try:
        yield name, pg
        assert not errors, errors
    finally:
        ctx.close()


def _viewport(page: Any) -> dict[str, float]:
    out: dict[str, float] = page.evaluate(
        "({w: innerWidth, h: innerHeight, sw: document.scrollingElement.scrollWidth})")
    return out


def _inside(box: dict[str, float] | None, vp: dict[str, float], what: str) -> None:
    assert box is not None, f"{what} is not rendered"
    assert box["x"] >= -0.5 and box["x"] + box["width"] <= vp["w"] + 0.5, f"{what} {box} leaves the viewport {vp}"
    assert box["y"] >= -0.5, f"{what} {box} starts above the viewport"


def _no_sideways_scroll(page: Any, expected_width: int) -> dict[str, float]:
    vp = _viewport(page)
    assert vp["w"] == expected_width, f"the layout viewport grew to {vp['w']}: the page overflows"
    assert vp["sw"] <= vp["w"], f"the page is {vp['sw']} px wide in a {vp['w']} px viewport: it scrolls sideways"
    return vp


CONTRAST = """el => {
  const rgb = (c) => c.match(/[\\d.]+/g).slice(0, 4).map(Number);
  const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
  const lum = ([r, g, b]) => 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  let bg = null;   // the first opaque background from the element up
  for (let n = el; n && !bg; n = n.parentElement) {
    const c = rgb(getComputedStyle(n).backgroundColor);
    if (c.length < 4 || c[3] > 0.9) bg = c;
  }
  const fg = lum(rgb(getComputedStyle(el).color)), b = lum(bg || [255, 255, 255]);
  return (Math.max(fg, b) + 0.05) / (Math.min(fg, b) + 0.05);
}"""


def test_the_board_fits_a_laptop_and_a_phone(sized: tuple[str, Any], live: Live) -> None:
    name, page = sized
    width = VIEWPORTS[name]["width"]
    w = World(live)
    long_title = "Rewrite the claim query so that it probes the ready index once per eligible route"
    tid = w.dev.create(w.lane, long_title, priority=2)
    for t in ("Add the lease index", "Metrics endpoint", "Board drawer"):
        w.dev.create(w.lane, t)
    blocked, lease = w.dev.claim(w.lane)   # the highest priority: the long title
    assert blocked == tid
    w.dev.verb(blocked, "block", lease=lease, reason="needs a DBA's approval for the migration")
    moved, lease = w.dev.claim(w.lane)
    w.dev.verb(moved, "advance", lease=lease, to="review", note="done")

    page.goto(f"/board/{w.project}")
    expect(page.locator("#signin")).to_be_visible()
    # Before signing in the connection state is neutral, not an alarm.
    live_state = page.locator("#live")
    expect(live_state).to_have_text("not signed in")
    expect(live_state).to_have_class(re.compile(r"\bidle\b"))
    _no_sideways_scroll(page, width)
    page.fill("#token", live.admin_token)
    page.press("#token", "Enter")
    expect(live_state).to_have_text("live")
    expect(card(page, tid)).to_be_visible()
    expect(page.locator(f'#stuck li[data-task-id="{blocked}"]')).to_be_visible()

    vp = _no_sideways_scroll(page, width)
    header = page.locator("header.top")
    hbox = header.bounding_box()
    _inside(hbox, vp, "the header")
    assert hbox is not None and hbox["x"] <= 0.5 and hbox["width"] >= vp["w"] - 0.5, \
        f"the header {hbox} does not span the {vp['w']} px viewport"
    signout = page.locator("#signout")
    expect(signout).to_be_visible()
    sbox = signout.bounding_box()
    _inside(sbox, vp, "Sign out")
    assert sbox is not None and hbox["y"] <= sbox["y"] and sbox["y"] + sbox["height"] <= hbox["y"] + hbox["height"], \
        "Sign out sits outside the header"
    for control in ("#signout", "#home", "#live"):
        ratio = page.locator(control).evaluate(CONTRAST)
        assert ratio >= 4.5, f"{control} has a contrast of {ratio:.2f} against its background"
    # The lane's columns scroll inside the lane when they do not fit, never the page.
    cols = page.locator(f'.lane[data-lane="{w.lane}"] .columns')
    _inside(cols.bounding_box(), vp, "the lane's columns")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"board-{name}.png"), full_page=True)

    card(page, tid).click()
    drawer = page.locator("#drawer")
    expect(drawer).to_be_visible()
    expect(page.locator("#drawer-title")).to_have_text(long_title)
    expect(page.locator("#timeline li")).to_have_count(3)
    expect(page.locator(".blockbox")).to_contain_text("needs a DBA's approval")
    dbox = drawer.bounding_box()
    _inside(dbox, vp, "the drawer")
    assert dbox is not None and dbox["y"] + dbox["height"] <= vp["h"] + 0.5
    if name == "phone":   # a full-width sheet
        assert dbox["x"] <= 0.5 and dbox["width"] >= vp["w"] - 0.5, dbox
    _inside(page.locator("#drawer-close").bounding_box(), vp, "the drawer's close button")
    _no_sideways_scroll(page, width)
    page.screenshot(path=str(ARTIFACTS / f"board-{name}-drawer.png"))
    page.locator("#drawer-close").click()
    expect(drawer).to_be_hidden()


def test_a_blocked_task_is_in_the_stuck_panel_with_its_reason(page: Any, live: Live) -> None:
    w = World(live)
    tid = w.dev.create(w.lane, "Migrate the ledger")
    _, lease = w.dev.claim(w.lane)
    w.dev.verb(tid, "block", lease=lease, reason="needs the finance team's sign-off")
    sign_in(page, live, w.project)

    api = live.admin("GET", f"/v1/stuck?project={w.project}", expect=200)["items"]
    assert [(s["id"], s["kind"], s["blocked_reason"], s["blocked_by_family"]) for s in api] == [
        (tid, "blocked", "needs the finance team's sign-off", f"{w.project}-dev")]
    row = page.locator(f'#stuck li[data-task-id="{tid}"]')
    expect(row).to_have_attribute("data-kind", "blocked")
    expect(row.locator(".badge.blocked")).to_have_text("blocked")
    expect(row).to_contain_text("Migrate the ledger")
    expect(row).to_contain_text("needs the finance team's sign-off")
    expect(row.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-\d\d-\d\dT"))
    expect(row).to_contain_text(f"by {w.project}-dev")
    expect(page.locator("#stuck-count")).to_have_text("1")

    # Unblocked, it leaves the panel.
    card(page, tid).click()
    page.click("#unblock")
    expect(row).to_have_count(0)
    expect(page.locator("#stuck")).to_contain_text("nothing stuck or blocked")
    page.keyboard.press("Escape")


def test_disabling_a_family_asks_first_and_no_changes_nothing(page: Any, live: Live) -> None:
    w = World(live)
    sign_in(page, live, w.project)
    key = f"{w.project}-rev"
    fam = page.locator(f'#families li[data-family="{key}"]')
    ask = fam.get_by_role("button", name=f"disable family {key}")
    expect(ask).to_be_visible()
    assert "danger" not in (ask.get_attribute("class") or ""), "every row shows a red button"

    # No: nothing changes.
    ask.click()
    expect(fam.locator(".confirm")).to_contain_text(f"Disable {key}?")
    no = fam.get_by_role("button", name=f"keep family {key} enabled")
    expect(no).to_be_focused()
    no.click()
    expect(fam.locator(".confirm")).to_have_count(0)
    expect(ask).to_be_focused()
    assert live.admin("GET", f"/v1/families/{key}", expect=200)["disabled"] is False
    w.rev.call("GET", "/v1/me", expect=200)

    # Escape is No too.
    ask.click()
    expect(fam.locator(".confirm")).to_be_visible()
    page.keyboard.press("Escape")
    expect(fam.locator(".confirm")).to_have_count(0)
    assert live.admin("GET", f"/v1/families/{key}", expect=200)["disabled"] is False

    # Yes (from the keyboard): disabled, its agents are refused, and the focus stays on the row.
    ask.click()
    expect(no).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(fam.get_by_role("button", name=f"yes, disable family {key}")).to_be_focused()
    page.keyboard.press("Enter")
    expect(fam.locator(".badge.blocked")).to_have_text("disabled")
    expect(fam.get_by_role("button", name=f"enable family {key}")).to_be_focused()
    assert live.admin("GET", f"/v1/families/{key}", expect=200)["disabled"] is True
    w.rev.call("GET", "/v1/me", expect=401)
    # Enabling again is one plain click.
    fam.get_by_role("button", name=f"enable family {key}").click()
    expect(fam.locator(".badge.blocked")).to_have_count(0)
    assert live.admin("GET", f"/v1/families/{key}", expect=200)["disabled"] is False


OUTLINE = "el => { const s = getComputedStyle(el); return [s.outlineStyle, parseFloat(s.outlineOffset)]; }"


def test_a_clicked_card_has_no_focus_ring_and_the_keyboard_one_is_not_clipped(page: Any, live: Live) -> None:
    w = World(live)
    first = w.dev.create(w.lane, "First card", priority=2)
    second = w.dev.create(w.lane, "Second card", priority=1)
    sign_in(page, live, w.project)
    c = card(page, first)
    c.click()
    expect(page.locator("#drawer")).to_be_visible()
    page.locator("#drawer-close").click()
    expect(page.locator("#drawer")).to_be_hidden()
    expect(c).to_be_focused()
    assert c.evaluate(OUTLINE)[0] == "none", "a clicked card keeps a focus ring"
    # From the keyboard the ring shows, drawn inside the card so the scrolling column cannot clip it.
    page.keyboard.press("Tab")
    nxt = card(page, second)
    expect(nxt).to_be_focused()
    style, offset = nxt.evaluate(OUTLINE)
    assert style == "solid" and offset < 0, (style, offset)
