"""The track record's counters folded from events on read (ADR 0019, migration 0017): events committed out of id
order are credited once, the counts credited live before the migration are not credited again, the rework-cap
block charges the producer, and the stage-time histogram fills from advances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

import ainarres_api.server.db as dbpkg
from ainarres_api.server.db.queries import Q
from ainarres_api.server.services.auth import OVERSIGHT
from tests.helpers import Api, make_world, review_flow

LOOP = review_flow("loop")  # todo → review → done; review rejects back to todo; no rework cap
COUNTS = ("deliveries", "rejects_made", "rejected", "reviewed", "reviewed_cross")


async def record(admin: Api) -> dict[tuple[str, str | None], tuple[int, ...]]:
    """GET /v1/track-record as {(family, role): counts}, for the families that moved work here."""
    out = {}
    for fam in (await admin.get("/v1/track-record"))["items"]:
        for r in fam["roles"]:
            out[(fam["key"], r["role"])] = tuple(r[k] for k in COUNTS)
    return out


async def held(api: Api, task_id: str) -> str:
    c = await api.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task_id, c
    lease: str = c["lease"]["id"]
    return lease


async def raw_transition(conn: asyncpg.Connection, task_id: str, lease: str, kind: str, to: str, sub: str,
                         family: str) -> int:
    """The transition statement itself, on a connection of the caller's (so that its transaction stays open)."""
    jti = await conn.fetchval("SELECT jti FROM tokens WHERE sub = $1", sub)
    r = await conn.fetchrow(Q["transition"], task_id, lease, kind, to, "x", "[]", jti, sub, family,
                            sorted(OVERSIGHT), False)
    assert r["verdict"] == "ok", r["verdict"]
    event_id: int = await conn.fetchval("SELECT max(id) FROM events WHERE task_id = $1", task_id)
    return event_id


async def test_events_committed_out_of_id_order_are_credited_exactly_once(admin, db, dsn):
    w = await make_world(admin, workflow=LOOP)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    a = (await maker.create("dev", "a"))["task"]["id"]
    await maker.verb(a, "advance", lease=await held(maker, a), to="review")
    b = (await maker.create("dev", "b"))["task"]["id"]
    lease_a, lease_b = await held(reviewer, a), await held(maker, b)
    assert await record(admin) == {("cheap", "role:dev"): (1, 0, 0, 0, 0)}

    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        late = first.transaction()
        await late.start()
        # The reject takes the lower id and stays uncommitted; the advance takes the next id and commits.
        rejected = await raw_transition(first, a, lease_a, "reject", "todo", reviewer.sub, "reviewers")
        async with second.transaction():
            advanced = await raw_transition(second, b, lease_b, "advance", "review", maker.sub, "cheap")
        assert rejected < advanced
        assert await record(admin) == {("cheap", "role:dev"): (2, 0, 0, 0, 0)}
        assert await db.fetchval("SELECT count(*) FROM flow_gaps WHERE id = $1", rejected) == 1  # remembered
        await late.commit()
    finally:
        await first.close()
        await second.close()
    expected = {("cheap", "role:dev"): (2, 0, 1, 1, 1), ("reviewers", "role:reviewer"): (0, 1, 0, 0, 0)}
    assert await record(admin) == expected
    assert await record(admin) == expected  # a read folds nothing twice
    assert await db.fetchval("SELECT count(*) FROM flow_gaps") == 0


async def test_counts_credited_live_before_the_migration_are_not_credited_again(admin, db):
    """A database migrated to 0017 holds the counts the transition statement credited live, while the fold's
    own mark lags: the migration's mark makes the fold credit only the events after it."""
    w = await make_world(admin, workflow=LOOP)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    await admin.call("PUT", "/v1/governance/policies/workflow/loop", {"strike_threshold": 10}, 200)
    t = (await maker.create("dev", "x"))["task"]["id"]
    await maker.verb(t, "advance", lease=await held(maker, t), to="review")
    await reviewer.verb(t, "reject", lease=await held(reviewer, t), to="todo", reason="no")
    await maker.verb(t, "advance", lease=await held(maker, t), to="review")
    assert await db.fetchval("SELECT folded_to FROM flow_fold") == 0  # nothing read yet: the fold lags

    # What the old transition statement credited for these three moves, in its backends' shards, ...
    await db.execute("""
        INSERT INTO track_counts (family_key, role, shard, deliveries, rejects_made, rejected, reviewed,
                                  reviewed_cross, stage_hist)
        VALUES ('cheap', 'role:dev', 3, 1, 0, 1, 1, 1, '{"2": 1}'),
               ('cheap', 'role:dev', 11, 1, 0, 0, 0, 0, '{"2": 1}'),
               ('reviewers', 'role:reviewer', 7, 0, 1, 0, 0, 0, '{}')""")
    # ... and the mark migration 0017 sets.
    migration = (Path(dbpkg.__file__).parent / "migrations" / "0017_track_record_folded.sql").read_text()
    await db.execute(migration[migration.index("UPDATE flow_fold SET credit_from"):])
    old = {("cheap", "role:dev"): (2, 0, 1, 1, 1), ("reviewers", "role:reviewer"): (0, 1, 0, 0, 0)}
    assert await record(admin) == old
    # The flow rollups still fold every event (their own mark), the history before the takeover included.
    assert await db.fetchval("SELECT sum(advances) FROM family_flow WHERE family = 'cheap'") == 2

    await reviewer.verb(t, "advance", lease=await held(reviewer, t), to="done")  # after the mark: credited
    new = {("cheap", "role:dev"): (2, 0, 1, 2, 2), ("reviewers", "role:reviewer"): (1, 1, 0, 0, 0)}
    assert await record(admin) == new
    # The fold writes its own shard (0) beside the shards the live credit wrote; the read sums them.
    hists = await db.fetch("SELECT shard, stage_hist::text FROM track_counts WHERE family_key = 'reviewers' "
                           "ORDER BY shard")
    assert [h["shard"] for h in hists] == [0, 7] and hists[1]["stage_hist"] == "{}"
    assert sum(json.loads(hists[0]["stage_hist"]).values()) == 1  # the reviewer's one delivery


async def test_a_rework_cap_block_charges_the_producer(admin, db):
    w = await make_world(admin, workflow=review_flow("capped", review_stage={"max_rework": 0}))
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    await admin.call("PUT", "/v1/governance/policies/workflow/capped", {"strike_threshold": 10}, 200)
    t = (await maker.create("dev", "x"))["task"]["id"]
    await maker.verb(t, "advance", lease=await held(maker, t), to="review")
    out = await reviewer.verb(t, "reject", lease=await held(reviewer, t), to="todo", reason="no")
    assert out["task"]["state"] == "blocked" and out["event"]["type"] == "blocked"
    # The producer is rejected and reviewed (by another family); the reviewer made no reject (the cap turned
    # it into a block), but the move is on its record in the role it exercised, with nothing counted.
    expected = {("cheap", "role:dev"): (1, 0, 1, 1, 1), ("reviewers", "role:reviewer"): (0, 0, 0, 0, 0)}
    assert await record(admin) == expected
    assert await record(admin) == expected


async def test_the_stage_time_histogram_fills_from_advances(admin, db):
    w = await make_world(admin, workflow=LOOP)
    maker = await w.agent("cheap")
    for n in range(2):
        await maker.create("dev", f"t{n}")
    moved: list[dict[str, Any]] = []
    for _ in range(2):
        c = await maker.claim("dev")
        t, lease = c["task"]["id"], c["lease"]["id"]
        # The DB clock instead of a sleep: the task entered its stage 1000 s ago.
        await db.execute("UPDATE tasks SET stage_entered_at = now() - interval '1000 seconds' WHERE id = $1", t)
        moved.append(await maker.verb(t, "advance", lease=lease, to="review"))
        await record(admin)  # each fold merges into the row the previous one wrote
    for m in moved:
        assert 1000 <= m["event"]["data"]["stage_seconds"] < 1100
    bucket = await db.fetchval("SELECT stage_bucket(1000)")
    hists = await db.fetch("SELECT stage_hist::text FROM track_counts WHERE family_key = 'cheap' AND role = 'role:dev'")
    assert [h["stage_hist"] for h in hists] == [f'{{"{bucket}": 2}}']
    cheap = next(f for f in (await admin.get("/v1/track-record"))["items"] if f["key"] == "cheap")
    median = cheap["roles"][0]["median_stage_seconds"]
    assert abs(median - 1000) / 1000 < 0.1
