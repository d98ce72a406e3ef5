"""The spend views stay off the large tables: EXPLAIN each of their statements (and the usage verb's and
the fold's) over a history of 300k events, 100k tasks, 100k usage reports and 100k per-task spend rows,
and check that none scans events, tasks, usage or task_spend whole: the views read rollups, the fold walks
the events' primary key from its high-water mark."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.db.queries import Q
from tests.helpers import Api, make_world

EVENTS = 300_000
TASKS = 100_000
BIG = {"events", "tasks", "usage", "task_spend", "task_flow"}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def _plan(db: asyncpg.Connection, name: str, *args: Any) -> list[dict[str, Any]]:
    doc = await db.fetchval(f"EXPLAIN (FORMAT JSON) {Q[name]}", *args)
    root = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
    return list(_nodes(root))


def _scans(nodes: list[dict[str, Any]]) -> list[str]:
    return [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in BIG]


@pytest.fixture
async def history(admin: Api, db: asyncpg.Connection) -> dict[str, Any]:
    """A delivered task with usage made through the API, then a large history copied from it."""
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    tid = (await dev.create("dev", "tpl"))["task"]["id"]
    c = await dev.claim("dev")
    adv = (await dev.verb(tid, "advance", lease=c["lease"]["id"], to="review"))["event"]
    await dev.post(f"/v1/tasks/{tid}/usage", {"model": "m", "cost": "0.1", "currency": "USD", "event": adv["id"]}, 200)
    c = await rev.claim("dev")
    await rev.verb(tid, "advance", lease=c["lease"]["id"], to="done")
    await admin.get("/v1/spend")  # folds what happened so far
    with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
        await db.execute("SET session_replication_role = replica")
    await db.execute("""
        INSERT INTO tasks (lane_id, stage_id, route_id, state, title, created_by, created_at)
        SELECT t.lane_id, t.stage_id, t.route_id, 'done', 'history', t.created_by, now() - make_interval(secs => g)
          FROM tasks t CROSS JOIN generate_series(1, $2::int) g WHERE t.id = $1""", tid, TASKS)
    ids = [r["id"] for r in await db.fetch("SELECT id FROM tasks WHERE title = 'history' LIMIT 1000")]
    await db.execute("""
        INSERT INTO events (task_id, type, actor, family, data, created_at)
        SELECT ($1::uuid[])[1 + g % 1000], CASE WHEN g % 3 = 0 THEN 'transition' ELSE 'progress' END, 'ghost',
               'cheap', '{"kind": "advance", "from": "todo", "to": "review"}', now() - make_interval(secs => g)
          FROM generate_series(1, $2::int) g""", ids, EVENTS)
    await db.execute("""
        INSERT INTO task_spend (task_id, family, currency, lane_id, reports, cost, first_at, last_at)
        SELECT t.id, 'cheap', 'USD', t.lane_id, 1, 0.1, t.created_at, t.created_at
          FROM tasks t WHERE t.title = 'history'""")
    await db.execute("""
        INSERT INTO usage (task_id, lane_id, family, agent, role, model, cost, currency, recorded_by,
                           recorded_by_family, request_hash, created_at)
        SELECT t.id, t.lane_id, 'cheap', 'ghost', 'role:dev', 'm', 0.1, 'USD', 'ghost', 'cheap', 'h', t.created_at
          FROM tasks t WHERE t.title = 'history'""")
    await db.execute("""
        INSERT INTO task_flow (task_id, releases, last_release_at, released_by)
        SELECT t.id, 1, t.created_at, '{cheap}' FROM tasks t WHERE t.title = 'history'""")
    await db.execute("""
        INSERT INTO flow_hours (lane_id, bucket, finished, lead_seconds, advances)
        SELECT t.lane_id, date_trunc('hour', now(), 'UTC') - make_interval(hours => g), 5, 50, 10
          FROM tasks t CROSS JOIN generate_series(1, 2000) g WHERE t.id = $1""", tid)
    await db.execute("RESET session_replication_role")
    # The fold has caught up: what is left to read is the events recorded after it.
    await db.execute("UPDATE flow_fold SET folded_to = (SELECT max(id) - 10 FROM events)")
    for table in ("tasks", "events", "task_spend", "task_flow", "flow_hours", "usage"):
        await db.execute(f"ANALYZE {table}")
    sub = await db.fetchval("SELECT sub FROM agents WHERE family_key = 'cheap'")
    return {"task": uuid.UUID(tid), "event": adv["id"], "sub": sub}


async def test_spend_views_read_rollups_not_the_history(history: dict[str, Any], db: asyncpg.Connection):
    assert await db.fetchval("SELECT count(*) FROM events") >= EVENTS
    since = datetime.now(UTC) - timedelta(hours=48)
    plans = {
        "spend_groups": await _plan(db, "spend_groups", "family"),
        "spend_groups(lane)": await _plan(db, "spend_groups", "lane"),
        "spend_tasks": await _plan(db, "spend_tasks", None, None, None, None, None, None, None, 101),
        "spend_tasks(task)": await _plan(db, "spend_tasks", history["task"], None, None, None, None, None, None, 101),
        "spend_costly_tasks": await _plan(db, "spend_costly_tasks", 3.0, 100),
        "spend_overspending": await _plan(db, "spend_overspending", 3.0),
        "spend_repeated_releases": await _plan(db, "spend_repeated_releases", 3, 100),
        "spend_spinning": await _plan(db, "spend_spinning", 3.0, 10, 100),
        "flow_series": await _plan(db, "flow_series", "hour", since, None),
        "flow_fold": await _plan(db, "flow_fold", 20_000),
        "usage_record": await _plan(db, "usage_record", history["task"], history["sub"], "cheap", ["lane:dev"], False,
                                    False, None, history["event"], "m", 1, 2, None, None, None, "k", "h"),
    }
    for name, nodes in plans.items():
        assert not _scans(nodes), f"{name} scans {_scans(nodes)}: {json.dumps(nodes)[:3000]}"
    # The views proper never touch the history at all.
    for name in ("spend_groups", "spend_groups(lane)", "spend_overspending", "flow_series"):
        touched = {n.get("Relation Name") for n in plans[name]} & BIG
        assert not touched, (name, touched)
    # The fold reads the events after its mark through the primary key.
    fold_events = [n for n in plans["flow_fold"] if n.get("Relation Name") == "events"]
    assert any(n.get("Index Name") == "events_pkey" for n in fold_events), json.dumps(fold_events)[:2000]
    # Its track-record credit finds each move's producer inline, by the task's own events (events_by_task): a
    # function scan of producer_of per move cost ~0.35 ms each (a catch-up of 150k events took 25 s).
    functions = [n.get("Function Name") for n in plans["flow_fold"] if n["Node Type"] == "Function Scan"]
    assert "producer_of" not in functions, functions
    assert any(n.get("Index Name") == "events_by_task" for n in plans["flow_fold"]), functions
    # The per-task list and the costly tasks read their indexes.
    assert any(n.get("Index Name") == "task_spend_recent" for n in plans["spend_tasks"])
    assert any(n.get("Index Name") == "task_spend_costly" for n in plans["spend_costly_tasks"])
    assert any(n.get("Index Name") == "task_flow_repeated" for n in plans["spend_repeated_releases"])
