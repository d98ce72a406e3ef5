"""The fast verb dispatcher (api/fastverbs.py) answers exactly as FastAPI's routes do.

One battery of requests runs against the app with the dispatcher and against the app without it, each
on its own database cloned from the same template; every answer must match in status, headers and body
once ids, times and tokens are masked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from ainarres_api.ops import embedded
from ainarres_api.server.api import deps
from ainarres_api.server.app import create_app
from ainarres_api.server.errors import NotFound
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world

MAX_BODY = 4096

_MASKS = [
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "<jwt>"),
    (re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"), "<uuid>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?"), "<time>"),
    (re.compile(r"\b(cheap|capable|reviewers|admin)\.[0-9a-f]{12}\b"), r"\1.<sub>"),
    (re.compile(r"ref [0-9a-f]{12}"), "ref <ref>"),
]


def _mask(text: str) -> str:
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return text


def _seen(label: str, r: httpx.Response) -> dict[str, Any]:
    """What a client can see of a response, with ids, times and tokens masked."""
    names = [k.lower() for k, _ in r.headers.multi_items()]
    assert r.headers.get("content-length") == str(len(r.content)), label
    assert "x-request-id" in names, label
    return {
        "label": label,
        "status": r.status_code,
        "headers": [(k, _mask(v)) for k, v in r.headers.multi_items()
                    if k.lower() not in ("content-length", "x-request-id")],
        "header_names": names,
        "body": _mask(r.text),
    }


@contextlib.asynccontextmanager
async def _service(pg_server: Any, template_db: str, tmp: Path, *, fast: bool, raise_app_exceptions: bool = True
                   ) -> AsyncIterator[tuple[FastAPI, Api]]:
    """An app on a fresh database and an admin handle on it."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(embedded.admin_uri(pg_server))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await conn.close()
    settings = Settings(database_url=None, data_dir=tmp, jwt_secret=TEST_SECRET, pool_min_size=1,
                        pool_max_size=10, max_body_bytes=MAX_BODY)
    application = create_app(settings, dsn=embedded.database_uri(pg_server, name), fast_verbs=fast)
    try:
        async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
            transport = httpx.ASGITransport(app=application, raise_app_exceptions=raise_app_exceptions)
            async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test") as client:
                st = application.state.ainarres
                async with st.pool.acquire() as c:
                    tok = await auth.mint(c, st.signer, family="admin", ttl_seconds=3600)
                yield application, Api(client, tok["token"])
    finally:
        conn = await asyncpg.connect(embedded.admin_uri(pg_server))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def _battery(admin: Api) -> list[dict[str, Any]]:
    """Valid and invalid calls of every verb; returns what the client saw of each."""
    out: list[dict[str, Any]] = []
    client = admin.client
    w = await make_world(admin)
    dev, rev, other = await w.agent("cheap"), await w.agent("reviewers"), await w.agent("cheap")

    async def call(label: str, path: str, *, api: Api | None = dev, json: Any = None, content: Any = None,
                   headers: dict[str, str] | None = None, method: str = "POST") -> httpx.Response:
        h = {"Authorization": f"Bearer {api.token}"} if api is not None else {}
        h.update(headers or {})
        r = await client.request(method, path, json=json, content=content, headers=h)
        out.append(_seen(label, r))
        return r

    created = (await call("create", "/v1/tasks", json={"lane": "dev", "title": "one", "payload": {"n": 1.5},
                                                        "idempotency_key": "k1"})).json()
    tid = created["task"]["id"]
    await call("create again (existing)", "/v1/tasks", json={"lane": "dev", "title": "one", "payload": {"n": 1.5},
                                                             "idempotency_key": "k1"})
    await call("create reused key", "/v1/tasks", json={"lane": "dev", "title": "two", "idempotency_key": "k1"})
    await call("create unknown lane", "/v1/tasks", json={"lane": "nope", "title": "x"})
    await call("create extra field", "/v1/tasks", json={"lane": "dev", "title": "x", "colour": "red"})
    await call("create wrong types", "/v1/tasks", json={"lane": 5, "title": ["x"], "priority": "high"})
    await call("create NUL", "/v1/tasks", json={"lane": "dev", "title": "a\u0000b"})
    await call("create lone surrogate", "/v1/tasks", content=b'{"lane":"dev","title":"\\ud800"}',
               headers={"Content-Type": "application/json"})
    await call("create BOM", "/v1/tasks", content=b'\xef\xbb\xbf{"lane":"dev","title":"bom"}',
               headers={"Content-Type": "application/json"})
    await call("create bad utf-8", "/v1/tasks", content=b'{"lane":"dev","title":"\xc3"}',
               headers={"Content-Type": "application/json"})
    await call("create deep", "/v1/tasks", content=b'{"lane":"dev","title":"x","payload":{"a":' + b"[" * 1500
               + b"]" * 1500 + b"}}", headers={"Content-Type": "application/json"})
    await call("create dependency", "/v1/tasks", json={"lane": "dev", "title": "later", "depends_on": [tid]})
    await call("create no token", "/v1/tasks", api=None, json={"lane": "dev", "title": "x"})
    await call("create no token, bad body", "/v1/tasks", api=None, json={"title": 5})

    await call("claim empty lane", "/v1/claims", api=rev, json={"lane": "dev"})
    claim = (await call("claim", "/v1/claims", json={"lane": "dev"})).json()
    lease = claim["lease"]["id"]
    held = f"/v1/tasks/{tid}"
    await call("claim while holding", "/v1/claims", json={})
    await call("claim wait wrong type", "/v1/claims", json={"wait_seconds": "soon"})
    await call("claim wait too long", "/v1/claims", json={"wait_seconds": 61})
    await call("claim long poll times out", "/v1/claims", api=rev, json={"lane": "dev", "wait_seconds": 0.05})
    await call("claim query string", "/v1/claims?x=1", api=rev, json={})
    await call("claim trailing slash", "/v1/claims/", api=rev, json={})
    await call("claim GET", "/v1/claims", method="GET")

    for label, api in (("missing token", None),):
        await call(f"heartbeat {label}", f"{held}/heartbeat", api=api, json={"lease": lease})
    for label, value in (("basic", "Basic abc"), ("bare bearer", "Bearer"), ("bearer spaces", "Bearer   "),
                         ("garbage", "Bearer not-a-token"), ("lowercase", f"bearer {dev.token}"),
                         ("double space", f"Bearer  {dev.token}")):
        await call(f"heartbeat token {label}", f"{held}/heartbeat", api=None, json={"lease": lease},
                   headers={"Authorization": value})
    await call("heartbeat", f"{held}/heartbeat", json={"lease": lease}, headers={"X-Request-ID": "req-1"})
    await call("heartbeat wrong lease", f"{held}/heartbeat", json={"lease": str(uuid.uuid4())})
    await call("heartbeat bad lease", f"{held}/heartbeat", json={"lease": "nope"})
    await call("heartbeat other agent", f"{held}/heartbeat", api=other, json={"lease": lease})
    await call("heartbeat bad JSON", f"{held}/heartbeat", content=b'{"lease": ', headers={"Content-Type":
                                                                                          "application/json"})
    await call("heartbeat empty body", f"{held}/heartbeat", content=b"",
               headers={"Content-Type": "application/json"})
    await call("heartbeat no content type", f"{held}/heartbeat", content=f'{{"lease":"{lease}"}}'.encode())
    await call("heartbeat text/plain", f"{held}/heartbeat", content=f'{{"lease":"{lease}"}}'.encode(),
               headers={"Content-Type": "text/plain"})
    await call("heartbeat +json", f"{held}/heartbeat", content=f'{{"lease":"{lease}"}}'.encode(),
               headers={"Content-Type": "application/vnd.x+json; charset=utf-8"})
    await call("heartbeat array body", f"{held}/heartbeat", json=[lease])
    await call("heartbeat null body", f"{held}/heartbeat", content=b"null",
               headers={"Content-Type": "application/json"})
    await call("heartbeat uppercase id", f"/v1/tasks/{tid.upper()}/heartbeat", json={"lease": lease})
    await call("heartbeat hyphenless id", f"/v1/tasks/{tid.replace('-', '')}/heartbeat", json={"lease": lease})
    await call("heartbeat bad id", "/v1/tasks/not-a-uuid/heartbeat", json={"lease": lease})
    await call("heartbeat unknown task", f"/v1/tasks/{uuid.uuid4()}/heartbeat", json={"lease": lease})
    await call("unknown verb", f"{held}/dance", json={"lease": lease})
    await call("advance GET", f"{held}/advance", method="GET")
    await call("oversized declared", f"{held}/progress", content=b'{"lease":"' + b"x" * MAX_BODY + b'"}',
               headers={"Content-Type": "application/json"})

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"lease":"'
        yield b"x" * MAX_BODY
        yield b'"}'

    await call("oversized streamed", f"{held}/progress", content=chunks(), headers={"Content-Type": "application/json"})
    await call("progress", f"{held}/progress", json={"lease": lease, "note": "half", "artifacts": [
        {"type": "pr", "uri": "https://example.test/pr/1"}]})
    await call("progress empty note", f"{held}/progress", json={"lease": lease, "note": ""})
    await call("progress bad artifact", f"{held}/progress", json={"lease": lease, "note": "x",
                                                                  "artifacts": [{"type": "pr"}]})
    await call("progress NUL", f"{held}/progress", json={"lease": lease, "note": "a\u0000"})
    await call("advance illegal", f"{held}/advance", json={"lease": lease, "to": "done"})
    await call("advance missing to", f"{held}/advance", json={"lease": lease})
    await call("advance", f"{held}/advance", json={"lease": lease, "to": "review", "note": "built"})
    await call("advance stale lease", f"{held}/advance", json={"lease": lease, "to": "review"})

    rclaim = (await call("reviewer claim", "/v1/claims", api=rev, json={"lane": "dev"})).json()
    rlease = rclaim["lease"]["id"]
    await call("reject no reason", f"{held}/reject", api=rev, json={"lease": rlease, "to": "todo"})
    await call("reject", f"{held}/reject", api=rev, json={"lease": rlease, "to": "todo", "reason": "tests"})
    dlease = (await call("claim rework", "/v1/claims", json={"lane": "dev"})).json()["lease"]["id"]
    await call("block empty reason", f"{held}/block", json={"lease": dlease, "reason": ""})
    await call("block", f"{held}/block", json={"lease": dlease, "reason": "needs a human"})
    await call("unblock by the holder", f"{held}/unblock", json={"note": "go"})
    await call("unblock extra field", f"{held}/unblock", api=admin, json={"note": "go", "x": 1})
    await call("unblock not blocked", f"{held}/unblock", api=admin, json={"note": "go"})
    elease = (await call("claim again", "/v1/claims", json={"lane": "dev"})).json()["lease"]["id"]
    await call("release bad reason type", f"{held}/release", json={"lease": elease, "reason": 5})
    await call("release", f"{held}/release", json={"lease": elease, "reason": "stuck"})
    await call("release again", f"{held}/release", json={"lease": elease})
    await call("read back", held, method="GET")
    await call("events", f"{held}/events", method="GET")
    return out


async def test_the_dispatcher_answers_every_verb_as_fastapi_does(pg_server, template_db, tmp_path):
    seen = {}
    for fast in (False, True):
        async with _service(pg_server, template_db, tmp_path, fast=fast) as (_, admin):
            seen[fast] = await _battery(admin)
    assert [s["label"] for s in seen[True]] == [s["label"] for s in seen[False]]
    for old, new in zip(seen[False], seen[True], strict=True):
        assert new == old
    statuses = {s["status"] for s in seen[True]}
    assert {200, 201, 401, 403, 404, 405, 409, 413, 422} <= statuses


async def test_a_bad_token_is_refused_before_the_body_is_parsed(pg_server, template_db, tmp_path):
    # FastAPI parses the JSON before it solves the caller; its validation handler then checks the token first.
    answers = {}
    for fast in (False, True):
        async with _service(pg_server, template_db, tmp_path, fast=fast) as (_, admin):
            r = await admin.client.post("/v1/claims", content=b"{", headers={"Content-Type": "application/json"})
            answers[fast] = (r.status_code, r.json()["code"], r.headers.get("www-authenticate"))
    assert answers[False] == answers[True] == (401, "unauthenticated", 'Bearer realm="ainarres"')


async def test_the_verbs_do_not_reach_fastapi(pg_server, template_db, tmp_path):
    async with _service(pg_server, template_db, tmp_path, fast=True) as (application, admin):
        w = await make_world(admin)
        dev = await w.agent("cheap")

        async def not_here() -> deps.AppState:
            raise NotFound("served by FastAPI")

        # Every FastAPI route that touches the database depends on state_of; the dispatcher does not.
        application.dependency_overrides[deps.state_of] = not_here
        tid = (await dev.create("dev", "x"))["task"]["id"]
        c = await dev.claim("dev")
        await dev.verb(tid, "heartbeat", lease=c["lease"]["id"])
        await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
        r = await dev.call("GET", f"/v1/tasks/{tid}")
        assert (r.status_code, r.json()["detail"]) == (404, "served by FastAPI")
        r = await dev.call("POST", f"/v1/tasks/{tid.replace('-', '')}/heartbeat", {"lease": c["lease"]["id"]})
        assert (r.status_code, r.json()["detail"]) == (404, "served by FastAPI")  # not canonical: FastAPI's


async def test_a_crash_in_a_verb_is_the_same_logged_500(pg_server, template_db, tmp_path, caplog):
    seen = {}
    for fast in (False, True):
        async with _service(pg_server, template_db, tmp_path, fast=fast, raise_app_exceptions=False) as (app, admin):
            w = await make_world(admin)
            dev = await w.agent("cheap")
            app.state.ainarres = dataclasses.replace(app.state.ainarres, limits=None)  # the claim will fail
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="ainarres"):
                r = await dev.call("POST", "/v1/claims", {"lane": "dev"})
            crashes = [rec for rec in caplog.records if rec.name == "ainarres" and rec.exc_info]
            assert len(crashes) == 1 and "unhandled error ref=" in crashes[0].getMessage()
            seen[fast] = (r.status_code, [(k, _mask(v)) for k, v in r.headers.multi_items()], _mask(r.text))
    assert seen[True] == seen[False]
    assert seen[True][0] == 500 and '"code":"internal"' in seen[True][2]
