import time, asyncio
import pytest
import tests.acceptance.test_drain as m
from ainarres_api.db.queries import Q

@pytest.mark.parametrize("mut", ["none", "nolock"])
async def test_scratch(admin, db, mut, monkeypatch):
    if mut == "nolock":
        monkeypatch.setitem(Q, "claim_pick", Q["claim_pick"].replace("FOR UPDATE SKIP LOCKED", ""))
    t = time.monotonic()
    orig_gather = asyncio.gather
    try:
        await m.test_twenty_agents_drain_a_thousand_tasks(admin, db)
        print(mut, "PASSED", time.monotonic() - t)
    except BaseException as e:
        print(mut, "FAILED", type(e).__name__, str(e)[:300], time.monotonic() - t)
