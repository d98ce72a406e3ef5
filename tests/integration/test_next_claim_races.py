"""One move, at most one `next` hold (tasks.sql `prior` / verdict `again`, api/verbs.py `_then_claim`,
services/claiming.py), where a review of the fourth session of 2026-12-05 probed it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from tests.helpers import Api, make_world, wait_for_lock
from tests.integration.test_verbs import held

WOKEN_WITHIN = 20


def _request(agent: Api, path: str, body: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    raw = json.dumps(body).encode()
    return raw, {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "server": ("ainarres.test", 80), "client": ("127.0.0.1", 50001),
                 "headers": [(b"host", b"ainarres.test"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(raw)).encode()),
                             (b"authorization", f"Bearer {agent.token}".encode())]}


async def test_a_retry_that_leaves_while_its_next_is_answered_again_keeps_the_hold(app, admin, db, dsn):
    """claim_waiting gives back what a claim took for a client that left (`gone`). With verdict `again` the
    claim took nothing: the hold it answers is the first call's. A retried move (its `next` waiting) whose client
    leaves while its claim runs gives back the FIRST call's `next` hold — the task another answer handed out,
    whose lease then fails with lease_lost: one move, zero holds."""
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "the next one")
    body = {"lease": lease, "to": "review", "note": "done", "next": {"lane": "dev", "wait_seconds": 30}}
    first = await dev.verb(task["id"], "advance", **body)
    nxt = first["next"]
    assert nxt["code"] == "claimed", first

    # The same move sent again (a retry), whose client goes away while its `next` claim is being made.
    raw, scope = _request(dev, f"/v1/tasks/{task['id']}/advance", body)
    leave, left = asyncio.Event(), asyncio.Event()
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await leave.wait()
        left.set()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        pass

    holder, observer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM agents WHERE sub = $1 FOR UPDATE", dev.sub)  # the claim waits on it
        served = asyncio.create_task(app(scope, receive, send))
        await wait_for_lock(observer, None, "the retry's next claim", query=Q["claim"])
        leave.set()
        await left.wait()
        await tx.rollback()
        await asyncio.wait_for(served, WOKEN_WITHIN)
    finally:
        await holder.close()
        await observer.close()

    state = await db.fetchrow("SELECT state, holder FROM tasks WHERE id = $1::uuid", nxt["task"]["id"])
    assert (state["state"], state["holder"]) == ("held", dev.sub), \
        f"the first call's `next` hold was given back by its retry: {dict(state)}"
    r = await dev.call("POST", f"/v1/tasks/{nxt['task']['id']}/heartbeat", {"lease": nxt["lease"]["id"]})
    assert r.status_code == 200, r.text
