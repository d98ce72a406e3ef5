"""Small helpers the tests share: an API handle and a standard world to work in."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx


class Clock:
    """A monotonic clock a test moves by hand (`clock.now = …`), for what takes one (rate buckets, the wake hub)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Api:
    """One caller of the HTTP API: a client and a bearer token."""

    def __init__(self, client: httpx.AsyncClient, token: str | None, sub: str | None = None) -> None:
        self.client = client
        self.token = token
        self.sub = sub

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def call(self, method: str, path: str, json: Any = None, expect: int | None = None,
                   **kw: Any) -> httpx.Response:
        r = await self.client.request(method, path, json=json, headers=self._headers(), **kw)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path} → {r.status_code} {r.text}"
        return r

    async def post(self, path: str, json: Any = None, expect: int | None = None, **kw: Any) -> Any:
        r = await self.call("POST", path, json, expect, **kw)
        return r.json() if r.content else None

    async def get(self, path: str, expect: int | None = 200, **kw: Any) -> Any:
        r = await self.call("GET", path, None, expect, **kw)
        return r.json()

    async def patch(self, path: str, json: Any, expect: int | None = 200) -> Any:
        r = await self.call("PATCH", path, json, expect)
        return r.json()

    async def delete(self, path: str, expect: int | None = 204) -> httpx.Response:
        return await self.call("DELETE", path, None, expect)

    # The verbs, as agents call them.
    async def create(self, lane: str, title: str = "t", expect: int | None = 201, **fields: Any) -> Any:
        return await self.post("/v1/tasks", {"lane": lane, "title": title, **fields}, expect)

    async def claim(self, lane: str | None = None, expect: int | None = 200, **fields: Any) -> Any:
        body = {"lane": lane, **fields} if lane else fields
        return await self.post("/v1/claims", body, expect)

    async def verb(self, task_id: str, verb: str, expect: int | None = 200, **body: Any) -> Any:
        return await self.post(f"/v1/tasks/{task_id}/{verb}", body, expect)


def review_flow(key: str, first: str = "todo", *, lease: int = 60, first_stage: dict[str, Any] | None = None,
                review_stage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A workflow `first` → review → done (role:dev builds, role:reviewer advances or rejects back)."""
    return {
        "key": key,
        "stages": [
            {"key": first, "initial": True, "lease_seconds": lease, **(first_stage or {})},
            {"key": "review", "lease_seconds": lease, **(review_stage or {})},
            {"key": "done", "terminal": True},
        ],
        "transitions": [
            {"from": first, "to": "review", "kind": "advance", "required_features": ["role:dev"]},
            {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
            {"from": "review", "to": first, "kind": "reject", "required_features": ["role:reviewer"]},
        ],
    }


DEV_WORKFLOW = review_flow("dev", first_stage={"max_attempts": 3, "escalate_after": 2},
                           review_stage={"max_rework": 2})


@dataclass
class World:
    """A project with lane `dev` over DEV_WORKFLOW and families `cheap`, `capable`, `reviewers`."""

    admin: Api
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def agent(self, family: str, **mint: Any) -> Api:
        """A new agent (its own sub) of a family."""
        tok = await self.admin.post("/v1/tokens", {"family": family, **mint}, 201)
        return Api(self.admin.client, tok["token"], tok["sub"])


async def make_world(admin: Api, *, workflow: dict[str, Any] | None = None, lane: str = "dev") -> World:
    for name in ("role:dev", "role:reviewer", "tier:2", "area:backend"):
        await admin.post("/v1/features", {"name": name}, None)
    await admin.post("/v1/workflows", workflow or DEV_WORKFLOW, 201)
    await admin.post("/v1/projects", {"slug": "acme"}, None)
    await admin.post("/v1/lanes", {"project": "acme", "key": lane, "workflow": (workflow or DEV_WORKFLOW)["key"]},
                     201)
    fams = {
        "cheap": [f"lane:{lane}", "role:dev"],
        "capable": [f"lane:{lane}", "role:dev", "tier:2"],
        "reviewers": [f"lane:{lane}", "role:reviewer"],
    }
    for key, feats in fams.items():
        await admin.post("/v1/families", {"key": key, "features": feats}, None)
    return World(admin)


def process_table() -> list[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, command-line arguments) of every process, from /proc (Linux); one that ends while
    it is read is left out."""
    table = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            args = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        table.append((int(d.name), ppid, args))
    return table


async def wait_for_lock(observer: asyncpg.Connection, pid: int | None, what: str, query: str | None = None) -> None:
    """Return once the backend `pid` (or, with `query`, any backend running that statement) waits on a lock."""
    for _ in range(3000):  # no event tells another session's lock wait; poll pg_stat_activity
        # pg_stat_activity keeps a statement's first track_activity_query_size bytes (1 kB): compared by its start.
        if await observer.fetchval("SELECT count(*) > 0 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND (pid = $1 OR left(query, 500) = left($2, 500))", pid, query):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} never waited on a lock")


async def second_waits(dsn: str, first: Callable[[asyncpg.Connection], Awaitable[Any]],
                       second: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    """Two changes sent at once, made to meet: `first(conn)` in a transaction left open, then `second(conn)` on
    another connection, which must wait for it (a lock the two share: else AssertionError); the first committed,
    the second's outcome (its answer, or the exception it raised)."""
    c1, c2, observer = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        tx = c1.transaction()
        await tx.start()
        await first(c1)
        later = asyncio.create_task(second(c2))
        waited = asyncio.create_task(wait_for_lock(observer, c2.get_server_pid(), "the second"))
        await asyncio.wait({later, waited}, return_when=asyncio.FIRST_COMPLETED)
        if later.done():
            waited.cancel()
            raise AssertionError(f"the second did not wait for the first: {later.exception() or later.result()}")
        await waited
        await tx.commit()
        try:
            return await asyncio.wait_for(later, 30)
        except Exception as exc:  # the outcome under test
            return exc
    finally:
        for conn in (c1, c2, observer):
            await conn.close()
