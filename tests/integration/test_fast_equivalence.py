"""The one-round-trip functions against the statement path (migrations 0007–0009, ADR 0010).

Each scenario builds a state once, then runs the verb twice on it, each time in a transaction that is
rolled back afterwards: once as the service runs it (claim_fast / transition_fast / claim_by_token /
transition_by_token first), once with those functions declining, so the statement-by-statement path
decides. The answer (or refusal), every row of tasks, events, routes, route_bundles and agents, and
the recorded wake-ups must be the same. Inside one transaction now() is the transaction's start for
both paths, so timestamps are compared as "now", "now+Ns" or their unchanged value; fresh lease ids,
event ids and route ids are compared by order of appearance. Where a function declines, it must have
changed nothing (checked at the call itself).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.db.pool import _init_connection
from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import AinarresError
from ainarres_api.server.services import auth, tasks, wake
from ainarres_api.server.services.tasks import Limits
from tests.helpers import Api, World, make_world, review_flow

_FAST = frozenset(Q[n] for n in ("claim_fast", "claim_by_token", "transition_fast", "transition_by_token"))

# Everything a verb may write, as JSON (the events after $1 only).
_SNAPSHOT = """
SELECT (SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY t.id), '[]') FROM tasks t) AS tasks,
       (SELECT coalesce(jsonb_agg(to_jsonb(e) ORDER BY e.id), '[]') FROM events e WHERE e.id > $1) AS events,
       (SELECT coalesce(jsonb_agg(to_jsonb(r) ORDER BY r.id), '[]') FROM routes r) AS routes,
       (SELECT coalesce(jsonb_agg(to_jsonb(b) ORDER BY b.route_id, b.features), '[]') FROM route_bundles b)
           AS bundles,
       (SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.sub), '[]') FROM agents a) AS agents
"""
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$")

Verb = Callable[[Any, Any], Awaitable[dict[str, Any]]]


class _Statements:
    """A connection on which the one-round-trip functions decline: the statement-by-statement path."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._c = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        if query in _FAST:
            return None
        return await self._c.fetchrow(query, *args)


class _Watch:
    """The service's own connection, noting whether a function decided; a declining one must have
    changed nothing (compared at the call, inside the same transaction)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._c, self.asked, self.decided = conn, 0, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        if query not in _FAST:
            return await self._c.fetchrow(query, *args)
        self.asked += 1
        before = dict(await self._c.fetchrow(_SNAPSHOT, 0))
        row = await self._c.fetchrow(query, *args)
        assert row is not None  # a function call always answers one row
        out = dict(row)
        key = "code" if "code" in out else "task"
        if out[key] is None:
            assert all(v is None for v in out.values()), f"declined with values: {out}"
            after = dict(await self._c.fetchrow(_SNAPSHOT, 0))
            assert after == before, "a declining function changed something"
        else:
            self.decided = True
        return row


class _Norm:
    """Makes two runs of one verb on one state comparable (see the module docstring)."""

    def __init__(self, now: datetime, known: set[str], routes: dict[int, str], events: dict[int, str]) -> None:
        self.now, self.known, self.routes, self.events = now, known, routes, events
        self.fresh: dict[str, str] = {}
        self.old: set[datetime] = set()

    def ts(self, v: datetime) -> str:
        if v in self.old:  # unchanged by the verb
            return v.isoformat()
        if v == self.now:
            return "now"
        if v > self.now:
            return f"now+{(v - self.now).total_seconds():g}s"
        return v.isoformat()

    def __call__(self, x: Any, key: str | None = None) -> Any:
        if isinstance(x, dict):
            out = {k: self(v, k) for k, v in x.items()}
            if "task_id" in x and "type" in x and isinstance(x.get("id"), int):  # an event
                out["id"] = self.events.get(x["id"], x["id"])
            return out
        if isinstance(x, list | tuple):
            return [self(v, key) for v in x]
        if isinstance(x, uuid.UUID):
            x = str(x)
        if isinstance(x, datetime):
            return self.ts(x)
        if isinstance(x, bool) or x is None:
            return x
        if isinstance(x, int) and key == "route_id":
            return self.routes.get(x, x)
        if isinstance(x, str):
            if _UUID.match(x) and x not in self.known:
                return self.fresh.setdefault(x, f"fresh#{len(self.fresh)}")
            if _TS.match(x):
                return self.ts(datetime.fromisoformat(x))
        return x


def _strings(x: Any, into: set[str]) -> set[str]:
    if isinstance(x, dict):
        for v in x.values():
            _strings(v, into)
    elif isinstance(x, list):
        for v in x:
            _strings(v, into)
    elif isinstance(x, str):
        into.add(x)
    return into


def _diff(a: Any, b: Any, at: str = "") -> list[str]:
    """Where two outcomes differ: (path, by the function, by the statements)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{at}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{at}[{i}]")]
    return [] if a == b else [f"{at}: {a!r} != {b!r}"]


def _refusal(exc: AinarresError) -> dict[str, Any]:
    return {"refused": type(exc).__name__, "detail": exc.detail, "task": exc.task, "extra": exc.extra}


async def _outcome(conn: asyncpg.Connection, st: Any, verb: Verb, wrapper: Any) -> tuple[Any, Any]:
    """Run `verb` once in a transaction rolled back afterwards; its normalised outcome and the wrapper."""
    tx = conn.transaction()
    await tx.start()
    try:
        now = await conn.fetchval("SELECT now()")
        mark = await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")
        base = dict(await conn.fetchrow(_SNAPSHOT, mark))
        w = wrapper(conn)
        with wake.recording() as rec:
            try:
                out = await verb(w, st)
            except AinarresError as exc:
                out = _refusal(exc)
        after = dict(await conn.fetchrow(_SNAPSHOT, mark))
    finally:
        await tx.rollback()
    old_routes = {r["id"] for r in base["routes"]}
    routes = {r["id"]: f"route+{i}" for i, r in enumerate(r for r in after["routes"] if r["id"] not in old_routes)}
    events = {e["id"]: f"event+{i}" for i, e in enumerate(after["events"])}
    seen = _strings(base, set())
    norm = _Norm(now, {x for x in seen if _UUID.match(x)}, routes, events)
    norm.old = {datetime.fromisoformat(x) for x in seen if _TS.match(x)}
    for r in after["routes"]:
        r["id"] = routes.get(r["id"], r["id"])
    for e in after["events"]:
        e.pop("id")
    woke = sorted((str(routes.get(r, r)), n) for r, n in rec.routes.items())
    return norm({"out": out, "db": after, "woke": woke, "rescan": rec.rescan}), w


async def same(app: Any, verb: Verb, *, fast: bool | None) -> Any:
    """The verb's outcome on the current state, asserting both paths agree and whether a function decided
    (None: no function was asked, the caller was refused first)."""
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        by_function, watch = await _outcome(conn, st, verb, _Watch)
        by_statements, _ = await _outcome(conn, st, verb, _Statements)
    assert by_function == by_statements, _diff(by_function, by_statements)
    assert (watch.asked >= 1) is (fast is not None), watch.asked
    assert watch.decided is bool(fast), f"expected the function {'to decide' if fast else 'to decline'}: {by_function}"
    return by_function


def claims(api: Api, lane: str | None = "dev", limits: Limits | None = None) -> list[Verb]:
    """The claim as the HTTP dispatcher runs it (token folded in) and as a Principal's call."""

    async def as_token(conn: Any, st: Any) -> dict[str, Any]:
        return await tasks.claim_as(conn, st.signer, api.token, lane, limits or st.limits)

    async def as_principal(conn: Any, st: Any) -> dict[str, Any]:
        p = await auth.authenticate(conn, st.signer, api.token)
        return await tasks.claim(conn, p, lane, limits or st.limits)

    return [as_token, as_principal]


def moves(api: Api, task_id: str, lease: str, kind: str, to: str, text: str | None = None,
          artifacts: list[dict[str, Any]] | None = None) -> list[Verb]:
    """Advance/reject as the dispatcher runs it (token folded in) and as a Principal's call."""
    tid, lid, arts = uuid.UUID(task_id), uuid.UUID(lease), artifacts or []

    async def as_token(conn: Any, st: Any) -> dict[str, Any]:
        return await tasks.transition_as(conn, st.signer, api.token, tid, lid, kind, to, text, arts)

    async def as_principal(conn: Any, st: Any) -> dict[str, Any]:
        p = await auth.authenticate(conn, st.signer, api.token)
        return await tasks.transition(conn, p, tid, lid, kind, to, text, arts)

    return [as_token, as_principal]


async def all_same(app: Any, verbs: list[Verb], *, fast: bool | tuple[bool | None, ...]) -> Any:
    """`same` for each way of calling the verb (`fast` per way, or one for all); the first outcome."""
    expect = fast if isinstance(fast, tuple) else (fast,) * len(verbs)
    outs = [await same(app, v, fast=f) for v, f in zip(verbs, expect, strict=True)]
    assert all(o == outs[0] for o in outs), "the two ways of calling disagree"
    return outs[0]


async def in_review(w: World, title: str, reviewer: Api | None = None, **fields: Any) -> tuple[Api, str, str]:
    """A task held in review: (its reviewer, its id, the lease)."""
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", title, **fields))["task"]["id"]
    c = await dev.claim("dev")
    assert c["task"]["id"] == tid, c
    await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
    rev = reviewer or await w.agent("reviewers")
    c = await rev.claim("dev")
    assert c["task"]["id"] == tid, c
    return rev, tid, c["lease"]["id"]


async def expire(db: asyncpg.Connection, task_id: str) -> None:
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                     uuid.UUID(task_id))


# -- claims ------------------------------------------------------------------------------------------------

async def test_a_claim_in_order_is_the_statement_paths_claim(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "low", priority=0)
    best = (await dev.create("dev", "high first", priority=5))["task"]["id"]
    await dev.create("dev", "high later", priority=5)
    await dev.create("dev", "needs a tier", priority=9, required_features=["tier:2"])  # not cheap's route
    for lane in ("dev", None):
        out = await all_same(app, claims(dev, lane), fast=True)
        assert out["out"]["code"] == "claimed" and out["out"]["task"]["id"] == best
        assert out["woke"] == [] and not out["rescan"]
    rev = await w.agent("reviewers")
    await rev.claim("dev", expect=200)  # records the agent: nothing in review yet
    out = await all_same(app, claims(rev), fast=True)
    assert out["out"] == {"code": "empty", "task": None, "lease": None}
    out = await all_same(app, claims(dev, "no-such-lane"), fast=True)
    assert out["out"]["code"] == "empty"


async def test_max_active_above_one_and_at_the_limit(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    dev = await w.agent("cheap")
    for i in range(4):
        await dev.create("dev", f"t{i}")
    await dev.claim("dev")
    out = await all_same(app, claims(dev), fast=True)  # one held, room for one more
    assert out["out"]["code"] == "claimed"
    await dev.claim("dev")
    out = await all_same(app, claims(dev), fast=False)  # at the limit with work ready
    assert out["out"]["refused"] == "AlreadyHolding"
    await admin.patch("/v1/families/cheap", {"max_active": 1})
    out = await all_same(app, claims(dev), fast=False)  # above the limit (it was lowered)
    assert out["out"]["refused"] == "AlreadyHolding"
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    other = await w.agent("cheap")
    await other.claim("dev")
    await other.claim("dev")  # nothing left to claim for dev now
    out = await all_same(app, claims(dev), fast=False)  # at the limit, nothing ready
    assert out["out"]["refused"] == "AlreadyHolding"


async def test_expired_holds_are_the_statement_paths(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev, mate = await w.agent("cheap"), await w.agent("cheap")
    first = (await dev.create("dev", "first", priority=3))["task"]["id"]
    await dev.create("dev", "second", priority=1)
    await mate.claim("dev")
    await expire(db, first)
    # Another agent's expired hold is the best candidate: recovered (attempts +1), by the statements.
    out = await all_same(app, claims(dev), fast=False)
    assert out["out"]["task"]["id"] == first and out["out"]["event"]["data"]["reclaimed"] is True
    # The agent's own expired hold, best again: reclaimed by itself.
    await dev.claim("dev")
    await db.execute("UPDATE tasks SET attempts = 0 WHERE id = $1", uuid.UUID(first))
    await expire(db, first)
    out = await all_same(app, claims(dev), fast=False)
    assert out["out"]["task"]["id"] == first and out["out"]["event"]["data"]["previous_holder"] == dev.sub
    # A ready task better than the own expired hold: taken in one trip, the hold left for later; the
    # expired hold does not count towards max_active.
    top = (await dev.create("dev", "top", priority=9))["task"]["id"]
    out = await all_same(app, claims(dev), fast=True)
    assert out["out"]["task"]["id"] == top
    # The expired hold escalates (escalate_after 2 in todo): a new route, a wake-up, a rescan.
    await db.execute("UPDATE tasks SET attempts = 1 WHERE id = $1", uuid.UUID(first))
    await db.execute("UPDATE tasks SET priority = 10 WHERE id = $1", uuid.UUID(first))
    out = await all_same(app, claims(dev), fast=False)
    assert out["out"]["task"]["id"] == top and out["rescan"]
    # ... or is blocked at max_attempts.
    await db.execute("UPDATE tasks SET attempts = 2 WHERE id = $1", uuid.UUID(first))
    out = await all_same(app, claims(dev), fast=False)
    assert out["out"]["task"]["id"] == top
    blocked = next(t for t in out["db"]["tasks"] if t["id"] == first)
    assert blocked["state"] == "blocked"


async def test_an_expired_hold_in_a_route_the_caller_cannot_take(app: Any, admin: Api, db: asyncpg.Connection
                                                                  ) -> None:
    w = await make_world(admin)
    dev = await w.agent("capable")
    tiered = (await dev.create("dev", "tiered", priority=5, required_features=["tier:2"]))["task"]["id"]
    await dev.claim("dev")
    await expire(db, tiered)
    await admin.patch("/v1/families/capable", {"features": ["lane:dev", "role:dev"]})  # tier:2 taken away
    plain = (await dev.create("dev", "plain"))["task"]["id"]
    out = await all_same(app, claims(dev), fast=True)
    assert out["out"]["task"]["id"] == plain


async def test_who_the_caller_is_decides_nothing_differently(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "x")
    # An agent not recorded yet (a fresh token of the family): the statements record it.
    fresh = await w.agent("cheap")
    out = await all_same(app, claims(fresh), fast=(False, True))
    assert out["out"]["code"] == "claimed"
    assert [a["sub"] for a in out["db"]["agents"] if a["sub"] == fresh.sub]
    # Due its last_seen_at touch.
    await db.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE sub = $1", dev.sub)
    out = await all_same(app, claims(dev), fast=(False, True))
    assert next(a for a in out["db"]["agents"] if a["sub"] == dev.sub)["last_seen_at"] == "now"
    await db.execute("UPDATE agents SET last_seen_at = now() WHERE sub = $1", dev.sub)
    # A token whose scope leaves out the lane: nothing to claim, in one trip.
    scoped = await w.agent("cheap", sub=dev.sub, scope=["role:dev"])
    out = await all_same(app, claims(scoped), fast=True)
    assert out["out"]["code"] == "empty"
    # A denial of the role: the lane's route no longer fits.
    other = await w.agent("cheap")
    await other.get("/v1/me")  # recorded
    out = await all_same(app, claims(other), fast=True)
    assert out["out"]["code"] == "claimed"
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "paused"}, 201)
    out = await all_same(app, claims(other), fast=True)
    assert out["out"]["code"] == "empty"
    await admin.delete("/v1/families/cheap/denials/role:dev")
    # A sub recorded under another family, a token expired in the database, a revoked one, a disabled
    # family: refused by the statements.
    await db.execute("UPDATE agents SET family_key = 'reviewers' WHERE sub = $1", other.sub)
    out = await all_same(app, claims(other), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"
    await db.execute("UPDATE tokens SET expires_at = now() - interval '1 second' WHERE sub = $1", fresh.sub)
    out = await all_same(app, claims(fresh), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"
    jti = await db.fetchval("SELECT jti FROM tokens WHERE sub = $1 AND scope IS NULL", dev.sub)
    await admin.delete(f"/v1/tokens/{jti}")
    out = await all_same(app, claims(dev), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"
    await admin.patch("/v1/families/cheap", {"disabled": True})
    out = await all_same(app, claims(scoped), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"


async def test_more_routes_than_one_claim_probes_is_declined(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("capable")
    await dev.create("dev", "plain")
    await dev.create("dev", "tiered", required_features=["tier:2"])
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        try:
            watch = _Watch(conn)
            out = await tasks.claim_as(watch, st.signer, dev.token, "dev", Limits(max_routes=1))
        finally:
            await tx.rollback()
    assert watch.asked == 1 and not watch.decided and out["code"] == "claimed"
    # Exactly as many routes as one claim probes: in one trip.
    out = await all_same(app, claims(dev, "dev", Limits(max_routes=2)), fast=True)
    assert out["out"]["code"] == "claimed"


async def test_heads_locked_by_others_are_stepped_over_alike(app: Any, admin: Api, db: asyncpg.Connection,
                                                            dsn: str) -> None:
    w = await make_world(admin)
    dev, mate = await w.agent("cheap"), await w.agent("cheap")
    held = (await dev.create("dev", "expired, best", priority=9))["task"]["id"]
    await mate.claim("dev")
    await expire(db, held)
    head = (await dev.create("dev", "ready head", priority=5))["task"]["id"]
    nxt = (await dev.create("dev", "ready next", priority=5))["task"]["id"]
    other = await asyncpg.connect(dsn)
    try:
        tx = other.transaction()
        await tx.start()
        # Another claimer's locks on the expired hold and the head of the ready queue (SKIP LOCKED).
        await other.execute("SELECT 1 FROM tasks WHERE id = ANY ($1::uuid[]) FOR UPDATE",
                            [uuid.UUID(held), uuid.UUID(head)])
        out = await all_same(app, claims(dev), fast=True)
        assert out["out"]["task"]["id"] == nxt
        await tx.rollback()
    finally:
        await other.close()


async def test_token_rows_out_of_order_and_lapsed_denials(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "x")
    # A denial that has lapsed vetoes nothing.
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "was paused"}, 201)
    await db.execute("UPDATE denials SET expires_at = now() - interval '1 second'")
    out = await all_same(app, claims(dev), fast=True)
    assert out["out"]["code"] == "claimed"
    # A token row naming another sub or family than the signed token: refused alike.
    await db.execute("UPDATE tokens SET sub = 'someone-else' WHERE sub = $1", dev.sub)
    out = await all_same(app, claims(dev), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"
    await db.execute("UPDATE tokens SET sub = $1, family_key = 'capable' WHERE sub = 'someone-else'", dev.sub)
    out = await all_same(app, claims(dev), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"


# -- advance and reject ------------------------------------------------------------------------------------

async def test_an_advance_in_order_is_the_statement_paths_advance(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "one"))["task"]["id"]
    c = await dev.claim("dev")
    arts = [{"kind": "commit", "ref": "abc", "note": "ünïcode ✓"}]
    # The review route does not exist yet: created by the statements (a rescan).
    out = await all_same(app, moves(dev, tid, c["lease"]["id"], "advance", "review", None, arts), fast=False)
    assert out["rescan"] and out["out"]["task"]["stage"] == "review"
    await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
    tid = (await dev.create("dev", "two"))["task"]["id"]
    c = await dev.claim("dev")
    out = await all_same(app, moves(dev, tid, c["lease"]["id"], "advance", "review", "built", arts), fast=True)
    assert out["woke"] and not out["rescan"] and out["out"]["event"]["data"]["artifacts"] == arts
    out = await all_same(app, moves(dev, tid, c["lease"]["id"], "advance", "review", None), fast=True)
    assert out["out"]["event"]["data"]["note"] is None


async def test_refusals_are_the_statement_paths(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    rev, tid, lease = await in_review(w, "r")
    expected = [
        (moves(rev, tid, str(uuid.uuid4()), "advance", "done"), "LeaseLost"),
        (moves(rev, str(uuid.uuid4()), lease, "advance", "done"), "NotFound"),
        (moves(rev, tid, lease, "advance", "nowhere"), "IllegalTransition"),
        (moves(rev, tid, lease, "reject", "done"), "IllegalTransition"),
    ]
    other = await w.agent("reviewers")
    expected.append((moves(other, tid, lease, "advance", "done"), "LeaseLost"))
    scoped = await w.agent("reviewers", sub=rev.sub, scope=["lane:dev"])
    expected.append((moves(scoped, tid, lease, "advance", "done"), "NotEligible"))
    dev = await w.agent("cheap")
    expected.append((moves(dev, tid, lease, "advance", "done"), "LeaseLost"))
    for verbs, refused in expected:
        out = await all_same(app, verbs, fast=False)
        assert out["out"]["refused"] == refused, out["out"]
    # Who calls: due a last_seen_at touch (the statements touch it, then decide as the function would);
    # a revoked token.
    await db.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE sub = $1", rev.sub)
    out = await all_same(app, moves(rev, tid, lease, "advance", "done"), fast=(False, True))
    assert out["out"]["code"] == "ok"
    await db.execute("UPDATE agents SET last_seen_at = now() WHERE sub = $1", rev.sub)
    await admin.delete(f"/v1/tokens/{await db.fetchval('SELECT jti FROM tokens WHERE scope IS NOT NULL')}")
    out = await all_same(app, moves(scoped, tid, lease, "advance", "done"), fast=(False, None))
    assert out["out"]["refused"] == "Unauthenticated"
    # The own lease ran out (not yet recovered by any claim).
    await expire(db, tid)
    out = await all_same(app, moves(rev, tid, lease, "advance", "done"), fast=False)
    assert out["out"]["refused"] == "LeaseLost" and "expired" in out["out"]["detail"]
    await db.execute("UPDATE tasks SET lease_expires_at = now() + interval '1 minute' WHERE id = $1",
                     uuid.UUID(tid))
    # The lane's feature denied: not visible; with a seat that sees every lane, visible again.
    await admin.post("/v1/families/reviewers/denials", {"feature": "lane:dev", "reason": "paused"}, 201)
    out = await all_same(app, moves(rev, tid, lease, "advance", "done"), fast=False)
    assert out["out"]["refused"] == "NotFound"
    await admin.patch("/v1/families/reviewers", {"features": ["lane:dev", "role:reviewer", "seat:monitor"]})
    out = await all_same(app, moves(rev, tid, lease, "advance", "done"), fast=True)
    assert out["out"]["task"]["state"] == "done"


async def test_finishing_promotes_exactly_the_dependents_the_statements_promote(
        app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    rev, a, lease = await in_review(w, "A")
    other = (await dev.create("dev", "still open"))["task"]["id"]
    b = (await dev.create("dev", "B after A", depends_on=[a]))["task"]["id"]
    b2 = (await dev.create("dev", "B2 after A", depends_on=[a], required_features=["tier:2"]))["task"]["id"]
    c = (await dev.create("dev", "C after A and the open one", depends_on=[a, other]))["task"]["id"]
    d = (await dev.create("dev", "D parked", depends_on=[a]))["task"]["id"]
    await db.execute("UPDATE tasks SET state = 'blocked', blocked_reason = 'parked' WHERE id = $1", uuid.UUID(d))
    out = await all_same(app, moves(rev, a, lease, "advance", "done", "shipped"), fast=True)
    states = {t["id"]: t["state"] for t in out["db"]["tasks"]}
    assert states[a] == "done" and states[b] == "ready" and states[b2] == "ready"
    assert states[c] == "waiting" and states[d] == "blocked"
    assert len(out["woke"]) == 2


async def test_rework_caps_stage_and_workflow_level(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)  # review: max_rework 2, no workflow cap
    rev, tid, lease = await in_review(w, "r")
    out = await all_same(app, moves(rev, tid, lease, "reject", "todo", "again"), fast=True)
    assert out["out"]["task"]["rework_count"] == 1 and out["out"]["event"]["data"]["reason"] == "again"
    row = next(t for t in out["db"]["tasks"] if t["id"] == tid)
    assert row["rework_by_stage"] == {"review": 1}
    for done, fast in ((1, True), (2, False), (5, False)):
        await db.execute("UPDATE tasks SET rework_by_stage = jsonb_build_object('review', $2::int, 'todo', 7) "
                         "WHERE id = $1", uuid.UUID(tid), done)
        out = await all_same(app, moves(rev, tid, lease, "reject", "todo", "again"), fast=fast)
        assert out["out"].get("code") == ("ok" if fast else "blocked")

    for key, wf_cap, stage_cap, fast in (("wfcap", 1, None, True), ("stagezero", 5, 0, False),
                                         ("stageover", 0, 3, True), ("wfzero", 0, None, False)):
        flow = review_flow(key, review_stage={"max_rework": stage_cap} if stage_cap is not None else None)
        flow["max_rework"] = wf_cap
        await admin.post("/v1/workflows", flow, 201)
        await admin.post("/v1/lanes", {"project": "acme", "key": key, "workflow": key}, 201)
        await admin.patch("/v1/families/cheap", {"features": ["lane:dev", "role:dev", f"lane:{key}"]})
        await admin.patch("/v1/families/reviewers", {"features": ["lane:dev", "role:reviewer", f"lane:{key}"]})
        d = await w.agent("cheap")
        t = (await d.create(key, "x"))["task"]["id"]
        c = await d.claim(key)
        await d.verb(t, "advance", lease=c["lease"]["id"], to="review")
        r = await w.agent("reviewers")
        c = await r.claim(key)
        out = await all_same(app, moves(r, t, c["lease"]["id"], "reject", "todo", "no"), fast=fast)
        assert out["out"]["code"] == ("ok" if fast else "blocked"), (key, out["out"])


SPECIFIC = {
    "key": "specific",
    "stages": [{"key": "todo", "initial": True}, {"key": "review"}, {"key": "done", "terminal": True}],
    "transitions": [
        {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
        # Most specific first whatever the position; among equals, the first by position.
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer", "tier:2"],
         "guard": "$.payload.ok == true"},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:lead"],
         "guard": "$.payload.lead_ok == true"},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["area:backend"]},
        {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
        {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:lead"],
         "guard": "$.payload.never == true"},
    ],
}


async def test_the_transition_chosen_is_the_statement_paths(app: Any, admin: Api) -> None:
    await admin.post("/v1/features", {"name": "role:lead"}, None)
    w = await make_world(admin, workflow=SPECIFIC, lane="sp")
    fams = {"plain": ["role:reviewer"], "tiered": ["role:reviewer", "tier:2"], "lead": ["role:lead", "area:backend"],
            "leadrev": ["role:lead", "role:reviewer"]}
    for key, feats in fams.items():
        await admin.post("/v1/families", {"key": key, "features": ["lane:sp", *feats]}, 201)
    dev = await w.agent("cheap")
    cases = [  # (family, payload, fast, expected code or refusal)
        ("plain", {}, True, "ok"),                       # the one it is eligible for, unguarded
        ("tiered", {"ok": True}, False, "ok"),           # the more specific one, guarded: true
        ("tiered", {"ok": False}, False, "GuardFailed"),  # ... false: no fallback to the plain one
        ("lead", {"lead_ok": False}, False, "GuardFailed"),  # equal cardinality: the first by position
        ("leadrev", {}, True, "ok"),                     # equal cardinality: reviewer comes first
    ]
    for fam, payload, fast, expected in cases:
        tid = (await dev.create("sp", f"{fam}", payload=payload))["task"]["id"]
        c = await dev.claim("sp")
        assert c["task"]["id"] == tid
        await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
        r = await w.agent(fam)
        c = await r.claim("sp")
        assert c["task"]["id"] == tid, (fam, c)
        out = await all_same(app, moves(r, tid, c["lease"]["id"], "advance", "done"), fast=fast)
        assert out["out"].get("code", out["out"].get("refused")) == expected, (fam, out["out"])
        if fam == "leadrev":  # equal cardinality again: the unguarded reviewer's reject comes first
            out = await all_same(app, moves(r, tid, c["lease"]["id"], "reject", "todo", "again"), fast=True)
            row = next(t for t in out["db"]["tasks"] if t["id"] == tid)
            assert out["out"]["code"] == "ok" and row["rework_by_stage"] == {"review": 1}
        if fam == "lead":  # its only reject is the guarded one
            out = await all_same(app, moves(r, tid, c["lease"]["id"], "reject", "todo", "no"), fast=False)
            assert out["out"]["refused"] == "GuardFailed"


async def test_an_escalated_task_moves_by_the_requirement_it_was_created_with(
        app: Any, admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    await in_review(w, "opens the review route")
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "hard"))["task"]["id"]
    for _ in range(2):  # escalate_after 2: the second failed hold raises it to tier:2
        c = await dev.claim("dev")
        assert c["task"]["id"] == tid
        await dev.verb(tid, "release", lease=c["lease"]["id"], reason="too hard")
    cap = await w.agent("capable")
    c = await cap.claim("dev")
    assert c["task"]["id"] == tid and c["task"]["required_features"] == ["tier:2"], c
    out = await all_same(app, moves(cap, tid, c["lease"]["id"], "advance", "review"), fast=True)
    row = next(t for t in out["db"]["tasks"] if t["id"] == tid)
    assert row["required_features"] == [] and row["base_required_features"] is None
    # An escalation in a stage whose route for the created requirement is missing: the statements.
    await db.execute("UPDATE tasks SET base_required_features = '{area:backend}' WHERE id = $1", uuid.UUID(tid))
    out = await all_same(app, moves(cap, tid, c["lease"]["id"], "advance", "review"), fast=False)
    assert out["rescan"]


# -- concurrency -------------------------------------------------------------------------------------------

async def test_a_function_claim_and_a_statement_claim_race_fairly(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    one = await w.agent("cheap")
    for i in range(3):
        await one.create("dev", f"t{i}")
    st = app.state.ainarres

    async def claim(wrap: Any) -> Any:
        async with st.pool.acquire() as conn:
            try:
                return await tasks.claim_as(wrap(conn), st.signer, one.token, "dev", st.limits)
            except AinarresError as exc:
                return type(exc).__name__

    for _ in range(5):
        # One agent (max_active 1), two claims at once, one by each path: exactly one gets through.
        got = await asyncio.gather(claim(_Statements), claim(lambda c: c))
        held = [g for g in got if isinstance(g, dict) and g["code"] == "claimed"]
        assert len(held) == 1 and "AlreadyHolding" in got, got
        await one.verb(held[0]["task"]["id"], "release", lease=held[0]["lease"]["id"])


async def test_two_prerequisites_finishing_at_once_by_different_paths(app: Any, admin: Api) -> None:
    w = await make_world(admin, workflow=review_flow("dev", first_stage={"max_attempts": 100}))
    dev = await w.agent("cheap")
    st = app.state.ainarres
    for i in range(4):
        rev1, a, la = await in_review(w, "A")
        rev2, b, lb = await in_review(w, "B")
        c = (await dev.create("dev", "C", depends_on=[a, b], priority=-5))["task"]["id"]
        first, second = (_Statements, lambda x: x) if i % 2 else (lambda x: x, _Statements)
        async with st.pool.acquire() as c1, st.pool.acquire() as c2:
            await asyncio.gather(
                tasks.transition_as(first(c1), st.signer, rev1.token, uuid.UUID(a), uuid.UUID(la), "advance",
                                    "done", None, []),
                tasks.transition_as(second(c2), st.signer, rev2.token, uuid.UUID(b), uuid.UUID(lb), "advance",
                                    "done", None, []))
            assert await c1.fetchval("SELECT state FROM tasks WHERE id = $1", uuid.UUID(c)) == "ready"


async def _lock_waiter(observer: asyncpg.Connection, pid: int) -> None:
    for _ in range(3000):  # no event tells another session's lock wait; poll pg_stat_activity
        if await observer.fetchval("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.01)
    pytest.fail("the second call never waited on the task's lock")


async def _second_of_two(app: Any, dsn: str, api: Api, tid: str, lease: str, wrap: Any,
                         second: Callable[[Any, Any], Awaitable[Any]] | None = None) -> Any:
    """Run `advance to review` on a held task, and while it holds the task's row lock uncommitted, the same
    call again (or `second`) on the connection `wrap` makes; the second call's answer once the first commits."""
    st = app.state.ainarres
    one, two, observer = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        for conn in (one, two):
            await _init_connection(conn)
        p = await auth.authenticate(one, st.signer, api.token)
        tx = one.transaction()
        await tx.start()
        await tasks.transition(one, p, uuid.UUID(tid), uuid.UUID(lease), "advance", "review", None, [])

        async def again() -> Any:
            try:
                if second is not None:
                    return await second(wrap(two), p)
                return await tasks.transition_as(wrap(two), st.signer, api.token, uuid.UUID(tid), uuid.UUID(lease),
                                                 "advance", "review", None, [])
            except AinarresError as exc:
                return type(exc).__name__

        pending = asyncio.ensure_future(again())
        await _lock_waiter(observer, two.get_server_pid())
        await tx.commit()
        return await asyncio.wait_for(pending, 30)
    finally:
        for conn in (one, two, observer):
            await conn.close()


async def test_a_repeated_advance_that_waited_for_the_first_is_refused_alike(app: Any, admin: Api, dsn: str
                                                                             ) -> None:
    """Both paths lock the task joined to its stage. A call that waited for that lock while another call
    moved the task to another stage must still find the task (and refuse with lease_lost), not lose
    it on the join to the stage it was in (PostgreSQL rechecks the join with the old stage row)."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await in_review(w, "opens the review route")
    answers = {}
    for label, wrap in (("function", lambda c: c), ("statements", _Statements)):
        tid = (await dev.create("dev", label))["task"]["id"]
        c = await dev.claim("dev")
        assert c["task"]["id"] == tid
        answers[label] = await _second_of_two(app, dsn, dev, tid, c["lease"]["id"], wrap)
    assert answers == {"function": "LeaseLost", "statements": "LeaseLost"}


async def test_a_heartbeat_that_waited_for_an_advance_is_refused_as_lease_lost(app: Any, admin: Api, dsn: str
                                                                                ) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await in_review(w, "opens the review route")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    c = await dev.claim("dev")

    async def heartbeat(conn: Any, p: Any) -> Any:
        return await tasks.heartbeat(conn, p, uuid.UUID(tid), uuid.UUID(c["lease"]["id"]))

    assert await _second_of_two(app, dsn, dev, tid, c["lease"]["id"], lambda x: x, heartbeat) == "LeaseLost"


async def test_a_claim_that_waited_for_the_agent_counts_the_hold_committed_meanwhile(app: Any, admin: Api, dsn: str
                                                                                      ) -> None:
    """max_active 1: a claim that waited for the agent's lock while the same agent's other claim took a task
    must count that hold (a statement that starts after the lock), by either path, in either order."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    st = app.state.ainarres
    for first, then in ((_Statements, lambda c: c), (lambda c: c, _Statements)):
        for i in range(2):
            await dev.create("dev", f"t{i}")
        one, two, observer = [await asyncpg.connect(dsn) for _ in range(3)]
        try:
            for conn in (one, two):
                await _init_connection(conn)
            tx = one.transaction()
            await tx.start()
            took = await tasks.claim_as(first(one), st.signer, dev.token, "dev", st.limits)
            assert took["code"] == "claimed"

            async def again(conn: Any) -> Any:
                try:
                    return await tasks.claim_as(conn, st.signer, dev.token, "dev", st.limits)
                except AinarresError as exc:
                    return type(exc).__name__

            pending = asyncio.ensure_future(again(then(two)))
            await _lock_waiter(observer, two.get_server_pid())
            await tx.commit()
            assert await asyncio.wait_for(pending, 30) == "AlreadyHolding"
        finally:
            for conn in (one, two, observer):
                await conn.close()
        await dev.verb(took["task"]["id"], "block", lease=took["lease"]["id"], reason="out of the way")
