"""The claim and the advance/reject of an agent in order are one statement each, authentication
included (migrations 0007–0009, ADR 0010); whatever is not in order still gets its precise answer."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.services import tasks
from tests.helpers import Api, make_world


class Recording:
    """A connection that notes every statement the service sends through it."""

    def __init__(self, conn: Any) -> None:
        self._c, self.sent = conn, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetch(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self._c.execute(query, *args)


def _names(sent: list[str]) -> list[str]:
    by_text = {text: name for name, text in Q.items()}
    return [by_text.get(q, q) for q in sent]


async def test_a_claim_and_an_advance_are_one_statement_each(app: Any, admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    first = (await dev.create("dev", "opens the review route"))["task"]["id"]
    c = await dev.claim("dev")
    await dev.verb(first, "advance", lease=c["lease"]["id"], to="review")  # a new route: the statement path
    tid = (await dev.create("dev", "one trip"))["task"]["id"]
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        rec = Recording(conn)
        await tasks.stage_card(conn, await conn.fetchval("SELECT stage_id FROM tasks WHERE id = $1",
                                                         uuid.UUID(tid)))  # the card cache, warmed
        out = await tasks.claim_as(rec, st.signer, dev.token, "dev", st.limits)
        assert out["code"] == "claimed" and out["task"]["id"] == tid
        assert _names(rec.sent) == ["claim_by_token"]
        rec.sent.clear()
        moved = await tasks.transition_as(rec, st.signer, dev.token, uuid.UUID(tid), uuid.UUID(out["lease"]["id"]),
                                          "advance", "review", "built", [])
        assert moved["task"]["stage"] == "review" and moved["event"]["data"]["note"] == "built"
        assert _names(rec.sent) == ["transition_by_token"]


async def test_an_agent_due_a_touch_is_recorded_by_the_statement_path(app: Any, admin: Api,
                                                                       db: asyncpg.Connection) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "x")
    await db.execute("UPDATE agents SET last_seen_at = now() - interval '1 hour' WHERE sub = $1", dev.sub)
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        rec = Recording(conn)
        out = await tasks.claim_as(rec, st.signer, dev.token, "dev", st.limits)
    assert out["code"] == "claimed"
    assert _names(rec.sent)[:3] == ["claim_by_token", "resolve_principal", "agent_touch"]
    assert await db.fetchval("SELECT last_seen_at > now() - interval '1 minute' FROM agents WHERE sub = $1",
                             dev.sub)


async def test_a_revoked_token_with_a_bad_body_is_refused_as_unauthenticated(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    c = await dev.claim("dev")
    jti = (await admin.get("/v1/tokens", params={"family": "cheap"}))["items"][0]["jti"]
    await admin.delete(f"/v1/tokens/{jti}")
    for path, body in (("/v1/claims", {"lane": 7}), (f"/v1/tasks/{tid}/advance", {"lease": "nope"}),
                       (f"/v1/tasks/{tid}/reject", {"lease": c["lease"]["id"], "to": "todo"})):
        r = await dev.call("POST", path, body)
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated", (path, r.text)
    # And with a well-formed body the statement path words the same refusal.
    r = await dev.call("POST", f"/v1/tasks/{tid}/advance", {"lease": c["lease"]["id"], "to": "review"})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert (await admin.get(f"/v1/tasks/{tid}"))["state"] == "held"
