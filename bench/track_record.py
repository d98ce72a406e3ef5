"""How long the track-record read takes beside a large event history (issue 10: milliseconds at 1M events).

Not a test: it prints figures. Run alone (nothing else on the machine's cores):

    .venv/bin/python -m bench.track_record --events 1000000

It seeds `--events` transition events and a full set of rollup rows (families × roles × 16 shards, as a
database migrated from the live credit holds them: the transition statement wrote one shard per backend
before migration 0017) and marks those events credited (flow_fold.credit_from, as 0017 does), so that the
rows are what a fold leaves (ADR 0019: the fold credits later events into shard 0). Then it runs the
`track_record_page` statement (the read behind GET /v1/track-record, after its fold) `--reads` times and
prints its p50 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg

from ainarres_api.server.db import migrate
from ainarres_api.server.db.queries import Q
from bench.harness import pct, start_postgres

SETUP = """
INSERT INTO projects (slug) VALUES ('tr') ON CONFLICT DO NOTHING;
INSERT INTO workflows (key, version) VALUES ('tr', 1) ON CONFLICT DO NOTHING;
INSERT INTO stages (workflow_id, key, position, initial)
SELECT id, 'a', 0, true FROM workflows WHERE key = 'tr' ON CONFLICT DO NOTHING;
INSERT INTO lanes (project_id, key, workflow_id)
SELECT p.id, 'tr', w.id FROM projects p, workflows w WHERE p.slug = 'tr' AND w.key = 'tr' ON CONFLICT DO NOTHING;
"""


async def run(dsn: str, events: int, families: int, reads: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.apply(conn)
        await conn.execute(SETUP)
        task = await conn.fetchval("""
            INSERT INTO tasks (lane_id, stage_id, state, title)
            SELECT l.id, s.id, 'done', 'history' FROM lanes l JOIN stages s ON s.workflow_id = l.workflow_id
             WHERE l.key = 'tr' RETURNING id""")
        await conn.execute("""
            INSERT INTO families (key) SELECT 'fam' || g FROM generate_series(1, $1::int) g ON CONFLICT DO NOTHING""",
                           families)
        t0 = time.perf_counter()
        await conn.execute("""
            INSERT INTO events (task_id, type, actor, family, data)
            SELECT $1, 'transition', 'ghost', 'fam' || (1 + g % $3::int),
                   jsonb_build_object('kind', CASE WHEN g % 4 = 0 THEN 'reject' ELSE 'advance' END,
                                      'from', 'a', 'to', 'a', 'role', 'role:r' || (g % 4))
              FROM generate_series(1, $2::int) g""", task, events, families)
        await conn.execute("""
            INSERT INTO track_counts (family_key, role, shard, deliveries, rejects_made, rejected, reviewed,
                                      reviewed_cross, stage_hist)
            SELECT 'fam' || f, 'role:r' || r, s, 1000, 100, 50, 900, 400,
                   jsonb_build_object('20', 10, '24', 30, '28', 5)
              FROM generate_series(1, $1::int) f, generate_series(0, 3) r, generate_series(0, 15) s
            ON CONFLICT DO NOTHING""", families)
        # The seeded counts stand for the seeded events: credited before the fold took over (migration 0017).
        await conn.execute("UPDATE flow_fold SET credit_from = (SELECT coalesce(max(id), 0) FROM events) WHERE id = 1")
        await conn.execute("ANALYZE")
        print(f"seeded {events} events in {time.perf_counter() - t0:.1f}s; {families} families × 4 roles × 16 shards")
        plan = json.loads(await conn.fetchval("EXPLAIN (FORMAT JSON) " + Q["track_record_page"],
                                              None, None, None, None, 101))
        print("plan reads events:", '"events"' in json.dumps(plan))
        lat = []
        for _ in range(reads):
            s = time.perf_counter()
            await conn.fetch(Q["track_record_page"], None, None, None, None, 101)
            lat.append(time.perf_counter() - s)
        print(f"track_record_page, {families} families: p50 {pct(lat, 50) * 1000:.2f} ms, "
              f"p99 {pct(lat, 99) * 1000:.2f} ms over {reads} reads")
    finally:
        await conn.close()


def main(events: int, families: int, reads: int) -> None:
    dsn, server = start_postgres()
    try:
        asyncio.run(run(dsn, events, families, reads))
    finally:
        server.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--families", type=int, default=50)
    ap.add_argument("--reads", type=int, default=200)
    a = ap.parse_args()
    main(a.events, a.families, a.reads)
