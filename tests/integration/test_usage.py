"""Usage and spend (issue 10, item 5): the `usage` verb's anchoring, refusals and replays; every spend,
anomaly and flow view's fields; unknown spend reads null, never zero."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from ainarres_api.server.services import spend as spend_svc
from tests.helpers import Api, World, make_world


async def build(dev: Api, lane: str = "dev") -> tuple[str, dict[str, Any]]:
    """A task `dev` created, claimed and advanced to review; returns its id and the advance's event."""
    tid = (await dev.create(lane))["task"]["id"]
    c = await dev.claim(lane)
    assert c["task"]["id"] == tid, c
    moved = await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review")
    return tid, moved["event"]


async def review(rev: Api, tid: str, lane: str = "dev", to: str = "done") -> dict[str, Any]:
    c = await rev.claim(lane)
    assert c["task"]["id"] == tid, c
    if to == "done":
        return (await rev.verb(tid, "advance", lease=c["lease"]["id"], to="done"))["event"]
    return (await rev.verb(tid, "reject", lease=c["lease"]["id"], to=to, reason="again"))["event"]


async def rows(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM usage"))


async def usage(api: Api, tid: str, expect: int = 200, **body: Any) -> Any:
    return await api.post(f"/v1/tasks/{tid}/usage", body, expect)


async def test_usage_is_anchored_to_the_task_and_the_transition_it_paid_for(admin: Api, db: asyncpg.Connection):
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    tid, advance = await build(dev)
    out = await usage(dev, tid, model="small-1", input_tokens=1200, output_tokens=300, cost="0.0125",
                      currency="USD", wall_seconds=12.5, event=advance["id"])
    u = out["usage"]
    assert out["code"] == "ok" and "replay" not in out
    assert u["task_id"] == tid and u["event_id"] == advance["id"] and u["lane"] == "dev"
    assert u["family"] == "cheap" and u["agent"] == dev.sub and u["recorded_by"] == dev.sub
    assert u["role"] == "role:dev" and u["model"] == "small-1"
    assert (u["input_tokens"], u["output_tokens"], u["cost"], u["currency"], u["wall_seconds"]) == \
        (1200, 300, "0.0125", "USD", 12.5)
    # Without an anchor: the task, and the role of the stage the recorder last claimed it in.
    done = await review(rev, tid)
    out = await usage(rev, tid, model="judge-2", output_tokens=80)
    assert out["usage"]["event_id"] is None and out["usage"]["role"] == "role:reviewer"
    assert out["usage"]["cost"] is None and out["usage"]["currency"] is None  # unknown, not zero
    assert out["usage"]["input_tokens"] is None
    # An overseer records on a family's behalf: the anchor event names the payer.
    out = await usage(admin, tid, model="judge-2", cost="0.5", currency="EUR", event=done["id"])
    assert out["usage"]["family"] == "reviewers" and out["usage"]["agent"] == rev.sub
    assert out["usage"]["role"] == "role:reviewer" and out["usage"]["recorded_by"].startswith("admin")
    out = await usage(admin, tid, cost="1", currency="USD", family="cheap")
    assert out["usage"]["family"] == "cheap" and out["usage"]["agent"] is None
    assert await rows(db) == 4


async def test_refusals_change_nothing(admin: Api, db: asyncpg.Connection, client: Any):
    w = await make_world(admin)
    dev, other, rev = await w.agent("cheap"), await w.agent("capable"), await w.agent("reviewers")
    tid, advance = await build(dev)
    tid2, advance2 = await build(other)
    cases: list[tuple[Api, str, dict[str, Any], int, str]] = [
        (other, tid, {"model": "m"}, 403, "not_eligible"),  # never held it
        (dev, tid, {"model": "m", "family": "capable"}, 403, "not_eligible"),  # on behalf needs the seat
        (dev, tid, {"event": advance2["id"]}, 422, "invalid"),  # another task's event
        (rev, tid2, {"model": "m"}, 403, "not_eligible"),
        (dev, tid, {"input_tokens": -1}, 422, "invalid"),
        (dev, tid, {"input_tokens": 10**13}, 422, "invalid"),
        (dev, tid, {"cost": "0.1"}, 422, "invalid"),  # cost without currency
        (dev, tid, {"currency": "USD"}, 422, "invalid"),
        (dev, tid, {"cost": "-1", "currency": "USD"}, 422, "invalid"),
        (dev, tid, {"cost": "0.0000001", "currency": "USD"}, 422, "invalid"),  # past 6 decimal places
        (dev, tid, {"cost": "1", "currency": "usd"}, 422, "invalid"),
        (dev, tid, {"cost": "1", "currency": "DOLLARS"}, 422, "invalid"),
        (dev, tid, {"model": "x" * 201}, 422, "invalid"),
        (dev, tid, {"wall_seconds": -0.5}, 422, "invalid"),
        (dev, tid, {"colour": "red"}, 422, "invalid"),
        (dev, "00000000-0000-4000-8000-000000000000", {"model": "m"}, 404, "not_found"),
        (admin, tid, {"family": "nobody"}, 404, "not_found"),
        (admin, tid, {"event": advance["id"], "family": "capable"}, 422, "invalid"),  # the anchor is cheap's
        (Api(client, None), tid, {"model": "m"}, 401, "unauthenticated"),
    ]
    for api, task, body, status, code in cases:
        r = await api.post(f"/v1/tasks/{task}/usage", body, status)
        assert r["code"] == code, (body, r)
        assert r["detail"], r
    # An event of the task, but another agent's: not the caller's to anchor to.
    await review(rev, tid)
    ev = (await dev.get(f"/v1/tasks/{tid}/events"))["items"][-1]
    assert ev["actor"] == rev.sub
    assert (await usage(dev, tid, 422, event=ev["id"]))["code"] == "invalid"
    assert await rows(db) == 0
    assert await db.fetchval("SELECT count(*) FROM spend_totals") == 0


async def test_replays_are_idempotent(admin: Api, db: asyncpg.Connection):
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid, advance = await build(dev)
    report = {"model": "m", "input_tokens": 5, "cost": "0.01", "currency": "USD", "event": advance["id"]}
    first = await usage(dev, tid, **report)
    again = await usage(dev, tid, **report)
    assert again["replay"] is True and again["usage"] == first["usage"]
    assert await rows(db) == 1
    other = await usage(dev, tid, **{**report, "input_tokens": 6})  # a different report: a new record
    assert "replay" not in other and await rows(db) == 2
    keyed = await usage(dev, tid, **report, idempotency_key="run-1")  # a key makes an equal report count
    assert "replay" not in keyed and await rows(db) == 3
    assert (await usage(dev, tid, **report, idempotency_key="run-1"))["replay"] is True
    clash = await usage(dev, tid, 409, **{**report, "cost": "0.02"}, idempotency_key="run-1")
    assert clash["code"] == "conflict"
    assert await rows(db) == 3
    totals = await db.fetchrow("SELECT reports, cost, input_tokens FROM spend_totals WHERE family = 'cheap'")
    assert (totals["reports"], str(totals["cost"].normalize()), totals["input_tokens"]) == (3, "0.03", 16)


async def deliveries(w: World) -> tuple[Api, Api, Api]:
    """cheap delivers two tasks (reviewed to done), capable one, reviewers review all three; returns them."""
    cheap, capable, rev = await w.agent("cheap"), await w.agent("capable"), await w.agent("reviewers")
    for dev in (cheap, cheap, capable):
        tid, adv = await build(dev)
        await usage(dev, tid, model="m", input_tokens=100, output_tokens=10, cost="1" if dev is cheap else "10",
                    currency="USD", wall_seconds=2, event=adv["id"])
        await review(rev, tid)
    return cheap, capable, rev


async def test_spend_views_fields_and_unknown_spend_is_null(admin: Api):
    w = await make_world(admin)
    cheap, _, _ = await deliveries(w)
    fams = {r["family"]: r for r in (await admin.get("/v1/spend", params={"group": "family"}))["items"]}
    assert set(fams) == {"cheap", "capable", "reviewers"}
    c = fams["cheap"]
    assert c == {"family": "cheap", "role": None, "lane": None, "currency": "USD", "reports": 2, "cost": "2",
                 "input_tokens": 200, "output_tokens": 20, "token_reports": 2, "wall_seconds": 4.0,
                 "last_at": c["last_at"], "deliveries": 2, "releases": 0, "cost_per_delivery": "1"}
    # The reviewers delivered three tasks and reported nothing: unknown, never zero.
    r = fams["reviewers"]
    assert r["deliveries"] == 3 and r["reports"] == 0
    assert all(r[k] is None for k in ("currency", "cost", "input_tokens", "output_tokens", "wall_seconds",
                                      "last_at", "cost_per_delivery"))
    roles = {x["role"]: x for x in (await admin.get("/v1/spend", params={"group": "role"}))["items"]}
    assert roles["role:dev"]["cost"] == "12" and roles["role:dev"]["deliveries"] == 3
    assert roles["role:dev"]["cost_per_delivery"] == "4" and roles["role:reviewer"]["cost"] is None
    lanes = (await admin.get("/v1/spend", params={"group": "lane"}))["items"]
    assert [(x["lane"], x["cost"], x["deliveries"], x["cost_per_delivery"]) for x in lanes] == [("dev", "12", 3, "4")]
    fr = {(x["family"], x["role"]): x for x in (await admin.get("/v1/spend", params={"group": "family_role"}))["items"]}
    assert fr[("capable", "role:dev")]["cost_per_delivery"] == "10"
    assert fr[("reviewers", "role:reviewer")]["cost"] is None
    # Tokens without a cost: a row of its own with a null currency and cost.
    tid, adv = await build(cheap)
    await usage(cheap, tid, input_tokens=7, event=adv["id"])
    cheap_rows = [x for x in (await admin.get("/v1/spend"))["items"] if x["family"] == "cheap"]
    assert [(x["currency"], x["cost"], x["input_tokens"]) for x in cheap_rows] == [(None, None, 7), ("USD", "2", 200)]
    # Per task, newest first, paged.
    monitor_fam = await admin.post("/v1/families", {"key": "watch", "features": ["seat:monitor"]}, 201)
    assert monitor_fam["key"] == "watch"
    monitor = await w.agent("watch")
    pages, cursor = [], None
    while True:
        page = await monitor.get("/v1/spend/tasks", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        pages.append(page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    flat = [x for p in pages for x in p]
    assert len(flat) == 4 and len(pages) == 2
    assert flat[0]["task_id"] == tid and flat[0]["cost"] is None and flat[0]["delivered"] is False
    assert {x["family"] for x in flat[1:]} == {"cheap", "capable"} and all(x["delivered"] for x in flat[1:])
    assert set(flat[1]) == {"task_id", "title", "lane", "stage", "state", "delivered", "family", "currency",
                            "reports", "cost", "input_tokens", "output_tokens", "wall_seconds", "first_at", "last_at"}
    one = await admin.get("/v1/spend/tasks", params={"task": tid})
    assert [x["task_id"] for x in one["items"]] == [tid]
    # Agents without a seat see none of it.
    for path in ("/v1/spend", "/v1/spend/tasks", "/v1/spend/anomalies", "/v1/flow"):
        assert (await cheap.get(path, 403))["code"] == "not_eligible"


async def test_spend_beside_the_track_record(admin: Api, db: asyncpg.Connection):
    w = await make_world(admin)
    await deliveries(w)
    fams, out = await spend_svc.beside_track_record(db)
    assert set(out) == {("cheap", "role:dev"), ("capable", "role:dev")}  # reviewers: unknown, absent
    assert out[("cheap", "role:dev")] == [{"currency": "USD", "reports": 2, "cost": "2", "input_tokens": 200,
                                          "output_tokens": 20, "wall_seconds": 4.0, "deliveries": 2,
                                          "cost_per_delivery": "1"}]
    assert set(fams) == {"cheap", "capable"} and fams["capable"][0]["cost"] == "10"


async def test_the_track_record_shows_spend_beside_it_and_null_where_nothing_was_reported(admin: Api):
    w = await make_world(admin)
    await deliveries(w)
    fams = {f["key"]: f for f in (await admin.get("/v1/track-record"))["items"]}
    cheap = fams["cheap"]
    assert cheap["delivered"] == 2 and cheap["spend"] == [
        {"currency": "USD", "reports": 2, "cost": "2", "input_tokens": 200, "output_tokens": 20,
         "wall_seconds": 4.0, "deliveries": 2, "cost_per_delivery": "1"}]
    dev = {r["role"]: r for r in cheap["roles"]}["role:dev"]
    assert dev["spend"] == cheap["spend"]
    assert fams["capable"]["spend"][0]["cost_per_delivery"] == "10"
    rev = fams["reviewers"]
    assert rev["delivered"] == 3 and rev["spend"] is None  # reported nothing: unknown, never zero
    assert all(r["spend"] is None for r in rev["roles"])


async def test_anomalies(admin: Api, db: asyncpg.Connection):
    w = await make_world(admin)
    cheap, _, _ = await deliveries(w)  # cheap: 1 per delivery, capable: 10
    out = await admin.get("/v1/spend/anomalies")
    assert out["thresholds"] == {"multiple": 3.0, "spin_leases": 3.0, "spin_progress": 10, "releases": 3}
    over = out["overspending"]
    assert [(o["family"], o["role"], o["currency"]) for o in over] == [("capable", "role:dev", "USD")]
    assert over[0] == {"family": "capable", "role": "role:dev", "currency": "USD", "cost": "10", "deliveries": 1,
                       "cost_per_delivery": "10", "role_norm": "1", "peers": 1, "ratio": 10.0}
    assert out["costly_tasks"] == [] and out["spinning"] == [] and out["repeated_releases"] == []
    # A task far above the family's own norm: cheap spends 9 more on a new task (norm (2 + 9) / 3).
    tid, adv = await build(cheap)
    await usage(cheap, tid, cost="9", currency="USD", event=adv["id"])
    costly = (await admin.get("/v1/spend/anomalies", params={"multiple": 2}))["costly_tasks"]
    assert [(c["task_id"], c["family"], c["cost"], c["delivered"]) for c in costly] == [(tid, "cheap", "9", False)]
    assert costly[0]["family_cost_per_delivery"] == "3.666667" and costly[0]["ratio"] == 2.45
    # Spinning: a hold with many progress reports, and one kept alive past several leases.
    spin = (await cheap.create("dev", "spin"))["task"]["id"]
    c = await cheap.claim("dev")
    assert c["task"]["id"] == spin
    for i in range(3):
        await cheap.verb(spin, "progress", lease=c["lease"]["id"], note=f"still going {i}")
    out = await admin.get("/v1/spend/anomalies", params={"spin_progress": 3})
    assert [(s["task_id"], s["family"], s["progress_reports"]) for s in out["spinning"]] == [(spin, "cheap", 3)]
    assert (await admin.get("/v1/spend/anomalies"))["spinning"] == []
    await db.execute("UPDATE tasks SET held_since = now() - interval '4 minutes' WHERE id = $1", spin)  # lease 60 s
    s = (await admin.get("/v1/spend/anomalies"))["spinning"]
    assert len(s) == 1 and s[0]["holder"] == cheap.sub and s[0]["leases_spanned"] >= 4 and s[0]["lease_seconds"] == 60
    # Repeated releases: given back twice by cheap (the second escalates it to tier:2), then by capable.
    await cheap.verb(spin, "advance", lease=c["lease"]["id"], to="review")
    rel = (await cheap.create("dev", "hard"))["task"]["id"]
    for _ in range(2):
        c = await cheap.claim("dev")
        assert c["task"]["id"] == rel
        await cheap.verb(rel, "release", lease=c["lease"]["id"], reason="too hard")
    out = await admin.get("/v1/spend/anomalies", params={"releases": 2})
    assert [(r["task_id"], r["releases"], r["released_by"]) for r in out["repeated_releases"]] == \
        [(rel, 2, ["cheap"])]
    assert set(out["repeated_releases"][0]) == {"task_id", "title", "lane", "stage", "state", "releases", "attempts",
                                                "last_release_at", "released_by"}
    assert (await admin.get("/v1/spend/anomalies"))["repeated_releases"] == []
    fams = {r["family"]: r for r in (await admin.get("/v1/spend"))["items"] if r["currency"] == "USD"}
    assert fams["cheap"]["releases"] == 2


async def test_flow_throughput_and_lead_time_folds_late_commits(admin: Api, db: asyncpg.Connection):
    w = await make_world(admin)
    await deliveries(w)
    out = await admin.get("/v1/flow")
    assert out["bucket"] == "hour" and out["since"]
    [point] = out["items"]
    assert point["lane"] == "dev" and point["finished"] == 3 and point["advances"] == 6
    assert point["rejects"] == 0 and point["releases"] == 0
    assert point["lead_time_avg_seconds"] > 0 and point["lead_time_max_seconds"] >= point["lead_time_avg_seconds"]
    day = await admin.get("/v1/flow", params={"bucket": "day", "lane": "dev"})
    assert [p["finished"] for p in day["items"]] == [3]
    assert (await admin.get("/v1/flow", params={"lane": "nowhere"}))["items"] == []
    assert (await admin.get("/v1/flow", params={"since": "2026-01-01T00:00:00"}, expect=422))["code"] == "invalid"
    # An event whose transaction took its id before a later one committed is folded once it commits.
    cheap, rev = await w.agent("cheap"), await w.agent("reviewers")
    late_tid, _ = await build(cheap)
    tx = db.transaction()
    await tx.start()
    await db.execute("INSERT INTO events (task_id, type, actor, family, data) VALUES ($1, 'transition', 'x', "
                     "'reviewers', '{\"kind\": \"advance\", \"from\": \"review\", \"to\": \"done\"}')", late_tid)
    tid, _ = await build(cheap)
    await review(rev, tid)
    assert (await admin.get("/v1/flow"))["items"][0]["finished"] == 4
    assert await db.fetchval("SELECT count(*) FROM flow_gaps") == 1  # the id taken, not yet committed
    await tx.commit()
    assert (await admin.get("/v1/flow"))["items"][0]["finished"] == 5
    assert await db.fetchval("SELECT count(*) FROM flow_gaps") == 0


async def test_the_fold_goes_in_batches_and_waits_for_another(admin: Api, db: asyncpg.Connection, dsn: str):
    w = await make_world(admin)
    await deliveries(w)  # 3 tasks: created, claimed ×2, transition ×2 each, plus usage (not an event)
    events = await db.fetchval("SELECT count(*) FROM events")
    assert await spend_svc.fold(db, batch=4, max_batches=1) == 4
    assert await db.fetchval("SELECT coalesce(sum(finished), 0) FROM flow_hours") < 3
    # Another read folding now: this one waits for it (so reads made together agree), then folds the rest.
    other = await asyncpg.connect(dsn)
    pid = await db.fetchval("SELECT pg_backend_pid()")
    try:
        tx = other.transaction()
        await tx.start()
        await other.fetchval("SELECT folded_to FROM flow_fold WHERE id = 1 FOR UPDATE")
        waiting = asyncio.create_task(spend_svc.fold(db, batch=4))
        for _ in range(2000):  # until the fold is seen waiting on the lock (the event), bounded
            if await other.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid):
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the fold never waited for the other read's lock")
        assert not waiting.done()
        await tx.commit()
        assert await waiting == events - 4
    finally:
        await other.close()
    assert [p["finished"] for p in (await admin.get("/v1/flow"))["items"]] == [3]
    assert await spend_svc.fold(db) == 0


async def test_a_report_sent_again_while_the_first_is_in_flight_is_recorded_once(admin: Api, db: asyncpg.Connection):
    """Without a key, a report equal to the caller's last one on the task is a replay — also when the retry races
    its original on another connection (found by a concurrency review: 2–8 rows for 8 copies sent at once)."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tids = [(await build(dev))[0] for _ in range(4)]
    report = {"model": "m", "input_tokens": 7, "cost": "0.5", "currency": "USD"}
    answers = await asyncio.gather(*(usage(dev, tid, **report) for tid in tids for _ in range(8)))
    per_task = {r["task_id"]: n for r in await db.fetch("SELECT task_id::text, count(*) AS n FROM usage GROUP BY 1")
                for n in [r["n"]]}
    assert per_task == dict.fromkeys(tids, 1)
    assert sum(1 for a in answers if "replay" not in a) == len(tids)
