"""Long-poll claims: what wakes a waiting claim, whom it wakes, and what waiting costs.

The safety sweep is pushed out to minutes here, so a waiter that claims before the test's
generous timeout can only have been woken by the change under test. Waits are on the hub's
observable state (who is waiting, who is idle), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from ainarres_api.server.app import create_app
from ainarres_api.server.db.queries import Q
from ainarres_api.server.services import auth
from ainarres_api.server.services import spend as spend_svc
from ainarres_api.server.services.wake import Recorded, Wake
from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import DEV_WORKFLOW, Api, Clock, make_world, wait_for_lock

# Long enough that a missing wake-up shows as a timeout of the test, not as a claim at the deadline.
WAIT = 60
WOKEN_WITHIN = 20


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                    pool_max_size=10, wake_sweep_seconds=300)


def hub_of(app: Any) -> Wake:
    hub: Wake = app.state.ainarres.wake
    return hub


async def waiting_claim(app: Any, agent: Api, **body: Any) -> asyncio.Task[Any]:
    """Start a long-poll claim and return once it is blocked waiting (its first claim was empty)."""
    hub = hub_of(app)
    before = {id(w) for w in hub.waiters}
    task = asyncio.create_task(agent.claim(wait_seconds=body.pop("wait_seconds", WAIT), **body))

    def blocked(h: Wake) -> bool:
        # ...and the sweep its new routes asked for is over, so only the change under test can wake it.
        return (any(id(w) not in before and w.idle for w in h.waiters) and not h.sweeping) or task.done()

    await hub.until(blocked, WOKEN_WITHIN)
    assert not task.done(), task.result()
    return task


async def woken(task: asyncio.Task[Any]) -> Any:
    return await asyncio.wait_for(task, WOKEN_WITHIN)


def workflow(**todo: Any) -> dict[str, Any]:
    wf = copy.deepcopy(DEV_WORKFLOW)
    wf["stages"][0].update(todo)
    return wf


async def test_wakes_on_create(app, admin):
    w = await make_world(admin)
    maker, taker = await w.agent("cheap"), await w.agent("cheap")
    waiter = await waiting_claim(app, taker)
    made = await maker.create("dev", "new work")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]


async def test_wakes_on_advance_and_on_reject(app, admin):
    w = await make_world(admin)
    dev, dev2, rev = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    lease = (await dev.claim())["lease"]["id"]
    reviewer = await waiting_claim(app, rev)
    await dev.verb(tid, "advance", lease=lease, to="review")
    got = await woken(reviewer)
    assert got["code"] == "claimed" and got["task"]["id"] == tid and got["task"]["stage"] == "review"
    developer = await waiting_claim(app, dev2)
    await rev.verb(tid, "reject", lease=got["lease"]["id"], to="todo", reason="tests fail")
    back = await woken(developer)
    assert back["code"] == "claimed" and back["task"]["id"] == tid and back["task"]["stage"] == "todo"


async def test_an_advance_waiting_for_its_next_task_wakes_others_first(app, admin):
    # The move commits before `next` long-polls: a reviewer waiting for it is woken at once, not when the
    # developer's own wait answers; then the developer's wait is answered by new work.
    w = await make_world(admin)
    dev, maker, rev = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    lease = (await dev.claim())["lease"]["id"]
    reviewer = await waiting_claim(app, rev)
    hub = hub_of(app)
    before = {id(x) for x in hub.waiters}
    advance = asyncio.create_task(dev.verb(tid, "advance", lease=lease, to="review", next={"wait_seconds": WAIT}))
    got = await woken(reviewer)
    assert got["code"] == "claimed" and got["task"]["id"] == tid and not advance.done()
    await hub.until(lambda h: any(id(x) not in before and x.idle for x in h.waiters) and not h.sweeping,
                    WOKEN_WITHIN)
    assert not advance.done()
    new_id = (await maker.create("dev", "next one"))["task"]["id"]
    out = await woken(advance)
    assert out["task"]["stage"] == "review" and out["next"]["code"] == "claimed"
    assert out["next"]["task"]["id"] == new_id


async def test_wakes_on_release(app, admin):
    w = await make_world(admin)
    a, b = await w.agent("cheap"), await w.agent("cheap")
    tid = (await a.create("dev", "x"))["task"]["id"]
    lease = (await a.claim())["lease"]["id"]
    waiter = await waiting_claim(app, b)
    await a.verb(tid, "release", lease=lease, reason="not mine")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == tid and got["task"]["attempts"] == 1


async def test_wakes_on_unblock(app, admin):
    w = await make_world(admin)
    a, b = await w.agent("cheap"), await w.agent("cheap")
    tid = (await a.create("dev", "x"))["task"]["id"]
    lease = (await a.claim())["lease"]["id"]
    await a.verb(tid, "block", lease=lease, reason="needs a human")
    waiter = await waiting_claim(app, b)
    await admin.verb(tid, "unblock", note="go on")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == tid


async def test_wakes_when_dependency_is_done(app, admin):
    w = await make_world(admin)
    dev, dev2, rev = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
    first = (await dev.create("dev", "first"))["task"]["id"]
    lease = (await dev.claim())["lease"]["id"]
    await dev.verb(first, "advance", lease=lease, to="review")
    later = (await dev.create("dev", "later", depends_on=[first]))["task"]
    assert later["state"] == "waiting"
    r = await rev.claim()
    waiter = await waiting_claim(app, dev2)
    await rev.verb(first, "advance", lease=r["lease"]["id"], to="done")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == later["id"]


async def test_wakes_on_escalation_by_release(app, admin):
    w = await make_world(admin)  # todo: escalate_after 2, max_attempts 3
    cheap, capable = await w.agent("cheap"), await w.agent("capable")
    tid = (await cheap.create("dev", "x"))["task"]["id"]
    await cheap.verb(tid, "release", lease=(await cheap.claim())["lease"]["id"])
    lease = (await cheap.claim())["lease"]["id"]
    waiter = await waiting_claim(app, capable)
    rel = await cheap.verb(tid, "release", lease=lease)
    assert "tier:2" in rel["task"]["required_features"]
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == tid


async def test_wakes_on_escalation_made_by_a_recovering_claim(app, admin, db):
    w = await make_world(admin, workflow=workflow(escalate_after=1))
    cheap, cheap2, capable = await w.agent("cheap"), await w.agent("cheap"), await w.agent("capable")
    # Make the tier:2 route exist beforehand, so the wake-up must name it (no "routes changed").
    parked = (await cheap.create("dev", "tier 2 work", required_features=["tier:2"]))["task"]["id"]
    await capable.verb(parked, "block", lease=(await capable.claim())["lease"]["id"], reason="park")
    tid = (await cheap.create("dev", "x"))["task"]["id"]
    await cheap.claim()
    waiter = await waiting_claim(app, capable)
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", tid)
    # cheap2's claim recovers the lease, which escalates the task out of its reach.
    assert (await cheap2.claim())["code"] == "empty"
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == tid
    assert "tier:2" in got["task"]["required_features"]


async def test_wakes_when_a_lease_it_could_recover_expires(app, admin):
    w = await make_world(admin, workflow=workflow(lease_seconds=1))
    a, b = await w.agent("cheap"), await w.agent("cheap")
    tid = (await a.create("dev", "x"))["task"]["id"]
    await a.claim()
    waiter = await waiting_claim(app, b)
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == tid
    assert got["event"]["data"]["reclaimed"] is True and got["task"]["attempts"] == 1


async def test_only_eligible_waiters_wake(app, admin, db):
    w = await make_world(admin)
    dev, dev2, rev = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
    # Both routes exist before anyone waits: creating a route wakes every waiter once.
    tid = (await dev.create("dev", "held"))["task"]["id"]
    lease = (await dev.claim())["lease"]["id"]
    await dev.verb(tid, "advance", lease=lease, to="review")
    lease = (await rev.claim())["lease"]["id"]
    await rev.verb(tid, "reject", lease=lease, to="todo", reason="again")
    await dev.claim()
    review_route = await db.fetchval("SELECT r.id FROM routes r JOIN stages s ON s.id = r.stage_id "
                                     "WHERE s.key = 'review'")
    reviewer = await waiting_claim(app, rev, wait_seconds=WAIT)
    developer = await waiting_claim(app, dev2)
    hub = hub_of(app)
    (rev_waiter,) = [x for x in hub.waiters if x.routes == {review_route}]
    made = await dev.create("dev", "new")
    got = await woken(developer)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]
    assert rev_waiter.wakeups == 0 and rev_waiter.idle and not reviewer.done()
    reviewer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reviewer


async def test_ineligible_waiter_gets_empty_at_its_deadline(app, admin):
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    reviewer = await waiting_claim(app, rev, wait_seconds=0.5)
    await dev.create("dev", "not for reviewers")
    got = await woken(reviewer)
    assert (got["code"], got["task"], got["lease"]) == ("empty", None, None)
    assert got["pending"] == {"held": 0, "waiting": 0, "blocked": 0}  # nothing it may take is even coming


async def test_empty_at_the_deadline(app, admin):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    got = await asyncio.wait_for(dev.claim(wait_seconds=0.5), WOKEN_WITHIN)
    assert got["code"] == "empty" and got["task"] is None
    assert hub_of(app).waiting == 0


@pytest.fixture
async def replica(settings: Settings, dsn: str, app: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """A second app instance on the same database (another replica)."""
    other = create_app(settings, dsn=dsn)
    async with LifespanManager(other, startup_timeout=30, shutdown_timeout=30):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other),
                                     base_url="http://replica.test") as c:
            yield other, c


async def test_survives_a_dropped_listen_connection_across_replicas(app, admin, replica, db):
    _other, other_client = replica
    w = await make_world(admin)
    a, b = await w.agent("cheap"), await w.agent("cheap")
    maker = Api(other_client, (await w.agent("cheap")).token)
    hub = hub_of(app)

    waiter = await waiting_claim(app, a)
    made = await maker.create("dev", "from the other replica")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]

    waiter = await waiting_claim(app, b)
    (mine,) = hub.waiters
    generation, seen = hub.generation, mine.wakeups
    assert await db.fetchval("SELECT pg_terminate_backend($1)", hub.listener_pid)
    # Reconnected, and the one catch-up wake-up that follows it has been answered.
    await hub.until(lambda h: h.generation > generation and mine.wakeups > seen and mine.idle, WOKEN_WITHIN)
    assert not waiter.done()
    made = await maker.create("dev", "after the drop")
    got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]


def post_request(agent: Api, path: str, fields: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """The body and ASGI scope of a POST by `agent`, for driving the app with a hand-made receive (a client that
    goes away)."""
    body = json.dumps(fields).encode()
    return body, {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                  "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                  "root_path": "", "server": ("ainarres.test", 80), "client": ("127.0.0.1", 50000),
                  "headers": [(b"host", b"ainarres.test"), (b"content-type", b"application/json"),
                              (b"content-length", str(len(body)).encode()),
                              (b"authorization", f"Bearer {agent.token}".encode())]}


def _waiting_claim_request(agent: Api) -> tuple[bytes, dict[str, Any]]:
    """A waiting claim by `agent` (post_request)."""
    return post_request(agent, "/v1/claims", {"wait_seconds": WAIT})


async def test_client_disconnect_frees_the_waiter(app, admin, db):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    hub = hub_of(app)

    # A client that goes away: the server must notice without anything being claimed.
    body, scope = _waiting_claim_request(dev)
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    served = asyncio.create_task(app(scope, receive, send))
    await hub.until(lambda h: any(x.idle for x in h.waiters) or served.done(), WOKEN_WITHIN)
    assert hub.waiting == 1 and not served.done()
    gone.set()
    await asyncio.wait_for(served, WOKEN_WITHIN)
    assert hub.waiting == 0
    made = (await dev.create("dev", "nobody is waiting"))["task"]
    assert (await dev.get(f"/v1/tasks/{made['id']}"))["state"] == "ready"

    # A cancelled request (the in-process client going away) frees its waiter too.
    other = await w.agent("cheap")
    await dev.claim()  # takes `made`, so `other` has to wait
    task = await waiting_claim(app, other)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.waiting == 0


async def leave_while_claiming(app: Any, agent: Api, dsn: str,
                               request: tuple[bytes, dict[str, Any]] | None = None) -> None:
    """A request by `agent` that claims (a waiting claim, unless `request` is another: post_request) whose client
    leaves while the claim is being made: the claim is held up on the agent's row until the disconnect has been
    delivered, then let through."""
    body, scope = request or _waiting_claim_request(agent)
    leave, left = asyncio.Event(), asyncio.Event()
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await leave.wait()
        left.set()  # the disconnect is delivered in this step; the server's watch of it ends with it
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        pass

    holder, observer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM agents WHERE sub = $1 FOR UPDATE", agent.sub)  # the claim waits on it
        served = asyncio.create_task(app(scope, receive, send))
        await wait_for_lock(observer, None, "the claim", query=Q["claim"])
        leave.set()
        await left.wait()
        await tx.rollback()  # the claim goes on, for a client that has left
        await asyncio.wait_for(served, WOKEN_WITHIN)
    finally:
        await holder.close()
        await observer.close()


async def test_a_task_claimed_for_a_client_that_left_is_given_back(app, admin, db, dsn):
    """A waiting claim whose client leaves while the claim is being made: nobody would receive the task, and it
    would wait out its lease held by no one (found by a review: an idle `ainarres work` stopped with Ctrl-C left one
    such task). Given back as it was: ready, its attempts unchanged, a `released` event saying why, which no
    rollup counts as a release (found by the next review: the family looked as if it kept giving work back)."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.get("/v1/me")  # the agent's row exists
    task = (await dev.create("dev", "for whoever stays"))["task"]
    for _ in range(2):
        await leave_while_claiming(app, dev, dsn)
    now = await admin.get(f"/v1/tasks/{task['id']}")
    assert now["state"] == "ready" and now["holder"] is None and now["attempts"] == 0, now
    events = (await admin.get(f"/v1/tasks/{task['id']}/events"))["items"]
    assert [e["type"] for e in events] == ["created", "claimed", "released", "claimed", "released"], events
    assert all(e["data"]["counted"] is False and "left" in e["data"]["reason"] for e in events[2::2])
    await spend_svc.fold(db)
    assert await db.fetchval("SELECT coalesce(sum(releases), 0) FROM family_flow") == 0
    assert await db.fetchval("SELECT coalesce(sum(releases), 0) FROM flow_hours") == 0
    assert await db.fetchval("SELECT count(*) FROM task_flow WHERE task_id = $1", uuid.UUID(task["id"])) == 0
    assert (await dev.claim())["task"]["id"] == task["id"]  # claimable at once


async def test_a_thousand_waiters_hold_no_more_connections_than_the_pool(app, admin, db, settings):
    w = await make_world(admin)
    maker = await w.agent("cheap")
    await maker.create("dev", "makes the route")  # creating a route wakes every waiter once
    await maker.claim()
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        tokens = [(await auth.mint(conn, st.signer, family="cheap", ttl_seconds=3600))["token"]
                  for _ in range(1000)]
    hub = hub_of(app)
    agents = [Api(admin.client, t) for t in tokens]
    claims = [asyncio.create_task(a.claim(wait_seconds=WAIT)) for a in agents]
    try:
        await hub.until(lambda h: sum(x.idle for x in h.waiters) == 1000 or any(c.done() for c in claims),
                        120)
        assert not any(c.done() for c in claims)
        others = await db.fetchval("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        # The pool, plus the hub's two own connections (LISTEN, and NOTIFY once anything was written).
        assert others <= settings.pool_max_size + 2, others
        await maker.create("dev", "one for a thousand")
        done, _ = await asyncio.wait(claims, timeout=WOKEN_WITHIN, return_when=asyncio.FIRST_COMPLETED)
        assert [d.result()["code"] for d in done] == ["claimed"]
        # One task woke one waiter, and the one it passed the wake-up on to.
        assert sum(x.wakeups for x in hub.waiters) <= 1
    finally:
        for c in claims:
            c.cancel()
        await asyncio.gather(*claims, return_exceptions=True)
    assert hub.waiting == 0


async def test_a_waiting_claim_learns_of_its_revoked_token_within_a_tick(app, admin):
    w = await make_world(admin)
    rev = await w.agent("reviewers")  # nothing for it in the lane yet: its claim waits
    waiting = asyncio.ensure_future(rev.call("POST", "/v1/claims", {"lane": "dev", "wait_seconds": 30}))
    hub = hub_of(app)
    for _ in range(2000):  # until the claim waits in the hub (no event tells a test this; bounded)
        if hub.waiting:
            break
        await asyncio.sleep(0.01)
    tok = await admin.get("/v1/tokens")
    jti = next(t["jti"] for t in tok["items"] if t["sub"] == rev.sub)
    await admin.delete(f"/v1/tokens/{jti}")
    r = await asyncio.wait_for(waiting, 10)  # well before its 30 s deadline: within the event clock's tick
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated", r.text


@pytest.mark.parametrize("how", ["denial", "features"])
async def test_a_waiting_claim_that_can_no_longer_match_is_refused_then(app, admin, how):
    """A denial (or a family's features changed) wakes every waiter; one whose features now never match is refused
    at once (403 not_eligible), as a claim that can never match is at its first look — not left waiting out its
    wait_seconds (found by a review across replicas)."""
    w = await make_world(admin)
    taker = await w.agent("cheap")
    waiter = await waiting_claim(app, taker, lane="dev", expect=None)
    if how == "denial":
        await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "paused"}, 201)
    else:
        await admin.call("PATCH", "/v1/families/cheap", {"features": ["lane:dev"]}, 200)
    got = await woken(waiter)
    assert got["code"] == "not_eligible" and "role:dev" in got["detail"], got


async def test_a_reflexive_ban_refuses_the_banned_familys_waiting_claims(app, admin):
    """A reject that bans the producer's family from the role (its strikes reach the threshold) wakes that
    family's waiting claims, which are refused then: nothing they could ever take is left."""
    w = await make_world(admin)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": 1}, 200)
    # The waiter waits in another lane, so that the rejected task coming back to `dev` does not wake it.
    await admin.post("/v1/lanes", {"project": "acme", "key": "side", "workflow": DEV_WORKFLOW["key"]}, 201)
    await admin.call("PATCH", "/v1/families/cheap", {"features": ["lane:dev", "lane:side", "role:dev"]}, 200)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    tid = (await dev.create("dev", "work"))["task"]["id"]
    c = await dev.claim("dev")
    await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
    c = await rev.claim("dev")
    waiter = await waiting_claim(app, await w.agent("cheap"), lane="side", expect=None)
    await rev.verb(tid, "reject", lease=c["lease"]["id"], to="todo", reason="no tests")
    got = await woken(waiter)
    assert got["code"] == "not_eligible" and "role:dev" in got["detail"], got


@pytest.fixture
async def channel(dsn: str) -> AsyncIterator[tuple[str, asyncpg.Connection, asyncio.Queue[str]]]:
    """A channel of the test's own, and a plain LISTEN connection on it that records what is said there
    (not a replica: it never speaks unless the test makes it)."""
    name = f"wake_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(name, lambda *msg: heard.put_nowait(msg[3]))
    yield name, conn, heard
    await conn.close()


@contextlib.asynccontextmanager
async def hub_on(dsn: str, channel: str, clock: Clock) -> AsyncIterator[Wake]:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    hub = Wake(pool, listen_dsn=dsn, notify_dsn=dsn, channel=channel, sweep_seconds=100, clock=clock)
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()
        await pool.close()


def made_ready(*routes: int) -> Recorded:
    return Recorded(Counter(routes))


async def said(heard: asyncio.Queue[str]) -> str:
    return await asyncio.wait_for(heard.get(), WOKEN_WITHIN)


async def publish_at(hub: Wake, clock: Clock, now: float, made: Recorded) -> None:
    """Move the clock to `now` (once the hub's flush under way, if any, is done: what it sent, the test may have heard
    already), publish what was made ready, and return once the hub has flushed what it queued."""
    await hub.until(lambda h: not h.flushing, WOKEN_WITHIN)
    clock.now = now
    flushes = hub.flushes
    hub.publish(made)
    await hub.until(lambda h: h.flushes > flushes, WOKEN_WITHIN)


async def said_all(heard: asyncio.Queue[str], *expected: str) -> None:
    """The next notifications are these, in any order (two sessions' notifications interleave as they commit)."""
    assert sorted([await said(heard) for _ in expected]) == sorted(expected)


async def left_alone(hub: Wake, clock: Clock, heard: asyncio.Queue[str]) -> None:
    """Take a new hub, with nobody else on its channel, to three intervals of listening (clock 300)."""
    me = hub.id
    assert await said(heard) == f"{me}|hello:100"
    # Listening for less than three intervals: the answers to its hello may still be on their way, so it tells.
    # The heartbeat due once an interval has passed goes first; it hears it come back.
    await publish_at(hub, clock, 150, made_ready(7))
    assert [await said(heard), await said(heard)] == [f"{me}|here:100", f"{me}|7"]
    assert not hub.alone
    await hub.until(lambda h: h.echoes >= 2, WOKEN_WITHIN)  # its hello and this heartbeat came back
    # Three intervals listening, its own words heard, nobody else: what it makes ready wakes its own waiters
    # only. The route is not sent (the test's next notification arrives right after the heartbeat).
    await publish_at(hub, clock, 300, made_ready(8))
    assert hub.alone
    assert await said(heard) == f"{me}|here:100"


async def test_a_lone_process_keeps_its_wake_ups_to_itself_until_another_replica_is_heard(dsn, channel):
    name, conn, heard = channel
    clock = Clock()
    async with hub_on(dsn, name, clock) as hub:
        me = hub.id
        await left_alone(hub, clock, heard)
        # A rescan, which no sweep makes up for, is still sent.
        await publish_at(hub, clock, 300, Recorded(rescan=True))
        assert await said(heard) == f"{me}|*"

        # Another replica says hello: it is answered, and told from then on.
        await conn.execute("SELECT pg_notify($1, 'peer|hello')", name)
        assert await said(heard) == "peer|hello"
        assert await said(heard) == f"{me}|here:100"
        assert not hub.alone and hub.peers == 1
        hub.publish(made_ready(9))
        assert await said(heard) == f"{me}|9"

        # A replica unheard for three intervals is gone (judged by this process's interval: it sent none).
        echoes = hub.echoes
        await publish_at(hub, clock, 450, made_ready(10))
        assert [await said(heard), await said(heard)] == [f"{me}|here:100", f"{me}|10"]
        await hub.until(lambda h: h.echoes > echoes, WOKEN_WITHIN)
        await publish_at(hub, clock, 600, made_ready(11))
        assert await said(heard) == f"{me}|here:100"
        assert hub.peers == 0 and hub.alone
        await conn.execute("SELECT pg_notify($1, 'probe')", name)
        assert await said(heard) == "probe"


async def test_a_process_that_cannot_hear_tells_everything(dsn, channel, db):
    name, _conn, heard = channel
    clock = Clock()
    async with hub_on(dsn, name, clock) as hub:
        me = hub.id
        await left_alone(hub, clock, heard)

        # Its LISTEN connection drops: it reconnects, says hello again (replicas that started meanwhile do not know
        # it), and tells everything until it has listened three intervals more.
        generation = hub.generation
        assert await db.fetchval("SELECT pg_terminate_backend($1)", hub.listener_pid)
        await hub.until(lambda h: h.generation > generation, WOKEN_WITHIN)
        assert await said(heard) == f"{me}|hello:100"
        assert not hub.alone
        hub.publish(made_ready(3))
        assert await said(heard) == f"{me}|3"

        # Three intervals later nothing it said has come back (a half-open connection looks like this): it tells.
        await publish_at(hub, clock, 700, made_ready(4))
        await said_all(heard, f"{me}|here:100", f"{me}|4")


async def test_a_replica_is_judged_by_its_own_interval(dsn, channel):
    name, conn, heard = channel
    clock = Clock()
    async with hub_on(dsn, name, clock) as hub:
        assert await said(heard) == f"{hub.id}|hello:100"

        async def heard_at(now: float, payload: str) -> None:
            clock.now = now
            await conn.execute("SELECT pg_notify($1, $2)", name, payload)
            assert await said(heard) == payload
            await hub.until(lambda h: h.peers == 1, WOKEN_WITHIN)

        await heard_at(0, "slow|here:250")
        clock.now = 749
        assert hub.peers == 1  # three of its intervals, not of this process's
        clock.now = 750
        assert hub.peers == 0
        # A build before presence sends only route ids, and a word without a believable interval is not trusted:
        # both are judged by this process's interval.
        for payload in ("older|5", "odd|here:nan", "odd|here:1e9"):
            await heard_at(1000, payload)
            clock.now = 1299
            assert hub.peers == 1
            clock.now = 1300
            assert hub.peers == 0


async def test_replicas_that_know_each_other_keep_telling_each_other(dsn, channel):
    name, _conn, heard = channel
    clock = Clock()
    async with hub_on(dsn, name, clock) as first:
        assert await said(heard) == f"{first.id}|hello:100"
        async with hub_on(dsn, name, clock) as second:
            # The newcomer's hello is answered, so each knows the other at once.
            await said_all(heard, f"{second.id}|hello:100", f"{first.id}|here:100")
            await first.until(lambda h: h.peers == 1, WOKEN_WITHIN)
            await second.until(lambda h: h.peers == 1, WOKEN_WITHIN)
            # Their heartbeats keep it so past the start-up grace, when a lone process would stop telling.
            heard_by = first.heard_others, second.heard_others
            await publish_at(first, clock, 200, made_ready(1))
            await publish_at(second, clock, 200, made_ready(2))
            await said_all(heard, f"{first.id}|here:100", f"{first.id}|1", f"{second.id}|here:100", f"{second.id}|2")
            # Each has heard the other's heartbeat and route (at 200) before the clock moves on.
            await first.until(lambda h: h.heard_others >= heard_by[0] + 2, WOKEN_WITHIN)
            await second.until(lambda h: h.heard_others >= heard_by[1] + 2, WOKEN_WITHIN)
            clock.now = 350
            assert first.peers == 1 and second.peers == 1
            assert not first.alone and not second.alone
            await publish_at(second, clock, 350, made_ready(5))
            await said_all(heard, f"{second.id}|here:100", f"{second.id}|5")


async def test_a_retry_racing_its_first_waiting_next_never_takes_a_second_task(app, admin, db):
    """Found by a review: the first call's `next` is a long poll still waiting when the same move comes again (an
    MCP client that timed out; an HTTP client retrying on a new connection while the old one stays open). The
    retry replays the move and waits too; when work comes, one of the two claims takes it and the other answers
    that same hold (`replay: true`), decided under the agent's lock — never two tasks for one move."""
    w = await make_world(admin)
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    dev, maker = await w.agent("cheap"), await w.agent("cheap")
    tid = (await dev.create("dev", "x"))["task"]["id"]
    lease = (await dev.claim())["lease"]["id"]
    hub = hub_of(app)
    body = {"lease": lease, "to": "review", "next": {"lane": "dev", "wait_seconds": WAIT}}

    async def waiting_move() -> asyncio.Task[Any]:
        before = {id(x) for x in hub.waiters}
        move = asyncio.create_task(dev.verb(tid, "advance", **body))
        await hub.until(lambda h: (any(id(x) not in before and x.idle for x in h.waiters) and not h.sweeping)
                        or move.done(), WOKEN_WITHIN)
        assert not move.done(), move.result()
        return move

    first = await waiting_move()
    retry = await waiting_move()
    made = [(await maker.create("dev", t))["task"]["id"] for t in ("b", "c")]
    one, two = await woken(first), await woken(retry)
    assert two["replay"] is True and two["event"] == one["event"]
    assert one["next"]["task"]["id"] == two["next"]["task"]["id"] in made
    assert one["next"]["lease"] == two["next"]["lease"]
    assert sorted(bool(x["next"].get("replay")) for x in (one, two)) == [False, True]
    held = await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1 AND state = 'held'", dev.sub)
    assert held == 1
