"""The MCP face at /mcp, driven by the official MCP Python client against a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from ainarres_api.server.app import create_app
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.helpers import Api, make_world

TOOLS = {"me", "claim", "create_task", "heartbeat", "progress", "advance", "reject", "release", "block",
         "unblock", "record_usage", "show_task", "show_card"}
WITHIN = 20.0  # a bound on waiting for an event, never a timing assertion


@dataclass
class Served:
    """The app behind a real socket, and an admin API handle over HTTP."""

    app: Any
    url: str
    admin: Api


@pytest.fixture
async def served(settings: Settings, dsn: str) -> AsyncIterator[Served]:
    app = create_app(settings, dsn=dsn)
    # Listen before serving: requests queue on the socket until the lifespan has run, so the first
    # one doubles as the readiness check.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=WITHIN) as http:
            assert (await http.get("/healthz")).status_code == 200
            st = app.state.ainarres
            async with st.pool.acquire() as conn:
                tok = await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600)
            yield Served(app, url, Api(http, tok["token"]))
    finally:
        server.should_exit = True
        await serving
        sock.close()


@asynccontextmanager
async def mcp_client(url: str, token: str | None, mode: str = "legacy") -> AsyncIterator[Client]:
    """The official client over streamable HTTP, sending `Authorization: Bearer <token>`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(WITHIN, read=60)) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http), mode=mode) as client:
            yield client


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    data = result.structured_content
    assert isinstance(data, dict)
    assert json.loads(result.content[0].text) == data  # type: ignore[union-attr]
    return data


def refused(result: CallToolResult, code: str) -> dict[str, Any]:
    assert result.is_error, result.structured_content
    data = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert data["code"] == code, data
    assert result.structured_content == data
    return data


async def test_lists_the_tools_for_a_model_that_never_saw_ainarres(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    async with mcp_client(served.url, dev.token) as client:
        assert "claim" in (client.instructions or "") and "lease_lost" in (client.instructions or "")
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for t in tools.values():
        assert t.description and len(t.description) > 100, t.name
    for name in ("advance", "reject"):
        for code in ("illegal_transition", "not_eligible", "guard_failed", "lease_lost"):
            assert code in (tools[name].description or ""), (name, code)
    assert "already_holding" in (tools["claim"].description or "")
    assert tools["advance"].input_schema["required"] == ["to"]  # task and lease may come from memory
    assert tools["claim"].annotations and tools["claim"].annotations.read_only_hint is False
    assert tools["me"].annotations and tools["me"].annotations.read_only_hint is True


async def test_a_tool_refuses_an_argument_it_does_not_take_and_publishes_its_bounds(served: Served) -> None:
    """A model that misspells an argument is told so, as an HTTP body's unknown field is refused: the SDK
    dropped it (`wait_second` made a claim that did not wait; `lanes` one from any lane). And a tool's schema
    carries the bounds the verb enforces, so a model can know them before it is refused."""
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "write it"))["task"]
    async with mcp_client(served.url, dev.token) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for t in tools.values():
            assert t.input_schema.get("additionalProperties") is False, t.name
        title = tools["create_task"].input_schema["properties"]["title"]
        assert (title.get("minLength"), title.get("maxLength")) == (1, 200), title
        assert tools["claim"].input_schema["properties"]["wait_seconds"].get("maximum") is not None
        assert tools["create_task"].input_schema["properties"]["lane"].get("pattern")

        r = refused(await client.call_tool("claim", {"lanes": "zzz", "wait_second": 30}), "invalid")
        assert {e["field"] for e in r["errors"]} == {"lanes", "wait_second"} and "lane" in r["detail"]
        refused(await client.call_tool("me", {"verbose": True}), "invalid")
        many = refused(await client.call_tool("me", {f"x{i}": i for i in range(500)}), "invalid")
        assert len(many["errors"]) == 20 and len(many["detail"]) < 1000  # as the HTTP face: bounded
        assert (await dev.get(f"/v1/tasks/{task['id']}"))["holder"] is None  # nothing was claimed
        ok(await client.call_tool("claim", {"lane": "dev"}))
        r = refused(await client.call_tool("progress", {"note": "x", "artefacts": [{"type": "file", "path": "a"}]}),
                    "invalid")
        assert [e["field"] for e in r["errors"]] == ["artefacts"]
        assert [e["type"] for e in (await dev.get(f"/v1/tasks/{task['id']}/events"))["items"]] == [
            "created", "claimed"]  # the refused progress recorded nothing


async def test_claim_progress_advance_without_carrying_the_lease(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "write it", payload={"goal": "x"}))["task"]
    async with mcp_client(served.url, dev.token) as client:
        assert client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS  # a stateful session
        c = ok(await client.call_tool("claim", {"lane": "dev"}))
        assert c["code"] == "claimed" and c["task"]["id"] == task["id"]
        assert c["card"]["stage"] == "todo" and c["card"]["transitions"][0]["to"] == "review"
        lease = c["lease"]["id"]

        me = ok(await client.call_tool("me", {}))
        assert me["sub"] == dev.sub
        assert me["remembered"] == {"current": task["id"], "leases": {task["id"]: lease}}

        p = ok(await client.call_tool("progress", {"note": "halfway", "artifacts": [
            {"type": "branch", "name": "feat/x"}]}))
        assert p["event"]["type"] == "progress" and p["event"]["data"]["lease"] == lease
        assert ok(await client.call_tool("heartbeat", {}))["lease"]["id"] == lease

        shown = ok(await client.call_tool("show_task", {}))
        assert shown["task"]["holder"] == dev.sub
        assert [e["type"] for e in shown["events"]] == ["created", "claimed", "progress"]
        assert ok(await client.call_tool("show_card", {}))["card"]["stage"] == "todo"

        adv = ok(await client.call_tool("advance", {"to": "review", "note": "done"}))
        assert adv["task"]["stage"] == "review" and adv["task"]["holder"] is None
        assert ok(await client.call_tool("me", {}))["remembered"] == {"current": None, "leases": {}}

    # The same task, read through the REST API: the MCP calls were the verbs themselves.
    events = (await dev.get(f"/v1/tasks/{task['id']}/events"))["items"]
    assert [e["type"] for e in events] == ["created", "claimed", "progress", "transition"]
    assert events[2]["data"]["note"] == "halfway" and events[3]["data"]["note"] == "done"


async def test_advance_with_next_remembers_the_next_hold(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    first = (await dev.create("dev", "one"))["task"]
    second = (await dev.create("dev", "two"))["task"]
    async with mcp_client(served.url, dev.token) as client:
        c = ok(await client.call_tool("claim", {"lane": "dev"}))
        assert c["task"]["id"] == first["id"]
        adv = ok(await client.call_tool("advance", {"to": "review", "next": {"lane": "dev"}}))
        assert adv["task"]["id"] == first["id"] and adv["next"]["task"]["id"] == second["id"]
        lease = adv["next"]["lease"]["id"]
        assert ok(await client.call_tool("me", {}))["remembered"] == {"current": second["id"],
                                                                     "leases": {second["id"]: lease}}
        # The remembered hold is the one the next claim took: progress needs neither id nor lease.
        assert ok(await client.call_tool("progress", {"note": "on it"}))["task"]["id"] == second["id"]


async def test_the_same_call_sent_again_is_answered_as_a_replay(served: Served) -> None:
    """A model whose answer was lost sends the same call again: it goes to the task and lease the first one used,
    and the service answers its outcome with "replay": true — not `invalid`, the session having forgotten the
    hold (found by a newcomer review). In the one-call loop the same `advance` with `next` and no task_id could be
    that retry or the next task's move (found by a review of that fix): it is refused, naming both, until the
    caller names the task; named, a retry answers the same outcome and the same `next`."""
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    first, second, third = [(await dev.create("dev", t))["task"]["id"] for t in ("one", "two", "three")]
    async with mcp_client(served.url, dev.token) as client:
        ok(await client.call_tool("claim", {"lane": "dev"}))
        move = {"to": "review", "note": "done"}
        adv = ok(await client.call_tool("advance", move))
        assert adv["task"]["id"] == first and "replay" not in adv
        again = ok(await client.call_tool("advance", move))
        assert again["replay"] is True and again["task"]["id"] == first and again["event"] == adv["event"]

        c = ok(await client.call_tool("claim", {"lane": "dev"}))
        assert c["task"]["id"] == second
        loop = {"to": "review", "note": "done", "next": {"lane": "dev"}}
        a = ok(await client.call_tool("advance", loop))
        assert a["task"]["id"] == second and a["next"]["task"]["id"] == third
        for between in ("me", "show_task", "claim", None):  # refused, also after other calls: nothing was moved
            err = refused(await client.call_tool("advance", loop), "invalid")
            assert second in err["detail"] and third in err["detail"] and f"task_id={third}" in err["detail"]
            if between is not None:
                await client.call_tool(between, {})
        r = ok(await client.call_tool("advance", {**loop, "task_id": second, "lease": c["lease"]["id"]}))
        assert r["replay"] is True and r["event"] == a["event"]
        assert r["next"]["replay"] is True and r["next"]["task"]["id"] == third
        assert r["next"]["lease"] == a["next"]["lease"]
        named = {**loop, "task_id": third}
        b = ok(await client.call_tool("advance", named))
        assert b["task"]["id"] == third and "replay" not in b and b["next"]["code"] == "empty"
        b2 = ok(await client.call_tool("advance", named))  # named, the same call again is its retry
        assert b2["replay"] is True and b2["event"] == b["event"]
        # Not right after itself (another call came between): not a retry; the session holds nothing now.
        ok(await client.call_tool("me", {}))
        refused(await client.call_tool("advance", {"to": "review"}), "invalid")
    for tid in (first, second, third):
        events = (await dev.get(f"/v1/tasks/{tid}/events"))["items"]
        assert [e["type"] for e in events] == ["created", "claimed", "transition"], (tid, events)


async def test_a_refusal_is_a_tool_error_carrying_the_code(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "write it"))["task"]
    async with mcp_client(served.url, dev.token) as client:
        # Nothing held: nothing to advance.
        err = refused(await client.call_tool("advance", {"to": "review"}), "invalid")
        assert "claim" in err["detail"]
        refused(await client.call_tool("advance", {"to": "review", "task_id": task["id"]}), "invalid")

        c = ok(await client.call_tool("claim", {}))
        # No advance leads from todo to done: refused, and the detail names the legal targets.
        err = refused(await client.call_tool("advance", {"to": "done"}), "illegal_transition")
        assert err["status"] == 409 and "review" in err["detail"] and err["task"]["stage"] == "todo"
        # An explicit lease wins over the remembered one.
        wrong = "00000000-0000-0000-0000-000000000001"
        refused(await client.call_tool("advance", {"to": "review", "lease": wrong}), "lease_lost")
        refused(await client.call_tool("progress", {"note": "x", "artifacts": [{"type": "file"}]}), "invalid")
        # Claiming again while holding: the refusal carries the held task.
        err = refused(await client.call_tool("claim", {}), "already_holding")
        assert err["task"]["id"] == task["id"] and err["lease"]["id"] == c["lease"]["id"]
        refused(await client.call_tool("show_card", {"lane": "nope"}), "not_eligible")
        refused(await client.call_tool("show_task", {"task_id": "00000000-0000-0000-0000-000000000002"}),
                "not_found")
        refused(await client.call_tool("unblock", {"task_id": task["id"]}), "conflict")
        # Nothing refused changed anything; the remembered lease still works.
        assert ok(await client.call_tool("advance", {"to": "review"}))["task"]["stage"] == "review"
        # The hold is over: the old lease is dead.
        refused(await client.call_tool("release", {"task_id": task["id"], "lease": c["lease"]["id"]}),
                "lease_lost")


async def test_the_lease_is_remembered_per_session(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "write it"))["task"]
    async with mcp_client(served.url, dev.token) as first:
        ok(await first.call_tool("claim", {}))
        async with mcp_client(served.url, dev.token) as second:
            # Another session of the same agent does not know the lease...
            refused(await second.call_tool("release", {"task_id": task["id"]}), "invalid")
            # ...until `me` shows it what the agent holds.
            held = ok(await second.call_tool("me", {}))["held"]
            assert [h["task"]["id"] for h in held] == [task["id"]]
            assert ok(await second.call_tool("release", {"reason": "handing over"}))["task"]["holder"] is None
        # The first session's lease died with the release: refused, and the same call sent again is told the same.
        refused(await first.call_tool("advance", {"to": "review"}), "lease_lost")
        refused(await first.call_tool("advance", {"to": "review"}), "lease_lost")
        refused(await first.call_tool("progress", {"note": "x"}), "invalid")  # the hold forgotten once found dead


async def test_features_are_read_live_on_every_call(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    async with mcp_client(served.url, dev.token) as client:
        assert ok(await client.call_tool("show_card", {"lane": "dev"}))["workflow"] == "dev"
        await served.admin.post("/v1/families/cheap/denials", {"feature": "lane:dev", "reason": "off"}, 201)
        refused(await client.call_tool("show_card", {"lane": "dev"}), "not_eligible")
        refused(await client.call_tool("create_task", {"lane": "dev", "title": "t"}), "not_eligible")


async def test_a_waiting_claim_is_woken_by_new_work(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    hub = served.app.state.ainarres.wake
    async with mcp_client(served.url, dev.token) as client:
        claiming = asyncio.create_task(client.call_tool("claim", {"wait_seconds": 60}))
        await hub.until(lambda h: any(x.idle for x in h.waiters) or claiming.done(), WITHIN)
        assert not claiming.done()
        task = (await dev.create("dev", "late work"))["task"]
        c = ok(await asyncio.wait_for(claiming, WITHIN))
        assert c["code"] == "claimed" and c["task"]["id"] == task["id"]


async def test_create_through_mcp_is_idempotent(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    args = {"lane": "dev", "title": "split", "payload": {"part": 1}, "idempotency_key": "k1"}
    async with mcp_client(served.url, dev.token) as client:
        first = ok(await client.call_tool("create_task", args))
        again = ok(await client.call_tool("create_task", args))
        assert (first["code"], again["code"]) == ("created", "existing")
        assert first["task"]["id"] == again["task"]["id"]
        refused(await client.call_tool("create_task", {**args, "title": "other"}), "conflict")


async def test_sessionless_clients_work_too(served: Served) -> None:
    # The 2026-07-28 protocol has no session: what a token holds is remembered for that token.
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "write it")
    async with mcp_client(served.url, dev.token, mode="auto") as client:
        assert client.protocol_version in MODERN_PROTOCOL_VERSIONS
        assert ok(await client.call_tool("claim", {}))["code"] == "claimed"
        assert ok(await client.call_tool("advance", {"to": "review"}))["task"]["stage"] == "review"


async def test_a_request_without_a_valid_token_is_refused(served: Served) -> None:
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    accept = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=served.url, timeout=WITHIN) as http:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {dev.token}"}):
            r = await http.post("/mcp", json=init, headers={**accept, **headers})
            assert r.status_code == 401, r.text
            assert r.json()["code"] == "unauthenticated"
            assert r.headers["www-authenticate"].startswith("Bearer")

        # A session belongs to the agent that opened it: another agent's token cannot use it.
        r = await http.post("/mcp", json=init, headers={**accept, "Authorization": f"Bearer {dev.token}"})
        assert r.status_code == 200, r.text
        sid = r.headers["mcp-session-id"]
        other = await w.agent("cheap")
        ping = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        r = await http.post("/mcp", json=ping, headers={**accept, "Authorization": f"Bearer {other.token}",
                                                        "mcp-session-id": sid,
                                                        "mcp-protocol-version": "2025-06-18"})
        assert r.status_code == 404, r.text

        # A token revoked mid-session is refused on its next request.
        await served.admin.delete(f"/v1/tokens/{_jti(dev.token)}")
        r = await http.post("/mcp", json=ping, headers={**accept, "Authorization": f"Bearer {dev.token}",
                                                        "mcp-session-id": sid,
                                                        "mcp-protocol-version": "2025-06-18"})
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"

    with pytest.raises(Exception):  # noqa: B017 - the client's own error type for an HTTP 401
        async with mcp_client(served.url, None) as client:
            await client.list_tools()


def _jti(token: str) -> str:
    import jwt

    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


@asynccontextmanager
async def _another_process(settings: Settings, dsn: str) -> AsyncIterator[str]:
    """A second app on the same database behind its own socket (as a second API process would be)."""
    app = create_app(settings, dsn=dsn)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=5))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        sock.close()


async def test_sessions_are_shared_and_bounded_across_processes(served: Served, settings: Settings,
                                                                dsn: str) -> None:
    # Sessions live in the database: opened on one process, used and ended on another; the per-agent
    # bound holds exactly over both, even when the openings race.
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "write it"))["task"]
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {dev.token}"}
    cap = settings.mcp_sessions_per_agent
    async with _another_process(settings, dsn) as other, httpx.AsyncClient(timeout=WITHIN, headers=headers) as http:
        assert (await http.get(f"{other}/healthz")).status_code == 200
        urls = [served.url, other]
        opened = await asyncio.gather(*(http.post(f"{urls[i % 2]}/mcp", json=init) for i in range(cap + 6)))
        assert sorted(r.status_code for r in opened) == [200] * cap + [429] * 6, [r.text for r in opened]
        sid = next(r.headers["mcp-session-id"] for r in opened if r.status_code == 200)
        session = {"mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"}

        async def tool(url: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
            r = await http.post(f"{url}/mcp", headers=session, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name, "arguments": args}})
            assert r.status_code == 200, r.text
            data = next(json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:"))
            return dict(data["result"]["structuredContent"])

        assert (await tool(served.url, "claim", {}))["task"]["id"] == task["id"]
        # The other process knows the lease from the session's memory.
        assert (await tool(other, "advance", {"to": "review"}))["task"]["stage"] == "review"
        # Ended on one process, gone on both; room for a new one.
        assert (await http.delete(f"{other}/mcp", headers=session)).status_code == 200
        assert (await http.post(f"{served.url}/mcp", headers=session, json=init)).status_code == 404
        assert (await http.post(f"{served.url}/mcp", json=init)).status_code == 200


async def test_an_idle_session_expires(served: Served, settings: Settings, dsn: str) -> None:
    import asyncpg

    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {dev.token}"}
    ping = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    async with httpx.AsyncClient(base_url=served.url, timeout=WITHIN, headers=headers) as http:
        sids = [(await http.post("/mcp", json=init)).headers["mcp-session-id"]
                for _ in range(settings.mcp_sessions_per_agent)]
        assert (await http.post("/mcp", json=init)).status_code == 429
        conn = await asyncpg.connect(dsn)
        try:  # the first session was last seen longer ago than the idle expiry
            await conn.execute("UPDATE mcp_sessions SET last_seen = now() - make_interval(secs => $2) WHERE id = $1",
                               sids[0], settings.mcp_session_idle_seconds + 1)
        finally:
            await conn.close()
        session = {"mcp-session-id": sids[0], "mcp-protocol-version": "2025-06-18"}
        assert (await http.post("/mcp", json=ping, headers=session)).status_code == 404
        assert (await http.post("/mcp", json=init)).status_code == 200  # its place is free again
        live = {"mcp-session-id": sids[1], "mcp-protocol-version": "2025-06-18"}
        assert (await http.post("/mcp", json=ping, headers=live)).status_code == 200


async def test_the_database_out_of_reach_is_a_refusal_with_its_code(served: Served, monkeypatch: Any) -> None:
    """A tool whose service call loses the database (the connection reset under it) answers what HTTP answers,
    `unavailable`, not a bare tool error without a code (found by a review across replicas)."""
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "one")

    async def reset(*_: Any, **__: Any) -> Any:
        raise ConnectionResetError("connection reset by peer")

    async with mcp_client(served.url, dev.token) as client:
        monkeypatch.setattr("ainarres_api.server.services.tasks.claim", reset)
        refused(await client.call_tool("claim", {"lane": "dev"}), "unavailable")
        monkeypatch.undo()
        assert ok(await client.call_tool("claim", {"lane": "dev"}))["code"] == "claimed"


async def test_mcp_verbs_are_counted_in_the_metrics_as_http_ones_are(served: Served) -> None:
    """Found by an operator review: tool calls all arrive as POST /mcp, so a swarm over MCP showed no claim and no
    verb on /metrics. Counted by verb and code as over HTTP, a move's `next` claim too."""
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    one, two = [(await dev.create("dev", t))["task"]["id"] for t in ("one", "two")]

    async def figures() -> dict[str, float]:
        text = (await served.admin.client.get("/metrics")).text
        out = {}
        for line in text.splitlines():
            if line.startswith(("ainarres_verb_calls_total{", "ainarres_claims_total{")):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    before = await figures()
    async with mcp_client(served.url, dev.token) as client:
        ok(await client.call_tool("claim", {"lane": "dev"}))
        ok(await client.call_tool("advance", {"task_id": one, "to": "review", "next": {"lane": "dev"}}))
        refused(await client.call_tool("advance", {"task_id": two, "to": "done"}), "illegal_transition")
    after = await figures()

    def grew(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew('ainarres_verb_calls_total{code="claimed",verb="claim"}') == 2  # the claim and the `next` one
    assert grew('ainarres_claims_total{result="claimed"}') == 2
    assert grew('ainarres_verb_calls_total{code="ok",verb="advance"}') == 1
    assert grew('ainarres_verb_calls_total{code="illegal_transition",verb="advance"}') == 1
