"""Claims under real contention: many connections, one winner per task, fenced leases."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.errors import AinarresError
from ainarres_api.server.services import auth, tasks
from ainarres_api.server.services.auth import Principal
from ainarres_api.server.services.tasks import Limits
from tests.helpers import Api, World, make_world


async def _json_codecs(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@pytest.fixture
async def conns(dsn: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Twenty separate connections to the test's database, as twenty API replicas would hold."""
    opened = await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(20)))
    try:
        for c in opened:
            await _json_codecs(c)
        yield list(opened)
    finally:
        await asyncio.gather(*(c.close() for c in opened))


async def _principal(app: Any, api: Api) -> Principal:
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        return await auth.authenticate(conn, st.signer, api.token or "")


async def _seed(w: World, n: int) -> set[str]:
    dev = await w.agent("cheap")
    return {(await dev.create("dev", f"task {i}"))["task"]["id"] for i in range(n)}


def _assert_seven_winners(codes: list[str], won: list[str], seeded: set[str]) -> None:
    assert Counter(codes) == {"claimed": 7, "empty": 13}
    assert len(won) == len(set(won)) == 7, "a task was handed to two agents"
    assert set(won) == seeded


async def _assert_db_agrees(db: asyncpg.Connection, winners: dict[str, str]) -> None:
    rows = await db.fetch("SELECT id::text, holder, state FROM tasks")
    assert {r["id"]: r["holder"] for r in rows} == winners
    assert {r["state"] for r in rows} == {"held"}
    claimed = await db.fetch(
        "SELECT task_id::text, count(*) AS n FROM events WHERE type = 'claimed' GROUP BY 1")
    assert {r["task_id"]: r["n"] for r in claimed} == dict.fromkeys(winners, 1)


async def test_twenty_agents_seven_tasks_over_http(admin, db):
    w = await make_world(admin)
    seeded = await _seed(w, 7)
    agents = [await w.agent("cheap") for _ in range(20)]
    outs = await asyncio.gather(*(a.claim("dev") for a in agents))
    codes = [o["code"] for o in outs]
    won = [o["task"]["id"] for o in outs if o["code"] == "claimed"]
    _assert_seven_winners(codes, won, seeded)
    winners = {o["task"]["id"]: a.sub for a, o in zip(agents, outs, strict=True) if o["code"] == "claimed"}
    await _assert_db_agrees(db, winners)


async def test_twenty_connections_contend_in_the_service(app, admin, db, conns):
    """The service's claim on twenty connections at once: the database alone decides the winners."""
    w = await make_world(admin)
    limits = Limits()
    all_winners: dict[str, str] = {}
    for _ in range(3):
        # Several rounds (fresh tasks, fresh agents) so that no single lucky interleaving passes.
        seeded = await _seed(w, 7)
        principals = [await _principal(app, await w.agent("cheap")) for _ in range(20)]
        outs = [o for o, _ in await asyncio.gather(*(tasks.claim(c, p, "dev", limits)
                                                    for c, p in zip(conns, principals, strict=True)))]
        codes = [o["code"] for o in outs]
        won = [o["task"]["id"] for o in outs if o["code"] == "claimed"]
        _assert_seven_winners(codes, won, seeded)
        all_winners |= {o["task"]["id"]: p.sub for p, o in zip(principals, outs, strict=True)
                        if o["code"] == "claimed"}
        await _assert_db_agrees(db, all_winners)


async def test_one_agent_five_concurrent_claims_holds_at_most_max_active(app, admin, db, conns):
    w = await make_world(admin)
    await _seed(w, 10)
    p = await _principal(app, await w.agent("cheap"))
    assert p.max_active == 1
    results: list[Any] = [r[0] if isinstance(r, tuple) else r for r in await asyncio.gather(
        *(tasks.claim(c, p, "dev", Limits()) for c in conns[:5]), return_exceptions=True)]
    claimed = [r for r in results if isinstance(r, dict) and r["code"] == "claimed"]
    refused = [r for r in results if isinstance(r, AinarresError)]
    assert [type(r).__name__ for r in results if not isinstance(r, dict | AinarresError)] == []
    assert len(claimed) == 1, f"one agent got {len(claimed)} tasks with max_active 1"
    assert {r.code for r in refused} == {"already_holding"} and len(refused) == 4
    held = await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1 AND state = 'held'", p.sub)
    assert held == 1


async def test_one_agent_five_concurrent_claims_over_http(admin, db):
    w = await make_world(admin)
    await _seed(w, 10)
    agent = await w.agent("cheap")
    rs = await asyncio.gather(*(agent.call("POST", "/v1/claims", {"lane": "dev"}) for _ in range(5)))
    statuses = Counter(r.status_code for r in rs)
    assert statuses == {200: 1, 409: 4}, [r.text for r in rs]
    assert {r.json()["code"] for r in rs if r.status_code == 409} == {"already_holding"}
    held = await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1 AND state = 'held'", agent.sub)
    assert held == 1


@pytest.mark.parametrize("offset", ["-1 hour", "-1 second", "0 seconds", "20 milliseconds", "1 hour"])
async def test_advance_by_holder_races_reclaim_exactly_one_wins(app, admin, db, conns, offset):
    """The holder advancing and another agent reclaiming at the lease's end: one of them, never both."""
    w = await make_world(admin)
    await _seed(w, 1)
    holder = await _principal(app, await w.agent("cheap"))
    other = await _principal(app, await w.agent("cheap"))
    limits = Limits()
    c, _ = await tasks.claim(conns[0], holder, "dev", limits)
    tid, lease = c["task"]["id"], uuid.UUID(c["lease"]["id"])
    await db.execute(
        "UPDATE tasks SET lease_expires_at = clock_timestamp() + $2::text::interval WHERE id = $1",
        tid, offset)

    async def advance() -> bool:
        try:
            await tasks.transition(conns[1], holder, tid, lease, "advance", "review", "done", [])
        except AinarresError as exc:
            assert exc.code == "lease_lost"
            return False
        return True

    adv_won, (claim_out, _) = await asyncio.gather(advance(), tasks.claim(conns[2], other, "dev", limits))
    if claim_out["code"] == "empty" and not adv_won:
        # The claim stepped over the row while the losing advance had it locked; nobody holds the
        # expired task yet, and the next claim must recover it.
        claim_out, _ = await tasks.claim(conns[2], other, "dev", limits)
    claim_won = claim_out["code"] == "claimed"
    assert adv_won != claim_won, f"advance won: {adv_won}, reclaim won: {claim_won}"
    row = await db.fetchrow("SELECT s.key AS stage, t.state, t.holder, t.attempts, t.lease_id::text AS lease "
                            "FROM tasks t JOIN stages s ON s.id = t.stage_id WHERE t.id = $1", tid)
    if adv_won:
        assert (row["stage"], row["state"], row["holder"]) == ("review", "ready", None)
    else:
        assert claim_out["task"]["id"] == tid
        assert (row["stage"], row["state"], row["holder"]) == ("todo", "held", other.sub)
        assert row["attempts"] == 1 and row["lease"] != str(lease)
        # The dead lease stays dead.
        with pytest.raises(AinarresError) as dead:
            await tasks.transition(conns[1], holder, tid, lease, "advance", "review", "late", [])
        assert dead.value.code == "lease_lost"
    if offset == "-1 hour":
        assert claim_won
    if offset == "1 hour":
        assert adv_won
    transitions = await db.fetchval(
        "SELECT count(*) FROM events WHERE task_id = $1 AND type = 'transition'", tid)
    assert transitions == (1 if adv_won else 0)
