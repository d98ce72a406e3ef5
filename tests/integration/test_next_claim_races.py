"""One move, at most one `next` hold (tasks.sql `prior` / verdict `again`, api/verbs.py `_then_claim`,
services/claiming.py), where a review of the fourth session of 2026-12-05 probed it."""

from __future__ import annotations

from tests.helpers import make_world
from tests.integration.test_longpoll import leave_while_claiming, post_request
from tests.integration.test_verbs import held


async def test_a_retry_that_leaves_while_its_next_is_answered_again_keeps_the_hold(app, admin, db, dsn):
    """claim_waiting gives back what a claim took for a client that left (`gone`). With verdict `again` the claim
    took nothing: the hold it answers is the first call's, and stays (found by a review: a retried move whose client
    left while its `next` claim ran gave back the first call's hold — one move, zero holds)."""
    w = await make_world(admin)
    dev, task, lease = await held(w)
    await dev.create("dev", "the next one")
    body = {"lease": lease, "to": "review", "note": "done", "next": {"lane": "dev", "wait_seconds": 30}}
    first = await dev.verb(task["id"], "advance", **body)
    nxt = first["next"]
    assert nxt["code"] == "claimed", first

    # The same move sent again (a retry), whose client goes away while its `next` claim is being made.
    await leave_while_claiming(app, dev, dsn, post_request(dev, f"/v1/tasks/{task['id']}/advance", body))

    state = await db.fetchrow("SELECT state, holder FROM tasks WHERE id = $1::uuid", nxt["task"]["id"])
    assert (state["state"], state["holder"]) == ("held", dev.sub), \
        f"the first call's `next` hold was given back by its retry: {dict(state)}"
    r = await dev.call("POST", f"/v1/tasks/{nxt['task']['id']}/heartbeat", {"lease": nxt["lease"]["id"]})
    assert r.status_code == 200, r.text
