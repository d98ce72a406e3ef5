"""The `usage` verb from a model's side (MCP tool `record_usage`, generated from its declaration) and from
the command line (`ainarres agent usage`)."""

from __future__ import annotations

import asyncio
import json

from tests.acceptance.live_server import AINARRES, clean_env
from tests.acceptance.test_mcp import Served, mcp_client, ok, refused, served
from tests.helpers import make_world

__all__ = ["served"]  # the fixture, shared with test_mcp


async def test_a_model_records_usage_through_mcp(served: Served) -> None:
    w = await make_world(served.admin)
    dev, other = await w.agent("cheap"), await w.agent("capable")
    task = (await dev.create("dev", "write it"))["task"]
    async with mcp_client(served.url, dev.token) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        schema = tools["record_usage"].input_schema
        assert schema["required"] == ["task_id"] and {"cost", "currency", "event", "model"} <= set(schema["properties"])
        ok(await client.call_tool("claim", {}))
        moved = ok(await client.call_tool("advance", {"to": "review"}))
        out = ok(await client.call_tool("record_usage", {
            "task_id": task["id"], "model": "m-1", "input_tokens": 900, "output_tokens": 90, "cost": "0.0042",
            "currency": "USD", "event": moved["event"]["id"]}))
        assert out["usage"]["event_id"] == moved["event"]["id"] and out["usage"]["role"] == "role:dev"
        assert out["usage"]["cost"] == "0.0042"
        refused(await client.call_tool("record_usage", {"task_id": task["id"], "cost": "1"}), "invalid")
    async with mcp_client(served.url, other.token) as client:
        refused(await client.call_tool("record_usage", {"task_id": task["id"], "model": "m"}), "not_eligible")
    # The command line: a report on the task, by id; cost without currency is a usage mistake (exit 2).
    env = clean_env(AINARRES_URL=served.url, AINARRES_TOKEN=dev.token)

    async def agent(*args: str) -> tuple[int, str]:  # the server runs in this event loop: never block it
        proc = await asyncio.create_subprocess_exec(*AINARRES, "agent", *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return int(proc.returncode or 0), out.decode() + err.decode()

    rc, out = await agent("usage", task["id"], "--model", "m-2", "--output-tokens", "12", "--cost", "0.5",
                          "--currency", "EUR", "--wall-seconds", "3.5")
    assert rc == 0, out
    said = json.loads(out.splitlines()[0])
    assert said["code"] == "ok" and said["usage"]["currency"] == "EUR" and said["usage"]["input_tokens"] is None
    rc, out = await agent("usage", task["id"], "--cost", "0.5")
    assert rc == 2 and json.loads(out.splitlines()[0])["code"] == "usage"
