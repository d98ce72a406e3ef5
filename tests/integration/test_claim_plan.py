"""The claim stays an index probe at any backlog: EXPLAIN the claim statement over 200k tasks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.db.queries import Q
from tests.helpers import Api, make_world

BACKLOG = 200_000

# Seeded rows copy the lane, stage, route and required features of a template task made through
# the API, so the routes and their bundles are exactly what the service builds. Of every 20 rows,
# 15 wait ready and 4 are held under a live lease, in routes the claimer may not take and at a
# priority above everything it may take; 1 is held under a lease that ran out, also out of reach.
SEED = """
INSERT INTO tasks (lane_id, stage_id, route_id, state, title, priority, required_features, holder,
                   lease_id, lease_expires_at, held_since, available_at)
SELECT tp.lane_id, tp.stage_id, tp.route_id, CASE WHEN g % 20 < 15 THEN 'ready' ELSE 'held' END,
       'backlog', 100 + g % 7, tp.required_features,
       CASE WHEN g % 20 >= 15 THEN 'ghost' END,
       CASE WHEN g % 20 >= 15 THEN '00000000-0000-4000-8000-000000000000'::uuid END,
       CASE WHEN g % 20 < 15 THEN NULL
            WHEN g % 20 = 19 THEN now() - make_interval(secs => g % 5000 + 1)
            ELSE now() + make_interval(secs => g % 5000 + 60) END,
       CASE WHEN g % 20 >= 15 THEN now() END,
       now() - make_interval(secs => g)
  FROM (SELECT * FROM tasks WHERE id = $1) tp
 CROSS JOIN generate_series(1, $2::int) g
"""


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _cte(root: dict[str, Any], name: str) -> list[dict[str, Any]]:
    subs = [n for n in _nodes(root) if n.get("Subplan Name") == f"CTE {name}"]
    assert len(subs) == 1, f"no CTE {name} in the plan (was the claim statement restructured?)"
    return list(_nodes(subs[0]))


def _assert_probes(plan_json: Any) -> None:
    doc = json.loads(plan_json) if isinstance(plan_json, str) else plan_json
    root = doc[0]["Plan"]
    seq = [n for n in _nodes(root) if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "tasks"]
    assert not seq, f"the claim scans the tasks table: {json.dumps(seq, indent=1)[:2000]}"
    # Each probe reads tasks only through its index, one range per eligible route (route_id = r.id),
    # so the rows of routes the claimer may not take are never read, whatever their priority.
    probes = (("ready", "tasks_ready", "route_id"), ("expired", "tasks_lease", "lease_expires_at"))
    for cte, index, key in probes:
        nodes = _cte(root, cte)
        where = f"CTE {cte}: {json.dumps(nodes)[:2000]}"
        indexed = [n for n in nodes if "Index Name" in n]
        assert [n["Index Name"] for n in indexed] == [index], where
        cond = indexed[0]["Index Cond"]
        assert "route_id = " in cond and key in cond, where
        on_tasks = [n for n in nodes if n.get("Relation Name") == "tasks"]
        assert len(on_tasks) == 1, where
        assert on_tasks[0]["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Heap Scan"), where
    # The ready probe takes its route's head in index order: nothing to sort.
    ready = _cte(root, "ready")
    assert not [n for n in ready if n["Node Type"] == "Sort"]
    assert [n["Node Type"] for n in ready if n.get("Relation Name") == "tasks"] == ["Index Scan"]


@pytest.fixture
async def seeded(admin: Api, db: asyncpg.Connection) -> list[int]:
    """A 200k backlog the claimer cannot touch, a few tasks it can; returns its eligible routes."""
    w = await make_world(admin)
    await admin.post("/v1/families",
                     {"key": "wide", "features": ["lane:dev", "role:dev", "area:backend"]}, 201)
    capable = await w.agent("capable")
    wide = await w.agent("wide")
    # Templates in routes the claimer (family wide) may NOT take: tier:2 work in todo and in review.
    in_review = (await capable.create("dev", "tpl", required_features=["tier:2"]))["task"]["id"]
    c = await capable.claim("dev")
    assert c["task"]["id"] == in_review
    await capable.verb(in_review, "advance", lease=c["lease"]["id"], to="review")
    out_of_reach = [in_review] + [(await capable.create("dev", "tpl", required_features=req))["task"]["id"]
                                  for req in (["tier:2"], ["area:backend", "tier:2"])]
    # A few tasks it may take, low priority, in two routes; one of them held under an expired lease.
    mine = [(await wide.create("dev", "mine", required_features=req, priority=-5))["task"]["id"]
            for req in ([], ["area:backend"], [], ["area:backend"])]
    c = await wide.claim("dev")
    assert c["task"]["id"] in mine
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 minute' WHERE id = $1",
                     c["task"]["id"])
    # Foreign-key triggers off for the bulk insert only: they would triple its cost, and every row
    # copies its references from a real task. Needs a superuser; without one it is just slower.
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await db.execute("SET session_replication_role = replica")
    for tid in out_of_reach:
        await db.execute(SEED, tid, BACKLOG // len(out_of_reach))
    await db.execute("RESET session_replication_role")
    await db.execute("ANALYZE tasks")
    feats = sorted((await wide.get("/v1/me"))["features"])
    routes = [r["id"] for r in await db.fetch(Q["eligible_routes"], feats, "dev")]
    not_mine = {r["route_id"] for r in await db.fetch(
        "SELECT DISTINCT route_id FROM tasks WHERE id = ANY ($1::uuid[])", out_of_reach)}
    assert len(routes) == 2 and len(not_mine) == 3 and not (set(routes) & not_mine)
    return routes


async def _claimer(db: asyncpg.Connection) -> tuple[str, str, str]:
    """The token (jti, sub, family) of the claimer, family wide: the claim statement reads its features."""
    jti, sub, family = await db.fetchrow("SELECT t.jti, t.sub, t.family_key FROM tokens t "
                                         "JOIN agents a ON a.sub = t.sub WHERE t.family_key = 'wide'")
    return str(jti), sub, family


async def test_the_claim_probes_indexes_over_a_large_backlog(seeded: list[int], db: asyncpg.Connection):
    """Custom and generic plans of the claim statement both probe tasks_ready and tasks_lease, one range per
    eligible route; the task it takes is the claimer's own best."""
    assert await db.fetchval("SELECT count(*) FROM tasks") >= BACKLOG
    jti, sub, family = await _claimer(db)
    args = (jti, sub, family, "dev", 64, [], None)
    # EXPLAIN takes no bind parameters: the statement is prepared, then explained with literal arguments,
    # with a custom plan (the values known to the planner) and with the generic plan a long-lived
    # connection switches to (the routes and features unknown to it).
    await db.execute(f"PREPARE claim_plan(uuid, text, text, text, int, int[], bigint) AS {Q['claim']}")
    literals = ", ".join(_literal(a) for a in args)
    for mode in ("force_custom_plan", "force_generic_plan"):
        await db.execute(f"SET plan_cache_mode = {mode}")
        _assert_probes(await db.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE claim_plan({literals})"))
    await db.execute("DEALLOCATE claim_plan")
    await db.execute("RESET plan_cache_mode")

    # Not just an index: it takes the claimer's best task (the expired hold: same priority, oldest),
    # never a backlog row.
    with contextlib.suppress(_Rollback):
        async with db.transaction():
            row = await db.fetchrow(Q["claim"], *args)
            assert row["verdict"] == "take" and json.loads(row["event"])["data"]["reclaimed"] is True
            assert await db.fetchval("SELECT route_id FROM tasks WHERE id = $1", row["candidate"]) in seeded
            raise _Rollback


class _Rollback(Exception):
    pass


def _literal(value: Any) -> str:
    """A SQL literal for a test value (text, int, None or a list of them)."""
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]::" + ("text[]" if value else "int[]")
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def test_event_json_is_inlined_into_the_statements_that_answer_an_event(db: asyncpg.Connection) -> None:
    """A SQL function PostgreSQL cannot inline is a function call per row with an executor of its own; event_json
    is a plain expression once declared as volatile as its body (migration 0018)."""
    plan = await db.fetchval("EXPLAIN (VERBOSE, FORMAT JSON) SELECT event_json(e) FROM events e")
    output = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]["Output"]
    assert any("jsonb_build_object" in o for o in output), output
    assert not any("event_json" in o for o in output), output
