"""The principal reads of concurrent calls, grouped (services.auth.Reads): each call still gets its own
caller read after it arrived, one statement serves the reads that waited, and a read that goes away
leaves the others to go on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import jwt
import pytest

from ainarres_api.server.api import outage
from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Unauthenticated
from ainarres_api.server.services import auth
from tests.helpers import Api, make_world

FRESH = "SELECT 'fresh connection'"


@contextlib.asynccontextmanager
async def _tokens_locked(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """The tokens table locked against readers until the block ends: a principal read started now waits."""
    holder = await asyncpg.connect(dsn)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
            yield holder
    finally:
        await holder.close()


async def _until_waiting_on_a_lock(watch: asyncpg.Connection, pid: int) -> None:
    for _ in range(2000):  # until the read is seen waiting on the lock (the event), bounded
        if await watch.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid):
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the first read never waited on the lock")


async def _until(cond: Any) -> None:
    for _ in range(10_000):  # the other reads joining the queue: only the event loop has to turn
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("the reads never queued")


async def _tokens(app: Any, n: int, family: str) -> list[dict[str, Any]]:
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        return [await auth.mint(conn, st.signer, family=family, ttl_seconds=3600) for _ in range(n)]


async def test_reads_that_arrive_while_one_runs_go_together_each_with_its_own_caller(
        app: Any, admin: Api, dsn: str, db: asyncpg.Connection) -> None:
    await make_world(admin)
    signer = app.state.ainarres.signer
    cheap, reviewers = await _tokens(app, 3, "cheap"), await _tokens(app, 2, "reviewers")
    revoked = cheap[2]
    await db.execute("UPDATE tokens SET revoked_at = now() WHERE jti = $1", uuid.UUID(revoked["jti"]))
    # Signed by the service, but never recorded: the read finds no row for it.
    unknown = signer.sign({**jwt.decode(cheap[0]["token"], options={"verify_signature": False}),
                           "jti": str(uuid.uuid4())})
    order = [cheap[0], reviewers[0], cheap[1], revoked, reviewers[1]]
    for tok in order[:3] + order[4:]:  # each agent has called once (its row made, its last call just now)
        await auth.authenticate(db, signer, tok["token"])
    conns = [await asyncpg.connect(dsn) for _ in range(len(order) + 2)]
    try:
        for c in conns:
            await c.fetchval(FRESH)
        reads = auth.Reads()
        async with _tokens_locked(dsn):
            first = asyncio.create_task(auth.authenticate(conns[0], signer, admin.token, reads))
            await _until_waiting_on_a_lock(db, conns[0].get_server_pid())
            later = [asyncio.create_task(auth.authenticate(c, signer, t["token"], reads))
                     for c, t in zip(conns[1:], order, strict=False)]
            later.append(asyncio.create_task(auth.authenticate(conns[-1], signer, unknown, reads)))
            await _until(lambda: len(reads.waiting) == len(later))
            assert not first.done() and not any(t.done() for t in later)
        got = await asyncio.wait_for(asyncio.gather(first, *later, return_exceptions=True), 30)
        assert isinstance(got[0], auth.Principal) and got[0].family == "admin"
        for tok, principal in zip(order, got[1:], strict=False):
            if tok is revoked:
                assert isinstance(principal, Unauthenticated) and "revoked" in principal.detail
                continue
            assert isinstance(principal, auth.Principal), principal
            assert (principal.sub, principal.family, principal.jti) == (tok["sub"], tok["family"], tok["jti"])
            assert ("role:reviewer" in principal.features) == (tok["family"] == "reviewers")
        assert isinstance(got[-1], Unauthenticated) and "not issued by this service" in got[-1].detail
        # One statement, on the connection of the first read that waited, read for all that waited: the others'
        # connections ran nothing since they opened.
        last = {r["pid"]: r["query"] for r in await db.fetch(
            "SELECT pid, query FROM pg_stat_activity WHERE pid = ANY($1::int[])", [c.get_server_pid() for c in conns])}
        ran = [c for c in conns[1:] if last[c.get_server_pid()] != FRESH]
        assert ran == [conns[1]] and "principal_of" in last[conns[1].get_server_pid()]
        assert not reads.running and not reads.waiting
    finally:
        for c in conns:
            await c.close()


@pytest.mark.parametrize("who", ["running", "waiting", "told to run next"])
async def test_a_read_that_goes_away_leaves_the_others_to_go_on(
        app: Any, admin: Api, dsn: str, db: asyncpg.Connection, who: str) -> None:
    await make_world(admin)
    signer = app.state.ainarres.signer
    toks = await _tokens(app, 4, "cheap")
    conns = [await asyncpg.connect(dsn) for _ in range(len(toks) + 1)]
    try:
        reads = auth.Reads()
        async with _tokens_locked(dsn):
            tasks = [asyncio.create_task(auth.authenticate(conns[0], signer, toks[0]["token"], reads))]
            await _until_waiting_on_a_lock(db, conns[0].get_server_pid())
            tasks += [asyncio.create_task(auth.authenticate(c, signer, t["token"], reads))
                      for c, t in zip(conns[1:], toks[1:], strict=False)]
            await _until(lambda: len(reads.waiting) == 3)
            if who == "running":  # its statement is cancelled (a client gone, a shutdown)
                gone = 0
                tasks[0].cancel()
            elif who == "waiting":
                gone = 2
                tasks[2].cancel()
            else:
                # Told to run the next statement (what the running read does as it ends, done here in the same
                # step) and cancelled before it could: the reads it was to run for read alone.
                gone = 1
                reads._next()
                tasks[1].cancel()
        got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        assert isinstance(got[gone], asyncio.CancelledError)
        for i, (tok, principal) in enumerate(zip(toks, got, strict=True)):
            if i != gone:
                assert isinstance(principal, auth.Principal) and principal.sub == tok["sub"], principal
        assert not reads.running and not reads.waiting
        # And the next read runs at once.
        assert (await auth.authenticate(conns[-1], signer, toks[0]["token"], reads)).sub == toks[0]["sub"]
    finally:
        for c in conns:
            await c.close()


async def test_one_statement_reads_for_at_most_256_calls(app: Any, admin: Api, dsn: str, db: asyncpg.Connection
                                                          ) -> None:
    await make_world(admin)
    signer = app.state.ainarres.signer
    tok = (await _tokens(app, 1, "cheap"))[0]
    await auth.authenticate(db, signer, tok["token"])  # its first call made the agent's row: the reads only read
    first_conn, lead_conn = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        reads = auth.Reads()
        async with _tokens_locked(dsn):
            first = asyncio.create_task(auth.authenticate(first_conn, signer, tok["token"], reads))
            await _until_waiting_on_a_lock(db, first_conn.get_server_pid())
            # A wake-up's worth of re-reads (the waiting ones never touch their connection unless told to lead).
            later = [asyncio.create_task(auth.authenticate(lead_conn, signer, tok["token"], reads)) for _ in range(300)]
            await _until(lambda: len(reads.waiting) == 300)
        await first
        assert len(reads.waiting) == 300 - 256  # the first 256 went in the statement now running
        got = await asyncio.wait_for(asyncio.gather(*later), 30)
        assert {p.sub for p in got} == {tok["sub"]}
        assert not reads.running and not reads.waiting
    finally:
        await first_conn.close()
        await lead_conn.close()


async def test_a_read_whose_connection_the_server_closed_while_it_waited_is_an_outage(
        app: Any, admin: Api, dsn: str, db: asyncpg.Connection) -> None:
    """A database restart while reads wait: the one told to run next finds its pooled connection gone (asyncpg
    detached it when the server closed it); that call is a 503, never a 500, and the read behind it goes on."""
    await make_world(admin)
    signer = app.state.ainarres.signer
    toks = await _tokens(app, 3, "cheap")
    for tok in toks:
        await auth.authenticate(db, signer, tok["token"])
    pool = await asyncpg.create_pool(dsn, min_size=3, max_size=3)
    try:
        c0, c1, c2 = [await pool.acquire() for _ in range(3)]
        reads = auth.Reads()
        async with _tokens_locked(dsn):
            first = asyncio.create_task(auth.authenticate(c0, signer, toks[0]["token"], reads))
            await _until_waiting_on_a_lock(db, c0.get_server_pid())
            doomed = asyncio.create_task(auth.authenticate(c1, signer, toks[1]["token"], reads))
            behind = asyncio.create_task(auth.authenticate(c2, signer, toks[2]["token"], reads))
            await _until(lambda: len(reads.waiting) == 2)
            assert await db.fetchval("SELECT pg_terminate_backend($1)", c1.get_server_pid())
            for _ in range(2000):  # until the pool has seen the close and detached the handle (the event), bounded
                if c1._con is None:
                    break
                await asyncio.sleep(0.005)
            else:
                raise AssertionError("asyncpg never saw the connection close")
        got = await asyncio.wait_for(asyncio.gather(first, doomed, behind, return_exceptions=True), 30)
        assert isinstance(got[0], auth.Principal) and isinstance(got[2], auth.Principal), got
        assert isinstance(got[1], asyncpg.InterfaceError) and outage.as_unavailable(got[1]) is not None, got[1]
        assert not reads.running and not reads.waiting
    finally:
        pool.terminate()


@pytest.mark.parametrize("plan", ["auto", "force_generic_plan"])
async def test_a_grouped_read_probes_the_tokens_index_among_many_tokens(db: asyncpg.Connection, plan: str) -> None:
    """Every token ever minted stays in `tokens` (revoked and expired ones too): a group's read looks each up by
    its jti, never scanning them, whichever plan PostgreSQL caches."""
    await db.execute("INSERT INTO families (key) VALUES ('many')")
    await db.execute("""INSERT INTO tokens (jti, family_key, sub, issued_at, expires_at)
                        SELECT gen_random_uuid(), 'many', 'many.' || g, now(), now() + interval '1 hour'
                          FROM generate_series(1, 50000) g""")
    await db.execute("ANALYZE tokens")
    jtis = [r["jti"] for r in await db.fetch("SELECT jti FROM tokens ORDER BY random() LIMIT 32")]
    await db.execute(f"SET plan_cache_mode = {plan}")
    await db.execute(f"PREPARE grouped(uuid[]) AS {Q['resolve_principals'].rstrip().rstrip(';')}")
    for n in (1, 8, 32):
        group = "{" + ",".join(map(str, jtis[:n])) + "}"
        doc = json.loads(await db.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE grouped('{group}')"))
        scans = [node for node in _nodes(doc[0]["Plan"]) if node.get("Relation Name") == "tokens"]
        assert scans and all(node["Node Type"] == "Index Scan" and node["Index Name"] == "tokens_pkey"
                             for node in scans), (n, json.dumps(doc)[:1500])
    assert len(await db.fetch(Q["resolve_principals"], jtis)) == 32


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)
