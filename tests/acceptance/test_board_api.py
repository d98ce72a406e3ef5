"""The HTTP surface the web board adds: its page and assets, the seats' layout read, and the
overseer's disable / enable of a family."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from tests.helpers import DEV_WORKFLOW, Api, make_world


async def _seat(admin: Api, seat: str) -> Api:
    await admin.post("/v1/families", {"key": seat.replace(":", "-"), "features": [seat]}, 201)
    tok = await admin.post("/v1/tokens", {"family": seat.replace(":", "-")}, 201)
    return Api(admin.client, tok["token"])


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(admin: Api) -> None:
    for path in ("/board", "/board/acme"):
        r = await admin.client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert '<script type="module" src="/board/static/board.js">' in r.text
    js = await admin.client.get("/board/static/board.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "sessionStorage" in js.text and "innerHTML" not in js.text
    css = await admin.client.get("/board/static/board.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for bad in ("/board/static/board.html", "/board/static/..%2Fapp.py", "/board/static/nope.js"):
        r = await admin.client.get(bad)
        assert r.status_code == 404 and r.json()["code"] == "not_found"


async def test_layout_gives_the_seats_each_lane_with_its_workflow_version(admin: Api) -> None:
    w = await make_world(admin)
    monitor = await _seat(admin, "seat:monitor")
    out = await monitor.get("/v1/layout")
    [proj] = out["projects"]
    assert proj["slug"] == "acme"
    [lane] = proj["lanes"]
    assert lane["key"] == "dev" and lane["feature"] == "lane:dev"
    wf = lane["workflow"]
    assert (wf["key"], wf["version"]) == ("dev", 1)
    assert [s["key"] for s in wf["stages"]] == ["todo", "review", "done"]
    assert [(t["from"], t["to"], t["kind"], t["required_features"]) for t in wf["transitions"]] == [
        ("todo", "review", "advance", ["role:dev"]), ("review", "done", "advance", ["role:reviewer"]),
        ("review", "todo", "reject", ["role:reviewer"])]

    # A new workflow version does not move the lane: it stays on the version it was bound to.
    v2 = {**DEV_WORKFLOW, "stages": [{**s, "lease_seconds": 30} if not s.get("terminal") else s
                                     for s in DEV_WORKFLOW["stages"]]}
    await admin.post("/v1/workflows", v2, 201)
    again = await monitor.get("/v1/layout", params={"project": "acme"})
    assert again["projects"][0]["lanes"][0]["workflow"]["version"] == 1

    assert (await monitor.get("/v1/layout", params={"project": "nope"}))["projects"] == []  # a filter, as /v1/board
    agent = await w.agent("cheap")
    assert (await agent.get("/v1/layout", expect=403))["code"] == "not_eligible"
    assert (await Api(admin.client, None).get("/v1/layout", expect=401))["code"] == "unauthenticated"


async def test_an_overseer_disables_and_enables_a_family(admin: Api) -> None:
    w = await make_world(admin)
    cheap = await w.agent("cheap")
    overseer = await _seat(admin, "seat:overseer")
    monitor = await _seat(admin, "seat:monitor")

    assert (await monitor.post("/v1/families/cheap/disable", expect=403))["code"] == "not_eligible"
    assert (await cheap.post("/v1/families/cheap/disable", expect=403))["code"] == "not_eligible"
    assert (await overseer.post("/v1/families/seat-overseer/disable", expect=409))["code"] == "conflict"
    assert (await overseer.post("/v1/families/nope/disable", expect=404))["code"] == "not_found"

    out = await overseer.post("/v1/families/cheap/disable", {"reason": "spinning on dev since 09:00"}, expect=200)
    assert out["key"] == "cheap" and out["disabled"] is True
    assert (await cheap.get("/v1/me", expect=401))["code"] == "unauthenticated"
    blank = await overseer.post("/v1/families/cheap/enable", {"reason": "  "}, expect=422)
    assert blank["code"] == "invalid"

    out = await overseer.post("/v1/families/cheap/enable", expect=200)
    assert out["disabled"] is False
    assert (await cheap.get("/v1/me"))["family"] == "cheap"

    # What an admin disabled only an admin re-enables — also after an overseer disables it again (found by a
    # review: that cleared the admin's mark, and the overseer's enable then went through).
    await admin.post("/v1/families/cheap/disable", expect=200)
    await overseer.post("/v1/families/cheap/disable", expect=200)
    refused = await overseer.post("/v1/families/cheap/enable", expect=403)
    assert refused["code"] == "not_eligible" and "disabled by an admin" in refused["detail"]
    assert (await cheap.get("/v1/me", expect=401))["code"] == "unauthenticated"
    await admin.post("/v1/families/cheap/enable", expect=200)
    assert (await cheap.get("/v1/me"))["family"] == "cheap"
    await admin.patch("/v1/families/cheap", {"disabled": True})
    await admin.patch("/v1/families/cheap", {"disabled": True, "max_active": 2})  # no change to the state: no entry

    # Each change of state is a governance act on the trail, with its reason or a note that none was given (found by
    # a review: disabling a family, a ban of everything it does, left no record).
    trail = [(e["action"], e["actor_family"], e["reason"], e["data"]["by_admin"])
             for e in (await admin.get("/v1/governance/trail"))["items"] if e["family"] == "cheap"]
    assert trail == [("disable", "admin", "disabled; no reason given", True),
                     ("enable", "admin", "enabled; no reason given", True),
                     ("disable", "admin", "disabled; no reason given", True),
                     ("enable", "seat-overseer", "enabled; no reason given", False),
                     ("disable", "seat-overseer", "spinning on dev since 09:00", False)], trail


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


async def test_the_front_door_sends_a_browser_to_the_board_and_a_program_to_the_api(admin: Api) -> None:
    r = await admin.client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert r.status_code == 303 and r.headers["location"] == "/board"
    assert "accept" in r.headers["vary"].lower()
    for accept in (None, "*/*", "application/json", "application/json, text/html;q=0.5",
                   "text/html;q=0, */*"):
        headers = {"Accept": accept} if accept else {}
        r = await admin.client.get("/", headers=headers)
        assert r.status_code == 200, (accept, r.status_code)
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert body["service"] == "AINARRES" and body["version"]
        assert body["links"] == {"openapi": "/openapi.json", "docs": "/docs", "board": "/board",
                                 "health": "/healthz"}
        for link in body["links"].values():   # every link leads somewhere
            assert (await admin.client.get(link)).status_code == 200, link

    doc = (await admin.client.get("/openapi.json")).json()
    op = doc["paths"]["/"]["get"]
    assert op["summary"] and "Accept" in op["description"]
    assert {"200", "303"} <= set(op["responses"])
    assert "/board" not in doc["paths"], "the board's page is not part of the API"


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


async def test_stuck_lists_blocked_tasks_beside_silent_holds(admin: Api, db: asyncpg.Connection) -> None:
    """The board's Stuck panel reads /v1/stuck: tasks blocked for a human are in it, with why, since when
    and by whom; the hold fields are null for them; kind, family and paging cover both kinds."""
    w = await make_world(admin)
    cheap, capable = await w.agent("cheap"), await w.agent("capable")
    silent = (await cheap.create("dev", "silent"))["task"]["id"]
    parked = (await cheap.create("dev", "parked"))["task"]["id"]
    c = await cheap.claim("dev")
    assert c["task"]["id"] == silent
    d = await capable.claim("dev")
    assert d["task"]["id"] == parked
    out = await capable.verb(parked, "block", lease=d["lease"]["id"], reason="needs a human decision")
    blocked_at = out["event"]["created_at"]
    # The hold has been silent 40 s of its 60 s lease (time travel, behind the API).
    await db.execute("UPDATE tasks SET held_since = now() - interval '40 seconds', "
                     "lease_expires_at = now() + interval '20 seconds' WHERE id = $1", silent)

    items = (await admin.get("/v1/stuck"))["items"]
    assert [(s["id"], s["kind"]) for s in items] == [(silent, "silent_hold"), (parked, "blocked")]
    hold, block = items
    assert hold["blocked_reason"] is None and hold["since"] == hold["held_since"]
    assert block["blocked_reason"] == "needs a human decision" and block["blocked_by_family"] == "capable"
    assert _at(block["blocked_since"]) == _at(blocked_at) == _at(block["since"])
    assert (block["holder"], block["held_since"], block["lease_expires_at"], block["silent_for_seconds"]) == (
        None, None, None, None)
    assert (block["lane"], block["stage"], block["title"]) == ("dev", "todo", "parked")

    async def ids(**params: Any) -> list[str]:
        return [s["id"] for s in (await admin.get("/v1/stuck", params=params))["items"]]

    assert await ids(kind="blocked") == [parked]
    assert await ids(kind="silent_hold") == [silent]
    assert await ids(kind="treadmill") == []
    assert await ids(family="capable") == [parked]   # the family that blocked it
    assert await ids(family="cheap") == [silent]
    assert await ids(stage="review") == []
    seen, cursor = [], None
    while True:
        page = await admin.get("/v1/stuck", params={"limit": 1, **({"cursor": cursor} if cursor else {})})
        seen += [s["id"] for s in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [silent, parked]
    assert (await admin.get("/v1/stuck", params={"kind": "stale"}, expect=422))["code"] == "invalid"

    # Unblocked, it leaves the list.
    await admin.post(f"/v1/tasks/{parked}/unblock", {})
    assert await ids() == [silent]
