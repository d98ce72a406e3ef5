"""Malformed requests: never a 500; problem+json with a stable code naming the field; nothing changes."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ainarres_api.server import errors
from tests.helpers import Api, make_world

PROBLEM = "application/problem+json"
MIB = 1_048_576
# Every code a refusal may carry (SPEC §6), plus the router's own 405.
CODES = {
    c.code
    for c in vars(errors).values()
    if isinstance(c, type) and issubclass(c, errors.AinarresError) and c.status < 500
}
CODES.add("method_not_allowed")
COUNTED = (
    "tasks",
    "events",
    "features",
    "families",
    "family_features",
    "denials",
    "tokens",
    "projects",
    "workflows",
    "stages",
    "transitions",
    "lanes",
)
# A digest of every row of the tables whose rows a verb rewrites, so an in-place change shows too.
DIGESTED = ("tasks", "families")


@dataclass
class Scene:
    """A world with one task held by `dev`; every caller's client answers 500s instead of raising."""

    admin: Api
    dev: Api
    anon: Api
    task: str
    lease: str
    db: asyncpg.Connection


@pytest.fixture
async def scene(app: Any, admin: Api, db: asyncpg.Connection) -> AsyncIterator[Scene]:
    # A 500 must come back as a response, so that the assertion can say which request caused it.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test") as loose:
        boss = Api(loose, admin.token)
        world = await make_world(boss)
        dev = await world.agent("cheap")
        task = (await dev.create("dev", "hold me"))["task"]["id"]
        claim = await dev.claim("dev")
        assert claim["code"] == "claimed"
        yield Scene(boss, dev, Api(loose, None), task, claim["lease"]["id"], db)


async def _state(db: asyncpg.Connection) -> dict[str, Any]:
    out: dict[str, Any] = {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in COUNTED}
    for t in DIGESTED:
        out[f"{t} digest"] = await db.fetchval(
            f"SELECT md5(string_agg(x::text, ',' ORDER BY x::text)) FROM {t} x"
        )
    return out


@contextlib.asynccontextmanager
async def unchanged(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Asserts that the block's requests left every row as it was (a refused call changes nothing)."""
    before = await _state(db)
    yield
    after = await _state(db)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def _where(r: httpx.Response) -> str:
    url = r.request.url
    return f"{r.request.method} {url.path}?{url.query.decode()} → {r.status_code} {r.text[:400]}"


def refused(r: httpx.Response, status: int, code: str, *named: str) -> dict[str, Any]:
    """Asserts a problem+json refusal with this status and code whose detail names each of `named`."""
    assert r.status_code == status, _where(r)
    assert r.headers["content-type"].split(";")[0] == PROBLEM, _where(r)
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status, _where(r)
    for name in named:
        assert name in body["detail"], f"{name!r} is not named in the detail: {_where(r)}"
    return body


def sane(r: httpx.Response) -> None:
    """Not a 500; and an error is problem+json with a known code."""
    assert r.status_code < 500, _where(r)
    if r.status_code >= 400:
        assert r.headers["content-type"].split(";")[0] == PROBLEM, _where(r)
        assert r.json()["code"] in CODES, _where(r)


def _h(api: Api, content_type: str | None = "application/json") -> dict[str, str]:
    headers = api._headers()
    if content_type:
        headers["content-type"] = content_type
    return headers


async def test_bodies_that_are_not_json_objects(scene: Scene) -> None:
    s = scene
    cases: list[tuple[bytes, str | None]] = [
        (b'{"lane": "dev", "title": ', "application/json"),  # truncated
        (b'"lane=dev"', "application/json"),  # a JSON string, not an object
        (b'[{"lane": "dev", "title": "x"}]', "application/json"),  # a JSON array
        (b"42", "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),  # empty
        (b"", None),
        (b'{"lane": "dev", "title": "x"}', "text/plain"),  # JSON, but not said to be
        (b"lane=dev&title=x", "application/x-www-form-urlencoded"),
        (b"\xff\xfe\xfd\x00", "application/json"),  # not UTF-8 text
        (b'{"lane": "dev", "title": "x"} and more', "application/json"),
        (b'{"lane": "dev", "title": "x", "title": ', "application/json"),
        (b"[" * 200_000, "application/json"),  # nested beyond the parser's depth
        (
            b'{"lane": "dev", "title": "x", "payload": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001,
            "application/json",
        ),
    ]
    targets = [("/v1/tasks", s.dev), (f"/v1/tasks/{s.task}/progress", s.dev), ("/v1/projects", s.admin)]
    async with unchanged(s.db):
        for path, who in targets:
            for content, ctype in cases:
                r = await who.client.post(path, content=content, headers=_h(who, ctype))
                refused(r, 422, "invalid", "body")


async def test_wrong_types_name_the_field(scene: Scene) -> None:
    s = scene
    t = f"/v1/tasks/{s.task}"
    lane = {"lane": "dev", "title": "x"}
    cases: list[tuple[Api, str, str, dict[str, Any] | list[Any], str]] = [
        (s.dev, "POST", "/v1/tasks", {**lane, "priority": "high"}, "priority"),
        (s.dev, "POST", "/v1/tasks", {**lane, "priority": 1.5}, "priority"),
        (s.dev, "POST", "/v1/tasks", {**lane, "priority": True}, "priority"),
        (s.dev, "POST", "/v1/tasks", {**lane, "priority": 10**30}, "priority"),
        (s.dev, "POST", "/v1/tasks", {**lane, "priority": None}, "priority"),
        (s.dev, "POST", "/v1/tasks", {"lane": "dev", "title": 5}, "title"),
        (s.dev, "POST", "/v1/tasks", {"lane": ["dev"], "title": "x"}, "lane"),
        (s.dev, "POST", "/v1/tasks", {**lane, "payload": [1, 2, 3]}, "payload"),
        (s.dev, "POST", "/v1/tasks", {**lane, "payload": "{}"}, "payload"),
        (s.dev, "POST", "/v1/tasks", {**lane, "required_features": "role:dev"}, "required_features"),
        (s.dev, "POST", "/v1/tasks", {**lane, "required_features": [{"role": "dev"}]}, "required_features.0"),
        (s.dev, "POST", "/v1/tasks", {**lane, "idempotency_key": 7}, "idempotency_key"),
        (s.dev, "POST", "/v1/tasks", {"title": "x"}, "lane"),  # missing
        (s.dev, "POST", f"{t}/heartbeat", {"lease": True}, "lease"),
        (s.dev, "POST", f"{t}/heartbeat", {"lease": 12}, "lease"),
        (s.dev, "POST", f"{t}/heartbeat", {}, "lease"),
        (s.dev, "POST", f"{t}/progress", {"lease": s.lease, "note": ["halfway"]}, "note"),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "x", "artifacts": {"type": "pr"}},
            "artifacts",
        ),
        (s.dev, "POST", f"{t}/advance", {"lease": s.lease, "to": 3}, "to"),
        (s.dev, "POST", f"{t}/reject", {"lease": s.lease, "to": "todo"}, "reason"),
        (s.dev, "POST", f"{t}/block", {"lease": s.lease, "reason": False}, "reason"),
        (s.dev, "POST", "/v1/claims", {"wait_seconds": "soon"}, "wait_seconds"),
        (s.dev, "POST", "/v1/claims", {"wait_seconds": -1}, "wait_seconds"),
        (s.dev, "POST", "/v1/claims", {"wait_seconds": 3600}, "wait_seconds"),
        (s.dev, "POST", "/v1/claims", {"lane": 7}, "lane"),
        (s.admin, "POST", "/v1/features", {"name": 12}, "name"),
        (s.admin, "POST", "/v1/families", {"key": "f", "max_active": "2"}, "max_active"),
        (s.admin, "POST", "/v1/families", {"key": "f", "features": "role:dev"}, "features"),
        (s.admin, "PATCH", "/v1/families/cheap", {"disabled": "yes"}, "disabled"),
        (s.admin, "PATCH", "/v1/families/cheap", {"max_active": 0}, "max_active"),
        (s.admin, "POST", "/v1/tokens", {"family": "cheap", "ttl_seconds": "3600"}, "ttl_seconds"),
        (s.admin, "POST", "/v1/tokens", {"family": "cheap", "scope": "lane:dev"}, "scope"),
        (
            s.admin,
            "POST",
            "/v1/families/cheap/denials",
            {"feature": "role:dev", "reason": "r", "expires_at": "next tuesday"},
            "expires_at",
        ),
        (s.admin, "POST", "/v1/workflows", {"key": "w", "stages": "todo"}, "stages"),
        (
            s.admin,
            "POST",
            "/v1/workflows",
            {"key": "w", "stages": [{"key": "a", "initial": "yes"}]},
            "stages.0.initial",
        ),
        (
            s.admin,
            "POST",
            "/v1/workflows",
            {
                "key": "w",
                "stages": [{"key": "a", "initial": True}],
                "transitions": [{"from": "a", "to": "b", "kind": "sideways"}],
            },
            "transitions.0.kind",
        ),
        (s.admin, "POST", "/v1/projects", {"slug": "p", "context": ["repo"]}, "context"),
        (s.admin, "POST", "/v1/lanes", {"project": "acme", "key": "l2", "workflow": 1}, "workflow"),
    ]
    async with unchanged(s.db):
        for who, method, path, body, field in cases:
            r = await who.call(method, path, body)
            refused(r, 422, "invalid", field)


async def test_unknown_fields_are_refused_by_name(scene: Scene) -> None:
    s = scene
    t = f"/v1/tasks/{s.task}"
    cases: list[tuple[Api, str, str, dict[str, Any], str]] = [
        (s.dev, "POST", "/v1/tasks", {"lane": "dev", "title": "x", "colour": "red"}, "colour"),
        (s.dev, "POST", "/v1/tasks", {"lane": "dev", "title": "x", "requires": ["role:dev"]}, "requires"),
        (s.dev, "POST", f"{t}/heartbeat", {"lease": s.lease, "extend_by": 600}, "extend_by"),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [{"type": "pr", "url": "https://x"}]},
            "artifacts.0.url",
        ),
        (s.dev, "POST", f"{t}/release", {"lease": s.lease, "force": True}, "force"),
        (s.dev, "POST", f"{t}/unblock", {"why": "x"}, "why"),
        (s.dev, "POST", "/v1/claims", {"lanes": ["dev"]}, "lanes"),
        (s.admin, "POST", "/v1/families", {"key": "f", "feature": ["role:dev"]}, "feature"),
        (s.admin, "PATCH", "/v1/families/cheap", {"enabled": False}, "enabled"),
        (s.admin, "POST", "/v1/tokens", {"family": "cheap", "exp": 1}, "exp"),
        (
            s.admin,
            "POST",
            "/v1/workflows",
            {"key": "w", "stages": [{"key": "a", "initial": True, "timeout": 1}]},
            "stages.0.timeout",
        ),
        (s.admin, "POST", "/v1/projects", {"slug": "p", "repo": "x"}, "repo"),
    ]
    async with unchanged(s.db):
        for who, method, path, body, field in cases:
            r = await who.call(method, path, body)
            refused(r, 422, "invalid", field)


async def test_bodies_over_the_byte_limit(scene: Scene) -> None:
    s = scene
    big = b'{"lane": "dev", "title": "x", "payload": {"blob": "' + b"a" * (MIB + 10) + b'"}}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 65_536):
            yield big[i : i + 65_536]

    async with unchanged(s.db):
        honest = await s.dev.client.post("/v1/tasks", content=big, headers=_h(s.dev))
        refused(honest, 413, "payload_too_large", str(MIB))
        # Content-Length says 64 bytes; the middleware counts what actually arrives.
        lying = await s.dev.client.post(
            "/v1/tasks", content=big, headers={**_h(s.dev), "content-length": "64"}
        )
        assert lying.request.headers["content-length"] == "64"
        refused(lying, 413, "payload_too_large", str(MIB))
        chunked = await s.dev.client.post("/v1/tasks", content=chunks(), headers=_h(s.dev))
        assert "content-length" not in chunked.request.headers
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        refused(chunked, 413, "payload_too_large", str(MIB))
        admin_big = await s.admin.client.post("/v1/projects", content=big, headers=_h(s.admin))
        refused(admin_big, 413, "payload_too_large")
        nonsense = await s.dev.client.post(
            "/v1/tasks", content=b"{}", headers={**_h(s.dev), "content-length": "lots"}
        )
        sane(nonsense)
        assert nonsense.status_code >= 400


async def test_a_payload_over_its_own_limit(scene: Scene) -> None:
    s = scene
    blob = "a" * 70_000  # the body is well under 1 MiB; the payload is over its 64 KiB bound
    async with unchanged(s.db):
        r = await s.dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x", "payload": {"blob": blob}})
        refused(r, 413, "payload_too_large", "payload", "65536")
        r = await s.admin.call("POST", "/v1/projects", {"slug": "big", "context": {"blob": blob}})
        refused(r, 413, "payload_too_large", "context", "65536")
    # The bound is the payload's, not the body's: just under it is accepted.
    ok = await s.dev.call(
        "POST", "/v1/tasks", {"lane": "dev", "title": "x", "payload": {"blob": "a" * 60_000}}
    )
    assert ok.status_code == 201, _where(ok)


async def test_bad_uuids_in_paths_and_fields(scene: Scene) -> None:
    s = scene
    t = f"/v1/tasks/{s.task}"
    nobody = str(uuid.uuid4())
    async with unchanged(s.db):
        for path in (
            "/v1/tasks/not-a-uuid",
            "/v1/tasks/12345",
            f"/v1/tasks/{s.task}x",
            "/v1/tasks/not-a-uuid/events",
        ):
            refused(await s.dev.call("GET", path), 422, "invalid", "task_id")
        for verb in ("heartbeat", "progress", "advance", "reject", "release", "block", "unblock"):
            r = await s.dev.call("POST", f"/v1/tasks/{s.task[:-1]}Z/{verb}", {"lease": s.lease})
            refused(r, 422, "invalid", "task_id")
        refused(await s.admin.call("GET", "/v1/tokens/not-a-jti"), 422, "invalid", "jti")
        refused(await s.admin.call("DELETE", "/v1/tokens/not-a-jti"), 422, "invalid", "jti")
        refused(await s.dev.call("POST", f"{t}/heartbeat", {"lease": "not-a-lease"}), 422, "invalid", "lease")
        refused(await s.dev.call("POST", f"{t}/heartbeat", {"lease": s.lease + "0"}), 422, "invalid", "lease")
        refused(
            await s.dev.call("POST", f"{t}/progress", {"lease": "", "note": "x"}), 422, "invalid", "lease"
        )
        r = await s.dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x", "depends_on": ["nope"]})
        refused(r, 422, "invalid", "depends_on.0")
        r = await s.dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x", "depends_on": [s.task, 7]})
        refused(r, 422, "invalid", "depends_on.1")
        r = await s.dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x", "depends_on": [nobody]})
        refused(r, 404, "not_found", "depends_on", nobody)  # a thing that does not exist (ADR 0025)
        r = await s.dev.call(
            "POST",
            "/v1/tasks",
            {"lane": "dev", "title": "x", "depends_on": [str(uuid.uuid4()) for _ in range(101)]},
        )
        refused(r, 422, "invalid", "depends_on")
        # Well-formed but wrong: a task nobody has, a lease that is not this task's.
        refused(await s.dev.call("GET", f"/v1/tasks/{nobody}"), 404, "not_found")
        refused(await s.dev.call("POST", f"{t}/heartbeat", {"lease": nobody}), 409, "lease_lost")
        refused(await s.admin.call("DELETE", f"/v1/tokens/{nobody}"), 404, "not_found")


async def test_oversized_strings_and_lists(scene: Scene) -> None:
    s = scene
    t = f"/v1/tasks/{s.task}"
    lane = {"lane": "dev", "title": "x"}
    art = {"type": "file", "path": "a.py"}
    cases: list[tuple[Api, str, str, dict[str, Any], str]] = [
        (s.dev, "POST", "/v1/tasks", {"lane": "dev", "title": "t" * 201}, "title"),
        (s.dev, "POST", "/v1/tasks", {"lane": "dev", "title": ""}, "title"),
        (s.dev, "POST", "/v1/tasks", {"lane": "d" * 97, "title": "x"}, "lane"),
        (s.dev, "POST", "/v1/tasks", {**lane, "idempotency_key": "k" * 201}, "idempotency_key"),
        (
            s.dev,
            "POST",
            "/v1/tasks",
            {**lane, "required_features": [f"area:a{i}" for i in range(65)]},
            "required_features",
        ),
        (s.dev, "POST", f"{t}/progress", {"lease": s.lease, "note": "n" * 8001}, "note"),
        (s.dev, "POST", f"{t}/progress", {"lease": s.lease, "note": ""}, "note"),
        (s.dev, "POST", f"{t}/advance", {"lease": s.lease, "to": "review", "note": "n" * 8001}, "note"),
        (s.dev, "POST", f"{t}/reject", {"lease": s.lease, "to": "todo", "reason": "r" * 8001}, "reason"),
        (s.dev, "POST", f"{t}/release", {"lease": s.lease, "reason": "r" * 8001}, "reason"),
        (s.dev, "POST", f"{t}/block", {"lease": s.lease, "reason": "r" * 8001}, "reason"),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [art] * 51},
            "artifacts",
        ),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [{"type": "pr"}]},
            "artifacts.0",
        ),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [art, {"type": "pr", "hash": "abc"}]},
            "artifacts.1",
        ),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [{"type": "", "path": "p"}]},
            "artifacts.0.type",
        ),
        (
            s.dev,
            "POST",
            f"{t}/progress",
            {"lease": s.lease, "note": "n", "artifacts": [{"type": "pr", "uri": "u" * 2049}]},
            "artifacts.0.uri",
        ),
        (s.admin, "POST", "/v1/features", {"name": "role:" + "x" * 200}, "name"),
        (s.admin, "POST", "/v1/features", {"name": "no-colon"}, "name"),
        (s.admin, "POST", "/v1/families", {"key": "f" * 101}, "key"),
        (s.admin, "POST", "/v1/projects", {"slug": "Not A Slug"}, "slug"),
    ]
    async with unchanged(s.db):
        for who, method, path, body, field in cases:
            r = await who.call(method, path, body)
            refused(r, 422, "invalid", field)
    # The bounds are exact: 200 characters of title and 8000 of note are accepted.
    ok = await s.dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "t" * 200})
    assert ok.status_code == 201, _where(ok)
    ok = await s.dev.call(
        "POST", f"{t}/progress", {"lease": s.lease, "note": "n" * 8000, "artifacts": [art] * 50}
    )
    assert ok.status_code == 200, _where(ok)


async def test_text_postgres_cannot_store(scene: Scene) -> None:
    """NUL and lone surrogates reach no SQL: a named 422 in bodies, a 422 in paths and queries."""
    s = scene
    t = f"/v1/tasks/{s.task}"
    raw: list[tuple[Api, str, bytes, str]] = [
        (s.dev, "/v1/tasks", b'{"lane": "dev", "title": "a\\u0000b"}', "title"),
        (s.dev, "/v1/tasks", b'{"lane": "dev", "title": "\\ud800"}', "title"),
        (s.dev, "/v1/tasks", b'{"lane": "dev", "title": "x", "payload": {"k": "\\u0000"}}', "payload"),
        (s.dev, "/v1/tasks", b'{"lane": "dev", "title": "x", "payload": {"k\\u0000": 1}}', "payload"),
        (s.dev, "/v1/tasks", b'{"lane": "dev", "title": "x", "payload": {"k": ["\\udfff"]}}', "payload"),
        (
            s.dev,
            "/v1/tasks",
            b'{"lane": "dev", "title": "x", "idempotency_key": "\\u0000"}',
            "idempotency_key",
        ),
        (s.dev, f"{t}/progress", f'{{"lease": "{s.lease}", "note": "\\u0000"}}'.encode(), "note"),
        (
            s.dev,
            f"{t}/progress",
            f'{{"lease": "{s.lease}", "note": "n", "artifacts": [{{"type": "f", '
            f'"path": "a\\u0000"}}]}}'.encode(),
            "artifacts.0.path",
        ),
        (s.dev, f"{t}/block", f'{{"lease": "{s.lease}", "reason": "\\u0000"}}'.encode(), "reason"),
        (s.admin, "/v1/features", b'{"name": "role:x", "description": "\\u0000"}', "description"),
        (s.admin, "/v1/projects", b'{"slug": "p", "context": {"repo": "\\u0000"}}', "context"),
        (s.admin, "/v1/tokens", b'{"family": "\\u0000"}', "family"),
        (s.admin, "/v1/families/cheap/denials", b'{"feature": "role:dev", "reason": "\\u0000"}', "reason"),
        (
            s.admin,
            "/v1/workflows",
            b'{"key": "w", "stages": [{"key": "a", "initial": true, "instructions": "\\u0000"}]}',
            "stages.0.instructions",
        ),
    ]
    async with unchanged(s.db):
        for who, path, content, field in raw:
            r = await who.client.post(path, content=content, headers=_h(who))
            refused(r, 422, "invalid", field)
        for who, path in [
            (s.admin, "/v1/features/role:%00"),
            (s.admin, "/v1/families/%00"),
            (s.admin, "/v1/projects/%00"),
            (s.admin, "/v1/lanes/%00"),
            (s.admin, "/v1/workflows/%00"),
            (s.admin, "/v1/features?kind=%00"),
            (s.admin, "/v1/features?after=%00"),
            (s.admin, "/v1/tokens?family=%00"),
            (s.admin, "/v1/lanes?project=%00"),
        ]:
            refused(await who.call("GET", path), 422, "invalid", "NUL")
        refused(await s.admin.call("DELETE", "/v1/families/cheap/denials/role:%00"), 422, "invalid", "NUL")
        refused(await s.admin.call("PATCH", "/v1/families/%00", {"disabled": True}), 422, "invalid", "NUL")


async def test_bad_query_strings(scene: Scene) -> None:
    s = scene
    ev = f"/v1/tasks/{s.task}/events"
    cases: list[tuple[Api, str, str]] = [
        (s.dev, f"{ev}?limit=-1", "limit"),
        (s.dev, f"{ev}?limit=0", "limit"),
        (s.dev, f"{ev}?limit=1001", "limit"),
        (s.dev, f"{ev}?limit={10**30}", "limit"),
        (s.dev, f"{ev}?limit=ten", "limit"),
        (s.dev, f"{ev}?limit=1.5", "limit"),
        (s.dev, f"{ev}?after=-1", "after"),
        (s.dev, f"{ev}?after={2**63}", "after"),
        (s.dev, f"{ev}?after={10**40}", "after"),
        (s.admin, "/v1/features?limit=-5", "limit"),
        (s.admin, f"/v1/features?limit={10**30}", "limit"),
        (s.admin, "/v1/families?limit=0", "limit"),
        (s.admin, "/v1/tokens?limit=501", "limit"),
        (s.admin, "/v1/projects?limit=abc", "limit"),
        (s.admin, "/v1/lanes?limit=", "limit"),
        (s.admin, "/v1/workflows?after=" + "a" * 201, "after"),
        (s.admin, "/v1/workflows/dev?version=0", "version"),
        (s.admin, "/v1/workflows/dev?version=-1", "version"),
        (s.admin, f"/v1/workflows/dev?version={2**31}", "version"),
        (s.admin, f"/v1/workflows/dev?version={10**20}", "version"),
        (s.admin, "/v1/workflows/dev?version=latest", "version"),
    ]
    async with unchanged(s.db):
        for who, path, field in cases:
            refused(await who.call("GET", path), 422, "invalid", field)
    # The largest values in range are answered, not crashed on.
    assert (await s.dev.call("GET", f"{ev}?after={2**63 - 1}&limit=1000")).json()["items"] == []
    refused(await s.admin.call("GET", f"/v1/workflows/dev?version={2**31 - 1}"), 404, "not_found")


async def test_unknown_routes_and_wrong_methods(scene: Scene) -> None:
    s = scene
    async with unchanged(s.db):
        for who in (s.dev, s.anon):
            for method, path in [
                ("GET", "/v1/nope"),
                ("GET", "/v2/tasks"),
                ("POST", f"/v1/tasks/{s.task}/explode"),
                ("GET", "/nope"),
                ("GET", "/v1/tasks/a/b/c/d"),
            ]:
                refused(await who.call(method, path, {}), 404, "not_found")
            for method, path, allowed in [
                ("DELETE", "/v1/tasks", "POST"),
                ("GET", "/v1/claims", "POST"),
                ("PUT", "/v1/claims", "POST"),
                ("PATCH", f"/v1/tasks/{s.task}", "GET"),
                ("GET", f"/v1/tasks/{s.task}/heartbeat", "POST"),
                ("POST", "/v1/me", "GET"),
                ("PUT", "/v1/families/cheap", "GET"),
            ]:
                # Starlette's Allow names the methods of the first route matching the path only.
                r = await who.call(method, path, {})
                refused(r, 405, "method_not_allowed")
                assert allowed in r.headers.get("allow", ""), _where(r)


GARBAGE: list[tuple[bytes, str | None]] = [
    (b"", None),
    (b"{", "application/json"),
    (b"[]", "application/json"),
    (b'"x"', "application/json"),
    (b"null", "application/json"),
    (b'{"no_such_field": 1}', "application/json"),
    (b'{"lane": {"$ne": null}, "lease": [], "to": 0, "key": "\\u0000"}', "application/json"),
    (b"\x00\xff", "application/octet-stream"),
    (b'{"a": 1}', "text/plain"),
]


def _endpoints(app: Any) -> list[tuple[str, str, list[str]]]:
    out = []
    for path, ops in app.openapi()["paths"].items():
        for method in ops:
            out.append((method.upper(), path, re.findall(r"\{(\w+)\}", path)))
    return out


def _streams(app: Any) -> set[str]:
    """Paths that answer with an endless stream (the in-process transport waits for a response's end)."""
    return {path for path, ops in app.openapi()["paths"].items() for op in ops.values()
            if "text/event-stream" in op.get("responses", {}).get("200", {}).get("content", {})}


async def test_every_endpoint_survives_garbage(app: Any, scene: Scene) -> None:
    s = scene
    endpoints = _endpoints(app)
    streams = _streams(app)
    assert len(endpoints) >= 25, endpoints  # the sweep sees the whole API, not a corner of it
    fills = [
        {
            "task_id": s.task,
            "jti": str(uuid.uuid4()),
            "key": "no-such",
            "name": "role:none",
            "slug": "none",
            "feature": "role:none",
            "scope": "nope",
            "flag_id": "999999",
            "rec_id": "999999",
        },
        {k: "not a ☃ uuid" for k in ("task_id", "jti", "key", "name", "slug", "feature", "scope", "flag_id", "rec_id")},
        {k: "x" * 3000 for k in ("task_id", "jti", "key", "name", "slug", "feature", "scope", "flag_id", "rec_id")},
    ]
    seen = 0
    async with unchanged(s.db):
        for method, template, params in endpoints:
            for i, fill in enumerate(fills):
                if i and not params:
                    continue
                path = template
                for p in params:
                    path = path.replace("{" + p + "}", fill[p])
                # A stream is only refused here (no token), never opened.
                callers = (s.admin, s.dev, s.anon) if i == 0 else (s.admin,)
                if template in streams:
                    callers = (s.anon,)
                for who in callers:
                    for content, ctype in GARBAGE if i == 0 else GARBAGE[:3]:
                        if method in ("GET", "DELETE") and content:
                            continue  # bodies are not read here; one bodiless call each is enough
                        r = await who.client.request(method, path, content=content, headers=_h(who, ctype))
                        sane(r)
                        seen += 1
    assert seen > 400, seen


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
# Field names the schemas know, so generated bodies get past "unknown field" into deeper validation.
_FIELDS = [
    "lane",
    "title",
    "payload",
    "priority",
    "required_features",
    "depends_on",
    "idempotency_key",
    "lease",
    "note",
    "to",
    "reason",
    "artifacts",
    "wait_seconds",
    "name",
    "key",
    "features",
    "max_active",
    "disabled",
    "family",
    "ttl_seconds",
    "scope",
    "sub",
    "feature",
    "expires_at",
    "stages",
    "transitions",
    "slug",
    "context",
    "project",
    "workflow",
    "description",
]
_bodies = st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=6) | _json


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_generated_bodies_never_crash(app: Any, scene: Scene, data: st.DataObject) -> None:
    s = scene
    method, template, params = data.draw(
        st.sampled_from([e for e in _endpoints(app) if e[0] in ("POST", "PATCH")]), label="endpoint"
    )
    path = template
    for p in params:
        path = path.replace(
            "{" + p + "}",
            data.draw(st.sampled_from([s.task, "cheap", "role:dev", "dev", str(uuid.uuid4()), "☃"]), label=p),
        )
    body = data.draw(_bodies, label="body")
    if isinstance(body, dict) and isinstance(body.get("wait_seconds"), int | float):
        body["wait_seconds"] = 0  # a valid wait would hold the claim open for up to a minute
    who = data.draw(st.sampled_from([s.admin, s.dev]), label="caller")
    r = await who.client.request(method, path, content=json.dumps(body).encode(), headers=_h(who))
    sane(r)
