"""Spend and flow views at volume (issue 10): a benchmark, not a test. Never run by the suite.

    .venv/bin/python -m bench.spend                  # 1M events (200k tasks × 5), 200k usage reports
    .venv/bin/python -m bench.spend --tasks 2000     # a quick look

Seeds a history in the `loop` lane (a → b → done): per task created, claimed, advance a → b, claimed,
advance b → done, and one usage report per task recorded through the usage statement's rollups. Then,
over HTTP with an overseer's token: the first read (which folds the whole history into the flow
rollups, in bounded batches over several reads), and the steady-state latency of every spend view
(median, p95 of N reads, each folding only what happened since the last). Prints JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
import httpx

from bench import harness

VIEWS: dict[str, tuple[str, dict[str, Any]]] = {
    "spend_family": ("/v1/spend", {"group": "family"}),
    "spend_family_role": ("/v1/spend", {"group": "family_role"}),
    "spend_lane": ("/v1/spend", {"group": "lane"}),
    "spend_tasks": ("/v1/spend/tasks", {"limit": 100}),
    "anomalies": ("/v1/spend/anomalies", {}),
    "flow_hour": ("/v1/flow", {"bucket": "hour"}),
    "flow_day": ("/v1/flow", {"bucket": "day"}),
}


async def seed(dsn: str, tasks: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SET session_replication_role = replica")  # FK triggers off for the bulk copy
        lane = await conn.fetchrow("SELECT l.id, l.workflow_id FROM lanes l WHERE l.key = 'big'")
        done = await conn.fetchval("SELECT id FROM stages WHERE workflow_id = $1 AND key = 'done'",
                                   lane["workflow_id"])
        await conn.execute("""
            INSERT INTO tasks (lane_id, stage_id, state, title, created_by, created_at)
            SELECT $1, $2, 'done', 'spend-bench', 'bench', now() - make_interval(secs => g * 7)
              FROM generate_series(1, $3::int) g""", lane["id"], done, tasks)
        await conn.execute("""
            INSERT INTO events (task_id, type, actor, family, data, created_at)
            SELECT t.id, k.type, 'bench-' || (hashtext(t.id::text) & 7), 'w_big', k.data,
                   t.created_at + make_interval(secs => k.n * 60)
              FROM tasks t
             CROSS JOIN (VALUES (0, 'created', '{"stage": "a"}'::jsonb),
                                (1, 'claimed', '{"stage": "a"}'),
                                (2, 'transition', '{"kind": "advance", "from": "a", "to": "b"}'),
                                (3, 'claimed', '{"stage": "b"}'),
                                (4, 'transition', '{"kind": "advance", "from": "b", "to": "done"}')) k (n, type, data)
             WHERE t.title = 'spend-bench'
             ORDER BY t.created_at, k.n""")
        await conn.execute("""
            INSERT INTO usage (task_id, lane_id, family, agent, role, model, input_tokens, output_tokens, cost,
                               currency, wall_seconds, recorded_by, recorded_by_family, request_hash, created_at)
            SELECT t.id, t.lane_id, 'w_big', 'bench', 'role:worker', 'm', 20000, 2000,
                   round((0.01 + (hashtext(t.id::text) & 1023) / 10000.0)::numeric, 6), 'USD', 30, 'bench',
                   'w_big', 'h', t.created_at
              FROM tasks t WHERE t.title = 'spend-bench'""")
        # The rollups the usage statement writes, as it would have written them.
        await conn.execute("""
            INSERT INTO spend_totals (family, role, lane_id, currency, reports, cost, input_tokens, output_tokens,
                                      token_reports, wall_seconds, last_at)
            SELECT family, role, lane_id, currency, count(*), sum(cost), sum(input_tokens), sum(output_tokens),
                   count(*), sum(wall_seconds), max(created_at)
              FROM usage GROUP BY family, role, lane_id, currency
            ON CONFLICT ON CONSTRAINT spend_totals_pkey DO NOTHING""")
        await conn.execute("""
            INSERT INTO task_spend (task_id, family, currency, lane_id, reports, cost, input_tokens, output_tokens,
                                    wall_seconds, first_at, last_at)
            SELECT task_id, family, currency, lane_id, 1, cost, input_tokens, output_tokens, wall_seconds,
                   created_at, created_at
              FROM usage WHERE recorded_by = 'bench'
            ON CONFLICT ON CONSTRAINT task_spend_pkey DO NOTHING""")
        await conn.execute("RESET session_replication_role")
        for table in ("tasks", "events", "usage", "spend_totals", "task_spend"):
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


def timed(http: httpx.Client, path: str, params: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = http.get(path, params=params)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=200_000, help="tasks seeded (5 events and 1 usage report each)")
    p.add_argument("--reads", type=int, default=30, help="reads per view for the steady-state figures")
    args = p.parse_args()
    dsn, server = harness.start_postgres()
    svc = harness.start_service(dsn)
    try:
        asyncio.run(harness.world(dsn, svc.base))
        asyncio.run(harness.reset_lane(dsn, "big"))
        t0 = time.perf_counter()
        asyncio.run(seed(dsn, args.tasks))
        print(json.dumps({"bench": "spend_seed", "tasks": args.tasks, "events": args.tasks * 5,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        token = asyncio.run(harness.mint(dsn, "admin", 1))[0]
        with httpx.Client(base_url=svc.base, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
            reads, t0 = 0, time.perf_counter()
            while True:  # catch-up: each read folds at most FOLD_BATCH × FOLD_MAX_BATCHES events
                timed(http, "/v1/flow", {})
                reads += 1
                folded = asyncio.run(_folded(dsn))
                if folded["behind"] == 0 or reads > 1000:
                    break
            print(json.dumps({"bench": "spend_catch_up", "reads": reads,
                              "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
            for name, (path, params) in VIEWS.items():
                lat = sorted(timed(http, path, params) for _ in range(args.reads))
                print(json.dumps({"bench": "spend_view", "view": name, "p50_ms": round(harness.pct(lat, 50), 2),
                                  "p95_ms": round(harness.pct(lat, 95), 2)}), flush=True)
    finally:
        svc.stop()
    del server


async def _folded(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        behind = await conn.fetchval("SELECT (SELECT coalesce(max(id), 0) FROM events) - folded_to FROM flow_fold")
        return {"behind": int(behind)}
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
