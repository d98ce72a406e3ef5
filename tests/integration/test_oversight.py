"""The oversight API: board, feed, stuck, demand, agents, track record, and the live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ainarres_api.server.api import oversight as oversight_api
from ainarres_api.server.services import oversight as oversight_svc
from tests.helpers import DEV_WORKFLOW, Api, World, make_world

ENDPOINTS = ("/v1/board", "/v1/feed", "/v1/stuck", "/v1/demand", "/v1/agents", "/v1/track-record")


# -- a streaming ASGI transport: httpx's own buffers the whole body, which an endless stream never ends


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Runs the app per request and hands body chunks to the client as they are sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.tasks: list[asyncio.Task[None]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path,
            "query_string": request.url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "client": ("127.0.0.1", 1234),
            "server": (request.url.host, request.url.port or 80),
        }
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(msg: dict[str, Any]) -> None:
            await sent.put(msg)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await sent.put(None)

        task = asyncio.create_task(run())
        self.tasks.append(task)
        start = await sent.get()
        assert start is not None and start["type"] == "http.response.start", start

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                while True:
                    msg = await sent.get()
                    if msg is None:
                        return
                    if msg["type"] == "http.response.body":
                        if msg.get("body"):
                            yield msg["body"]
                        if not msg.get("more_body"):
                            return

            async def aclose(self) -> None:
                gone.set()
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), 5)
                task.cancel()

        return httpx.Response(
            start["status"], headers=start.get("headers", []), stream=Body(), request=request
        )


@pytest.fixture
async def sse(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = StreamingASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test", timeout=30) as c:
        yield c
    for t in transport.tasks:
        t.cancel()


class Frames:
    """Reads an SSE response frame by frame: ("event", id, data), ("comment", text) or ("error", data)."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self) -> tuple[Any, ...]:
        fields: dict[str, str] = {}
        comment = None
        async for line in self.lines:
            if line == "":
                if fields.get("event") == "error":
                    return ("error", json.loads(fields["data"]))
                if "data" in fields:
                    return ("event", int(fields["id"]), json.loads(fields["data"]))
                if comment is not None:
                    return ("comment", comment)
                fields, comment = {}, None
                continue
            if line.startswith(":"):
                comment = line[1:].strip()
            else:
                k, _, v = line.partition(":")
                fields[k] = v[1:] if v.startswith(" ") else v
        raise AssertionError("the stream ended")

    async def next_frame(self) -> tuple[Any, ...]:
        return await asyncio.wait_for(self.next(), 20)

    async def next_event(self) -> tuple[int, dict[str, Any]]:
        while True:
            f = await asyncio.wait_for(self.next(), 20)
            if f[0] == "event":
                return f[1], f[2]
            assert f[0] == "comment", f


# -- helpers ----------------------------------------------------------------------------------------


async def seat(w: World, key: str, features: list[str]) -> Api:
    await w.admin.post("/v1/families", {"key": key, "features": features}, 201)
    return await w.agent(key)


async def all_pages(api: Api, path: str, limit: int, **params: Any) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        q = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        page = await api.get(path, params=q)
        pages.append(page["items"])
        cursor = page["next"]
        if cursor is None:
            return pages
        assert len(pages) < 50


async def ops_lane(w: World) -> None:
    """A second lane `ops` in project `acme`, and a family working only there."""
    await w.admin.post("/v1/lanes", {"project": "acme", "key": "ops", "workflow": "dev"}, 201)
    await w.admin.post("/v1/families", {"key": "opsdev", "features": ["lane:ops", "role:dev"]}, 201)


# -- refusals ---------------------------------------------------------------------------------------


async def test_oversight_needs_a_seat(admin, client):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    for path in ENDPOINTS:
        r = await dev.call("GET", path)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["code"] == "not_eligible" and "seat:monitor" in r.json()["detail"]
        r = await client.get(path)
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    monitor = await seat(w, "watchers", ["seat:monitor"])
    overseer = await seat(w, "overseers", ["seat:overseer"])
    for path in ENDPOINTS:
        for who in (monitor, overseer, admin):
            page = await who.get(path)
            assert set(page) == {"items", "next"}
    # A monitor reads; it does not act.
    r = await monitor.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "x"})
    assert r.status_code == 403


# -- board ------------------------------------------------------------------------------------------


async def test_board_shows_where_every_task_is_and_what_holds_it(admin, db):
    w = await make_world(admin)
    dev, dev2, rev = await w.agent("cheap"), await w.agent("capable"), await w.agent("reviewers")
    a = (await dev.create("dev", "first"))["task"]
    b = (await dev.create("dev", "after first", depends_on=[a["id"]]))["task"]
    c = (await dev.create("dev", "gets blocked"))["task"]
    got = await dev.claim("dev")
    assert got["task"]["id"] == a["id"]
    blk = await dev2.claim("dev")
    assert blk["task"]["id"] == c["id"]
    await dev2.verb(c["id"], "block", lease=blk["lease"]["id"], reason="needs a human")
    await db.execute(
        "UPDATE tasks SET stage_entered_at = now() - interval '100 seconds' WHERE id = $1", b["id"]
    )

    items = {t["id"]: t for t in (await admin.get("/v1/board"))["items"]}
    assert list(items) == [a["id"], b["id"], c["id"]]  # creation order
    ta, tb, tc = items[a["id"]], items[b["id"]], items[c["id"]]
    assert ta["state"] == "held" and ta["holder"] == dev.sub and ta["holder_family"] == "cheap"
    assert ta["lease_expires_at"] is not None
    assert ta["abandoned"] is False and ta["held_since"] is not None
    assert (ta["project"], ta["lane"], ta["stage"], ta["stage_terminal"]) == ("acme", "dev", "todo", False)
    assert (
        tb["state"] == "waiting" and tb["unmet_dependencies"] == [a["id"]] and tb["depends_on"] == [a["id"]]
    )
    assert tb["holder"] is None and tb["holder_family"] is None and tb["lease_expires_at"] is None
    assert tb["age_in_stage_seconds"] >= 100 and ta["age_in_stage_seconds"] < 100
    assert tc["blocked"] is True and tc["blocked_reason"] == "needs a human" and tc["state"] == "blocked"
    assert "payload" not in ta

    # The holder goes silent past its lease: the task is abandoned until a claim meets it.
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", a["id"])
    ab = (await admin.get("/v1/board", params={"abandoned": "true"}))["items"]
    assert [t["id"] for t in ab] == [a["id"]]
    assert ab[0]["abandoned"] is True and ab[0]["holder"] == dev.sub and ab[0]["holder_family"] == "cheap"
    assert [t["id"] for t in (await admin.get("/v1/board", params={"abandoned": "false"}))["items"]] == [
        b["id"],
        c["id"],
    ]
    # The next claim recovers it (attempts +1) and it is no longer abandoned.
    again = await dev2.claim("dev", expect=None)  # dev2 holds nothing now (its task is blocked)
    assert again["code"] == "claimed" and again["task"]["id"] == a["id"]
    ta = next(t for t in (await admin.get("/v1/board"))["items"] if t["id"] == a["id"])
    assert ta["abandoned"] is False and ta["attempts"] == 1 and ta["holder_family"] == "capable"

    # Rework shows once a reviewer sends it back; the dependency is met once the first task is done.
    await dev2.verb(a["id"], "advance", lease=again["lease"]["id"], to="review")
    r1 = await rev.claim("dev")
    await rev.verb(a["id"], "reject", lease=r1["lease"]["id"], to="todo", reason="no tests")
    ta = next(t for t in (await admin.get("/v1/board"))["items"] if t["id"] == a["id"])
    assert ta["rework_count"] == 1 and ta["stage"] == "todo" and ta["age_in_stage_seconds"] < 100


async def test_board_pages_and_filters(admin):
    w = await make_world(admin)
    await ops_lane(w)
    dev, ops = await w.agent("cheap"), await w.agent("opsdev")
    ids = [(await dev.create("dev", f"dev {i}"))["task"]["id"] for i in range(5)]
    ops_id = (await ops.create("ops", "ops 1"))["task"]["id"]
    held = await dev.claim("dev")

    pages = await all_pages(admin, "/v1/board", 2)
    assert [len(p) for p in pages] == [2, 2, 2]
    assert [t["id"] for p in pages for t in p] == [*ids, ops_id]

    async def board(**params: Any) -> list[str]:
        return [t["id"] for t in (await admin.get("/v1/board", params=params))["items"]]

    assert await board(lane="ops") == [ops_id]
    assert await board(lane="dev") == ids
    assert await board(project="acme") == [*ids, ops_id]
    assert await board(project="nope") == []
    assert await board(state="held") == [held["task"]["id"]]
    assert await board(state=["held", "ready"]) == [*ids, ops_id]
    assert await board(state="held,waiting") == [held["task"]["id"]]
    assert await board(family="cheap") == [held["task"]["id"]]
    assert await board(family="capable") == []
    assert await board(stage="todo", lane="dev") == ids
    assert await board(stage="review") == []
    assert len(await board(lane="dev", limit=3)) == 3

    r = await admin.call("GET", "/v1/board", params={"state": "stuck"})
    assert r.status_code == 422 and r.json()["code"] == "invalid" and "state" in r.json()["detail"]
    for bad in ("garbage!", "WyJ4Il0", "bm90IGpzb24"):
        r = await admin.call("GET", "/v1/board", params={"cursor": bad})
        assert r.status_code == 422 and "cursor" in r.json()["detail"], bad


# -- feed -------------------------------------------------------------------------------------------


async def test_feed_newest_first_with_family_lane_and_stage(admin):
    w = await make_world(admin)
    await ops_lane(w)
    dev, rev, ops = await w.agent("cheap"), await w.agent("reviewers"), await w.agent("opsdev")
    t = (await dev.create("dev", "feature"))["task"]
    c = await dev.claim("dev")
    await dev.verb(t["id"], "release", lease=c["lease"]["id"], reason="later")
    c = await dev.claim("dev")
    await dev.verb(t["id"], "progress", lease=c["lease"]["id"], note="half")
    await dev.verb(t["id"], "advance", lease=c["lease"]["id"], to="review")
    r = await rev.claim("dev")
    await rev.verb(t["id"], "release", lease=r["lease"]["id"])
    await ops.create("ops", "elsewhere")

    items = (await admin.get("/v1/feed"))["items"]
    ids = [e["id"] for e in items]
    assert ids == sorted(ids, reverse=True)
    mine = [e for e in items if e["task_id"] == t["id"]][::-1]
    assert [(e["type"], e["stage"], e["family"]) for e in mine] == [
        ("created", "todo", "cheap"),
        ("claimed", "todo", "cheap"),
        ("released", "todo", "cheap"),
        ("claimed", "todo", "cheap"),
        ("progress", "todo", "cheap"),
        ("transition", "todo", "cheap"),
        ("claimed", "review", "reviewers"),
        ("released", "review", "reviewers"),
    ]
    assert all(e["lane"] == "dev" and e["project"] == "acme" and e["task_title"] == "feature" for e in mine)
    assert mine[0]["actor"] == dev.sub and mine[-1]["actor"] == rev.sub
    assert items[0]["lane"] == "ops" and items[0]["type"] == "created"

    # Pages: every event exactly once, newest first.
    pages = await all_pages(admin, "/v1/feed", 3)
    assert [e["id"] for p in pages for e in p] == ids and all(len(p) <= 3 for p in pages)

    async def feed(**params: Any) -> list[tuple[str, str | None]]:
        return [(e["type"], e["stage"]) for e in (await admin.get("/v1/feed", params=params))["items"]]

    assert await feed(family="reviewers") == [("released", "review"), ("claimed", "review")]
    assert await feed(stage="review") == [("released", "review"), ("claimed", "review")]
    assert await feed(type="released", lane="dev") == [("released", "review"), ("released", "todo")]
    assert await feed(lane="ops") == [("created", "todo")]
    assert len(await feed(task=t["id"])) == 8
    assert await feed(project="other") == []
    assert len(await feed(state="ready", lane="dev")) == 8  # the task is ready again, in review


# -- stuck ------------------------------------------------------------------------------------------


async def test_stuck_finds_silent_holds_and_treadmills(admin, db):
    w = await make_world(admin)
    agents = [await w.agent("cheap") for _ in range(4)]
    tasks = [(await agents[0].create("dev", f"t{i}"))["task"]["id"] for i in range(4)]
    leases = {}
    for a in agents:
        c = await a.claim("dev")
        leases[c["task"]["id"]] = (a, c["lease"]["id"])
    silent, treadmill, fresh, busy = tasks  # stage todo: lease 60 s, so "silent" means > 30 s
    # Time travel, behind the API: held 40 s, nothing since the claim.
    await db.execute(
        "UPDATE tasks SET held_since = now() - interval '40 seconds', "
        "lease_expires_at = now() + interval '20 seconds' WHERE id = $1",
        silent,
    )
    # Held 5 min, no progress ever, lease kept alive (by heartbeats) to 30 s from now.
    await db.execute(
        "UPDATE tasks SET held_since = now() - interval '300 seconds', "
        "lease_expires_at = now() + interval '30 seconds' WHERE id = $1",
        treadmill,
    )
    # Held 5 min but reported progress 10 s ago: working, not stuck.
    a, lease = leases[busy]
    await a.verb(busy, "progress", lease=lease, note="going")
    await db.execute(
        "UPDATE tasks SET held_since = now() - interval '300 seconds', "
        "progress_at = now() - interval '10 seconds' WHERE id = $1",
        busy,
    )

    items = (await admin.get("/v1/stuck"))["items"]
    assert [(s["id"], s["kind"]) for s in items] == [(treadmill, "treadmill"), (silent, "silent_hold")]
    tm, sh = items
    assert tm["holder_family"] == "cheap" and tm["lane"] == "dev" and tm["stage"] == "todo"
    assert tm["lease_seconds"] == 60 and tm["held_for_seconds"] >= 300 and tm["progress_at"] is None
    assert tm["extended_by_seconds"] >= 300 - 60 - 5
    assert 40 <= sh["silent_for_seconds"] < 300 and sh["extended_by_seconds"] < 5
    assert fresh not in {s["id"] for s in items}

    assert [s["id"] for s in (await admin.get("/v1/stuck", params={"kind": "treadmill"}))["items"]] == [
        treadmill
    ]
    assert [s["id"] for s in (await admin.get("/v1/stuck", params={"kind": "silent_hold"}))["items"]] == [
        silent
    ]
    assert (await admin.get("/v1/stuck", params={"family": "capable"}))["items"] == []
    assert (await admin.get("/v1/stuck", params={"lane": "nope"}))["items"] == []
    pages = await all_pages(admin, "/v1/stuck", 1)
    assert [s["id"] for p in pages for s in p] == [treadmill, silent]

    # Progress ends the silence; a lease that ran out is abandoned, not stuck.
    a, lease = leases[silent]
    await a.verb(silent, "progress", lease=lease, note="alive")
    await db.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", treadmill
    )
    assert (await admin.get("/v1/stuck"))["items"] == []


# -- demand -----------------------------------------------------------------------------------------


async def test_demand_groups_pending_work_by_bundle_and_names_who_can_take_it(admin, db):
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    for i in range(3):
        await dev.create("dev", f"plain {i}")
    await dev.create("dev", "tier two", required_features=["tier:2"])
    await dev.create("dev", "backend", required_features=["area:backend"])
    # One plain task goes to review; one stays held with a lease that ran out (pending, expired).
    c = await dev.claim("dev")
    await dev.verb(c["task"]["id"], "advance", lease=c["lease"]["id"], to="review")
    c = await dev.claim("dev")
    await db.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", c["task"]["id"]
    )

    rows = {tuple(r["features"]): r for r in (await admin.get("/v1/demand"))["items"]}
    plain = rows[("lane:dev", "role:dev")]
    assert (plain["stage"], plain["pending"], plain["ready"], plain["expired"]) == ("todo", 2, 1, 1)
    assert (
        plain["capable"] is True
        and plain["capable_families"] == ["capable", "cheap"]
        and plain["note"] is None
    )
    tier = rows[("lane:dev", "role:dev", "tier:2")]
    assert tier["pending"] == 1 and tier["capable_families"] == ["capable"]
    review = rows[("lane:dev", "role:reviewer")]
    assert (
        review["stage"] == "review" and review["pending"] == 1 and review["capable_families"] == ["reviewers"]
    )
    backend = rows[("area:backend", "lane:dev", "role:dev")]
    assert backend["capable"] is False and backend["capable_families"] == []
    assert backend["note"] == "no capable agent"
    assert backend["closest"]["missing"] == ["area:backend"]
    assert len(rows) == 4

    # A denial or a disabled family takes the capability away: nobody can take tier-2 work now.
    await admin.post("/v1/families/capable/denials", {"feature": "tier:2", "reason": "over budget"}, 201)
    rows = {tuple(r["features"]): r for r in (await admin.get("/v1/demand"))["items"]}
    assert rows[("lane:dev", "role:dev", "tier:2")]["note"] == "no capable agent"
    assert rows[("lane:dev", "role:dev")]["capable_families"] == ["capable", "cheap"]
    await admin.patch("/v1/families/reviewers", {"disabled": True})
    rows = {tuple(r["features"]): r for r in (await admin.get("/v1/demand"))["items"]}
    assert rows[("lane:dev", "role:reviewer")]["capable"] is False

    nobody = (await admin.get("/v1/demand", params={"capable": "false"}))["items"]
    assert sorted(tuple(r["features"]) for r in nobody) == [
        ("area:backend", "lane:dev", "role:dev"),
        ("lane:dev", "role:dev", "tier:2"),
        ("lane:dev", "role:reviewer"),
    ]
    assert [r["stage"] for r in (await admin.get("/v1/demand", params={"family": "cheap"}))["items"]] == [
        "todo"
    ]
    assert [r["stage"] for r in (await admin.get("/v1/demand", params={"stage": "review"}))["items"]] == [
        "review"
    ]
    pages = await all_pages(admin, "/v1/demand", 1)
    assert [len(p) for p in pages] == [1, 1, 1, 1]
    assert sorted(tuple(p[0]["features"]) for p in pages) == sorted(rows)
    assert rev.sub  # the reviewer family exists, but disabled it cannot work


# -- agents -----------------------------------------------------------------------------------------


async def test_agents_show_family_holds_and_last_call(admin, db):
    w = await make_world(admin)
    dev, idle = await w.agent("cheap"), await w.agent("capable")
    t = (await dev.create("dev", "work"))["task"]
    await dev.claim("dev")
    await idle.get("/v1/me")
    items = {a["sub"]: a for a in (await admin.get("/v1/agents"))["items"]}
    assert set(items) >= {dev.sub, idle.sub}
    d = items[dev.sub]
    assert d["family"] == "cheap" and d["family_disabled"] is False
    assert [(h["task_id"], h["lane"], h["stage"], h["abandoned"]) for h in d["holds"]] == [
        (t["id"], "dev", "todo", False)
    ]
    assert items[idle.sub]["holds"] == [] and items[idle.sub]["family"] == "capable"

    # last_seen_at follows calls (written at most every 30 s, so push it back first).
    await db.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE sub = $1", idle.sub)
    old = await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", idle.sub)
    await idle.get("/v1/me")
    new = await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", idle.sub)
    assert (new - old).total_seconds() > 3000
    a = next(a for a in (await admin.get("/v1/agents"))["items"] if a["sub"] == idle.sub)
    assert a["last_seen_at"] >= new.isoformat()[:19]

    assert [a["sub"] for a in (await admin.get("/v1/agents", params={"family": "cheap"}))["items"]] == [
        dev.sub
    ]
    assert dev.sub in [a["sub"] for a in (await admin.get("/v1/agents", params={"lane": "dev"}))["items"]]
    assert (await admin.get("/v1/agents", params={"lane": "ops"}))["items"] == []
    subs = sorted(items)
    pages = await all_pages(admin, "/v1/agents", 1)
    assert [p[0]["sub"] for p in pages if p] == subs


# -- families' track record -------------------------------------------------------------------------


async def test_track_record_counts_deliveries_and_rejections(admin, db):
    w = await make_world(
        admin,
        workflow={
            **DEV_WORKFLOW,
            "stages": [
                {**DEV_WORKFLOW["stages"][0]},
                {"key": "review", "lease_seconds": 60, "max_rework": 1},
                {"key": "done", "terminal": True},
            ],
        },
    )
    cheap, capable, rev = await w.agent("cheap"), await w.agent("capable"), await w.agent("reviewers")
    t = (await cheap.create("dev", "feature"))["task"]

    async def step(api: Api, verb: str, **body: Any) -> None:
        c = await api.claim("dev")
        assert c["task"]["id"] == t["id"]
        await api.verb(t["id"], verb, lease=c["lease"]["id"], **body)

    await step(cheap, "advance", to="review")  # cheap delivers
    await step(rev, "reject", to="todo", reason="no tests")  # ... and is rejected
    await step(capable, "advance", to="review")  # capable delivers
    await step(rev, "reject", to="todo", reason="still no")  # the rework cap (1) blocks it instead
    await admin.post(f"/v1/tasks/{t['id']}/unblock", {"note": "go on"}, 200)
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "too many rejects"}, 201)
    await admin.post(
        "/v1/families/capable/denials",
        {"feature": "tier:2", "reason": "expires", "expires_at": "2999-01-01T00:00:00Z"},
        201,
    )
    await db.execute("UPDATE denials SET expires_at = now() - interval '1 minute' WHERE family_key = 'capable'")

    recs = {r["key"]: r for r in (await admin.get("/v1/track-record"))["items"]}
    assert (recs["cheap"]["delivered"], recs["cheap"]["rejected"], recs["cheap"]["rejects_made"]) == (1, 1, 0)
    assert recs["cheap"]["reject_rate"] == 1.0
    assert (recs["capable"]["delivered"], recs["capable"]["rejected"]) == (1, 1)
    assert (
        recs["reviewers"]["delivered"],
        recs["reviewers"]["rejected"],
        recs["reviewers"]["rejects_made"],
    ) == (0, 0, 1)
    assert recs["reviewers"]["reject_rate"] is None
    assert recs["cheap"]["features"] == ["lane:dev", "role:dev"]
    assert [d["feature"] for d in recs["cheap"]["denials"]] == ["role:dev"]
    assert recs["cheap"]["denials"][0]["reason"] == "too many rejects"
    assert recs["capable"]["denials"] == []  # an expired denial is not active
    assert recs["cheap"]["agents"] == 1 and recs["cheap"]["holding"] == 0
    assert recs["admin"]["features"] == ["seat:admin", "seat:overseer"]

    only = (await admin.get("/v1/track-record", params={"family": "capable"}))["items"]
    assert [r["key"] for r in only] == ["capable"]
    assert sorted(
        r["key"] for r in (await admin.get("/v1/track-record", params={"lane": "dev"}))["items"]
    ) == ["capable", "cheap", "reviewers"]
    pages = await all_pages(admin, "/v1/track-record", 2)
    assert [r["key"] for p in pages for r in p] == sorted(recs)


# -- the event stream -------------------------------------------------------------------------------


async def test_stream_resumes_exactly_after_the_given_id(admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    for i in range(4):
        await dev.create("dev", f"t{i}")
    c = await dev.claim("dev")
    await dev.verb(c["task"]["id"], "progress", lease=c["lease"]["id"], note="x")
    ids = sorted(e["id"] for e in (await admin.get("/v1/feed"))["items"])
    assert len(ids) == 6
    after = ids[2]
    want = [i for i in ids if i > after]

    # Last-Event-ID, and ?after=, each give exactly the events after that id, in order.
    for how in ({"headers": {"Last-Event-ID": str(after)}}, {"params": {"after": after}}):
        params = {"limit": len(want), **how.get("params", {})}
        r = await admin.client.get(
            "/v1/events/stream",
            params=params,
            headers={"Authorization": f"Bearer {admin.token}", **how.get("headers", {})},
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in r.text.split("\n\n") if f.startswith("id:")]
        got = [int(f.split("\n")[0][4:]) for f in frames]
        assert got == want, how
        data = [json.loads(f.split("\n")[1][6:]) for f in frames]
        assert [d["id"] for d in data] == want
        assert data[-1]["type"] == "progress" and data[-1]["lane"] == "dev" and data[-1]["stage"] == "todo"
        assert data[-1]["family"] == "cheap" and data[-1]["task"]["holder"] == dev.sub

    r = await admin.client.get(
        "/v1/events/stream", headers={"Authorization": f"Bearer {admin.token}", "Last-Event-ID": "abc"}
    )
    assert r.status_code == 422 and r.json()["code"] == "invalid"

    # A filter the database cannot hold (a NUL) is refused before the stream opens, not by cutting it after its 200.
    for params in ({"lane": "\x00"}, {"project": "a\x00b", "after": 0}):
        r = await admin.client.get("/v1/events/stream", params=params,
                                   headers={"Authorization": f"Bearer {admin.token}"})
        assert r.status_code == 422 and r.json()["code"] == "invalid", (params, r.text)


async def test_stream_delivers_new_events_live(admin, sse):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    old = (await dev.create("dev", "before the stream"))["task"]
    headers = {"Authorization": f"Bearer {admin.token}"}
    async with sse.stream("GET", "/v1/events/stream", headers=headers) as r:
        assert r.status_code == 200
        frames = Frames(r)
        assert (await frames.next_frame())[0] == "comment"  # the stream is open: from now on
        t = (await dev.create("dev", "live"))["task"]
        eid, ev = await frames.next_event()
        assert ev["type"] == "created" and ev["task_id"] == t["id"] and ev["task"]["state"] == "ready"
        c = await dev.claim("dev")
        assert c["task"]["id"] == old["id"]
        eid2, ev2 = await frames.next_event()
        assert eid2 > eid and ev2["type"] == "claimed" and ev2["task_id"] == old["id"]
        assert ev2["task"]["holder"] == dev.sub and ev2["family"] == "cheap"
        last = eid2
    # Resuming from the last id seen gets what happened in between, and nothing before it.
    await dev.verb(old["id"], "advance", lease=c["lease"]["id"], to="review")
    async with sse.stream("GET", "/v1/events/stream", headers={**headers, "Last-Event-ID": str(last)}) as r:
        frames = Frames(r)
        eid3, ev3 = await frames.next_event()
        assert eid3 > last and ev3["type"] == "transition" and ev3["stage"] == "todo"
        assert ev3["task"]["stage"] == "review"


async def test_stream_keeps_alive_and_respects_lanes(admin, sse):
    w = await make_world(admin)
    await ops_lane(w)
    dev, ops = await w.agent("cheap"), await w.agent("opsdev")
    await w.admin.post("/v1/families", {"key": "nolane", "features": ["role:dev"]}, 201)
    stranger = await w.agent("nolane")
    r = await stranger.call("GET", "/v1/events/stream")
    assert r.status_code == 403 and r.json()["code"] == "not_eligible"

    async with sse.stream(
        "GET",
        "/v1/events/stream",
        params={"keepalive": 0.1, "after": 0},
        headers={"Authorization": f"Bearer {dev.token}"},
    ) as r:
        frames = Frames(r)
        assert (await frames.next_frame())[0] == "comment"
        assert await asyncio.wait_for(frames.next(), 10) == ("comment", "keep-alive")
        await ops.create("ops", "not for dev's eyes")
        mine = (await dev.create("dev", "dev's"))["task"]
        _, ev = await frames.next_event()
        assert ev["task_id"] == mine["id"] and ev["lane"] == "dev"  # the ops event was skipped

    # A seat sees every lane; ?lane= narrows it.
    r = await admin.client.get(
        "/v1/events/stream",
        params={"after": 0, "limit": 2},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert [
        json.loads(f.split("\ndata: ")[1])["lane"] for f in r.text.split("\n\n") if f.startswith("id:")
    ] == ["ops", "dev"]
    r = await admin.client.get(
        "/v1/events/stream",
        params={"after": 0, "limit": 1, "lane": "dev"},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert '"lane":"dev"' in r.text and '"lane":"ops"' not in r.text


async def test_stream_ends_when_the_token_is_revoked(admin, sse, monkeypatch):
    monkeypatch.setattr(oversight_api, "REAUTH_SECONDS", 0.0)
    w = await make_world(admin)
    tok = await admin.post("/v1/tokens", {"family": "cheap"}, 201)
    async with sse.stream(
        "GET", "/v1/events/stream", headers={"Authorization": f"Bearer {tok['token']}"}
    ) as r:
        frames = Frames(r)
        assert (await frames.next_frame())[0] == "comment"
        await admin.delete(f"/v1/tokens/{tok['jti']}")
        while True:
            f = await asyncio.wait_for(frames.next(), 10)
            if f[0] == "error":
                assert f[1]["code"] == "unauthenticated"
                break
            assert f[0] == "comment"
    assert w


async def test_stream_waits_for_an_event_that_commits_late(admin, sse, db, monkeypatch):
    # Event ids come from a sequence: a later id can commit first. The stream must not skip the earlier.
    monkeypatch.setattr(oversight_api, "GAP_SECONDS", 60.0)
    w = await make_world(admin)
    dev = await w.agent("cheap")
    t = (await dev.create("dev", "t"))["task"]
    headers = {"Authorization": f"Bearer {admin.token}"}
    async with sse.stream("GET", "/v1/events/stream", params={"keepalive": 0.1}, headers=headers) as r:
        frames = Frames(r)
        assert (await frames.next_frame())[0] == "comment"
        tx = db.transaction()
        await tx.start()
        late = await db.fetchval(
            "INSERT INTO events (task_id, type, actor, family, data) "
            "VALUES ($1, 'progress', 'someone', 'cheap', '{\"note\": \"late\"}') RETURNING id",
            t["id"],
        )
        early = (await dev.create("dev", "commits first"))["event"]["id"]
        assert early > late
        # A keep-alive comes after a poll that saw `early` committed and `late` not yet.
        while (await frames.next_frame()) != ("comment", "keep-alive"):
            pass
        await tx.commit()
        first, ev1 = await frames.next_event()
        second, ev2 = await frames.next_event()
        assert (first, second) == (late, early)
        assert ev1["data"]["note"] == "late" and ev2["type"] == "created"


def test_sequencer_holds_back_at_a_gap_then_gives_up_on_it():
    seq = oversight_svc.Sequencer(10, gap_seconds=2.0)
    ev = {i: {"id": i} for i in range(11, 20)}
    assert seq.take([(11, ev[11]), (12, None), (14, ev[14])], now=0.0) == [ev[11]]  # 12: not visible
    assert seq.cursor == 12 and seq.waiting
    assert seq.take([(14, ev[14])], now=1.0) == []  # 13 may still commit
    assert seq.take([(13, ev[13]), (14, ev[14])], now=1.5) == [ev[13], ev[14]]
    assert not seq.waiting
    assert seq.take([(16, ev[16]), (18, ev[18])], now=10.0) == []
    assert seq.take([(16, ev[16]), (18, ev[18])], now=11.9) == []
    # 15 and 17 never came (rolled back): after the wait both gaps are given up on at once.
    assert seq.take([(16, ev[16]), (18, ev[18])], now=12.0) == [ev[16], ev[18]]
    assert seq.cursor == 18 and not seq.waiting


async def test_stream_reads_hold_back_what_follows_an_uncommitted_event(admin, app, db):
    # The same race, step by step at the service layer: the batch read while `late` is in flight has
    # only `early`, and the sequencer must not let it out until `late` has committed.
    w = await make_world(admin)
    dev = await w.agent("cheap")
    t = (await dev.create("dev", "t"))["task"]
    pool = app.state.ainarres.pool
    async with pool.acquire() as conn:
        seq = oversight_svc.Sequencer(await oversight_svc.last_event_id(conn), gap_seconds=60.0)
    tx = db.transaction()
    await tx.start()
    late = await db.fetchval(
        "INSERT INTO events (task_id, type, data) VALUES ($1, 'progress', '{}') RETURNING id", t["id"]
    )
    early = (await dev.create("dev", "commits first"))["event"]["id"]
    async with pool.acquire() as conn:
        batch = await oversight_svc.events_after(conn, None, seq.cursor, None, None, 100)
    assert [eid for eid, _ in batch] == [early]
    assert seq.take(batch, now=0.0) == [] and seq.waiting
    await tx.commit()
    async with pool.acquire() as conn:
        batch = await oversight_svc.events_after(conn, None, seq.cursor, None, None, 100)
    assert [e["id"] for e in seq.take(batch, now=1.0)] == [late, early]


async def test_open_streams_with_nothing_to_send_do_not_read_the_events_table(app, admin, sse, monkeypatch):
    """Idle streams wait on the process's event clock (one max(id) per interval for all of them)
    and read their own events only when it moves."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    reads = 0
    three_read = asyncio.Event()
    real = oversight_svc.events_after

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads >= 3:
            three_read.set()
        return await real(*args, **kwargs)

    monkeypatch.setattr(oversight_svc, "events_after", counting)
    clock = app.state.ainarres.events
    headers = {"Authorization": f"Bearer {admin.token}"}
    async with contextlib.AsyncExitStack() as stack:
        streams = [Frames(await stack.enter_async_context(sse.stream("GET", "/v1/events/stream", headers=headers)))
                   for _ in range(3)]
        for f in streams:
            assert (await f.next_frame())[0] == "comment"
        await asyncio.wait_for(three_read.wait(), 20)  # each stream's first read
        for _ in range(3):
            await asyncio.wait_for(clock.next_read(), 20)
        assert reads == 3, "an idle stream read the events table on its own"
        t = (await dev.create("dev", "wakes them"))["task"]
        for f in streams:
            _, ev = await f.next_event()
            assert ev["type"] == "created" and ev["task_id"] == t["id"]
        assert reads >= 6
