"""HTTP edges answered the same way whichever layer answers them: 413s, 500s, a bad token before a bad body,
and a JSON field over its size bound."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ainarres_api.server import logs
from ainarres_api.server.api import deps
from ainarres_api.server.errors import PayloadTooLarge
from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world

PROBLEM = "application/problem+json"
MAX_BODY = 131_072  # over the 64 KiB field bounds, so that those are reached before the body's


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                    pool_max_size=10, max_body_bytes=MAX_BODY)


@pytest.fixture
async def loose(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client that gets a 500 back as a response instead of the app's exception."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test") as c:
        yield c


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The service's log lines (ainarres, ainarres.access) as the JSON formatter writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    lg = logging.getLogger("ainarres")
    level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    try:
        yield out
    finally:
        lg.removeHandler(handler)
        lg.setLevel(level)


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path} → {r.status_code} {r.text[:300]}"
    assert r.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status, body
    return body


async def _count(db: asyncpg.Connection, *tables: str) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


# --- 1. every 413 is the same problem -----------------------------------------------------------------


async def test_every_oversized_body_gets_the_same_413(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    big = b'{"lane":"dev","title":"x","payload":{"blob":"' + b"a" * (MAX_BODY + 10) + b'"}}'

    async def streamed() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 16_384):
            yield big[i : i + 16_384]

    seen = {}
    for who, path in ((dev, "/v1/tasks"), (dev, f"/v1/tasks/{tid}/progress"),  # the dispatcher
                      (admin, "/v1/projects"), (admin, "/v1/families/cheap/denials")):  # FastAPI
        h = {"Authorization": f"Bearer {who.token}", "Content-Type": "application/json"}
        declared = await who.client.post(path, content=big, headers=h)
        chunked = await who.client.post(path, content=streamed(), headers=h)
        assert "content-length" not in chunked.request.headers
        for how, r in (("declared", declared), ("streamed", chunked)):
            body = _problem(r, 413, "payload_too_large")
            assert body.pop("instance") == path
            seen[how, path] = body
    first = next(iter(seen.values()))
    assert first["title"] == PayloadTooLarge.title
    assert f"limited to {MAX_BODY} bytes" in first["detail"]
    assert all(body == first for body in seen.values()), seen


# --- 2. a 500 carries the request's id ------------------------------------------------------------------


async def test_a_crash_answers_with_the_request_id_its_log_line_carries(
        app: Any, admin: Api, loose: httpx.AsyncClient, log_lines: io.StringIO) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")

    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("the state is broken")

    async def broken() -> Any:
        raise RuntimeError("the caller is broken")

    h = {"Authorization": f"Bearer {dev.token}"}
    crashes = []
    app.dependency_overrides[deps.agent_call] = broken  # a read's dependency crashes
    try:
        crashes.append(await loose.get("/v1/me", headers={**h, "X-Request-ID": "edge-crash-1"}))
        crashes.append(await loose.get("/v1/me", headers=h))
    finally:
        app.dependency_overrides.clear()
    real = app.state.ainarres
    app.state.ainarres = Broken()  # a verb's claim crashes
    try:
        crashes.append(await loose.post("/v1/claims", json={}, headers={**h, "X-Request-ID": "edge-crash-2"}))
    finally:
        app.state.ainarres = real

    lines = [json.loads(x) for x in log_lines.getvalue().splitlines()]
    assert crashes[0].headers.get("x-request-id") == "edge-crash-1"
    assert crashes[2].headers.get("x-request-id") == "edge-crash-2"
    for r in crashes:
        body = _problem(r, 500, "internal")
        assert r.headers.get("connection") == "close"  # the server closes it after a crash: said, not left to find
        rid = r.headers.get("x-request-id")
        assert rid, r.headers
        assert [x["request_id"] for x in lines if x["request_id"] == rid]
        logged = [x for x in lines if x["msg"].startswith("unhandled error") and x.get("request_id") == rid]
        assert len(logged) == 1, lines
        ref = logged[0]["msg"].split("ref=")[1].split()[0]
        assert f"ref {ref}" in body["detail"]
        access = [x for x in lines if x["logger"] == "ainarres.access" and x.get("request_id") == rid]
        assert [x["status"] for x in access] == [500]


# --- 3. a bad token is refused before a bad body --------------------------------------------------------


async def test_a_bad_token_is_refused_before_a_bad_body(admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    revoked = await admin.post("/v1/tokens", {"family": "admin"}, 201)
    await admin.delete(f"/v1/tokens/{revoked['jti']}")
    head, payload, signature = str(admin.token).split(".")
    forged = f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    bad_tokens = {"missing": None, "not bearer": "Basic YWRtaW46YWRtaW4=", "malformed": "Bearer not-a-token",
                  "forged": f"Bearer {forged}", "revoked": f"Bearer {revoked['token']}"}
    endpoints = [  # FastAPI's routes, then the dispatcher's verbs (which already refused the token first)
        ("POST", "/v1/features"), ("POST", "/v1/families"), ("PATCH", "/v1/families/cheap"),
        ("POST", "/v1/families/cheap/denials"), ("POST", "/v1/tokens"), ("POST", "/v1/workflows"),
        ("POST", "/v1/projects"), ("POST", "/v1/lanes"),
        ("POST", f"/v1/tasks/{tid.replace('-', '')}/heartbeat"),
        ("POST", "/v1/tasks"), ("POST", "/v1/claims"), ("POST", f"/v1/tasks/{tid}/heartbeat"),
        ("POST", f"/v1/tasks/{tid}/advance"),
    ]
    bodies = {"truncated JSON": b'{"name": ', "too deep to parse": b"[" * 1500 + b"]" * 1500}
    before = await _count(db, "features", "families", "denials", "tokens", "workflows", "projects", "lanes",
                          "tasks", "events")
    for method, path in endpoints:
        for what, content in bodies.items():
            for label, value in bad_tokens.items():
                h = {"Content-Type": "application/json", **({"Authorization": value} if value else {})}
                r = await admin.client.request(method, path, content=content, headers=h)
                where = f"{method} {path}, {what}, token {label}"
                assert r.status_code == 401, f"{where} → {r.status_code} {r.text[:200]}"
                _problem(r, 401, "unauthenticated")
                assert r.headers["www-authenticate"] == 'Bearer realm="ainarres"', where
            r = await admin.client.request(method, path, content=content, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {admin.token}"})
            assert _problem(r, 422, "invalid")["detail"].startswith("body:"), f"{method} {path}, {what}"
    assert await _count(db, *before) == before


async def test_a_bad_body_on_a_public_endpoint_is_still_judged_without_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", params={"x": "y"})  # a probe ignores a query string (a cache-buster)
    assert r.status_code == 200
    r = await client.get("/v1/features", params={"x": "y"})  # an operation judges it, the token first
    _problem(r, 401, "unauthenticated")
    r = await client.get("/v1/tasks/not-a-uuid")  # a caller's endpoint: the token first, even on the path
    _problem(r, 401, "unauthenticated")


# --- 4. a JSON field over its size bound ----------------------------------------------------------------


async def test_a_json_field_over_its_bound_is_too_large(admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    blob = {"blob": "x" * 70_000}
    before = await _count(db, "projects", "lanes", "tasks", "features")
    refusals = [
        await dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x", "payload": blob}),
        await admin.call("POST", "/v1/projects", {"slug": "big", "context": blob}),
        await admin.call("POST", "/v1/lanes", {"project": "acme", "key": "big", "workflow": "dev", "context": blob}),
    ]
    for r, field in zip(refusals, ("payload", "context", "context"), strict=True):
        body = _problem(r, 413, "payload_too_large")
        assert body["title"] == PayloadTooLarge.title
        assert field in body["detail"] and "65536" in body["detail"], body
    assert await _count(db, *before) == before
    # A bad token is refused first, and just under the bound is accepted.
    anon = Api(admin.client, "not-a-token")
    _problem(await anon.call("POST", "/v1/projects", {"slug": "big", "context": blob}), 401, "unauthenticated")
    under = {"blob": "x" * 60_000}
    await admin.post("/v1/projects", {"slug": "big", "context": under}, 201)
    lane = await admin.post("/v1/lanes", {"project": "big", "key": f"l{uuid.uuid4().hex[:6]}", "workflow": "dev",
                                          "context": under}, 201)
    assert lane["context"] == under
