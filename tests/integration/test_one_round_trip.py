"""Each verb is one statement the service issues through the pool in the common case (ADR 0012); whatever is
not in order still gets its precise answer from the same statement's verdict (the words a refusal needs, or a
replay's event, from a statement of their own run only then)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from ainarres_api.server.db.queries import Q
from ainarres_api.server.services import tasks
from ainarres_api.server.services.auth import identity
from tests.helpers import Api, make_world


class Recording:
    """A connection that notes every statement the service sends through it."""

    def __init__(self, conn: Any) -> None:
        self._c, self.sent = conn, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetch(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.execute(query, *args)


class RecordingPool:
    """The app's pool, lending Recording connections that note, in one list, what every request sends."""

    def __init__(self, pool: Any) -> None:
        self.pool, self.sent = pool, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def acquire(self) -> Any:
        return _Acquire(self)

    async def release(self, conn: Any) -> None:
        await self.pool.release(conn._c if isinstance(conn, Recording) else conn)


class _Acquire:
    """`await pool.acquire()` and `async with pool.acquire()`, as asyncpg's pool offers both."""

    def __init__(self, owner: RecordingPool) -> None:
        self.owner, self.conn = owner, None

    async def _lend(self) -> Recording:
        rec = Recording(await self.owner.pool.acquire())
        rec.sent = self.owner.sent
        return rec

    def __await__(self) -> Any:
        return self._lend().__await__()

    async def __aenter__(self) -> Recording:
        self.conn = await self._lend()
        return self.conn

    async def __aexit__(self, *_: Any) -> None:
        await self.owner.release(self.conn)


def _names(sent: list[str]) -> list[str]:
    by_text = {text: name for name, text in Q.items()}
    return [by_text.get(q, q) for q in sent]


async def test_claim_advance_and_progress_are_one_statement_each(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    first = (await dev.create("dev", "opens the review route"))["task"]["id"]
    c = await dev.claim("dev")
    await dev.verb(first, "advance", lease=c["lease"]["id"], to="review")  # creates the review route
    tid = (await dev.create("dev", "one trip"))["task"]["id"]
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        who = identity(st.signer, dev.token)  # the token verified; the claim and the transition read the caller
        await tasks.stage_card(conn, await conn.fetchval("SELECT stage_id FROM tasks WHERE id = $1",
                                                         uuid.UUID(tid)))  # the card cache, warmed
        rec = Recording(conn)
        out, p = await tasks.claim(rec, who, "dev", st.limits)
        assert out["code"] == "claimed" and out["task"]["id"] == tid
        assert p.sub == dev.sub and "role:dev" in p.features
        lease = uuid.UUID(out["lease"]["id"])
        out = await tasks.progress(rec, p, uuid.UUID(tid), lease, "half", [])
        assert out["event"]["type"] == "progress"
        out, _ = await tasks.transition(rec, who, uuid.UUID(tid), lease, "advance", "review", "done", [])
        assert out["task"]["stage"] == "review"
        assert _names(rec.sent) == ["claim", "renew", "transition"]


@pytest.mark.parametrize("case", ["foreign", "ended", "expired", "illegal"])
async def test_refusals_come_from_the_same_statement(app: Any, admin: Api, db: Any, case: str) -> None:
    w = await make_world(admin)
    dev, other = await w.agent("cheap"), await w.agent("cheap")
    tid = (await dev.create("dev", "refused"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    body: dict[str, Any] = {"lease": lease, "to": "review"}
    who = dev
    if case == "foreign":
        who = other  # another agent presenting dev's live lease
    elif case == "ended":
        body["lease"] = str(uuid.uuid4())
    elif case == "expired":
        await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                         uuid.UUID(tid))
    elif case == "illegal":
        body["to"] = "done"
    r = await who.call("POST", f"/v1/tasks/{tid}/advance", body)
    expected = {"foreign": (409, "lease_lost", "another agent"),
                "ended": (409, "lease_lost", "another lease of this identity"),
                "expired": (409, "lease_lost", "expired"), "illegal": (409, "illegal_transition", "review")}[case]
    assert (r.status_code, r.json()["code"]) == expected[:2], r.text
    assert expected[2] in r.json()["detail"], r.text
    # Nothing changed: still held by dev under the same lease.
    row = await db.fetchrow("SELECT state, holder, lease_id::text FROM tasks WHERE id = $1", uuid.UUID(tid))
    assert (row["state"], row["holder"], row["lease_id"]) == ("held", dev.sub, lease)


async def test_a_lost_lease_says_which_way_the_hold_ended(admin: Api, db: Any) -> None:
    """SPEC §3: the detail says which — taken over by another agent after the lease ran out, or moved on (found by
    a review of SPEC against the code: every ended hold had one wording)."""
    w = await make_world(admin)
    a, b = await w.agent("cheap"), await w.agent("cheap")
    tid = (await a.create("dev", "taken over"))["task"]["id"]
    mine = (await a.claim("dev"))["lease"]["id"]
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", uuid.UUID(tid))
    theirs = (await b.claim("dev"))["lease"]["id"]  # recovers it
    r = await a.verb(tid, "heartbeat", 409, lease=mine)
    assert r["code"] == "lease_lost" and "another agent holds the task now" in r["detail"], r
    await b.verb(tid, "advance", lease=theirs, to="review")
    r = await a.verb(tid, "heartbeat", 409, lease=mine)
    assert "the task is now ready (stage review)" in r["detail"], r


async def test_over_http_a_claim_and_an_advance_are_one_statement_each_the_caller_read_inside(
        app: Any, admin: Api) -> None:
    """Authentication included: the route's dependency verifies the token, and the verb's own statement reads the
    caller's features (ADR 0027) — one statement per request, the caller's read not a round trip of its own; a
    refusal decided after that statement does not read the caller again (the refusal carries it)."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    first = (await dev.create("dev", "opens the review route"))["task"]["id"]
    c = await dev.claim("dev")  # the agent recorded, the card cached
    await dev.verb(first, "advance", lease=c["lease"]["id"], to="review")  # the review route created
    tid = (await dev.create("dev", "one trip"))["task"]["id"]
    await dev.create("dev", "queued")
    st = app.state.ainarres

    async def sent(method: str, path: str, body: dict[str, Any] | None, status: int) -> list[str]:
        recording.sent.clear()
        r = await dev.call(method, path, body)
        assert r.status_code == status, r.text
        return _names(recording.sent)

    recording = RecordingPool(st.pool)
    st.pool = recording
    try:
        c = await dev.claim("dev")
        claimed = _names(recording.sent)
        lease = c["lease"]["id"]
        full = await sent("POST", "/v1/claims", {"lane": "dev"}, 409)  # already_holding (max_active 1)
        illegal = await sent("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "nowhere"}, 409)
        advanced = await sent("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"}, 200)
        read = await sent("GET", "/v1/me", None, 200)  # a read: the caller read first, by the route's dependency
    finally:
        st.pool = recording.pool
    assert c["task"]["id"] == tid
    assert claimed == ["claim"]
    assert full == ["claim", "held_by_agent"]
    assert illegal == ["transition", "transition_options"]
    assert advanced == ["transition"]
    assert read[0] == "resolve_principal"
