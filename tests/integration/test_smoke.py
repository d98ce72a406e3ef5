"""The happy path through every verb, over HTTP."""

from __future__ import annotations

from tests.helpers import make_world


async def test_walkthrough(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    rev = await w.agent("reviewers")
    created = await dev.create("dev", "write it", payload={"goal": "x"})
    task = created["task"]
    assert task["stage"] == "todo" and task["state"] == "ready"
    c = await dev.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
    lease = c["lease"]["id"]
    hb = await dev.verb(task["id"], "heartbeat", lease=lease)
    assert hb["code"] == "ok"
    pr = await dev.verb(task["id"], "progress", lease=lease, note="halfway",
                        artifacts=[{"type": "branch", "name": "feat/x"}])
    assert pr["event"]["type"] == "progress"
    adv = await dev.verb(task["id"], "advance", lease=lease, to="review", note="done")
    assert adv["task"]["stage"] == "review" and adv["task"]["holder"] is None
    c2 = await rev.claim()
    assert c2["task"]["id"] == task["id"]
    rj = await rev.verb(task["id"], "reject", lease=c2["lease"]["id"], to="todo", reason="tests fail")
    assert rj["task"]["rework_count"] == 1 and rj["task"]["stage"] == "todo"
    c3 = await dev.claim()
    rel = await dev.verb(task["id"], "release", lease=c3["lease"]["id"], reason="need a break")
    assert rel["task"]["attempts"] == 1
    c4 = await dev.claim()
    await dev.verb(task["id"], "advance", lease=c4["lease"]["id"], to="review")
    c5 = await rev.claim()
    done = await rev.verb(task["id"], "advance", lease=c5["lease"]["id"], to="done")
    assert done["task"]["state"] == "done"
    evs = await dev.get(f"/v1/tasks/{task['id']}/events")
    types = [e["type"] for e in evs["items"]]
    assert types[0] == "created" and types[-1] == "transition"
    me = await dev.get("/v1/me")
    assert me["held"] == [] and "lane:dev" in me["features"]
