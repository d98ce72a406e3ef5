"""Issue 9: one agent opening many MCP sessions, long polls and requests cannot stop another agent from
claiming and advancing. Real HTTP, a real uvicorn, the official MCP client for the well-behaved agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from ainarres_api.server.settings import Settings
from tests.acceptance.test_mcp import WITHIN, Served, mcp_client, ok, served  # noqa: F401 - the fixture
from tests.conftest import TEST_SECRET
from tests.helpers import make_world

RATE, BURST = 5.0, 20


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """A low per-agent request rate, so that a flood is seen within a few dozen requests."""
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                    pool_max_size=10, rate_limit_per_second=RATE, rate_limit_burst=BURST)

INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "abuser", "version": "0"}}}
ACCEPT = {"Accept": "application/json, text/event-stream"}


async def test_one_agent_flooding_cannot_stop_another(served: Served) -> None:  # noqa: F811
    settings = served.app.state.ainarres.settings
    w = await make_world(served.admin)
    # The abuser may claim in the lane (review work) but nothing there is for it yet: its polls wait.
    abuser, worker = await w.agent("reviewers"), await w.agent("cheap")
    tid = (await worker.create("dev", "real work"))["task"]["id"]
    auth = {"Authorization": f"Bearer {abuser.token}"}
    async with httpx.AsyncClient(base_url=served.url, timeout=WITHIN) as http:
        # MCP sessions: up to the per-agent bound, then 429 with Retry-After.
        for _ in range(settings.mcp_sessions_per_agent):
            r = await http.post("/mcp", json=INIT, headers={**ACCEPT, **auth})
            assert r.status_code == 200 and r.headers["mcp-session-id"], r.text
        r = await http.post("/mcp", json=INIT, headers={**ACCEPT, **auth})
        assert r.status_code == 429 and r.json()["code"] == "rate_limited" and r.headers["retry-after"], r.text

        # A flood of requests: past its burst the abuser gets 429 with Retry-After.
        flood = [await http.get("/v1/me", headers=auth) for _ in range(BURST + 5)]
        limited = [r for r in flood if r.status_code == 429]
        assert limited and limited[0].json()["code"] == "rate_limited" and limited[0].headers["retry-after"]
        # The bucket refills with time alone: wait until it is full again (the limit is a rate, time is its event).
        await asyncio.sleep(BURST / RATE)

        # Long polls: up to the per-agent bound waiting at once, then 429 at once.
        body = {"lane": "dev", "wait_seconds": 30}
        polls = [asyncio.create_task(http.post("/v1/claims", json=body, headers=auth))
                 for _ in range(settings.max_long_polls_per_agent)]
        hub = served.app.state.ainarres.wake
        for _ in range(2000):  # until every poll waits in the hub (no event tells a test this; bounded)
            if hub.waiting >= settings.max_long_polls_per_agent:
                break
            await asyncio.sleep(0.01)
        r = await http.post("/v1/claims", json=body, headers=auth)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
        assert "waiting claims" in r.json()["detail"], r.text  # the long-poll bound, not the request rate

        # Meanwhile another agent works, over MCP and over HTTP.
        async with mcp_client(served.url, worker.token) as client:
            claimed = ok(await client.call_tool("claim", {}))
            assert claimed["task"]["id"] == tid
            assert ok(await client.call_tool("advance", {"to": "review"}))["task"]["stage"] == "review"
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)
