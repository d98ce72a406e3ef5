"""Regressions found by review: lock ordering, escalation scope, governance limits, storable input."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import uuid
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.db.pool import _init_connection
from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict, Invalid
from ainarres_api.server.services import admin as admin_svc
from ainarres_api.server.services import auth, tasks
from tests.helpers import make_world, second_waits, wait_for_lock

FLAT = {"key": "flat", "stages": [{"key": "todo", "initial": True}, {"key": "done", "terminal": True}],
        "transitions": [{"from": "todo", "to": "done", "kind": "advance", "required_features": ["role:dev"]}]}


class _PauseBeforeDependents:
    """A connection that stops right before the advance locks the finished task's dependents."""

    def __init__(self, conn: asyncpg.Connection, gate: asyncio.Event, reached: asyncio.Event) -> None:
        self._c, self._gate, self._reached = conn, gate, reached

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        if query == Q["dependents_lock"]:
            self._reached.set()
            await self._gate.wait()
        return await self._c.fetch(query, *args)


async def _prerequisite_race(admin: Any) -> tuple[Any, str, str, dict[str, Any]]:
    """A held task A and a task B waiting on it, B's id sorting first (so a create naming both locks B,
    then waits on A); returns the agent, A, B and A's claim."""
    w = await make_world(admin, workflow=FLAT, lane="flat")
    dev = await w.agent("cheap")
    a = (await dev.create("flat", "A"))["task"]["id"]
    while True:
        b = (await dev.create("flat", "B", depends_on=[a]))["task"]["id"]
        if b < a:
            break
    c = await dev.claim("flat")
    assert c["task"]["id"] == a
    return dev, a, b, c


async def _three_connections(dsn: str) -> list[asyncpg.Connection]:
    """Two connections set up as the service's pool sets them up, and an observer."""
    conns = [await asyncpg.connect(dsn) for _ in range(3)]
    for conn in conns[:2]:
        await _init_connection(conn)
    return conns


async def test_create_naming_a_task_and_its_prerequisite_does_not_deadlock_with_the_advance(app, admin, dsn):
    dev, a, b, c = await _prerequisite_race(admin)
    st = app.state.ainarres
    conns = await _three_connections(dsn)
    c1, c2, observer = conns
    try:
        p = await auth.authenticate(c1, st.signer, dev.token)
        gate, reached = asyncio.Event(), asyncio.Event()
        advance = asyncio.create_task(tasks.transition(
            _PauseBeforeDependents(c1, gate, reached), p, uuid.UUID(a), uuid.UUID(c["lease"]["id"]),
            "advance", "done", None, []))
        await asyncio.wait_for(reached.wait(), 30)  # the advance holds A
        create = asyncio.create_task(tasks.create(c2, p, {"lane": "flat", "title": "C", "depends_on": [a, b]},
                                                  st.limits))
        await wait_for_lock(observer, c2.get_server_pid(), "the create")  # it holds B, wants A
        gate.set()
        (done, _), created = await asyncio.wait_for(asyncio.gather(advance, create), 30)
    finally:
        for conn in conns:
            await conn.close()
    assert done["task"]["state"] == "done"
    assert created[0]["task"]["state"] == "waiting"  # B is still open


async def test_two_changes_that_take_seat_admin_at_once_leave_an_admin(app, admin, dsn):
    """ADR 0008's last-admin rule holds when two admin families act on each other at once: the second change
    waits for the first (they take one lock) and then sees that it would leave no admin (found by a review: two
    denials sent together both went through, and every admin was locked out). A denial and a disable: every
    change that may take seat:admin takes the same lock."""
    st = app.state.ainarres
    await admin.post("/v1/families", {"key": "admins2", "features": ["seat:admin"]}, 201)
    other = (await admin.post("/v1/tokens", {"family": "admins2"}, 201))["token"]
    db = await asyncpg.connect(dsn)
    try:
        p1, p2 = [await auth.authenticate(db, st.signer, t) for t in (str(admin.token), other)]
    finally:
        await db.close()
    outcome = await second_waits(dsn, lambda c: admin_svc.deny(c, p1, "admins2", "seat:admin", "we disagree", None),
                                 lambda c: admin_svc.set_family_disabled(c, p2, "admin", True))
    assert isinstance(outcome, Conflict) and "last one holding seat:admin" in str(outcome)
    assert "seat:admin" in (await admin.get("/v1/me"))["features"]


async def test_an_escalation_stays_in_the_stage_where_the_work_failed(admin):
    w = await make_world(admin)
    tid = (await (await w.agent("cheap")).create("dev", "x"))["task"]["id"]
    for _ in range(2):  # escalate_after=2 in todo
        a = await w.agent("cheap")
        c = await a.claim("dev")
        await a.verb(tid, "release", lease=c["lease"]["id"])
    assert (await admin.get(f"/v1/tasks/{tid}"))["required_features"] == ["tier:2"]
    cap = await w.agent("capable")
    c = await cap.claim("dev")
    moved = await cap.verb(tid, "advance", lease=c["lease"]["id"], to="review")
    assert moved["task"]["required_features"] == []
    rev = await w.agent("reviewers")
    out = await rev.claim("dev")
    assert out["code"] == "claimed" and out["task"]["id"] == tid


async def test_an_overseer_cannot_lift_its_own_denial_nor_touch_seats(admin, db):
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "ops", "features": ["seat:overseer", "lane:dev", "role:dev"]}, 201)
    ops = await w.agent("ops")
    await admin.post("/v1/families/ops/denials", {"feature": "lane:dev", "reason": "misbehaving"}, 201)
    before = await db.fetchval("SELECT count(*) FROM denials")
    r = await ops.call("DELETE", "/v1/families/ops/denials/lane:dev", expect=403)
    assert r.json()["code"] == "not_eligible"
    r = await ops.call("POST", "/v1/families/admin/denials", {"feature": "seat:admin", "reason": "coup"}, 403)
    r = await ops.call("POST", "/v1/families/cheap/denials", {"feature": "seat:overseer", "reason": "x"}, 403)
    assert await db.fetchval("SELECT count(*) FROM denials") == before
    # Governing other families' work features stays open to overseers.
    await ops.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "sloppy"}, 201)
    await ops.call("DELETE", "/v1/families/cheap/denials/role:dev", expect=204)


async def test_the_last_admin_family_cannot_be_locked_out(admin, db):
    await admin.call("POST", "/v1/families/admin/denials", {"feature": "seat:admin", "reason": "oops"}, 409)
    await admin.call("PATCH", "/v1/families/admin", {"disabled": True}, 409)
    await admin.call("PATCH", "/v1/families/admin", {"features": ["seat:overseer"]}, 409)
    assert await db.fetchval("SELECT count(*) FROM denials") == 0
    # With a second admin family, the first may be changed.
    await admin.post("/v1/families", {"key": "admins2", "features": ["seat:admin"]}, 201)
    await admin.call("POST", "/v1/families/admin/denials", {"feature": "seat:admin", "reason": "rotate"}, 201)


async def test_a_refused_mint_records_no_token(app, admin, db):
    await make_world(admin)
    st = app.state.ainarres
    verify_only = copy.copy(st.signer)
    verify_only._signing_key = None
    before = await db.fetchval("SELECT count(*) FROM tokens")
    async with st.pool.acquire() as conn:
        with pytest.raises(Invalid):
            await auth.mint(conn, verify_only, family="cheap", ttl_seconds=3600)
    assert await db.fetchval("SELECT count(*) FROM tokens") == before


async def test_a_guard_must_be_a_predicate(admin, db):
    wf = {"key": "g", "stages": [{"key": "a", "initial": True}, {"key": "b", "terminal": True}],
          "transitions": [{"from": "a", "to": "b", "kind": "advance", "guard": "$.payload.ok"}]}
    r = await admin.call("POST", "/v1/workflows", wf, 422)
    assert "guard" in r.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM workflows") == 0
    wf["transitions"][0]["guard"] = "$.payload.ok == true"
    await admin.call("POST", "/v1/workflows", wf, 201)


RAW = {"Content-Type": "application/json"}


async def _raw(api: Any, path: str, text: str) -> Any:
    return await api.client.request("POST", path, content=text.encode(), headers={**api._headers(), **RAW})


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_numbers_are_refused_not_stored(admin, db, literal):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    before = await db.fetchval("SELECT count(*) FROM tasks")
    r = await _raw(dev, "/v1/tasks", '{"lane":"dev","title":"t","payload":{"x":' + literal + "}}")
    assert r.status_code == 422 and "finite" in r.json()["detail"]
    r = await _raw(admin, "/v1/projects", '{"slug":"pp","context":{"x":' + literal + "}}")
    assert r.status_code == 422
    assert await db.fetchval("SELECT count(*) FROM tasks") == before


async def test_deeply_nested_payloads_are_refused(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    for depth in (100, 400, 900):
        body = '{"lane":"dev","title":"t","payload":' + '{"a":' * depth + "1" + "}" * depth + "}"
        r = await _raw(dev, "/v1/tasks", body)
        assert r.status_code == 422, (depth, r.text[:200])
    ok = '{"lane":"dev","title":"t","payload":' + '{"a":' * 20 + "1" + "}" * 20 + "}"
    assert (await _raw(dev, "/v1/tasks", ok)).status_code == 201


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2030-01-01T00:00:00+14:00",
                                  # at the ends of what a datetime holds, with an offset that would carry past them
                                  "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+01:00"])
async def test_denial_expiry_out_of_range_is_invalid(admin, when):
    await make_world(admin)
    body = {"feature": "role:dev", "reason": "x", "expires_at": when}
    expect = 201 if when.startswith("2030") else 422
    await admin.call("POST", "/v1/families/cheap/denials", body, expect)


async def test_depends_on_a_task_in_an_unseen_lane_is_unknown(admin):
    w = await make_world(admin)
    await admin.post("/v1/projects", {"slug": "p2"}, 201)
    await admin.post("/v1/lanes", {"project": "p2", "key": "secret", "workflow": "dev"}, 201)
    await admin.post("/v1/families", {"key": "insider", "features": ["lane:secret", "role:dev"]}, 201)
    insider = await w.agent("insider")
    hidden = (await insider.create("secret", "hidden"))["task"]["id"]
    dev = await w.agent("cheap")
    r = await dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "t", "depends_on": [hidden]}, 404)
    assert hidden in r.json()["detail"] and r.json()["code"] == "not_found"  # as for one that does not exist


async def test_creates_may_not_open_required_sets_without_bound(app, admin, db):
    """Each required set is a queue every claim may probe: creates may open at most N per lane; a set
    the lane already uses is always accepted; the refusal writes nothing."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    st = app.state.ainarres
    limits = dataclasses.replace(st.limits, max_sets_per_lane=2)
    async with st.pool.acquire() as conn:
        p = await auth.authenticate(conn, st.signer, dev.token)
        await tasks.create(conn, p, {"lane": "dev", "title": "a"}, limits)
        await tasks.create(conn, p, {"lane": "dev", "title": "b", "required_features": ["area:backend"]}, limits)
        before = await db.fetchval("SELECT (SELECT count(*) FROM routes) + (SELECT count(*) FROM tasks)")
        with pytest.raises(Invalid, match="already uses 2 distinct required-feature sets"):
            await tasks.create(conn, p, {"lane": "dev", "title": "c", "required_features": ["tier:2"]}, limits)
        assert await db.fetchval("SELECT (SELECT count(*) FROM routes) + (SELECT count(*) FROM tasks)") == before
        out, created = await tasks.create(conn, p, {"lane": "dev", "title": "d",
                                                    "required_features": ["area:backend"]}, limits)
        assert created and out["task"]["required_features"] == ["area:backend"]
    # Through HTTP with the default limit, the same create is accepted.
    await dev.create("dev", "c", required_features=["tier:2"])


@pytest.mark.parametrize(("literal", "stored", "ttl"), [("3.0", 3, "3600.0"), ("1e2", 100, "36e2"),
                                                        ("-2.0", -2, "7200.00"), ("7", 7, "3600")])
async def test_an_integer_field_takes_a_number_without_a_fraction(admin, literal, stored, ttl):
    """JSON Schema's `integer` (OpenAPI 3.1) admits 3.0 and 1e2, and encoders write numbers so (Python's json.dumps
    of a float): the document says integer, so the service takes them as the integers they are."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    r = await _raw(dev, "/v1/tasks", '{"lane":"dev","title":"t","priority":' + literal + "}")
    assert r.status_code == 201, r.text
    assert r.json()["task"]["priority"] == stored
    minted = await _raw(admin, "/v1/tokens", '{"family":"cheap","ttl_seconds":' + ttl + "}")
    assert minted.status_code == 201, minted.text


@pytest.mark.parametrize("literal", ["3.5", '"3"', "true", "1e400"])
async def test_an_integer_field_refuses_fractions_text_and_booleans(admin, db, literal):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    before = await db.fetchval("SELECT count(*) FROM tasks")
    r = await _raw(dev, "/v1/tasks", '{"lane":"dev","title":"t","priority":' + literal + "}")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid" and r.json()["errors"][0]["field"] == "priority", r.json()
    assert await db.fetchval("SELECT count(*) FROM tasks") == before


async def test_a_dependent_created_while_its_prerequisite_finishes_is_promoted(app, admin, dsn, db):
    """The advance that finishes A waits for the lock of a create naming A (it takes A FOR KEY SHARE); the create
    commits B as waiting, and the advance, whose statement began before, must still see B and promote it —
    else B waits forever on a task that is done (found by a concurrency review)."""
    w = await make_world(admin, workflow=FLAT, lane="flat")
    dev = await w.agent("cheap")
    a = (await dev.create("flat", "A"))["task"]["id"]
    c = await dev.claim("flat")
    st = app.state.ainarres
    conns = await _three_connections(dsn)
    c1, c2, observer = conns
    try:
        p = await auth.authenticate(c1, st.signer, dev.token)
        outer = c2.transaction()
        await outer.start()
        created, _ = await tasks.create(c2, p, {"lane": "flat", "title": "B", "depends_on": [a]}, st.limits)
        assert created["task"]["state"] == "waiting"  # A is still held: B waits, A locked by the create
        advance = asyncio.create_task(tasks.transition(c1, p, uuid.UUID(a), uuid.UUID(c["lease"]["id"]),
                                                       "advance", "done", None, []))
        await wait_for_lock(observer, c1.get_server_pid(), "the advance")  # its statement began before B
        await outer.commit()
        done, _ = await asyncio.wait_for(advance, 30)
    finally:
        for conn in conns:
            await conn.close()
    assert done["task"]["state"] == "done"
    assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", uuid.UUID(created["task"]["id"])) == "ready"


async def test_the_overseers_unblock_records_the_block_it_lifts(admin, dsn, db):
    """The trail names the block an overseer's unblock lifted, read under the task's lock: a block that replaced
    another while the unblock waited (an unblock, a claim and a new block in between) is the one recorded."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "stuck"))["task"]["id"]
    c = await dev.claim("dev")
    await dev.verb(tid, "block", lease=c["lease"]["id"], reason="first block")
    conns = await _three_connections(dsn)
    holder, _, observer = conns
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("UPDATE tasks SET blocked_reason = 'second block' WHERE id = $1", uuid.UUID(tid))
        unblock = asyncio.create_task(admin.post("/v1/governance/unblock", {"task_id": tid, "note": "fixed"}, 200))
        await wait_for_lock(observer, None, "the unblock", query=Q["task_lock"])
        await tx.commit()
        await asyncio.wait_for(unblock, 30)
    finally:
        for conn in conns:
            await conn.close()
    data = await db.fetchval("SELECT data FROM governance_trail WHERE action = 'unblock' AND task_id = $1",
                             uuid.UUID(tid))
    assert (json.loads(data) if isinstance(data, str) else data) == {"blocked_by": "agent",
                                                                     "blocked_reason": "second block"}


def test_a_float_past_two_to_the_53_is_not_taken_for_an_integer():
    """Past 2⁵³ a float no longer says which integer it was (9007199254740993.0 is 9007199254740992): refused,
    so that a big id written as a float never names another event."""
    from pydantic import ValidationError

    from ainarres_api.server.api.schemas import UsageIn

    assert UsageIn.model_validate({"event": 9007199254740992.0}).event == 2**53
    with pytest.raises(ValidationError):
        UsageIn.model_validate({"event": 9007199254740994.0})


@pytest.mark.parametrize(("value", "expect"), [(3, 200), (3.0, 200), ("3", 422), (True, 422)])
async def test_governance_thresholds_are_integers_not_text_or_booleans(admin, value, expect):
    await make_world(admin)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": value}, expect)


async def test_the_agent_seen_is_recorded_with_the_move_and_never_waits_for_its_row(admin, db, dsn):
    """An agent is recorded seen (last_seen_at, at most every 30 s) by the move's own statement, which does not
    wait for the agent's row: with another transaction holding it, an advance is answered 200 and the task has
    moved — not a 503 "nothing was changed" for a move that happened (found by a review: the touch once ran
    after the committed move) — and the next call records the agent seen."""
    w = await make_world(admin)
    agent = await w.agent("cheap")
    first = (await agent.create("dev", "opens the review route"))["task"]["id"]
    await agent.verb(first, "advance", lease=(await agent.claim("dev"))["lease"]["id"], to="review")
    tid = (await agent.create("dev", "moves"))["task"]["id"]
    lease = (await agent.claim("dev"))["lease"]["id"]
    stale = "UPDATE agents SET last_seen_at = now() - interval '1 minute' WHERE sub = $1 RETURNING last_seen_at"
    before = await db.fetchval(stale, agent.sub)
    other = await asyncpg.connect(dsn)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM agents WHERE sub = $1 FOR UPDATE", agent.sub)
            r = await asyncio.wait_for(
                agent.call("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"}), 60)
    finally:
        await other.close()
    assert r.status_code == 200, r.text
    row = await db.fetchrow("SELECT s.key AS stage, t.state FROM tasks t JOIN stages s ON s.id = t.stage_id "
                            "WHERE t.id = $1", uuid.UUID(tid))
    assert dict(row) == {"stage": "review", "state": "ready"}
    assert await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", agent.sub) == before  # skipped
    await agent.claim("dev")  # the row free again: seen
    assert await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", agent.sub) > before
