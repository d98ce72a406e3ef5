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


async def test_a_retried_move_with_room_for_one_answers_its_first_next(admin, db: asyncpg.Connection):
    # A retry whose first answer was lost: the move replays, and so does the claim it asked for the first time
    # (max_active 1; with room for more: test_a_retried_move_answers_the_next_claim_its_first_call_made).
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "second")
    body = {"lease": lease, "to": "review", "next": {"lane": "dev"}}
    first = await dev.post(f"/v1/tasks/{task['id']}/advance", body, 200)
    again = await dev.post(f"/v1/tasks/{task['id']}/advance", body, 200)
    assert again.get("replay") is True and again["event"]["id"] == first["event"]["id"]
    assert again["next"]["code"] == "claimed" and again["next"]["replay"] is True
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


async def _held_count(db: asyncpg.Connection, sub: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1 AND state = 'held'", sub))


async def test_a_retried_move_answers_the_next_claim_its_first_call_made(admin, db):
    """The answer of an advance with `next` is lost and the client sends it again: the move is a replay, and so is
    its `next` — the task and lease the first call claimed, not a second task (with room for two, a second claim
    would take one more and leave the first held by a lease nobody heard of)."""
    w = await make_world(admin)
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    dev, task, lease = await held(w)
    for title in ("second", "third"):
        await dev.create("dev", title)
    body = {"lease": lease, "to": "review", "note": "done", "next": {"lane": "dev"}}
    first = await dev.verb(task["id"], "advance", **body)
    again = await dev.verb(task["id"], "advance", **body)
    assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
    assert again["next"]["code"] == "claimed" and again["next"]["replay"] is True
    assert again["next"]["task"]["id"] == first["next"]["task"]["id"]
    assert again["next"]["lease"]["id"] == first["next"]["lease"]["id"]
    assert again["next"]["event"]["id"] == first["next"]["event"]["id"]
    assert again["next"]["card"] == first["next"]["card"]
    assert await _held_count(db, dev.sub) == 1
    # The same with a long-poll `next` and a reject.
    rev = await w.agent("reviewers")
    c = await rev.claim()
    await dev.verb(first["next"]["task"]["id"], "advance", lease=first["next"]["lease"]["id"], to="review")
    body = {"lease": c["lease"]["id"], "to": "todo", "reason": "no", "next": {"lane": "dev", "wait_seconds": 1}}
    one = await rev.verb(c["task"]["id"], "reject", **body)
    two = await rev.verb(c["task"]["id"], "reject", **body)
    assert two["replay"] is True and one["next"]["code"] == "claimed"
    assert two["next"]["task"]["id"] == one["next"]["task"]["id"] and two["next"]["replay"] is True
    assert await _held_count(db, rev.sub) == 1


async def test_a_retried_move_claims_anew_when_its_first_next_is_over(admin, db):
    """Nothing to answer again — the first `next` found nothing, or its hold has ended — and the retry claims as
    any `next` does."""
    w = await make_world(admin)
    dev, task, lease = await held(w)
    body = {"lease": lease, "to": "review", "next": {"lane": "dev"}}
    first = await dev.verb(task["id"], "advance", **body)
    assert first["next"]["code"] == "empty"
    second = (await dev.create("dev", "second"))["task"]
    again = await dev.verb(task["id"], "advance", **body)
    assert again["replay"] is True and again["next"]["code"] == "claimed" and "replay" not in again["next"]
    assert again["next"]["task"]["id"] == second["id"]
    # Its hold ended (released): a retry of the move that claimed it claims what there is now.
    await dev.verb(second["id"], "release", lease=again["next"]["lease"]["id"])
    third = await dev.verb(task["id"], "advance", **body)
    assert third["replay"] is True and third["next"]["code"] == "claimed" and "replay" not in third["next"]
    assert third["next"]["lease"]["id"] != again["next"]["lease"]["id"]
    assert await _held_count(db, dev.sub) == 1


async def test_a_next_claim_the_database_fails_is_refused_inside_the_200(admin, db, dsn):
    """Found by a review: the move committed, then its `next` claim met a lock time-out (another transaction held
    the agent's row) and the whole request was answered `503 … nothing was changed`. The move stands: 200, and
    `next` is the claim's refusal, `unavailable`, with when to claim again."""
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "second")
    other = await asyncpg.connect(dsn)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM agents WHERE sub = $1 FOR UPDATE", dev.sub)
            out = await dev.verb(task["id"], "advance", lease=lease, to="review", next={"lane": "dev"})
    finally:
        await other.close()
    assert out["code"] == "ok" and out["task"]["stage"] == "review"
    nxt = out["next"]
    assert nxt["code"] == "unavailable" and nxt["status"] == 503 and nxt["retry_after"] >= 1
    assert "the move stands" in nxt["detail"] and "Claim again" in nxt["detail"]
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1", dev.sub) == 0
