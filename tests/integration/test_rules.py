"""The claim and routing rules (SPEC §3–§4): order, eligibility, idempotency, dependencies, rework."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from tests.helpers import Api, World, make_world

# Review can be left forward only by role:lead; role:reviewer may only send work back.
REJECT_ONLY_WORKFLOW = {
    "key": "gate",
    "stages": [
        {"key": "todo", "initial": True},
        {"key": "review"},
        {"key": "done", "terminal": True},
    ],
    "transitions": [
        {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:lead"]},
        {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
    ],
}


async def to_done(w: World, task_id: str) -> None:
    """Walk a todo task through review to done (the caller must make sure it is the next claim)."""
    dev = await w.agent("cheap")
    c = await dev.claim()
    assert c["task"]["id"] == task_id, c
    await dev.verb(task_id, "advance", lease=c["lease"]["id"], to="review")
    rev = await w.agent("reviewers")
    c = await rev.claim()
    assert c["task"]["id"] == task_id, c
    await rev.verb(task_id, "advance", lease=c["lease"]["id"], to="done")


async def to_review(w: World, task_id: str) -> None:
    dev = await w.agent("cheap")
    c = await dev.claim()
    assert c["task"]["id"] == task_id, c
    await dev.verb(task_id, "advance", lease=c["lease"]["id"], to="review")


# order --------------------------------------------------------------------------------------------

async def test_claims_come_by_priority_then_age(admin):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    low = (await maker.create("dev", "low", priority=-5))["task"]
    old_mid = (await maker.create("dev", "old mid", priority=5))["task"]
    high = (await maker.create("dev", "high", priority=50))["task"]
    new_mid = (await maker.create("dev", "new mid", priority=5))["task"]
    plain = (await maker.create("dev", "plain"))["task"]
    # A different route (required set) of the same stage competes on the same order.
    routed = (await maker.create("dev", "routed", priority=5, required_features=["area:backend"]))["task"]
    await admin.patch("/v1/families/capable", {"features": ["lane:dev", "role:dev", "tier:2", "area:backend"],
                                               "max_active": 10})
    agent = await w.agent("capable")
    got = [(await agent.claim())["task"]["id"] for _ in range(6)]
    assert got == [high["id"], old_mid["id"], new_mid["id"], routed["id"], plain["id"], low["id"]]
    assert (await agent.claim())["code"] == "empty"


async def test_a_reviewer_that_may_only_reject_still_gets_the_task(admin, db):
    await admin.post("/v1/features", {"name": "role:lead"}, 201)
    w = await make_world(admin, workflow=REJECT_ONLY_WORKFLOW)
    dev = await w.agent("cheap")
    task = (await dev.create("dev"))["task"]
    await to_review(w, task["id"])
    rev = await w.agent("reviewers")
    c = await rev.claim()
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"] and c["task"]["stage"] == "review"
    advance = {"lease": c["lease"]["id"], "to": "done"}
    r = await rev.call("POST", f"/v1/tasks/{task['id']}/advance", advance, 403)
    assert r.json()["code"] == "not_eligible" and "role:lead" in r.json()["detail"]
    rj = await rev.verb(task["id"], "reject", lease=c["lease"]["id"], to="todo", reason="not good enough")
    assert rj["task"]["stage"] == "todo" and rj["task"]["rework_count"] == 1


async def test_a_family_with_no_transition_out_of_the_stage_does_not_get_it(admin):
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "watchers", "features": ["lane:dev"]}, 201)
    dev = await w.agent("cheap")
    await dev.create("dev")
    # A family that can take no way out of any stage can never claim here: refused, naming what it lacks.
    r = await (await w.agent("watchers")).call("POST", "/v1/claims", {}, 403)
    assert "can ever match" in r.json()["detail"] and "role:dev" in r.json()["detail"]
    assert (await (await w.agent("reviewers")).claim())["code"] == "empty"


# idempotent create --------------------------------------------------------------------------------

async def test_same_idempotency_key_returns_the_same_task(admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    body = {"lane": "dev", "title": "once", "payload": {"n": 1}, "idempotency_key": "job-1"}
    r1 = await dev.call("POST", "/v1/tasks", body, 201)
    r2 = await dev.call("POST", "/v1/tasks", body, 200)
    assert r1.json()["code"] == "created" and r2.json()["code"] == "existing"
    assert r2.json()["task"]["id"] == r1.json()["task"]["id"]
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1
    assert await db.fetchval("SELECT count(*) FROM events") == 1

    # The same key with another body is a conflict that names the existing task.
    r3 = await dev.call("POST", "/v1/tasks", {**body, "payload": {"n": 2}}, 409)
    assert r3.json()["code"] == "conflict" and r3.json()["task"]["id"] == r1.json()["task"]["id"]
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1

    # Another key is another task.
    r4 = await dev.call("POST", "/v1/tasks", {**body, "idempotency_key": "job-2"}, 201)
    assert r4.json()["task"]["id"] != r1.json()["task"]["id"]


async def test_concurrent_duplicates_make_one_task(admin, db):
    w = await make_world(admin)
    agents = [await w.agent("cheap") for _ in range(6)]
    body = {"lane": "dev", "title": "raced", "idempotency_key": "race-1"}
    results = await asyncio.gather(*(a.call("POST", "/v1/tasks", body) for a in agents))
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200] * 5 + [201], [r.text for r in results]
    assert len({r.json()["task"]["id"] for r in results}) == 1
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1
    assert await db.fetchval("SELECT count(*) FROM events WHERE type = 'created'") == 1


# dependencies -------------------------------------------------------------------------------------

async def test_a_dependent_waits_until_its_prerequisite_is_done(admin, db):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    first = (await maker.create("dev", "first"))["task"]
    # Higher priority: if it were claimable it would come first.
    second = (await maker.create("dev", "second", priority=100, depends_on=[first["id"]]))["task"]
    assert second["state"] == "waiting" and second["depends_on"] == [first["id"]]

    await to_review(w, first["id"])
    assert (await (await w.agent("cheap")).claim())["code"] == "empty"
    rev = await w.agent("reviewers")
    c = await rev.claim()
    assert c["task"]["id"] == first["id"]
    await rev.verb(first["id"], "advance", lease=c["lease"]["id"], to="done")

    assert (await maker.get(f"/v1/tasks/{second['id']}"))["state"] == "ready"
    c = await (await w.agent("cheap")).claim()
    assert c["code"] == "claimed" and c["task"]["id"] == second["id"]


async def test_a_dependent_created_after_its_prerequisite_finished_is_ready(admin):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    first = (await maker.create("dev", "first"))["task"]
    await to_done(w, first["id"])
    second = (await maker.create("dev", "second", depends_on=[first["id"]]))["task"]
    assert second["state"] == "ready"
    assert (await (await w.agent("cheap")).claim())["task"]["id"] == second["id"]


async def test_every_prerequisite_must_be_done(admin):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    a = (await maker.create("dev", "a", priority=2))["task"]
    b = (await maker.create("dev", "b", priority=1))["task"]
    joined = (await maker.create("dev", "joined", priority=100, depends_on=[a["id"], b["id"]]))["task"]
    await to_done(w, a["id"])
    assert (await maker.get(f"/v1/tasks/{joined['id']}"))["state"] == "waiting"
    await to_done(w, b["id"])
    assert (await (await w.agent("cheap")).claim())["task"]["id"] == joined["id"]


async def test_a_blocked_prerequisite_keeps_dependents_waiting(admin):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    first = (await maker.create("dev", "first"))["task"]
    second = (await maker.create("dev", "second", depends_on=[first["id"]]))["task"]
    dev = await w.agent("cheap")
    c = await dev.claim()
    assert c["task"]["id"] == first["id"]
    await dev.verb(first["id"], "block", lease=c["lease"]["id"], reason="waiting on a human")
    assert (await (await w.agent("cheap")).claim())["code"] == "empty"
    assert (await maker.get(f"/v1/tasks/{second['id']}"))["state"] == "waiting"
    # A dependent created while its prerequisite is parked waits too.
    third = (await maker.create("dev", "third", depends_on=[first["id"]]))["task"]
    assert third["state"] == "waiting"
    await maker.verb(first["id"], "unblock")
    await to_done(w, first["id"])
    agent = await w.agent("cheap")
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    got = {(await agent.claim())["task"]["id"] for _ in range(2)}
    assert got == {second["id"], third["id"]}


# rework -------------------------------------------------------------------------------------------

async def _reject_once(w: World, task_id: str) -> dict[str, Any]:
    await to_review(w, task_id)
    rev = await w.agent("reviewers")
    c = await rev.claim()
    assert c["task"]["id"] == task_id
    return await rev.verb(task_id, "reject", lease=c["lease"]["id"], to="todo", reason="again")


async def test_rework_cap_blocks_for_a_human_and_unblock_resets_it(admin, db):
    # DEV_WORKFLOW's review stage has max_rework 2.
    w = await make_world(admin)
    maker = await w.agent("cheap")
    task = (await maker.create("dev"))["task"]
    for n in (1, 2):
        rj = await _reject_once(w, task["id"])
        assert rj["code"] == "ok" and rj["task"]["stage"] == "todo" and rj["task"]["rework_count"] == n

    capped = await _reject_once(w, task["id"])
    assert capped["code"] == "blocked"
    t = capped["task"]
    assert t["blocked"] is True and t["stage"] == "review" and t["holder"] is None
    assert "rework cap" in t["blocked_reason"]
    assert t["rework_count"] == 2  # the refused reject did not count
    assert capped["event"]["type"] == "blocked"
    assert (await (await w.agent("reviewers")).claim())["code"] == "empty"

    # The substrate made this block (ADR 0015): a reviewer (who may work the review stage) may not lift it,
    # a human (seat:overseer) does; the cap counts afresh.
    rev = await w.agent("reviewers")
    refused = await rev.verb(task["id"], "unblock", 403, note="one more round is fine")
    assert refused["code"] == "not_eligible" and "a human must lift it" in refused["detail"]
    u = await admin.verb(task["id"], "unblock", note="one more round is fine")
    assert u["task"]["state"] == "ready" and u["task"]["stage"] == "review"
    c = await rev.claim()
    assert c["task"]["id"] == task["id"]
    rj = await rev.verb(task["id"], "reject", lease=c["lease"]["id"], to="todo", reason="again")
    assert rj["code"] == "ok" and rj["task"]["stage"] == "todo" and rj["task"]["rework_count"] == 3


async def _at_the_cap(admin: Api) -> tuple[dict[str, Any], Api, dict[str, Any]]:
    """A task rejected twice out of review (DEV_WORKFLOW's cap) and back in review, held by a reviewer: the task,
    the reviewer and the claim."""
    w = await make_world(admin)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    for _ in (1, 2):
        await _reject_once(w, task["id"])
    await to_review(w, task["id"])
    rev = await w.agent("reviewers")
    return task, rev, await rev.claim()


async def test_an_agents_own_block_and_unblock_start_nothing_over(admin):
    """Only a human's unblock (seat:overseer) starts attempts and the stage's rework count over (ADR 0006): an
    agent that blocks a task and unblocks it again would otherwise take the rework cap, the escalation and the
    max-attempts block out of the workflow at will (found by a review: a max_rework 2 stage took 4 rejects)."""
    task, rev, c = await _at_the_cap(admin)
    await rev.verb(task["id"], "release", lease=c["lease"]["id"])  # a failed hold: attempts 1
    c = await rev.claim()
    assert c["task"]["id"] == task["id"] and c["task"]["attempts"] == 1
    await rev.verb(task["id"], "block", lease=c["lease"]["id"], reason="need a moment")
    u = await rev.verb(task["id"], "unblock", note="ok")
    assert u["task"]["attempts"] == 1 and u["task"]["rework_count"] == 2
    c = await rev.claim()
    capped = await rev.verb(task["id"], "reject", lease=c["lease"]["id"], to="todo", reason="again")
    assert capped["code"] == "blocked" and capped["task"]["rework_count"] == 2  # the cap still holds


async def test_a_retried_reject_past_the_rework_cap_answers_its_block(admin):
    """The rework cap's block records the refused call: the same reject sent again (its answer lost) is told
    that outcome, a replay, and nothing is applied twice."""
    task, rev, c = await _at_the_cap(admin)
    body = {"lease": c["lease"]["id"], "to": "todo", "reason": "again", "artifacts": [{"type": "file", "path": "x"}]}
    first = await rev.verb(task["id"], "reject", **body)
    again = await rev.verb(task["id"], "reject", **body)
    assert first["code"] == "blocked" and "replay" not in first
    assert again["code"] == "blocked" and again["replay"] is True and again["event"] == first["event"]
    assert again["task"]["blocked"] is True
    r = await rev.call("POST", f"/v1/tasks/{task['id']}/reject", {**body, "reason": "other"}, 409)
    assert r.json()["code"] == "lease_lost"
    types = [e["type"] for e in (await admin.get(f"/v1/tasks/{task['id']}/events"))["items"]]
    assert types.count("blocked") == 1 and types.count("transition") == 5  # 3 advances, 2 rejects


async def test_workflow_wide_max_rework_applies_when_the_stage_sets_none(admin):
    wf = {
        "key": "strict",
        "max_rework": 0,
        "stages": [{"key": "todo", "initial": True}, {"key": "review"}, {"key": "done", "terminal": True}],
        "transitions": [
            {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
            {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
            {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
        ],
    }
    w = await make_world(admin, workflow=wf)
    task = (await (await w.agent("cheap")).create("dev"))["task"]
    capped = await _reject_once(w, task["id"])
    assert capped["code"] == "blocked" and "rework cap" in capped["task"]["blocked_reason"]


# events are append-only ---------------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE events SET type = 'progress'",
    "DELETE FROM events",
    "TRUNCATE events",
    "TRUNCATE tasks, events",
])
async def test_the_database_refuses_to_change_events(admin, db, statement):
    w = await make_world(admin)
    await (await w.agent("cheap")).create("dev")
    before = await db.fetch("SELECT * FROM events ORDER BY id")
    assert before
    with pytest.raises(asyncpg.PostgresError, match="append-only"):
        await db.execute(statement)
    assert await db.fetch("SELECT * FROM events ORDER BY id") == before


async def test_every_change_appends_an_event(admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev"))["task"]
    c = await dev.claim()
    await dev.verb(task["id"], "progress", lease=c["lease"]["id"], note="n")
    await dev.verb(task["id"], "block", lease=c["lease"]["id"], reason="r")
    await dev.verb(task["id"], "unblock")
    c = await dev.claim()
    await dev.verb(task["id"], "release", lease=c["lease"]["id"])
    c = await dev.claim()
    await dev.verb(task["id"], "advance", lease=c["lease"]["id"], to="review")
    rows = await db.fetch("SELECT type, actor, family FROM events WHERE task_id = $1 ORDER BY id",
                          uuid.UUID(task["id"]))
    assert [r["type"] for r in rows] == ["created", "claimed", "progress", "blocked", "unblocked", "claimed",
                                         "released", "claimed", "transition"]
    assert {(r["actor"], r["family"]) for r in rows} == {(dev.sub, "cheap")}



async def test_a_denial_bites_on_the_holders_next_verb(admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev"))["task"]
    c = await dev.claim()
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "bad output"}, 201)
    row = "SELECT to_jsonb(t)::text FROM tasks t WHERE id = $1"
    before = await db.fetchval(row, uuid.UUID(task["id"]))
    advance = {"lease": c["lease"]["id"], "to": "review"}
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/advance", advance, 403)
    assert r.json()["code"] == "not_eligible" and "role:dev" in r.json()["detail"]
    assert await db.fetchval(row, uuid.UUID(task["id"])) == before
    # It may still give the work back, and it gets no new work of that kind.
    await dev.verb(task["id"], "release", lease=c["lease"]["id"], reason="denied")
    r = await dev.call("POST", "/v1/claims", {}, 403)  # nothing it may ever take now, and it is told why
    assert "role:dev is denied to family cheap" in r.json()["detail"]
    await admin.delete("/v1/families/cheap/denials/role:dev")
    assert (await dev.claim())["task"]["id"] == task["id"]


async def test_a_promotion_is_in_the_dependents_history(admin):
    """A task that waited on another says, in its events, when it became claimable and after what."""
    w = await make_world(admin)
    maker = await w.agent("cheap")
    first = (await maker.create("dev", "first"))["task"]
    second = (await maker.create("dev", "second", depends_on=[first["id"]]))["task"]
    assert second["state"] == "waiting"
    c = await maker.claim("dev")
    await maker.verb(first["id"], "advance", lease=c["lease"]["id"], to="review")
    rev = await w.agent("reviewers")
    c = await rev.claim("dev")
    await rev.verb(first["id"], "advance", lease=c["lease"]["id"], to="done")
    events = (await maker.get(f"/v1/tasks/{second['id']}/events"))["items"]
    assert [e["type"] for e in events] == ["created", "ready"]
    assert events[1]["actor"] is None and events[1]["data"] == {"after": first["id"]}
