"""The nine verbs over HTTP (SPEC §3–§4): each one's success and every refusal it can give."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from tests.helpers import Api, World, make_world

# A workflow whose review stage can be left by a reviewer only backwards: the advance needs
# role:lead, the reject role:reviewer; todo → review is guarded by the task's own payload.
GUARDED_WORKFLOW = {
    "key": "guarded",
    "stages": [
        {"key": "todo", "initial": True, "lease_seconds": 60},
        {"key": "review", "lease_seconds": 60},
        {"key": "done", "terminal": True},
    ],
    "transitions": [
        {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"],
         "guard": "$.payload.checks_passed == true"},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:lead"]},
        {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
    ],
}

# Each held-task verb with a body that would succeed under a live lease on a todo task
# (reject has no legal target from todo, but the lease is checked before the transition).
HELD_VERBS: dict[str, dict[str, Any]] = {
    "heartbeat": {},
    "progress": {"note": "working"},
    "advance": {"to": "review"},
    "reject": {"to": "todo", "reason": "no"},
    "release": {"reason": "giving up"},
    "block": {"reason": "stuck"},
}


async def snapshot(db: asyncpg.Connection, task_id: str) -> tuple[str, int]:
    """The task's whole row and the number of events in the database: what a refusal must not touch."""
    row = await db.fetchval("SELECT to_jsonb(t)::text FROM tasks t WHERE id = $1", uuid.UUID(task_id))
    count = await db.fetchval("SELECT count(*) FROM events")
    return row, count


def instant(text: str) -> datetime:
    """A timestamp as the API writes it (`Z` or `+00:00`), parsed."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def family(admin: Api, key: str, features: list[str], **extra: Any) -> None:
    await admin.post("/v1/families", {"key": key, "features": features, **extra}, 201)


async def held(w: World, family_key: str = "cheap", **create: Any) -> tuple[Api, dict[str, Any], str]:
    """A new agent of `family_key` holding a freshly created todo task: (agent, task, lease id)."""
    agent = await w.agent(family_key)
    task = (await agent.create("dev", "held task", **create))["task"]
    c = await agent.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
    return agent, c["task"], c["lease"]["id"]


# create -------------------------------------------------------------------------------------------

async def test_create_returns_201_with_task_and_created_event(admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    r = await dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "write it", "payload": {"goal": "x"},
                                             "priority": 7, "required_features": ["area:backend"]})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["code"] == "created"
    t = body["task"]
    assert (t["lane"], t["stage"], t["state"], t["title"]) == ("dev", "todo", "ready", "write it")
    assert t["project"] == "acme" and t["payload"] == {"goal": "x"} and t["priority"] == 7
    assert t["required_features"] == ["area:backend"] and t["depends_on"] == []
    assert (t["attempts"], t["rework_count"], t["blocked"], t["holder"]) == (0, 0, False, None)
    assert body["event"]["type"] == "created" and body["event"]["task_id"] == t["id"]
    assert body["event"]["actor"] == dev.sub and body["event"]["family"] == "cheap"
    assert await db.fetchval("SELECT count(*) FROM tasks") == 1


async def test_create_refusals(admin, db):
    w = await make_world(admin)
    await family(admin, "outsider", ["role:dev"])
    outsider = await w.agent("outsider")
    reviewer = await w.agent("reviewers")
    dev = await w.agent("cheap")
    before = await db.fetchval("SELECT count(*) FROM tasks"), await db.fetchval("SELECT count(*) FROM events")

    r = await outsider.call("POST", "/v1/tasks", {"lane": "dev", "title": "t"}, 403)
    assert r.json()["code"] == "not_eligible" and "lane:dev" in r.json()["detail"]
    assert r.headers["content-type"].startswith("application/problem+json")

    # Only the role that may take the first step out of the initial stage (todo → review: role:dev).
    r = await reviewer.call("POST", "/v1/tasks", {"lane": "dev", "title": "t"}, 403)
    assert r.json()["code"] == "not_eligible" and "role:dev" in r.json()["detail"]

    # An unknown lane answers like a lane you lack, so outsiders learn nothing about which lanes exist.
    r = await dev.call("POST", "/v1/tasks", {"lane": "nowhere", "title": "t"}, 403)
    assert r.json()["code"] == "not_eligible" and "lane:nowhere" in r.json()["detail"]

    unregistered = {"lane": "dev", "title": "t", "required_features": ["area:nowhere"]}
    r = await dev.call("POST", "/v1/tasks", unregistered, 422)
    assert r.json()["code"] == "invalid" and "area:nowhere" in r.json()["detail"]
    assert "required_features" in r.json()["detail"]

    ghost = str(uuid.uuid4())
    r = await dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "t", "depends_on": [ghost]}, 404)
    assert r.json()["code"] == "not_found"  # a thing that does not exist, whether the path or the body names it
    assert ghost in r.json()["detail"] and "depends_on" in r.json()["detail"]

    # Over the payload bound (64 KiB by default) but well under the body bound.
    big = {"lane": "dev", "title": "t", "payload": {"blob": "x" * 70_000}}
    r = await dev.call("POST", "/v1/tasks", big, 413)
    assert r.json()["code"] == "payload_too_large"

    after = await db.fetchval("SELECT count(*) FROM tasks"), await db.fetchval("SELECT count(*) FROM events")
    assert after == before == (0, 0)


# claim --------------------------------------------------------------------------------------------

async def test_claim_takes_a_task_and_returns_its_lease(admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev"))["task"]
    c = await dev.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
    assert c["task"]["state"] == "held" and c["task"]["holder"] == dev.sub
    assert instant(c["lease"]["expires_at"]) == instant(c["task"]["lease_expires_at"])
    assert c["event"]["type"] == "claimed" and c["event"]["data"]["lease"] == c["lease"]["id"]
    row = await db.fetchrow("SELECT holder, lease_id, state FROM tasks WHERE id = $1", uuid.UUID(task["id"]))
    assert (row["holder"], str(row["lease_id"]), row["state"]) == (dev.sub, c["lease"]["id"], "held")


async def test_claim_empty_when_nothing_fits(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    empty = await dev.claim()
    assert (empty["code"], empty["task"], empty["lease"]) == ("empty", None, None)
    assert empty["pending"] == {"held": 0, "waiting": 0, "blocked": 0}
    await dev.create("dev")
    rev = await w.agent("reviewers")
    # A todo task is nothing a reviewer may move; a task needing area:backend is nothing cheap holds.
    assert (await rev.claim())["code"] == "empty"
    other = await w.agent("cheap")
    assert (await other.claim())["code"] == "claimed"  # nobody else may take it while it is held
    await dev.create("dev", required_features=["area:backend"])
    fresh = await w.agent("cheap")
    assert (await fresh.claim())["code"] == "empty"


async def test_claim_while_holding_is_already_holding_with_the_held_task(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "second")
    events = await db.fetchval("SELECT count(*) FROM events")
    r = await dev.call("POST", "/v1/claims", {}, 409)
    body = r.json()
    assert body["code"] == "already_holding"
    assert body["task"]["id"] == task["id"] and body["lease"]["id"] == lease
    assert await db.fetchval("SELECT count(*) FROM events") == events
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE state = 'held'") == 1


async def test_family_max_active_allows_more_holds(admin):
    w = await make_world(admin)
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    dev = await w.agent("cheap")
    for i in range(3):
        await dev.create("dev", f"t{i}")
    a = await dev.claim()
    b = await dev.claim()
    assert a["code"] == b["code"] == "claimed" and a["task"]["id"] != b["task"]["id"]
    r = await dev.call("POST", "/v1/claims", {}, 409)
    assert r.json()["code"] == "already_holding"
    me = await dev.get("/v1/me")
    assert {h["task"]["id"] for h in me["held"]} == {a["task"]["id"], b["task"]["id"]}


async def test_claim_lane_filter(admin):
    w = await make_world(admin)
    await admin.post("/v1/lanes", {"project": "acme", "key": "ops", "workflow": "dev"}, 201)
    await family(admin, "both", ["lane:dev", "lane:ops", "role:dev"], max_active=5)
    agent = await w.agent("both")
    in_dev = (await agent.create("dev", "dev work", priority=10))["task"]
    in_ops = (await agent.create("ops", "ops work"))["task"]
    await agent.claim("nowhere", expect=403)  # a lane it does not hold can never match: refused
    c = await agent.claim("ops")
    assert c["task"]["id"] == in_ops["id"] and c["task"]["lane"] == "ops"
    assert (await agent.claim("ops"))["code"] == "empty"
    c = await agent.claim("dev")
    assert c["task"]["id"] == in_dev["id"]


# heartbeat and progress ---------------------------------------------------------------------------

async def test_heartbeat_extends_the_lease(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    tid = uuid.UUID(task["id"])
    await db.execute("UPDATE tasks SET lease_expires_at = now() + interval '5 seconds' WHERE id = $1", tid)
    short = await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", tid)
    events = await db.fetchval("SELECT count(*) FROM events")
    hb = await dev.verb(task["id"], "heartbeat", lease=lease)
    assert hb["code"] == "ok" and hb["lease"]["id"] == lease
    renewed = await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", tid)
    assert (renewed - short).total_seconds() > 30  # the stage's 60 s lease, not the 5 s left
    assert instant(hb["task"]["lease_expires_at"]) == instant(hb["lease"]["expires_at"]) == renewed
    assert await db.fetchval("SELECT count(*) FROM events") == events  # a heartbeat is not an event


async def test_progress_records_an_event_and_renews(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    tid = uuid.UUID(task["id"])
    await db.execute("UPDATE tasks SET lease_expires_at = now() + interval '5 seconds' WHERE id = $1", tid)
    short = await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", tid)
    pr = await dev.verb(task["id"], "progress", lease=lease, note="halfway",
                        artifacts=[{"type": "commit", "sha": "abc123"}])
    assert pr["code"] == "ok" and pr["task"]["holder"] == dev.sub
    ev = pr["event"]
    assert ev["type"] == "progress" and ev["data"]["note"] == "halfway"
    assert ev["data"]["artifacts"] == [{"type": "commit", "sha": "abc123"}]
    renewed = await db.fetchval("SELECT lease_expires_at FROM tasks WHERE id = $1", tid)
    assert (renewed - short).total_seconds() > 30


# advance and reject -------------------------------------------------------------------------------

async def test_advance_moves_the_task_and_releases_the_hold(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    adv = await dev.verb(task["id"], "advance", lease=lease, to="review", note="ready for review",
                         artifacts=[{"type": "pr", "uri": "https://example.test/pr/1"}])
    t = adv["task"]
    assert adv["code"] == "ok" and t["stage"] == "review" and t["state"] == "ready"
    assert t["holder"] is None and t["lease_expires_at"] is None and t["attempts"] == 0
    assert adv["event"]["type"] == "transition"
    assert adv["event"]["data"]["from"] == "todo" and adv["event"]["data"]["to"] == "review"
    assert adv["event"]["data"]["kind"] == "advance" and adv["event"]["data"]["note"] == "ready for review"
    assert (await dev.get("/v1/me"))["held"] == []
    # The old lease died with the hold.
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/heartbeat", {"lease": lease}, 409)
    assert r.json()["code"] == "lease_lost"


async def test_reject_sends_back_and_counts_rework(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.verb(task["id"], "advance", lease=lease, to="review")
    rev = await w.agent("reviewers")
    c = await rev.claim()
    rj = await rev.verb(task["id"], "reject", lease=c["lease"]["id"], to="todo", reason="tests fail",
                        artifacts=[{"type": "file", "path": "log.txt"}])
    assert rj["code"] == "ok"
    assert rj["task"]["stage"] == "todo" and rj["task"]["rework_count"] == 1 and rj["task"]["holder"] is None
    assert rj["event"]["data"]["reason"] == "tests fail" and rj["event"]["data"]["kind"] == "reject"


async def test_illegal_transition_names_the_legal_targets(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    before = await snapshot(db, task["id"])
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/advance", {"lease": lease, "to": "done"}, 409)
    body = r.json()
    assert body["code"] == "illegal_transition" and "review" in body["detail"]
    assert body["task"]["id"] == task["id"]
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/advance", {"lease": lease, "to": "nowhere"}, 409)
    assert r.json()["code"] == "illegal_transition"
    # No reject leads out of todo at all.
    reject = {"lease": lease, "to": "todo", "reason": "x"}
    r = await dev.call("POST", f"/v1/tasks/{task['id']}/reject", reject, 409)
    assert r.json()["code"] == "illegal_transition"
    assert await snapshot(db, task["id"]) == before


async def _guarded_world(admin: Api) -> World:
    await admin.post("/v1/features", {"name": "role:lead"}, 201)
    w = await make_world(admin, workflow=GUARDED_WORKFLOW)
    return w


async def test_not_eligible_names_the_missing_feature(admin, db):
    w = await _guarded_world(admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", payload={"checks_passed": True}))["task"]
    c = await dev.claim()
    await dev.verb(task["id"], "advance", lease=c["lease"]["id"], to="review")
    rev = await w.agent("reviewers")
    c = await rev.claim()
    assert c["code"] == "claimed"
    before = await snapshot(db, task["id"])
    advance = {"lease": c["lease"]["id"], "to": "done"}
    r = await rev.call("POST", f"/v1/tasks/{task['id']}/advance", advance, 403)
    assert r.json()["code"] == "not_eligible" and "role:lead" in r.json()["detail"]
    assert await snapshot(db, task["id"]) == before


async def test_guard_failed_unless_the_payload_satisfies_it(admin, db):
    w = await _guarded_world(admin)
    await admin.patch("/v1/families/cheap", {"max_active": 3})
    dev = await w.agent("cheap")
    failing = (await dev.create("dev", "unchecked", payload={"checks_passed": False}))["task"]
    absent = (await dev.create("dev", "no checks at all"))["task"]
    passing = (await dev.create("dev", "checked", payload={"checks_passed": True}))["task"]
    leases = {}
    for _ in range(3):
        c = await dev.claim()
        leases[c["task"]["id"]] = c["lease"]["id"]
    for t in (failing, absent):
        before = await snapshot(db, t["id"])
        advance = {"lease": leases[t["id"]], "to": "review"}
        r = await dev.call("POST", f"/v1/tasks/{t['id']}/advance", advance, 409)
        assert r.json()["code"] == "guard_failed" and r.json()["task"]["id"] == t["id"]
        assert await snapshot(db, t["id"]) == before
    ok = await dev.verb(passing["id"], "advance", lease=leases[passing["id"]], to="review")
    assert ok["task"]["stage"] == "review"


# release and block --------------------------------------------------------------------------------

async def test_release_returns_the_task_with_one_more_attempt(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    rel = await dev.verb(task["id"], "release", lease=lease, reason="need a break")
    assert rel["code"] == "ok"
    t = rel["task"]
    assert t["state"] == "ready" and t["holder"] is None and t["attempts"] == 1 and t["stage"] == "todo"
    assert rel["event"]["type"] == "released" and rel["event"]["data"]["reason"] == "need a break"
    again = await (await w.agent("cheap")).claim()
    assert again["task"]["id"] == task["id"]


async def test_block_parks_the_task(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    b = await dev.verb(task["id"], "block", lease=lease, reason="needs a decision")
    t = b["task"]
    assert b["code"] == "ok" and t["blocked"] is True and t["state"] == "blocked"
    assert t["blocked_reason"] == "needs a decision" and t["holder"] is None
    assert b["event"]["type"] == "blocked" and b["event"]["data"]["reason"] == "needs a decision"
    assert (await dev.claim())["code"] == "empty"
    assert (await (await w.agent("capable")).claim())["code"] == "empty"


# unblock ------------------------------------------------------------------------------------------

async def test_unblock_by_a_stage_worker_or_an_overseer(admin, db):
    w = await make_world(admin)
    await family(admin, "overseers", ["seat:overseer"])
    dev, task, lease = await held(w)
    await dev.verb(task["id"], "block", lease=lease, reason="stuck")

    # A reviewer has the lane but no role that moves a todo task.
    rev = await w.agent("reviewers")
    before = await snapshot(db, task["id"])
    r = await rev.call("POST", f"/v1/tasks/{task['id']}/unblock", {"note": "go"}, 403)
    assert r.json()["code"] == "not_eligible" and "role:dev" in r.json()["detail"]
    assert await snapshot(db, task["id"]) == before

    boss = await w.agent("overseers")
    u = await boss.verb(task["id"], "unblock", note="decided: go ahead")
    assert u["code"] == "ok" and u["task"]["state"] == "ready" and u["task"]["blocked"] is False
    assert u["task"]["blocked_reason"] is None
    assert u["event"]["type"] == "unblocked" and u["event"]["actor"] == boss.sub

    # Not blocked any more: a second unblock is a conflict and changes nothing.
    before = await snapshot(db, task["id"])
    r = await boss.call("POST", f"/v1/tasks/{task['id']}/unblock", {}, 409)
    assert r.json()["code"] == "conflict"
    assert await snapshot(db, task["id"]) == before

    c = await dev.claim()
    assert c["task"]["id"] == task["id"]
    await dev.verb(task["id"], "block", lease=c["lease"]["id"], reason="stuck again")
    # Any agent able to work the stage may unblock it, not only the one that blocked it.
    other = await w.agent("cheap")
    u = await other.verb(task["id"], "unblock")
    assert u["task"]["state"] == "ready" and u["task"]["attempts"] == 0


# refusals common to the held-task verbs ------------------------------------------------------------

async def test_wrong_or_foreign_lease_is_lease_lost_and_changes_nothing(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    stranger = await w.agent("cheap")
    own_task = (await stranger.create("dev", "stranger's"))["task"]
    own = await stranger.claim()
    assert own["task"]["id"] == own_task["id"]
    before = await snapshot(db, task["id"])
    for verb, body in HELD_VERBS.items():
        # A lease that never existed, from the holder.
        path = f"/v1/tasks/{task['id']}/{verb}"
        r = await dev.call("POST", path, {"lease": str(uuid.uuid4()), **body}, 409)
        assert r.json()["code"] == "lease_lost", verb
        assert r.json()["task"]["id"] == task["id"]
        # The holder's real lease, presented by someone else.
        r = await stranger.call("POST", path, {"lease": lease, **body}, 409)
        assert r.json()["code"] == "lease_lost", verb
        # A real lease of another task.
        r = await dev.call("POST", path, {"lease": own["lease"]["id"], **body}, 409)
        assert r.json()["code"] == "lease_lost", verb
        assert await snapshot(db, task["id"]) == before, verb
    # The holder still holds it.
    assert (await dev.verb(task["id"], "heartbeat", lease=lease))["code"] == "ok"


async def test_expired_lease_is_lease_lost_before_anyone_reclaims(admin, db):
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                     uuid.UUID(task["id"]))
    before = await snapshot(db, task["id"])
    for verb, body in HELD_VERBS.items():
        r = await dev.call("POST", f"/v1/tasks/{task['id']}/{verb}", {"lease": lease, **body}, 409)
        assert r.json()["code"] == "lease_lost", verb
        assert "expired" in r.json()["detail"]
        assert await snapshot(db, task["id"]) == before, verb


async def test_unknown_task_is_not_found_for_every_verb(admin, db):
    w = await make_world(admin)
    dev, _task, lease = await held(w)
    ghost = uuid.uuid4()
    events = await db.fetchval("SELECT count(*) FROM events")
    for verb, body in {**HELD_VERBS, "unblock": {}}.items():
        payload = body if verb == "unblock" else {"lease": lease, **body}
        r = await dev.call("POST", f"/v1/tasks/{ghost}/{verb}", payload, 404)
        assert r.json()["code"] == "not_found", verb
    r = await dev.call("GET", f"/v1/tasks/{ghost}", None, 404)
    assert r.json()["code"] == "not_found"
    assert await db.fetchval("SELECT count(*) FROM events") == events


async def test_task_of_a_lane_you_lack_is_not_found(admin):
    w = await make_world(admin)
    await family(admin, "outsider", ["role:dev"])
    _dev, task, lease = await held(w)
    outsider = await w.agent("outsider")
    r = await outsider.call("GET", f"/v1/tasks/{task['id']}", None, 404)
    assert r.json()["code"] == "not_found"
    r = await outsider.call("POST", f"/v1/tasks/{task['id']}/heartbeat", {"lease": lease}, 404)
    assert r.json()["code"] == "not_found"


# reads --------------------------------------------------------------------------------------------

TASK_FIELDS = {"id", "project", "lane", "stage", "title", "payload", "priority", "required_features",
               "depends_on", "attempts", "rework_count", "blocked", "blocked_reason", "holder",
               "lease_expires_at", "created_at", "updated_at"}
EVENT_FIELDS = {"id", "task_id", "type", "actor", "family", "data", "created_at"}


async def test_get_task_and_its_events_with_a_cursor(admin):
    w = await make_world(admin)
    dev, task, lease = await held(w, payload={"spec": "s3://bucket/spec.md"})
    await dev.verb(task["id"], "progress", lease=lease, note="one")
    await dev.verb(task["id"], "progress", lease=lease, note="two")
    await dev.verb(task["id"], "advance", lease=lease, to="review")

    t = await dev.get(f"/v1/tasks/{task['id']}")
    assert TASK_FIELDS <= set(t)
    assert t["id"] == task["id"] and t["stage"] == "review" and t["payload"] == {"spec": "s3://bucket/spec.md"}

    evs = (await dev.get(f"/v1/tasks/{task['id']}/events"))["items"]
    assert [e["type"] for e in evs] == ["created", "claimed", "progress", "progress", "transition"]
    assert all(EVENT_FIELDS <= set(e) and e["task_id"] == task["id"] for e in evs)
    ids = [e["id"] for e in evs]
    assert ids == sorted(ids)
    rest = (await dev.get(f"/v1/tasks/{task['id']}/events", params={"after": ids[1]}))["items"]
    assert [e["id"] for e in rest] == ids[2:]
    page = await dev.get(f"/v1/tasks/{task['id']}/events", params={"after": ids[0], "limit": 2})
    assert [e["id"] for e in page["items"]] == ids[1:3] and page["next"] == ids[2]
    assert (await dev.get(f"/v1/tasks/{task['id']}/events", params={"after": ids[-1]}))["items"] == []


async def test_me_shows_held_tasks_with_their_lease(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    me = await dev.get("/v1/me")
    assert me["sub"] == dev.sub and me["family"] == "cheap" and me["held"] == []
    assert set(me["features"]) == {"lane:dev", "role:dev"}
    task = (await dev.create("dev"))["task"]
    c = await dev.claim()
    me = await dev.get("/v1/me")
    assert len(me["held"]) == 1
    assert me["held"][0]["task"]["id"] == task["id"]
    assert me["held"][0]["lease"] == c["lease"]
    await dev.verb(task["id"], "release", lease=c["lease"]["id"])
    assert (await dev.get("/v1/me"))["held"] == []
