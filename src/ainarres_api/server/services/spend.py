"""Usage and spend: the `usage` verb, the flow rollups' fold, and the spend views (migration 0014).

Usage reports go to the append-only `usage` ledger and, in the same statement, to two rollups
(`spend_totals`, `task_spend`). The flow rollups (throughput, lead time, deliveries, releases) are folded
from `events` when a view is read, from a high-water mark forward, so no verb pays for them. Views read
rollups only. The same fold keeps the track record's counters (track_counts, ADR 0019). An unknown amount
is None (null), never zero.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound
from ainarres_api.server.services.auth import Principal
from ainarres_api.server.services.digest import request_digest
from ainarres_api.server.services.pages import BAD_CURSOR, decode_cursor, encode_cursor

Group = Literal["family", "role", "lane", "family_role"]
Bucket = Literal["hour", "day"]

# Events folded per transaction, and batches per read at most: a read after a long quiet period (or the
# first over a large history) folds at most FOLD_BATCH * FOLD_MAX_BATCHES events and shows the rest on
# later reads; each read folds what happened since the last one.
FOLD_BATCH = 10_000
FOLD_MAX_BATCHES = 20

# Anomaly thresholds (defaults; the anomalies view takes each as a query parameter).
OVERSPEND_MULTIPLE = 3.0  # cost per delivery above this many times the norm
SPIN_LEASES = 3.0  # a live hold older than this many of its stage's leases is spinning
SPIN_PROGRESS = 10  # ... as is one with this many progress reports
REPEATED_RELEASES = 3  # an unfinished task given back this many times
ANOMALY_ROWS = 100


_WORDS = {
    "not_found": "no such task visible to you; check the id",
    "not_yours": "you may record usage only for a task you hold or held (an overseer, seat:overseer, may record "
                 "for any family)",
    "bad_anchor": "event: not an event of this task{own}; pass the id of the transition (or other event) this "
                  "usage paid for, as its answer gave it, or leave it out",
}


async def record(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, body: dict[str, Any]
                 ) -> dict[str, Any]:
    """Record one usage report on a task (the `usage` verb); a replay answers the first record."""
    overseer = p.has("seat:overseer")
    family = body.get("family")
    if family is not None and not overseer and family != p.family:
        raise NotEligible("recording usage on behalf of another family needs seat:overseer; leave `family` out "
                          "to record your own")
    if not overseer:
        family = None
    cost = body.get("cost")
    content = {k: body.get(k) for k in ("model", "input_tokens", "output_tokens", "currency", "wall_seconds",
                                        "event", "family")}
    content["cost"] = str(Decimal(cost).normalize()) if cost is not None else None
    digest = request_digest(content)
    wall = body.get("wall_seconds")
    args = (task_id, p.sub, p.family, sorted(p.features), p.oversees, overseer, family, body.get("event"),
            body.get("model"), body.get("input_tokens"), body.get("output_tokens"),
            Decimal(cost) if cost is not None else None, body.get("currency"),
            Decimal(str(round(wall, 3))) if wall is not None else None, body.get("idempotency_key"), digest)
    for _ in range(2):
        if body.get("idempotency_key") is None:
            # Without a key, "the same report as my last one" is the replay rule: it holds only if a retry racing its
            # original waits for it (usage_reporter_lock) and then reads it, in a statement after the wait.
            async with conn.transaction():
                await conn.execute(Q["usage_reporter_lock"], str(task_id), p.sub)
                r = await conn.fetchrow(Q["usage_record"], *args)
        else:
            r = await conn.fetchrow(Q["usage_record"], *args)
        verdict = r["verdict"]
        if verdict == "ok" and r["usage"] is None:
            continue  # a concurrent report with the same key won the insert: answer it as a replay
        break
    if verdict == "ok":
        return {"code": "ok", "usage": r["usage"]}
    if verdict == "replay":
        return {"code": "ok", "usage": r["usage"], "replay": True}
    if verdict == "conflict":
        raise Conflict("idempotency_key was already used for a different usage report on this task; use a new "
                       "key, or resend exactly the same report")
    if verdict == "unknown_family":
        raise NotFound(f"family: no family {family!r}; GET /v1/families lists them")
    if verdict == "not_yours":
        raise NotEligible(_WORDS["not_yours"])
    if verdict == "bad_anchor":
        raise Invalid(_WORDS["bad_anchor"].format(own="" if overseer else " made by you")
                      + (f" of family {family}" if family else ""),
                      errors=[{"field": "event", "detail": "not an event of this task you may anchor to"}])
    raise NotFound(_WORDS["not_found"])


async def fold(conn: asyncpg.Connection, batch: int = FOLD_BATCH, max_batches: int = FOLD_MAX_BATCHES) -> int:
    """Catch the flow rollups and the track record's counters (track_counts, ADR 0019) up with the events
    recorded since the last fold; returns the events read. While another read is folding, this one waits for
    it (up to 5 s; then it reads the rollups as they are), so that reads made together — the board's panels —
    agree. Every read of either folds first."""
    total = 0
    for _ in range(max_batches):
        try:
            async with conn.transaction():
                if (await conn.fetchrow(Q["flow_lock"])) is None:
                    await conn.execute(Q["flow_lock_patience"])
                    await conn.fetchrow(Q["flow_lock_wait"])
                read = int(await conn.fetchval(Q["flow_fold"], batch))
        except asyncpg.LockNotAvailableError:
            break
        total += read
        if read < batch:
            break
    return total


async def groups(conn: asyncpg.Connection, group: Group, *, caught_up: bool = False) -> dict[str, Any]:
    """Spend per family, role, lane, or (family, role), beside deliveries (`caught_up`: the caller folded)."""
    if not caught_up:
        await fold(conn)
    return {"items": [dict(r) for r in await conn.fetch(Q["spend_groups"], group)], "next": None}


_SPEND_FIELDS = ("currency", "reports", "cost", "input_tokens", "output_tokens", "wall_seconds", "deliveries",
                 "cost_per_delivery")


Figures = list[dict[str, Any]]


async def beside_track_record(conn: asyncpg.Connection
                              ) -> tuple[dict[str, Figures], dict[tuple[str, str | None], Figures]]:
    """Spend per family and per (family, role) for the track record (beside it, never blended), after one
    fold: each key's rows, one per currency (currency None: reports without a cost). A key absent here
    reported no usage: its spend is unknown (null), never zero. `role` None: work whose ways out need no
    role:* feature (the track record's role ''). The fold also catches the track record's counters up: call
    this before reading track_record_page."""
    await fold(conn)

    async def by(group: Group, key: Callable[[dict[str, Any]], Any]) -> dict[Any, Figures]:
        out: dict[Any, Figures] = {}
        for r in (await groups(conn, group, caught_up=True))["items"]:
            if r["reports"]:
                out.setdefault(key(r), []).append({k: r[k] for k in _SPEND_FIELDS})
        return out

    return (await by("family", lambda r: r["family"]),
            await by("family_role", lambda r: (r["family"], r["role"])))


def _task_cursor(cursor: str | None) -> tuple[datetime | None, uuid.UUID | None, str | None, str | None]:
    parts = decode_cursor(cursor, 4)
    if parts is None:
        return None, None, None, None
    try:
        return datetime.fromisoformat(parts[0]), uuid.UUID(parts[1]), parts[2], parts[3]
    except ValueError:
        raise Invalid(BAD_CURSOR) from None


async def tasks(conn: asyncpg.Connection, task: uuid.UUID | None, lane: str | None, family: str | None,
                cursor: str | None, limit: int) -> dict[str, Any]:
    """Spend per task, family and currency, the most recently reported first."""
    at, tid, fam, cur = _task_cursor(cursor)
    rows = [dict(r) for r in await conn.fetch(Q["spend_tasks"], task, lane, family, at, tid, fam, cur, limit + 1)]
    nxt = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        nxt = encode_cursor(last["last_at"], last["task_id"], last["family"], last["currency_key"])
    for r in rows:
        r.pop("currency_key")
    return {"items": rows, "next": nxt}


async def anomalies(conn: asyncpg.Connection, multiple: float = OVERSPEND_MULTIPLE, spin_leases: float = SPIN_LEASES,
                    spin_progress: int = SPIN_PROGRESS, releases: int = REPEATED_RELEASES) -> dict[str, Any]:
    """What an auditor should look at: overspending against the role's norm, costly tasks against the
    family's own norm, spinning holds, and tasks given back again and again."""
    await fold(conn)
    return {
        "thresholds": {"multiple": multiple, "spin_leases": spin_leases, "spin_progress": spin_progress,
                       "releases": releases},
        "overspending": [dict(r) for r in await conn.fetch(Q["spend_overspending"], multiple)],
        "costly_tasks": [dict(r) for r in await conn.fetch(Q["spend_costly_tasks"], multiple, ANOMALY_ROWS)],
        "spinning": [dict(r) for r in await conn.fetch(Q["spend_spinning"], spin_leases, spin_progress,
                                                       ANOMALY_ROWS)],
        "repeated_releases": [dict(r) for r in await conn.fetch(Q["spend_repeated_releases"], releases,
                                                                ANOMALY_ROWS)],
    }


DEFAULT_SPAN = {"hour": timedelta(hours=48), "day": timedelta(days=30)}


async def flow(conn: asyncpg.Connection, bucket: Bucket, since: datetime | None, lane: str | None
               ) -> dict[str, Any]:
    """Throughput (tasks finished) and lead time (creation to finish) per lane, per hour or day."""
    await fold(conn)
    start = since or datetime.now(UTC) - DEFAULT_SPAN[bucket]
    rows = await conn.fetch(Q["flow_series"], bucket, start, lane)
    return {"bucket": bucket, "since": start, "items": [dict(r) for r in rows]}
