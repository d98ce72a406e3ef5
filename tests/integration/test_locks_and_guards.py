"""Issue 9, items 6 and 8: a verb waits for a row lock only so long (then 503 with Retry-After, its connection
returned, nothing changed); a guard runs under the statement time-out and one that runs long refuses."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world, review_flow


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1, pool_max_size=4,
                    lock_timeout_ms=300, statement_timeout_ms=400)


async def test_a_row_locked_by_someone_else_is_a_503_and_changes_nothing(admin: Api, dsn: str) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "locked"))["task"]["id"]
    free = (await dev.create("dev", "free", priority=-1))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    holder = await asyncpg.connect(dsn)  # an idle transaction sitting on the row
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", uuid.UUID(tid))
        for _ in range(6):  # more calls than the pool has connections: each gives its connection back
            r = await dev.call("POST", f"/v1/tasks/{tid}/progress", {"lease": lease, "note": "x"}, 503)
            assert r.json()["code"] == "unavailable" and r.headers["Retry-After"] == "1", r.text
        # The unlocked work is still served meanwhile.
        other = await w.agent("cheap")
        assert (await other.claim("dev"))["task"]["id"] == free
        await tx.rollback()
    finally:
        await holder.close()
    events = (await dev.get(f"/v1/tasks/{tid}/events"))["items"]
    assert [e["type"] for e in events] == ["created", "claimed"]  # nothing was applied
    assert (await dev.verb(tid, "progress", lease=lease, note="now"))["event"]["type"] == "progress"


async def test_a_guard_that_runs_long_refuses_and_changes_nothing(admin: Api, db: Any) -> None:
    flow = review_flow("slow")
    # Quadratic over the payload's array: every element against every element.
    flow["transitions"][0]["guard"] = "exists($.payload.xs[*] ? (@ + 100000 == $.payload.xs[*]))"
    w = await make_world(admin, workflow=flow, lane="slow")
    dev = await w.agent("cheap")
    tid = (await dev.create("slow", "big", payload={"xs": list(range(6000))}))["task"]["id"]
    lease = (await dev.claim("slow"))["lease"]["id"]
    r = await dev.call("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"})
    assert (r.status_code, r.json()["code"]) == (409, "guard_failed"), r.text[:300]
    assert "time-out" in r.json()["detail"]
    row = await db.fetchrow("SELECT state, holder FROM tasks WHERE id = $1", uuid.UUID(tid))
    assert row["state"] == "held" and row["holder"] == dev.sub


async def test_a_guard_comparing_times_with_and_without_a_zone_is_judged_not_a_crash(admin: Api, db: Any) -> None:
    """A date in the payload without a time zone, compared with one that has it: PostgreSQL's plain JSONPath
    functions raise on the conversion even when told to be silent, and every advance through that way out answered
    500 — for good, since a payload never changes (found by a review). The guard judges the times in UTC."""
    flow = review_flow("dated")
    flow["transitions"][0]["guard"] = '$.payload.due.datetime() < "2030-01-01T00:00:00+00:00".datetime()'
    w = await make_world(admin, workflow=flow, lane="dated")
    dev = await w.agent("cheap")
    for due, answer in (("2029-05-05", (200, "ok")), ("2031-05-05", (409, "guard_failed")),
                        ("2029-12-31T23:30:00-02:00", (409, "guard_failed")), ("2029-12-31T23:30:00", (200, "ok"))):
        tid = (await dev.create("dated", due, payload={"due": due}))["task"]["id"]
        lease = (await dev.claim("dated"))["lease"]["id"]
        r = await dev.call("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"})
        assert (r.status_code, r.json()["code"]) == answer, (due, r.text[:300])
        if answer[0] == 409:  # parked, out of the next claim's way
            await dev.verb(tid, "block", lease=lease, reason="the guard refused")
