"""Governance (ADR 0015): the human boundary and the auditor's flags.

The substrate's own acts (strikes, reflexive bans, recommendations after bans) are written by
`governance_strike` (governance.sql), which services.tasks.transition runs in an accepted reject's
transaction; this module holds what people do: set the
thresholds (seat:admin), ban permanently, lift, unblock what the substrate blocked, decide on
recommendations (seat:overseer), raise flags (role:auditor), and the governance reads.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict, Invalid, NotFound
from ainarres_api.server.services import admin, auth, tasks, wake
from ainarres_api.server.services.auth import Principal

TRAIL_LATEST = 100
# The thresholds only strikes read: a strike is for (producer family, producer role), under that role's policy.
ROLE_ONLY = ("strike_threshold", "ban_base_seconds", "ban_cap_seconds", "recommend_after_bans")
POLICY_FIELDS = (*ROLE_ONLY, "recommend_after_flags")
OPERATIONAL_KINDS = ("spinning", "overspending", "health", "integrity")


async def _known(conn: asyncpg.Connection, family: str, feature: str | None) -> None:
    if not await conn.fetchval(Q["family_known"], family):
        raise NotFound(f"no family {family!r}; GET /v1/track-record lists them")
    if feature is not None:  # a body naming an unregistered feature is invalid (404 is for a path)
        await auth.registered(conn, "feature", [feature])


async def status(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything the governance panel and the Needs-you inbox show: policies, strikes, active bans, open
    recommendations and flags, and the newest trail entries."""
    return {
        "policies": [dict(r) for r in await conn.fetch(Q["policies"])],
        "strikes": [dict(r) for r in await conn.fetch(Q["strikes"])],
        "bans": [dict(r) for r in await conn.fetch(Q["bans_active"])],
        "recommendations": [dict(r) for r in await conn.fetch(Q["recommendations_open"])],
        "flags": [dict(r) for r in await conn.fetch(Q["flags_open"])],
        "trail": [dict(r) for r in await conn.fetch(Q["trail_latest"], None, TRAIL_LATEST)],
    }


async def trail(conn: asyncpg.Connection, before: int | None, limit: int) -> dict[str, Any]:
    """The trail, newest first; `next` is the id to pass back as `before`."""
    rows = [dict(r) for r in await conn.fetch(Q["trail_latest"], before, limit + 1)]
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": rows, "next": str(rows[-1]["id"]) if more and rows else None}


async def set_policy(conn: asyncpg.Connection, p: Principal, scope: str, key: str, values: dict[str, Any]
                     ) -> dict[str, Any]:
    """Set the thresholds of one scope (system `*`, a workflow key, or a role:/capability: feature)."""
    if scope == "system":
        if key != "*":
            raise Invalid("path.key: the system policy's key is '*'")
        missing = [f for f in POLICY_FIELDS if values.get(f) is None]
        if missing:
            raise Invalid("the system policy is the last resort and needs every threshold: missing "
                          f"{', '.join(missing)}",
                          errors=[{"field": f, "detail": "required in the system policy"} for f in missing])
    elif scope == "workflow":
        if not await conn.fetchval(Q["workflow_known"], key):  # a typo would be stored and govern nothing
            raise NotFound(f"no workflow {key!r}; GET /v1/workflows lists them")
    elif scope == "feature":
        if not (key.startswith("role:") or key.startswith("capability:")):
            raise Invalid("path.key: a feature policy is for a role:<x> or capability:<x> feature")
        await auth.feature_exists(conn, key)
        if key.startswith("capability:") and (dead := [f for f in ROLE_ONLY if values.get(f) is not None]):
            # Stored, they would govern nothing: strikes and their bans are counted per (family, role).
            raise Invalid(f"a capability's policy sets recommend_after_flags only (auditor flags on {key}): strikes "
                          f"and bans are counted per role, so set {', '.join(dead)} on the role:<x> policy instead",
                          errors=[{"field": f, "detail": "a role's threshold, not a capability's"} for f in dead])
    base, cap = values.get("ban_base_seconds"), values.get("ban_cap_seconds")
    if base is not None and cap is not None and base > cap:  # the first ban would be longer than the longest
        raise Invalid(f"ban_cap_seconds: {cap} is below ban_base_seconds ({base}); the cap bounds every ban, "
                      "the first included")
    async with conn.transaction():
        row = await conn.fetchrow(Q["policy_set"], scope, key, *(values.get(f) for f in POLICY_FIELDS), p.sub, p.family)
    return dict(row)


async def ban(conn: asyncpg.Connection, p: Principal, family: str, feature: str, reason: str,
              recommendation: int | None = None) -> dict[str, Any]:
    """A human's permanent ban of a feature for a family (until lifted), on the trail."""
    admin.may_govern(p, family, feature, "ban or lift features of")
    await _known(conn, family, feature)
    async with conn.transaction():
        # One order for every ban (the accept of a recommendation too): the admin lock, the open recommendations it
        # decides, then the denial.
        if feature == "seat:admin":  # ADR 0008: never lock every admin out
            await admin.lock_admins(conn)
        decided = await conn.fetch(Q["recommendations_lock"], family, feature, recommendation)
        if recommendation is not None and recommendation not in {r["id"] for r in decided}:
            rec = await conn.fetchrow(Q["recommendation_get"], recommendation)
            raise Conflict(f"recommendation {recommendation} was {rec['status'] if rec else 'removed'} already")
        if feature == "seat:admin":
            await admin.keep_an_admin(conn, family, "banning it")
        row = await conn.fetchrow(Q["permanent_ban"], family, feature, reason, p.sub, p.family, recommendation,
                                  [r["id"] for r in decided])
    if row is not None:
        wake.narrowed()
    if row is None:
        raise Conflict(f"family {family} is permanently banned from {feature} already; lift it first to change it")
    return dict(row)


async def lift(conn: asyncpg.Connection, p: Principal, family: str, feature: str, reason: str) -> dict[str, Any]:
    """Lift a ban (temporary or permanent) and start the family's strikes in that role over, on the trail."""
    admin.may_govern(p, family, feature, "ban or lift features of")
    await _known(conn, family, feature)
    async with conn.transaction():
        row = await conn.fetchrow(Q["lift"], family, feature, p.sub, p.family, reason, p.has("seat:admin"))
    if row is None:
        held = await conn.fetchrow(Q["denial_kind"], family, feature)
        if held is not None and held["by_admin"]:  # as with disable: what an admin decided, only an admin undoes
            raise admin.admin_denied(family, feature)
        raise NotFound(f"family {family} has no active ban or denial of {feature}; GET /v1/governance lists them")
    return dict(row)


async def unblock(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, note: str) -> dict[str, Any]:
    """An overseer's unblock (what the substrate blocked included), with its note on the trail: the unblock verb's
    rules, which write the trail entry under the task's lock (the block recorded is the one lifted)."""
    return await tasks.unblock(conn, p, task_id, note, on_trail=True)


async def raise_flag(conn: asyncpg.Connection, p: Principal, kind: str, family: str, feature: str | None,
                     task_id: uuid.UUID | None, note: str) -> dict[str, Any]:
    """An auditor's flag: quality (anchored to a task, and a family or its capability) or operational (a
    family). It never denies anything; enough open flags make a recommendation."""
    if kind == "quality" and task_id is None:
        raise Invalid("task_id: a quality flag is anchored to the task whose work it judges")
    if kind in OPERATIONAL_KINDS and feature is not None:
        raise Invalid(f"feature: a {kind} flag is about the family as a whole; leave feature out")
    await _known(conn, family, feature)
    if task_id is not None and not await conn.fetchval(Q["task_known"], task_id):
        raise NotFound("task_id: no such task")
    async with conn.transaction():
        await conn.execute(Q["flags_lock"], family, feature)
        row = await conn.fetchrow(Q["flag_insert"], kind, family, feature, task_id, note, p.sub)
    return dict(row)


async def dismiss_flag(conn: asyncpg.Connection, p: Principal, flag_id: int, note: str) -> dict[str, Any]:
    """Dismiss an auditor's flag, on the trail: an overseer, not one about its own family (ADR 0008)."""
    flag = await conn.fetchrow(Q["flag_get"], flag_id)
    if flag is None:
        raise NotFound(f"no flag {flag_id}")
    admin.may_govern(p, flag["family"], flag["feature"], "dismiss a flag about")
    async with conn.transaction():
        row = await conn.fetchrow(Q["flag_dismiss"], flag_id, p.sub, note)
        if row is None:
            raise Conflict(f"flag {flag_id} was dismissed already")
        await conn.execute(Q["trail_flag_dismissed"], flag_id, p.sub, p.family, note)
    return dict(row) | {"recommendation": None}


async def _open_recommendation(conn: asyncpg.Connection, p: Principal, rec_id: int, act: str, *, lock: bool = True
                               ) -> asyncpg.Record:
    """The recommendation if it is open and the caller may decide on it (an overseer not about its own family: ADR
    0008); locked until the caller's transaction ends, unless `lock` is false (the accept: its ban locks it, in the
    order every ban takes its locks, and sees again that it is open)."""
    rec = await conn.fetchrow(Q["recommendation_lock" if lock else "recommendation_get"], rec_id)
    if rec is None:
        raise NotFound(f"no recommendation {rec_id}")
    admin.may_govern(p, rec["family"], rec["feature"], act)
    if rec["status"] != "open":
        raise Conflict(f"recommendation {rec_id} was {rec['status']} already")
    return rec


async def accept(conn: asyncpg.Connection, p: Principal, rec_id: int, reason: str, feature: str | None
                 ) -> dict[str, Any]:
    """Accept a recommendation: the permanent ban it recommends (a family-wide one names the feature)."""
    async with conn.transaction():
        rec = await _open_recommendation(conn, p, rec_id, "accept a recommendation about", lock=False)
        feature = rec["feature"] or feature
        if feature is None:
            raise Invalid("feature: this recommendation is about the family as a whole; name the feature to ban")
        await ban(conn, p, rec["family"], feature, reason, rec_id)
        return dict(await conn.fetchrow(Q["recommendation_get"], rec_id))


async def dismiss(conn: asyncpg.Connection, p: Principal, rec_id: int, reason: str) -> dict[str, Any]:
    """Dismiss a recommendation: nothing is banned; it stays on the trail."""
    async with conn.transaction():
        await _open_recommendation(conn, p, rec_id, "dismiss a recommendation about")
        row = await conn.fetchrow(Q["recommendation_decide"], rec_id, "dismissed", p.sub, p.family, reason)
    return dict(row)
