"""MCP tool calls counted in the verb and claim metrics as HTTP ones are (api/mcp_server.py `_count`), as a
review probed it."""

from __future__ import annotations

from tests.acceptance.test_mcp import Served, mcp_client, ok, refused, served  # noqa: F401 (the fixture)
from tests.helpers import make_world


async def _figures(served: Served) -> dict[str, float]:  # noqa: F811
    text = (await served.admin.client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("ainarres_verb_calls_total{"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def test_the_same_calls_count_the_same_over_both_faces(served: Served) -> None:  # noqa: F811
    """Over HTTP every verb request is counted, a 422 and a 401 included, and `usage` is never counted
    (metrics.verb_of has no usage). Over MCP `usage` is counted (as verb "usage"), while a call refused before
    verbs.run — invalid arguments, no held task, the new `next` marker's refusal — is not counted at all."""
    w = await make_world(served.admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "one"))["task"]["id"]
    c = await dev.claim("dev")
    await dev.verb(task, "advance", lease=c["lease"]["id"], to="review")

    before = await _figures(served)
    await dev.call("POST", f"/v1/tasks/{task}/usage", {"input_tokens": 5})  # HTTP usage
    await dev.call("POST", f"/v1/tasks/{task}/advance", {"lease": "not-a-lease", "to": "review"})  # HTTP 422
    http = {k: v - before.get(k, 0.0) for k, v in (await _figures(served)).items() if v != before.get(k, 0.0)}

    before = await _figures(served)
    async with mcp_client(served.url, dev.token) as client:
        ok(await client.call_tool("record_usage", {"task_id": task, "input_tokens": 5}))  # MCP usage
        refused(await client.call_tool("advance", {"task_id": task, "lease": "not-a-lease", "to": "review"}),
                "invalid")  # MCP invalid
    mcp = {k: v - before.get(k, 0.0) for k, v in (await _figures(served)).items() if v != before.get(k, 0.0)}
    assert http == mcp, f"HTTP counted {http}; MCP counted {mcp}"
