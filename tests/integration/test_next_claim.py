"""advance and reject with `next`: the move, then the caller's next claim, in one call (one request per task)."""

from __future__ import annotations

import uuid

import asyncpg

from tests.helpers import make_world
from tests.integration.test_verbs import held, snapshot


async def test_advance_with_next_claims_the_next_task_in_the_same_call(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    second = (await dev.create("dev", "second"))["task"]
    out = await dev.verb(task["id"], "advance", lease=lease, to="review", note="done", next={"lane": "dev"})
    assert out["code"] == "ok" and out["task"]["stage"] == "review" and out["event"]["type"] == "transition"
    nxt = out["next"]
    assert nxt["code"] == "claimed" and nxt["task"]["id"] == second["id"]
    assert nxt["card"]["stage"] == "todo" and nxt["event"]["type"] == "claimed"
    # The new hold is real: its lease works, and the agent holds exactly it.
    me = await dev.get("/v1/me")
    assert [h["task"]["id"] for h in me["held"]] == [second["id"]]
    await dev.verb(second["id"], "heartbeat", lease=nxt["lease"]["id"])
    assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", uuid.UUID(task["id"])) == "ready"


async def test_advance_without_next_answers_no_next(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "second")
    out = await dev.verb(task["id"], "advance", lease=lease, to="review")
    assert "next" not in out
    assert (await dev.get("/v1/me"))["held"] == []


async def test_next_empty_says_so_and_the_move_stands(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    out = await dev.verb(task["id"], "advance", lease=lease, to="review", next={})
    assert out["code"] == "ok" and out["task"]["stage"] == "review"
    assert out["next"]["code"] == "empty" and out["next"]["task"] is None and "hint" in out["next"]


async def test_reject_with_next_takes_the_next_review(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    ids = []
    for title in ("one", "two"):
        t = (await dev.create("dev", title))["task"]
        c = await dev.claim()
        await dev.verb(t["id"], "advance", lease=c["lease"]["id"], to="review")
        ids.append(t["id"])
    rev = await w.agent("reviewers")
    c = await rev.claim()
    first = c["task"]["id"]
    out = await rev.verb(first, "reject", lease=c["lease"]["id"], to="todo", reason="tests fail", next={"lane": "dev"})
    assert out["task"]["stage"] == "todo" and out["task"]["rework_count"] == 1
    assert out["next"]["code"] == "claimed" and {first, out["next"]["task"]["id"]} == set(ids)


async def test_a_refused_move_claims_nothing(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    other = (await dev.create("dev", "other"))["task"]
    before = await snapshot(db, other["id"])
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/advance",
                       {"lease": lease, "to": "done", "next": {"lane": "dev"}}, 409)
    assert r.json()["code"] == "illegal_transition" and "next" not in r.json()
    assert await snapshot(db, other["id"]) == before


async def test_a_refused_next_claim_is_a_problem_document_beside_the_move(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    out = await dev.verb(task["id"], "advance", lease=lease, to="review", next={"lane": "nope"})
    assert out["code"] == "ok" and out["task"]["stage"] == "review"
    nxt = out["next"]
    assert nxt["code"] == "not_eligible" and nxt["status"] == 403
    assert nxt["type"] == "urn:ainarres:problem:not_eligible" and "lane:nope" in nxt["detail"]
    assert await db.fetchval("SELECT stage_id IS NOT NULL FROM tasks WHERE id = $1", uuid.UUID(task["id"]))


async def test_next_still_holding_answers_already_holding_with_the_held_task(admin, db: asyncpg.Connection):
    # A retry whose first answer was lost: the move replays, and the claim it asked for the first time is
    # the task the agent now holds (max_active 1): `next` names it, with its lease.
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "second")
    body = {"lease": lease, "to": "review", "next": {"lane": "dev"}}
    first = await dev.post(f"/v1/tasks/{task['id']}/advance", body, 200)
    again = await dev.post(f"/v1/tasks/{task['id']}/advance", body, 200)
    assert again.get("replay") is True and again["event"]["id"] == first["event"]["id"]
    assert again["next"]["code"] == "already_holding"
    assert again["next"]["task"]["id"] == first["next"]["task"]["id"]
    assert again["next"]["lease"]["id"] == first["next"]["lease"]["id"]


async def test_next_refuses_a_bad_wait_like_claim_does(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    before = await snapshot(db, task["id"])
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/advance",
                       {"lease": lease, "to": "review", "next": {"wait_seconds": 61}}, 422)
    assert r.json()["code"] == "invalid" and any("next" in e["field"] for e in r.json()["errors"])
    assert await snapshot(db, task["id"]) == before


async def test_a_reject_that_bans_the_callers_own_family_claims_nothing_the_ban_denies(admin):
    """A family that reviews its own work and rejects it strikes itself; at the threshold the reject bans it from
    the role. The same call's `next` claim must read the features after the move, not before: else it takes a
    task of the role it was just banned from, which it may then not move (found by a concurrency review)."""
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "both", "features": ["lane:dev", "role:dev", "role:reviewer"]}, 201)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": 1}, 200)
    agent = await w.agent("both")
    task = (await agent.create("dev", "own work"))["task"]["id"]
    await agent.create("dev", "next one", priority=-1)  # todo work, which the ban denies it
    c = await agent.claim("dev")
    assert c["task"]["id"] == task
    await agent.verb(task, "advance", lease=c["lease"]["id"], to="review")
    c = await agent.claim("dev")  # its own work, now in review (its priority ranks it first)
    assert c["task"]["id"] == task and c["task"]["stage"] == "review"
    out = await agent.verb(task, "reject", lease=c["lease"]["id"], to="todo", reason="redo", next={"lane": "dev"})
    assert out["task"]["stage"] == "todo"
    assert "role:dev" not in (await agent.get("/v1/me"))["features"]  # banned by its own reject
    nxt = out["next"]
    assert nxt["code"] == "empty", nxt  # the `todo` task needs role:dev, just denied; no review work is left
