"""Lease expiry and lazy recovery (SPEC §3): the next claim that meets an abandoned task recovers it.

Expiry is simulated by moving the lease's end into the past in the database, never by sleeping.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from tests.helpers import World, make_world

HELD_VERBS: dict[str, dict[str, Any]] = {
    "heartbeat": {},
    "progress": {"note": "still here"},
    "advance": {"to": "review"},
    "reject": {"to": "todo", "reason": "no"},
    "release": {"reason": "late"},
    "block": {"reason": "late"},
}


async def expire(db: asyncpg.Connection, task_id: str) -> None:
    """Make the task's current lease run out, as if its holder had vanished."""
    n = await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                         uuid.UUID(task_id))
    assert n == "UPDATE 1"


async def snapshot(db: asyncpg.Connection, task_id: str) -> tuple[str, int]:
    row = await db.fetchval("SELECT to_jsonb(t)::text FROM tasks t WHERE id = $1", uuid.UUID(task_id))
    return row, await db.fetchval("SELECT count(*) FROM events")


async def abandon(w: World, db: asyncpg.Connection, task_id: str, family: str = "cheap") -> dict[str, Any]:
    """A new agent of `family` claims the task and vanishes; returns its claim."""
    c = await (await w.agent(family)).claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task_id, c
    await expire(db, task_id)
    return c


async def test_the_next_claim_recovers_an_expired_lease(admin, db):
    w = await make_world(admin)
    gone = await w.agent("cheap")
    task = (await gone.create("dev"))["task"]
    first = await gone.claim()
    assert first["task"]["attempts"] == 0
    await expire(db, task["id"])

    taker = await w.agent("cheap")
    c = await taker.claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
    assert c["task"]["attempts"] == 1 and c["task"]["holder"] == taker.sub
    assert c["lease"]["id"] != first["lease"]["id"]
    ev = c["event"]
    assert ev["type"] == "claimed" and ev["data"]["reclaimed"] is True
    assert ev["data"]["previous_holder"] == gone.sub and ev["data"]["previous_lease"] == first["lease"]["id"]
    assert ev["data"]["attempts"] == 1
    # The old holder no longer counts as holding it.
    assert (await gone.get("/v1/me"))["held"] == []


async def test_a_live_lease_is_not_recovered(admin, db):
    w = await make_world(admin)
    holder = await w.agent("cheap")
    await holder.create("dev")
    await holder.claim()
    assert (await (await w.agent("cheap")).claim())["code"] == "empty"


async def test_the_old_holder_is_fenced_off_after_a_reclaim(admin, db):
    w = await make_world(admin)
    gone = await w.agent("cheap")
    task = (await gone.create("dev"))["task"]
    old = await gone.claim()
    await expire(db, task["id"])
    taker = await w.agent("cheap")
    new = await taker.claim()
    assert new["task"]["id"] == task["id"]

    before = await snapshot(db, task["id"])
    for verb, body in HELD_VERBS.items():
        path = f"/v1/tasks/{task['id']}/{verb}"
        r = await gone.call("POST", path, {"lease": old["lease"]["id"], **body}, 409)
        assert r.json()["code"] == "lease_lost", verb
        assert r.json()["task"]["holder"] == taker.sub
        assert await snapshot(db, task["id"]) == before, verb
    # The new holder's lease works.
    assert (await taker.verb(task["id"], "heartbeat", lease=new["lease"]["id"]))["code"] == "ok"
    adv = await taker.verb(task["id"], "advance", lease=new["lease"]["id"], to="review")
    assert adv["task"]["stage"] == "review"


async def test_an_expired_holder_may_claim_again_and_gets_a_new_lease(admin, db):
    w = await make_world(admin)
    agent = await w.agent("cheap")
    task = (await agent.create("dev"))["task"]
    old = await agent.claim()
    await expire(db, task["id"])
    # An expired hold does not count against max_active: the same agent can claim, and recovers it.
    c = await agent.claim()
    assert c["task"]["id"] == task["id"] and c["lease"]["id"] != old["lease"]["id"]
    assert c["task"]["attempts"] == 1
    r = await agent.call("POST", f"/v1/tasks/{task['id']}/heartbeat", {"lease": old["lease"]["id"]}, 409)
    assert r.json()["code"] == "lease_lost"


async def test_escalation_after_failed_holds(admin, db):
    # DEV_WORKFLOW's todo: escalate_after 2, max_attempts 3; tier:2 is registered by make_world.
    w = await make_world(admin)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    await abandon(w, db, task["id"])
    second = await abandon(w, db, task["id"])
    assert second["task"]["attempts"] == 1

    cheap = await w.agent("cheap")
    assert (await cheap.claim())["code"] == "empty"  # the claim escalated it and moved on
    t = await admin.get(f"/v1/tasks/{task['id']}")
    assert "tier:2" in t["required_features"] and t["attempts"] == 2
    assert t["state"] == "ready" and t["holder"] is None
    evs = (await admin.get(f"/v1/tasks/{task['id']}/events"))["items"]
    esc = [e for e in evs if e["type"] == "escalated"]
    assert len(esc) == 1 and esc[0]["data"]["to_tier"] == 2 and esc[0]["actor"] == cheap.sub

    assert (await (await w.agent("cheap")).claim())["code"] == "empty"
    capable = await w.agent("capable")
    c = await capable.claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]


async def test_release_counts_attempts_and_escalates(admin, db):
    w = await make_world(admin)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    dev = await w.agent("cheap")
    c = await dev.claim()
    r1 = await dev.verb(task["id"], "release", lease=c["lease"]["id"], reason="too hard")
    assert r1["task"]["attempts"] == 1 and r1["task"]["required_features"] == []
    c = await dev.claim()
    assert c["task"]["id"] == task["id"]
    r2 = await dev.verb(task["id"], "release", lease=c["lease"]["id"], reason="still too hard")
    assert r2["code"] == "ok"
    assert r2["task"]["attempts"] == 2 and r2["task"]["required_features"] == ["tier:2"]
    assert r2["event"]["type"] == "released" and r2["event"]["data"]["escalated"] is True
    types = [e["type"] for e in (await dev.get(f"/v1/tasks/{task['id']}/events"))["items"]]
    assert types[-2:] == ["escalated", "released"]
    assert (await dev.claim())["code"] == "empty"
    assert (await (await w.agent("capable")).claim())["task"]["id"] == task["id"]


async def test_release_at_max_attempts_blocks(admin, db):
    w = await make_world(admin)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    capable = await w.agent("capable")
    for _ in range(2):
        c = await capable.claim()
        assert c["task"]["id"] == task["id"]
        await capable.verb(task["id"], "release", lease=c["lease"]["id"])
    c = await capable.claim()
    out = await capable.verb(task["id"], "release", lease=c["lease"]["id"], reason="give up")
    assert out["code"] == "blocked"
    assert out["task"]["blocked"] is True and out["task"]["blocked_reason"] == "max attempts exceeded"
    assert out["task"]["attempts"] == 3 and out["event"]["type"] == "blocked"
    assert (await capable.claim())["code"] == "empty"


async def test_max_attempts_blocks_inside_the_claim_which_goes_on(admin, db):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    doomed = (await maker.create("dev", "doomed", priority=10))["task"]
    await abandon(w, db, doomed["id"])
    await abandon(w, db, doomed["id"])
    assert (await (await w.agent("cheap")).claim())["code"] == "empty"  # escalated to tier:2
    third = await abandon(w, db, doomed["id"], family="capable")
    assert third["task"]["attempts"] == 2
    spare = (await maker.create("dev", "spare", priority=0))["task"]

    # The doomed task (higher priority) is met first: blocked, and the same claim takes the spare.
    capable = await w.agent("capable")
    c = await capable.claim()
    assert c["code"] == "claimed" and c["task"]["id"] == spare["id"]
    t = await admin.get(f"/v1/tasks/{doomed['id']}")
    assert t["blocked"] is True and t["blocked_reason"] == "max attempts exceeded" and t["attempts"] == 3
    assert t["holder"] is None
    evs = (await admin.get(f"/v1/tasks/{doomed['id']}/events"))["items"]
    assert evs[-1]["type"] == "blocked" and evs[-1]["actor"] == capable.sub
    assert evs[-1]["data"]["reason"] == "max attempts exceeded"

    # The last holder is fenced off, and nobody gets it until a human unblocks it.
    r = await capable.call("POST", f"/v1/tasks/{doomed['id']}/heartbeat", {"lease": third["lease"]["id"]})
    assert r.status_code == 409 and r.json()["code"] == "lease_lost"
    assert (await (await w.agent("capable")).claim())["code"] == "empty"
    u = await admin.verb(doomed["id"], "unblock", note="try once more")
    assert u["task"]["attempts"] == 0 and u["task"]["state"] == "ready"
    assert (await (await w.agent("capable")).claim())["task"]["id"] == doomed["id"]


async def test_without_a_next_tier_the_claim_just_reclaims(admin, db):
    wf = {
        "key": "eager",
        "stages": [
            {"key": "todo", "initial": True, "max_attempts": 5, "escalate_after": 1},
            {"key": "done", "terminal": True},
        ],
        "transitions": [{"from": "todo", "to": "done", "kind": "advance", "required_features": ["role:dev"]}],
    }
    w = await make_world(admin, workflow=wf)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    await abandon(w, db, task["id"])
    assert (await (await w.agent("cheap")).claim())["code"] == "empty"  # escalated to tier:2
    await abandon(w, db, task["id"], family="capable")
    # tier:3 is not registered: past the threshold the task stays at tier:2 and is taken again.
    c = await (await w.agent("capable")).claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
    assert c["task"]["required_features"] == ["tier:2"] and c["task"]["attempts"] == 2
    assert c["event"]["data"]["reclaimed"] is True
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'escalated'") == 1


async def test_a_claimer_of_the_next_tier_takes_the_task_it_escalates(admin, db):
    w = await make_world(admin)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    await abandon(w, db, task["id"])
    await abandon(w, db, task["id"])
    # This claim escalates the task to tier:2 — which the claimer holds, so it goes on and takes it.
    capable = await w.agent("capable")
    c = await capable.claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"], c
    assert c["task"]["required_features"] == ["tier:2"] and c["task"]["attempts"] == 2
    types = [e["type"] for e in (await admin.get(f"/v1/tasks/{task['id']}/events"))["items"]]
    assert types[-2:] == ["escalated", "claimed"]


async def test_abandoned_tasks_are_recovered_in_priority_order(admin, db):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    low = (await maker.create("dev", "low", priority=0))["task"]
    high = (await maker.create("dev", "high", priority=10))["task"]
    await (await w.agent("cheap")).claim()  # takes high
    await (await w.agent("cheap")).claim()  # takes low
    # low's lease ran out first, high's later; both are abandoned now.
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '10 seconds' WHERE id = $1",
                     uuid.UUID(low["id"]))
    await expire(db, high["id"])
    c = await (await w.agent("cheap")).claim()
    assert c["task"]["id"] == high["id"]
