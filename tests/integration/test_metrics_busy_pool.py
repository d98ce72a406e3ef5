"""/metrics through a busy pool (api/oversight.py, metrics.unreadable, ainarres_database_up), as a review probed
it."""

from __future__ import annotations

import contextlib


async def test_a_busy_pool_is_not_a_database_down(app, admin, client, db):
    """The scrape's pool.acquire and query run under asyncio.timeout(5); a TimeoutError is taken as
    an outage: `ainarres_database_up 0` and the queue's gauges dropped, while the database answers (here: every
    pooled connection busy — a burst of verbs, slow statements). An alert on ainarres_database_up == 0 fires for a
    saturated pool or a slow scrape."""
    assert await db.fetchval("SELECT 1") == 1
    st = app.state.ainarres
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(st.pool.get_max_size()):
            await stack.enter_async_context(st.pool.acquire())
        text = (await client.get("/metrics")).text
    assert await db.fetchval("SELECT 1") == 1  # the database was up all along
    assert "ainarres_database_up 0.0" not in text, "a busy pool reported as the database down"
