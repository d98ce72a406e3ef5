"""Holding under abuse: events bounded in bytes, numbers that round-trip, pages bounded in bytes,
crafted cursors refused, governance of family disable/enable, revocation biting open streams, the
per-agent rate limit, and a database outage answered as one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from ainarres_api.server.api import outage
from ainarres_api.server.app import create_app
from ainarres_api.server.services import auth
from ainarres_api.server.services import oversight as oversight_svc
from ainarres_api.server.settings import Settings
from tests.helpers import Api, make_world
from tests.integration.test_oversight import Frames, StreamingASGITransport


@pytest.fixture
async def sse(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = StreamingASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test", timeout=30) as c:
        yield c
    for t in transport.tasks:
        t.cancel()


async def _held(admin: Api) -> tuple[Api, dict[str, Any]]:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "t")
    claim = await dev.claim("dev")
    return dev, claim


# -- one event is bounded in bytes (note or reason + artifacts) ------------------------------------

async def test_an_event_over_its_byte_bound_is_413_naming_the_fields_and_changes_nothing(admin: Api, db: Any
                                                                                          ) -> None:
    dev, claim = await _held(admin)
    tid, lease = claim["task"]["id"], claim["lease"]["id"]
    before = await db.fetchval("SELECT count(*) FROM events")
    # Within Note's 8,000-character bound: 7,000 two-byte characters and artifacts pass the 16 KiB
    # default together; 6,000 three-byte characters alone do.
    big = {"lease": lease, "note": "é" * 7000,
           "artifacts": [{"type": "file", "path": "p" * 2000}] * 5}
    r = await dev.verb(tid, "progress", expect=413, **big)
    assert r["code"] == "payload_too_large" and "note and artifacts together" in r["detail"]
    r = await dev.verb(tid, "release", expect=413, lease=lease, reason="€" * 6000)
    assert r["code"] == "payload_too_large" and r["detail"].startswith("reason:")
    assert await db.fetchval("SELECT count(*) FROM events") == before
    ok = await dev.verb(tid, "progress", lease=lease, note="é" * 4000, artifacts=[{"type": "pr", "uri": "u"}])
    assert ok["event"]["type"] == "progress"


# -- numbers that cannot be read back are refused at the door ---------------------------------------

@pytest.mark.parametrize("number", ["1e300", "-1e19", "18446744073709551616", "-9223372036854775809"])
async def test_numbers_that_cannot_round_trip_are_422_naming_the_field(admin: Api, db: Any, number: str) -> None:
    await make_world(admin)
    body = '{"lane": "dev", "title": "t", "payload": {"a": [1, {"b": NUMBER}]}}'.replace("NUMBER", number)
    r = await admin.client.post("/v1/tasks", content=body, headers={
        "Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid" and r.json()["errors"][0]["field"] == "payload"
    assert "a.1.b" in r.json()["detail"]
    r = await admin.client.post("/v1/projects", content='{"slug": "p2", "context": {"n": N}}'.replace("N", number),
                                headers={"Authorization": f"Bearer {admin.token}",
                                         "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "context"
    assert await db.fetchval("SELECT count(*) FROM tasks") == 0
    assert await db.fetchval("SELECT count(*) FROM projects WHERE slug = 'p2'") == 0


async def test_numbers_within_64_bits_are_stored_and_read_back(admin: Api) -> None:
    dev = await (await make_world(admin)).agent("cheap")
    payload = {"max": 9223372036854775807, "min": -9223372036854775808, "big": 9.2e18, "tiny": 1e-300}
    t = (await dev.create("dev", "t", payload=payload))["task"]
    got = (await dev.get(f"/v1/tasks/{t['id']}"))
    got = got.get("task", got)
    assert got["payload"]["max"] == 9223372036854775807 and got["payload"]["min"] == -9223372036854775808
    assert got["payload"]["big"] == 9.2e18 and got["payload"]["tiny"] == 1e-300


# -- reads bounded in bytes ------------------------------------------------------------------------

async def test_a_feed_page_stops_at_its_byte_budget_and_the_cursor_walks_every_event(
        settings: Settings, dsn: str) -> None:
    settings.max_read_bytes = 65_536
    app = create_app(settings, dsn=dsn)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            st = app.state.ainarres
            async with st.pool.acquire() as conn:
                tok = await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600)
            admin = Api(c, tok["token"])
            dev, claim = await _held(admin)
            for i in range(12):  # 12 × ~15 KB: about three pages of 64 KiB
                await dev.verb(claim["task"]["id"], "progress", lease=claim["lease"]["id"], note=f"{i}" + "é" * 7_500)
            seen: list[int] = []
            cursor = None
            pages = 0
            while True:
                params: dict[str, Any] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
                r = await c.get("/v1/feed", params=params, headers={"Authorization": f"Bearer {admin.token}"})
                assert r.status_code == 200
                assert len(r.content) < 65_536 + 20_000  # the budget plus at most one event
                page = r.json()
                pages += 1
                seen += [e["id"] for e in page["items"]]
                cursor = page["next"]
                if cursor is None:
                    break
            assert pages >= 3
            async with st.pool.acquire() as conn:
                every = [r["id"] for r in await conn.fetch("SELECT id FROM events ORDER BY id DESC")]
            assert seen == every


async def test_a_stream_batch_stops_at_its_byte_budget_without_skipping_an_id(app: Any, admin: Api) -> None:
    dev, claim = await _held(admin)
    for _ in range(6):
        await dev.verb(claim["task"]["id"], "progress", lease=claim["lease"]["id"], note="n" * 7_000)
    async with app.state.ainarres.pool.acquire() as conn:
        every = [r["id"] for r in await conn.fetch("SELECT id FROM events ORDER BY id")]
        cursor, got = 0, []
        while True:
            batch = await oversight_svc.events_after(conn, None, cursor, None, None, 200, max_bytes=25_000)
            if not batch:
                break
            assert len(batch) < len(every) or not batch.more
            got += [eid for eid, _ in batch]
            cursor = batch[-1][0]
            if not batch.more:
                break
    assert got == every


# -- crafted cursors and event ids -----------------------------------------------------------------

async def test_crafted_cursors_and_event_ids_are_422_naming_the_parameter(admin: Api, sse: httpx.AsyncClient
                                                                         ) -> None:
    h = {"Authorization": f"Bearer {admin.token}"}
    r = await sse.get("/v1/events/stream", headers={**h, "Last-Event-ID": "²".encode()})
    assert r.status_code == 422 and r.json()["code"] == "invalid" and "Last-Event-ID" in r.json()["detail"]
    r = await sse.get("/v1/events/stream", headers={**h, "Last-Event-ID": "9" * 25})
    assert r.status_code == 422 and "Last-Event-ID" in r.json()["detail"]
    r = await sse.get("/v1/events/stream", params={"after": "1" + "0" * 39}, headers=h)
    assert r.status_code == 422 and r.json()["code"] == "invalid" and "after" in r.json()["detail"]
    for parts in (["²"], ["9" * 40], ["\ud800"], ["a\u0000"]):
        raw = json.dumps(parts).encode()
        cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        r = await admin.client.get("/v1/feed", params={"cursor": cursor}, headers=h)
        assert r.status_code == 422 and r.json()["code"] == "invalid" and "cursor" in r.json()["detail"], parts
    raw = json.dumps(["\ud800"]).encode()
    for path in ("/v1/agents", "/v1/track-record"):
        r = await admin.client.get(path, params={"cursor": base64.urlsafe_b64encode(raw).decode()}, headers=h)
        assert r.status_code == 422 and "cursor" in r.json()["detail"], path


# -- governance of family disable / enable (ADR 0008) ----------------------------------------------

async def _seat(admin: Api, seat: str, key: str | None = None) -> Api:
    key = key or seat.replace(":", "-")
    await admin.post("/v1/families", {"key": key, "features": [seat]}, 201)
    tok = await admin.post("/v1/tokens", {"family": key}, 201)
    return Api(admin.client, tok["token"])


async def test_an_overseer_governs_work_families_only(admin: Api) -> None:
    await make_world(admin)
    overseer = await _seat(admin, "seat:overseer")
    await _seat(admin, "seat:monitor", "watchers")
    r = await overseer.post("/v1/families/admin/disable", expect=403)
    assert r["code"] == "not_eligible" and "seat:admin" in r["detail"]
    assert (await overseer.post("/v1/families/watchers/disable", expect=403))["code"] == "not_eligible"
    # An admin's disable of a seat family cannot be undone by an overseer; an admin can.
    assert (await admin.post("/v1/families/watchers/disable", expect=200))["disabled"] is True
    assert (await overseer.post("/v1/families/watchers/enable", expect=403))["code"] == "not_eligible"
    assert (await admin.get("/v1/families/watchers"))["disabled"] is True
    assert (await admin.post("/v1/families/watchers/enable", expect=200))["disabled"] is False
    # Work families stay the overseer's to govern; the last admin family stays enabled.
    assert (await overseer.post("/v1/families/cheap/disable", expect=200))["disabled"] is True
    assert (await overseer.post("/v1/families/cheap/enable", expect=200))["disabled"] is False
    # ... but an admin's disable of a work family is the admin's to undo (via disable or PATCH).
    for disable in (lambda: admin.post("/v1/families/cheap/disable", expect=200),
                    lambda: admin.patch("/v1/families/cheap", {"disabled": True})):
        assert (await disable())["disabled"] is True
        r = await overseer.post("/v1/families/cheap/enable", expect=403)
        assert r["code"] == "not_eligible" and "disabled by an admin" in r["detail"]
        assert (await admin.post("/v1/families/cheap/enable", expect=200))["disabled"] is False
    # An overseer's own disable the overseer may undo.
    assert (await overseer.post("/v1/families/cheap/disable", expect=200))["disabled"] is True
    assert (await overseer.post("/v1/families/cheap/enable", expect=200))["disabled"] is False
    assert (await admin.post("/v1/families/admin/disable", expect=409))["code"] == "conflict"


# -- revocation and disabling end open streams promptly -------------------------------------------

async def _stream_ends(sse: httpx.AsyncClient, token: str, act: Any) -> dict[str, Any]:
    async with sse.stream("GET", "/v1/events/stream", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status_code == 200
        frames = Frames(r)
        assert (await frames.next())[0] == "comment"
        await act()

        async def until_error() -> dict[str, Any]:
            while True:
                f = await frames.next()
                if f[0] == "error":
                    return dict(f[1])

        # REAUTH_SECONDS (30) is far beyond this bound: only the per-tick token probe ends it in time.
        return await asyncio.wait_for(until_error(), 10)


async def test_a_revoked_token_s_stream_ends_within_a_tick(admin: Api, sse: httpx.AsyncClient) -> None:
    w = await make_world(admin)
    tok = await admin.post("/v1/tokens", {"family": "cheap"}, 201)
    err = await _stream_ends(sse, tok["token"], lambda: admin.delete(f"/v1/tokens/{tok['jti']}"))
    assert err["code"] == "unauthenticated" and "revoked" in err["detail"]
    assert w is not None


async def test_a_disabled_family_s_stream_ends_within_a_tick(admin: Api, sse: httpx.AsyncClient) -> None:
    await make_world(admin)
    tok = await admin.post("/v1/tokens", {"family": "cheap"}, 201)
    err = await _stream_ends(sse, tok["token"],
                             lambda: admin.patch("/v1/families/cheap", {"disabled": True}))
    assert err["code"] == "unauthenticated" and "disabled" in err["detail"]


# -- the per-agent rate limit ----------------------------------------------------------------------

async def test_the_rate_limit_is_per_agent_with_retry_after(settings: Settings, dsn: str) -> None:
    settings.rate_limit_per_second = 0.001  # one token per 1000 s: nothing refills during the test
    settings.rate_limit_burst = 3
    app = create_app(settings, dsn=dsn)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            st = app.state.ainarres
            async with st.pool.acquire() as conn:
                one = Api(c, (await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600))["token"])
                two = Api(c, (await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600))["token"])
            for _ in range(3):
                await one.get("/v1/me")
            r = await one.call("GET", "/v1/me")
            assert r.status_code == 429 and r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
            await two.get("/v1/me")  # another agent has its own bucket
            for _ in range(5):
                assert (await c.get("/healthz")).status_code == 200  # probes are not counted
            anon = Api(c, None)
            codes = [(await anon.call("GET", "/v1/me")).status_code for _ in range(4)]
            assert codes == [401, 401, 401, 429]  # without a valid token: by client address


# -- a database outage is a 503, logged once ------------------------------------------------------

class Relay:
    """A relay to the test's PostgreSQL (a Unix socket of its own) that can be cut: the database goes
    away for one app only, the shared server stays up."""

    def __init__(self, upstream: str, directory: Path) -> None:
        self.upstream = upstream
        self.path = directory / ".s.PGSQL.5432"
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_unix_connection(self.upstream)
        self.writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()


async def test_a_database_outage_is_503_unavailable_logged_once(settings: Settings, dsn: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    url = urlsplit(dsn)
    sockets = Path(parse_qs(url.query)["host"][0])
    upstream = next(p for p in sockets.glob(".s.PGSQL.*") if not p.name.endswith(".lock"))  # noqa: ASYNC240
    relay = Relay(str(upstream), tmp_path)
    await relay.start()
    via = urlunsplit(url._replace(query=f"host={tmp_path}&port=5432"))
    settings.pool_max_size = 2
    app = create_app(settings, dsn=via)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as c:
            st = app.state.ainarres
            async with st.pool.acquire() as conn:
                admin = Api(c, (await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600))["token"])
            await admin.get("/v1/me")
            assert (await c.get("/readyz")).status_code == 200
            await relay.cut()
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                for method, path, body in (("GET", "/v1/me", None), ("POST", "/v1/claims", {}),
                                           ("GET", "/v1/projects", None), ("GET", "/readyz", None)):
                    r = await admin.call(method, path, body)
                    assert r.status_code == 503, (path, r.text)
                    assert r.headers["content-type"] == "application/problem+json"
                    assert r.json()["code"] == "unavailable" and int(r.headers["Retry-After"]) > 0
                assert (await c.get("/healthz")).status_code == 200  # liveness reads no database
            lines = [rec for rec in caplog.records if "database unavailable" in rec.getMessage()]
            assert len(lines) == 4, [rec.getMessage() for rec in caplog.records]
            assert not any(rec.exc_info for rec in caplog.records if rec.name in ("ainarres", "ainarres.outage"))


async def test_a_held_connection_the_server_closed_is_an_outage_not_a_bug(dsn: str, db: Any) -> None:
    """A pooled connection the server terminates while a request holds it between two statements: asyncpg's
    pool detaches the request's handle, and the next call on it is read as the outage it is (503)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        conn = await pool.acquire()
        assert await db.fetchval("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        for _ in range(2000):  # until asyncpg has seen the close and detached the handle (the event), bounded
            if conn._con is None:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("asyncpg never saw the connection close")
        with pytest.raises(asyncpg.InterfaceError, match="released back to the pool") as caught:
            await conn.fetchval("SELECT 1")
        assert outage.as_unavailable(caught.value) is not None
        assert outage.as_unavailable(asyncpg.InterfaceError("some other misuse")) is None
    finally:
        pool.terminate()


async def test_what_jsonb_hands_back_for_big_numbers_renders(app: Any, db: Any) -> None:
    """The cause of the 500s on read: jsonb prints 1e300 as a 301-digit integer, which orjson refuses.
    render.dumps (for FastJSONResponse) renders it as the float it stood for."""
    import orjson

    from ainarres_api.server.api import render

    async with app.state.ainarres.pool.acquire() as conn:  # the service's own JSON codec
        back = await conn.fetchval("SELECT '{\"a\": 1e300, \"b\": 123456789012345678901234567890}'::jsonb")
    # The codec (orjson) reads an integer beyond 64 bits as the float it stands for: reads never fail.
    assert back == {"a": 1e300, "b": 1.2345678901234568e29}
    # And what orjson refuses to render is widened by render.dumps, not a crash.
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps({"a": 10**300})
    assert json.loads(render.dumps({"a": 10**300})) == {"a": 1e300}
