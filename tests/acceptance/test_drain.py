"""Twenty agents of two families drain a thousand tasks over HTTP, one of them dying mid-task.

Afterwards the database and the event log must tell a consistent story: every task finished exactly
once, no two leases on a task were ever live at once, and attempts and rework agree with the events.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from tests.helpers import Api, make_world

N_TASKS = 1000
N_WORKERS = 12
N_REVIEWERS = 8
LEASE_SECONDS = 60
KILL_AFTER = 5  # the doomed worker finishes this many tasks, then claims one and never calls again
BOUND_SECONDS = 240  # generous: the drain takes a fraction of this even on a loaded machine

DRAIN_WORKFLOW = {
    "key": "drain",
    "stages": [
        {"key": "todo", "initial": True, "lease_seconds": LEASE_SECONDS, "max_attempts": 5},
        {"key": "review", "lease_seconds": LEASE_SECONDS, "max_rework": 3},
        {"key": "done", "terminal": True},
    ],
    "transitions": [
        {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
        {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
    ],
}


def _bucket(task_id: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}:{task_id}".encode()).hexdigest(), 16) % 100


def rejected_on_first_review(task_id: str) -> bool:
    return _bucket(task_id, "review") < 10


def released_on_first_claim(task_id: str) -> bool:
    return _bucket(task_id, "release") < 3


def reports_progress(task_id: str) -> bool:
    return _bucket(task_id, "progress") < 10


@dataclass
class Drain:
    """What the agents share while draining: the finish line and what the killed agent left behind."""

    total: int
    finished: int = 0
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    last_one_left: asyncio.Event = field(default_factory=asyncio.Event)
    killed_lease: str | None = None
    killed_claimed: asyncio.Event = field(default_factory=asyncio.Event)
    reviewed: set[str] = field(default_factory=set)
    claimed_once: set[str] = field(default_factory=set)
    leases: list[str] = field(default_factory=list)
    empties: int = 0

    def finish(self) -> None:
        self.finished += 1
        if self.finished == self.total - 1:
            self.last_one_left.set()
        if self.finished == self.total:
            self.all_done.set()


async def _idle(empties_in_a_row: int) -> None:
    # An empty claim is not a reason to stop while undone tasks remain: back off and ask again
    # (asking *is* the recovery mechanism). A backoff, not a synchronisation point.
    await asyncio.sleep(min(0.2, 0.01 * 2 ** min(empties_in_a_row, 5)))


async def _claims(api: Api, drain: Drain, stage: str) -> AsyncIterator[tuple[str, str]]:
    """(task id, lease) of each claim this agent makes until the drain is done; empties back off."""
    idle = 0
    while not drain.all_done.is_set():
        c = await api.claim("drain")
        if c["code"] == "empty":
            drain.empties += 1
            idle += 1
            await _idle(idle)
            continue
        idle = 0
        assert c["code"] == "claimed" and c["task"]["stage"] == stage, c
        drain.leases.append(c["lease"]["id"])
        yield c["task"]["id"], c["lease"]["id"]


async def worker(api: Api, drain: Drain, doomed: bool) -> None:
    done_here = 0
    async for tid, lease in _claims(api, drain, "todo"):
        if doomed and done_here == KILL_AFTER:
            drain.killed_lease = lease
            drain.killed_claimed.set()
            return  # killed: holds the task and never calls again
        first = tid not in drain.claimed_once
        drain.claimed_once.add(tid)
        if first and released_on_first_claim(tid):
            await api.verb(tid, "release", lease=lease, reason="not today")
            continue
        if reports_progress(tid):
            await api.verb(tid, "progress", lease=lease, note="halfway",
                           artifacts=[{"type": "branch", "name": f"feat/{tid[:8]}"}])
        await api.verb(tid, "advance", lease=lease, to="review", note="built")
        done_here += 1


async def reviewer(api: Api, drain: Drain) -> None:
    async for tid, lease in _claims(api, drain, "review"):
        first = tid not in drain.reviewed
        drain.reviewed.add(tid)
        if first and rejected_on_first_review(tid):
            await api.verb(tid, "reject", lease=lease, to="todo", reason="tests fail")
            continue
        await api.verb(tid, "advance", lease=lease, to="done", note="lgtm")
        drain.finish()


async def kill_switch(drain: Drain, db: asyncpg.Connection) -> datetime | None:
    """Once everything else is done, let the dead agent's lease run out (rather than wait 60 s).

    Returns the expiry it set, or None if the lease had already run out on its own and a claim
    recovered the task (a very slow machine); the event log is checked the same way either way.
    """
    waits = [asyncio.ensure_future(drain.killed_claimed.wait()), asyncio.ensure_future(drain.all_done.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for f in waits:
        f.cancel()
    assert drain.killed_claimed.is_set(), "the doomed worker never got to claim its last task"
    await drain.last_one_left.wait()
    expired_at: datetime | None = await db.fetchval(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 millisecond' "
        "WHERE lease_id = $1::uuid AND state = 'held' RETURNING lease_expires_at", drain.killed_lease)
    return expired_at


async def test_twenty_agents_drain_a_thousand_tasks(admin: Api, db: asyncpg.Connection) -> None:
    w = await make_world(admin, workflow=DRAIN_WORKFLOW, lane="drain")
    # Rejects are routine here (a share of first reviews): governance must not ban the family mid-drain
    # (ADR 0015; thresholds are data).
    await admin.call("PUT", "/v1/governance/policies/workflow/drain", {"strike_threshold": 1000}, 200)
    workers = [await w.agent("cheap") for _ in range(N_WORKERS)]
    reviewers = [await w.agent("reviewers") for _ in range(N_REVIEWERS)]

    async def create_share(api: Api, k: int) -> None:
        for i in range(k, N_TASKS, N_WORKERS):
            await api.create("drain", f"task {i}", payload={"n": i}, priority=i % 3)

    await asyncio.gather(*(create_share(a, k) for k, a in enumerate(workers)))
    drain = Drain(total=N_TASKS)
    killed = workers[0]
    agents = [worker(a, drain, doomed=a is killed) for a in workers]
    agents += [reviewer(a, drain) for a in reviewers]
    results = await asyncio.wait_for(asyncio.gather(kill_switch(drain, db), *agents), BOUND_SECONDS)
    assert drain.killed_lease is not None and drain.finished == N_TASKS
    overrides = {drain.killed_lease: results[0]} if results[0] is not None else {}

    await check_database(db)
    leases = await check_event_log(db, killed.sub, drain.killed_lease, overrides)
    # Every lease an agent was handed is in the log, once.
    assert sorted(leases) == sorted(drain.leases)


async def check_database(db: asyncpg.Connection) -> None:
    rows = await db.fetch("SELECT t.state, s.key AS stage, t.holder, t.lease_id FROM tasks t "
                          "JOIN stages s ON s.id = t.stage_id")
    assert len(rows) == N_TASKS
    assert Counter((r["state"], r["stage"]) for r in rows) == {("done", "done"): N_TASKS}
    assert all(r["holder"] is None and r["lease_id"] is None for r in rows)


@dataclass
class Lease:
    id: str
    claim_event: int
    expires: datetime
    ended_by: int | None = None


async def check_event_log(db: asyncpg.Connection, killed_sub: str, killed_lease: str,
                          overrides: dict[str, datetime]) -> list[str]:
    """Replays the log task by task; returns every lease it saw granted."""
    tasks = {str(r["id"]): r for r in await db.fetch(
        "SELECT id, attempts, rework_count, rework_by_stage FROM tasks")}
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in await db.fetch("SELECT id, task_id, type, actor, data, created_at FROM events ORDER BY id"):
        by_task[str(e["task_id"])].append({**e, "data": json.loads(e["data"])})
    assert set(by_task) == set(tasks)
    reclaims = 0
    for tid, evs in by_task.items():
        reclaims += _replay(tid, evs, tasks[tid], overrides)
    # The dead agent's task, and only it, was recovered by a later claim.
    assert reclaims == 1
    dead = [e for evs in by_task.values() for e in evs
            if e["type"] == "claimed" and e["data"].get("previous_lease") == killed_lease]
    assert len(dead) == 1 and dead[0]["data"]["previous_holder"] == killed_sub
    assert dead[0]["actor"] != killed_sub
    rejects = sum(1 for evs in by_task.values() for e in evs
                  if e["type"] == "transition" and e["data"]["kind"] == "reject")
    assert rejects == sum(1 for tid in tasks if rejected_on_first_review(tid)) > 0
    return [e["data"]["lease"] for evs in by_task.values() for e in evs if e["type"] == "claimed"]


def _replay(tid: str, evs: list[dict[str, Any]], task: asyncpg.Record, overrides: dict[str, datetime]) -> int:
    """Walk one task's events in commit order; returns how many claims were lazy recoveries."""
    assert evs[0]["type"] == "created"
    live: Lease | None = None
    attempts = rework = reclaims = 0
    done = 0
    for e in evs[1:]:
        d = e["data"]
        if e["type"] == "claimed":
            if live is not None:
                # A claim while a lease is still held: only legal as a recovery of an expired lease,
                # decided by the claim's own clock (now() of its transaction = created_at).
                assert d.get("reclaimed") and d.get("previous_lease") == live.id, (tid, d)
                assert e["created_at"] > live.expires, f"{tid}: reclaimed a live lease"
                attempts += 1
                reclaims += 1
            else:
                assert not d.get("reclaimed"), (tid, d)
            assert d["attempts"] == attempts, (tid, d, attempts)
            expires = overrides.get(d["lease"], datetime.fromisoformat(d["lease_expires_at"]))
            live = Lease(d["lease"], e["id"], expires)
            continue
        assert e["type"] in ("progress", "transition", "released"), (tid, e["type"])
        # Every verb on a held task names the lease that is live now, and only the holder's verbs
        # succeed: a verb under a superseded lease would mean two leases overlapped.
        assert live is not None and d["lease"] == live.id, (tid, e["type"], d)
        assert e["created_at"] <= live.expires, f"{tid}: a verb succeeded after its lease ran out"
        if e["type"] == "progress":
            live.expires = max(live.expires, e["created_at"] + timedelta(seconds=LEASE_SECONDS))
            continue
        live = None
        if e["type"] == "released":
            attempts += 1
            assert d["attempts"] == attempts, (tid, d)
        else:
            attempts = 0
            if d["kind"] == "reject":
                rework += 1
            if d["to"] == "done":
                done += 1
    assert done == 1, f"{tid} entered done {done} times"
    assert live is None
    assert task["rework_count"] == rework
    assert task["attempts"] == attempts == 0
    assert sum(json.loads(task["rework_by_stage"]).values()) == rework
    return reclaims
