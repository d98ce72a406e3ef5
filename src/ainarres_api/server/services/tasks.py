"""The nine agent verbs and the task reads: the rules of the substrate."""

from __future__ import annotations

import hashlib
import json
import random
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import (
    AlreadyHolding,
    Conflict,
    GuardFailed,
    IllegalTransition,
    Invalid,
    LeaseLost,
    NotEligible,
    NotFound,
)
from ainarres_api.server.services import auth, wake
from ainarres_api.server.services.auth import Principal, Signer

MAX_ATTEMPTS_REASON = "max attempts exceeded"
_TIER = re.compile(r"^tier:(\d+)$")
# One claim never walks more than this many recovery steps (blocks/escalations) before answering.
_MAX_CLAIM_STEPS = 32


@dataclass(frozen=True)
class Limits:
    """Bounds the service enforces on what callers send."""

    max_payload_bytes: int = 65_536
    max_routes: int = 64
    max_sets_per_lane: int = 1000


def _canonical(features: list[str] | tuple[str, ...]) -> list[str]:
    return sorted(set(features))


def _lease_out(lease_id: Any, expires_at: Any) -> dict[str, Any]:
    # isoformat, like every timestamp PostgreSQL renders into task JSON (…+00:00).
    return {"id": str(lease_id), "expires_at": expires_at.isoformat() if expires_at else None}


def _check_visible(p: Principal, lane_key: str) -> None:
    if not (p.has(f"lane:{lane_key}") or p.oversees):
        raise NotFound("no such task visible to you; check the id, or ask for the lane's feature")


async def _route(conn: asyncpg.Connection, lane_id: Any, lane_key: str, stage_id: Any,
                 required: list[str], new_sets_cap: int | None = None) -> int:
    """The id of the route (lane, stage, required set), creating it with its bundles if new.

    `new_sets_cap` (creates only): a required set the lane does not use yet is refused once the lane
    uses that many. Every route is a queue each claimer may probe and each new one wakes every
    waiter, so callers may not mint them without bound; workflow moves and escalations are bounded
    by the workflow itself and are never refused.
    """
    rid = await conn.fetchval(Q["route_find"], lane_id, stage_id, required)
    if rid is None and new_sets_cap is not None:
        # Serialise new routes per lane, then count in a later statement (its snapshot sees every
        # route committed while we waited).
        await conn.execute(Q["lane_routes_lock"], str(lane_id))
        room = await conn.fetchrow(Q["lane_required_sets"], lane_id, required)
        if not room["known"] and room["sets"] >= new_sets_cap:
            raise Invalid(f"required_features: lane {lane_key} already uses {room['sets']} distinct required-feature "
                          f"sets, its limit (AINARRES_MAX_REQUIRED_SETS_PER_LANE); use a set its tasks already "
                          "use, or ask an operator to raise the limit")
    if rid is None:
        rid = await conn.fetchval(Q["route_insert"], lane_id, stage_id, required, [f"lane:{lane_key}"])
        if rid is not None:
            wake.new_route()
        else:  # another transaction created it first; it has committed by now
            rid = await conn.fetchval(Q["route_find"], lane_id, stage_id, required)
    assert rid is not None
    return int(rid)


async def _event(conn: asyncpg.Connection, task_id: Any, type_: str, p: Principal | None,
                 data: dict[str, Any]) -> dict[str, Any]:
    ev: dict[str, Any] = await conn.fetchval(
        Q["event_insert"], task_id, type_, p.sub if p else None, p.family if p else None, data
    )
    return ev


def _payload_size_ok(payload: Any, limits: Limits, field: str) -> None:
    size = len(json.dumps(payload, separators=(",", ":")).encode())
    if size > limits.max_payload_bytes:
        from ainarres_api.server.errors import PayloadTooLarge

        raise PayloadTooLarge(
            f"{field} is {size} bytes; the limit is {limits.max_payload_bytes}. Keep work products "
            "elsewhere and store references (artifacts) here"
        )


def _request_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


async def create(conn: asyncpg.Connection, p: Principal, body: dict[str, Any], limits: Limits
                 ) -> tuple[dict[str, Any], bool]:
    """Create a task at its lane's initial stage; returns (task, created) — idempotent by key."""
    lane_key = body["lane"]
    _payload_size_ok(body.get("payload", {}), limits, "payload")
    async with conn.transaction():
        # The feature first: an outsider learns nothing about which lanes exist.
        if not p.has(f"lane:{lane_key}"):
            raise NotEligible(f"creating in lane {lane_key} needs feature lane:{lane_key}")
        lane = await conn.fetchrow(Q["lane_for_create"], lane_key)
        if lane is None:
            raise NotFound(f"no lane {lane_key!r}; GET /v1/me shows the lanes your features name")
        starters = [json.loads(b) for b in lane["starter_bundles"]]
        if starters and not any(set(b) <= p.features for b in starters):
            closest = min(starters, key=lambda b: len(set(b) - p.features))
            raise NotEligible(
                f"only the role that takes the first step out of {lane['stage_key']} may create tasks in "
                f"lane {lane_key}; missing: {', '.join(p.missing(closest))}"
            )
        required = _canonical(body.get("required_features") or [])
        if required:
            known = {r["name"] for r in await conn.fetch(Q["registered_features"], required)}
            unknown = [f for f in required if f not in known]
            if unknown:
                raise Invalid(f"required_features: not registered: {', '.join(unknown)} "
                              "(GET /v1/features lists them)")
        depends = sorted({str(d) for d in body.get("depends_on") or []})
        idem = body.get("idempotency_key")
        same = {k: v for k, v in body.items() if k != "idempotency_key"} | {
            "required_features": required, "depends_on": depends}
        req_hash = _request_hash(same) if idem else None
        if idem:
            existing = await conn.fetchrow(Q["task_by_idempotency"], lane["lane_id"], idem)
            if existing is not None:
                return _same_request(existing, req_hash), False
        deps = await conn.fetch(Q["dependencies_state"], depends) if depends else []
        # A prerequisite in a lane the caller cannot see does not exist for it (no existence oracle).
        deps = [r for r in deps if p.has(f"lane:{r['lane_key']}") or p.oversees]
        if len(deps) != len(depends):
            found = {str(r["id"]) for r in deps}
            missing = [d for d in depends if d not in found]
            raise Invalid(f"depends_on: no such task: {', '.join(missing)}")
        state = "ready" if all(r["state"] == "done" for r in deps) else "waiting"
        route = await _route(conn, lane["lane_id"], lane_key, lane["stage_id"], required,
                             new_sets_cap=limits.max_sets_per_lane)
        row = await conn.fetchrow(
            Q["task_insert"], lane["lane_id"], lane["stage_id"], route, state, body["title"],
            body.get("payload", {}), body.get("priority", 0), required, depends, idem,
            req_hash, p.sub, p.family, lane_key, lane["stage_key"],
        )
        if row is None:  # lost an idempotency race to a concurrent create with the same key
            existing = await conn.fetchrow(Q["task_by_idempotency"], lane["lane_id"], idem)
            assert existing is not None
            return _same_request(existing, req_hash), False
        if state == "ready":
            wake.ready(route)
    return {"task": row["task"], "event": row["event"]}, True


def _same_request(existing: asyncpg.Record, req_hash: str | None) -> dict[str, Any]:
    if existing["request_hash"] != req_hash:
        raise Conflict("idempotency_key was already used for a different task in this lane; "
                       "use a new key, or resend exactly the same request", task=existing["task"])
    return {"task": existing["task"], "event": None}


async def eligible_routes(conn: asyncpg.Connection, p: Principal, lane: str | None) -> list[int]:
    """Every route the caller may claim from (what a waiting claim watches)."""
    return [r["id"] for r in await conn.fetch(Q["eligible_routes"], sorted(p.features), lane)]


async def _eligible_routes(conn: asyncpg.Connection, p: Principal, lane: str | None, limits: Limits,
                           prefer: Collection[int] = ()) -> list[int]:
    return _capped(await eligible_routes(conn, p, lane), limits, prefer)


def _capped(routes: list[int], limits: Limits, prefer: Collection[int]) -> list[int]:
    if len(routes) > limits.max_routes:
        # Too many queues to probe in one claim: the routes a waiting claim was woken for first,
        # then a random subset of the rest, so that over a few claims every queue is visited
        # (documented in docs/operations.md).
        first = [r for r in routes if r in prefer][:limits.max_routes]
        rest = [r for r in routes if r not in prefer]
        routes = first + random.sample(rest, limits.max_routes - len(first))
    return routes


async def claim(conn: asyncpg.Connection, p: Principal, lane: str | None, limits: Limits,
                prefer: Collection[int] = ()) -> dict[str, Any]:
    """Take the best task the caller may do, recovering expired leases on the way."""
    # The common case in one round trip; the function answers NULL for everything it leaves to the
    # statement-by-statement path below (recovery, the max_active refusal, sampling many routes).
    fast = await conn.fetchrow(Q["claim_fast"], p.sub, p.family, sorted(p.features), lane, p.max_active,
                               limits.max_routes)
    if (out := await _claim_decided(conn, fast)) is not None:
        return out
    return await _claim_by_statements(conn, p, lane, limits, prefer)


async def claim_as(conn: asyncpg.Connection, signer: Signer, token: str, lane: str | None, limits: Limits
                   ) -> dict[str, Any]:
    """`claim` for a bearer token, its database read folded into the claim's one round trip; a token
    or an agent that is not in order is authenticated statement by statement (and refused there)."""
    jti, sub, family = auth.identity(signer, token)
    fast = await conn.fetchrow(Q["claim_by_token"], jti, sub, family, lane, limits.max_routes)
    if (out := await _claim_decided(conn, fast)) is not None:
        return out
    return await _claim_by_statements(conn, await auth.authenticate(conn, signer, token), lane, limits, ())


async def _claim_decided(conn: asyncpg.Connection, fast: asyncpg.Record | None) -> dict[str, Any] | None:
    """The answer of claim_fast / claim_by_token, or None where they left the claim to the statements."""
    if fast is None or fast["code"] is None:
        return None
    if fast["code"] == "empty":
        return {"code": "empty", "task": None, "lease": None}
    return {"code": "claimed", "task": fast["task"], "lease": _lease_out(fast["lease_id"], fast["lease_expires_at"]),
            "card": await stage_card(conn, fast["stage_id"]), "event": fast["event"]}


async def _claim_by_statements(conn: asyncpg.Connection, p: Principal, lane: str | None, limits: Limits,
                               prefer: Collection[int]) -> dict[str, Any]:
    async with conn.transaction():
        # Lock (reading the eligible routes in the same round trip), then count the agent's holds
        # in a later statement: a statement that took the lock would count from a snapshot taken
        # before the lock was granted and miss a claim this agent committed meanwhile. The count
        # rides in claim_take (the usual case: one fewer round trip) or, when there is nothing to
        # take, in agent_held.
        locked = await conn.fetchrow(Q["agent_lock_routes"], p.sub, sorted(p.features), lane)
        routes = _capped(list(locked["routes"]) if locked else [], limits, prefer)
        for _ in range(_MAX_CLAIM_STEPS):
            cand = await conn.fetchrow(Q["claim_pick"], routes) if routes else None
            if cand is None:
                await _check_room(conn, p)
                return {"code": "empty", "task": None, "lease": None}
            extra: dict[str, Any] = {}
            bump = 0
            if cand["expired"]:
                attempts = cand["attempts"] + 1
                prev = {"previous_holder": cand["holder"], "previous_lease": str(cand["lease_id"])}
                if await _exhausted_or_escalated(conn, p, cand, attempts, prev):
                    # An escalation may have opened a route this caller may take (the task itself).
                    routes = await _eligible_routes(conn, p, lane, limits, prefer)
                    continue
                bump = 1
                extra = {"reclaimed": True, **prev}
            take = (Q["claim_take"], cand["id"], p.sub, bump, p.family, extra, cand["stage_key"], p.max_active)
            row = await conn.fetchrow(*take)
            if row is None:
                # At max_active: _check_room raises, and the rollback undoes any recovery above.
                # Otherwise one of the agent's holds ended between the two statements (holds only
                # grow through claims, which agent_lock_routes serialises): the take now succeeds.
                await _check_room(conn, p)
                row = await conn.fetchrow(*take)
                assert row is not None
            return {"code": "claimed", "task": row["task"], "lease": _lease_out(row["lease_id"],
                                                                             row["lease_expires_at"]),
                    "card": await stage_card(conn, cand["stage_id"]), "event": row["event"]}
        await _check_room(conn, p)
    return {"code": "empty", "task": None, "lease": None}


async def _check_room(conn: asyncpg.Connection, p: Principal) -> None:
    """Refuse the claim if the agent already holds max_active live leases (after agent_lock_routes)."""
    held = list(await conn.fetchval(Q["agent_held"], p.sub))
    if len(held) >= p.max_active:
        rows = await conn.fetch(Q["held_by_agent"], p.sub)
        first = rows[0] if rows else None
        raise AlreadyHolding(
            f"you already hold {len(held)} task(s) and family {p.family} allows {p.max_active}; "
            "finish one (advance, reject, release or block) before claiming another",
            task=first["task"] if first else None,
            lease=_lease_out(first["lease_id"], first["lease_expires_at"]) if first else None,
        )


async def _exhausted_or_escalated(conn: asyncpg.Connection, p: Principal | None, cand: Mapping[str, Any],
                                  attempts: int, ctx: dict[str, Any]) -> bool:
    """Apply max attempts and escalation after a failed hold; True if the task left the claimer."""
    if attempts >= cand["max_attempts"]:
        await conn.fetchval(Q["task_set_blocked"], cand["id"], MAX_ATTEMPTS_REASON, attempts)
        await _event(conn, cand["id"], "blocked", p, {"reason": MAX_ATTEMPTS_REASON, "attempts": attempts,
                                                     **ctx})
        return True
    esc = cand["escalate_after"]
    if esc is not None and attempts >= esc:
        current = max((int(m.group(1)) for f in cand["required_features"] if (m := _TIER.match(f))),
                      default=1)
        nxt = f"tier:{current + 1}"
        if await conn.fetchval(Q["tier_exists"], nxt):
            required = _canonical([f for f in cand["required_features"] if not _TIER.match(f)] + [nxt])
            route = await _route(conn, cand["lane_id"], cand["lane_key"], cand["stage_id"], required)
            await conn.execute(Q["task_remember_base"], cand["id"])
            await conn.fetchval(Q["task_set_ready"], cand["id"], route, required, False, attempts,
                                dict(cand["rework_by_stage"]))
            wake.ready(route)
            await _event(conn, cand["id"], "escalated", p, {"from_tier": current, "to_tier": current + 1,
                                                           "attempts": attempts, **ctx})
            return True
    return False


async def _locked(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(Q["task_lock"], task_id)
    if row is None:
        # After a lock wait PostgreSQL rechecks the join to the stage with the stage row it read before
        # the wait, so a task another call moved to a new stage meanwhile drops out of the result
        # (still locked by us). Read it again, in a new statement, before calling it missing: the
        # late caller then gets lease_lost, not not_found.
        row = await conn.fetchrow(Q["task_lock"], task_id)
    if row is None:
        raise NotFound("no such task visible to you; check the id")
    _check_visible(p, row["lane_key"])
    return row


def _check_lease(p: Principal, row: asyncpg.Record, lease: uuid.UUID) -> None:
    same = row["lease_id"] is not None and str(row["lease_id"]) == str(lease)
    if not (row["state"] == "held" and row["holder"] == p.sub and same and row["lease_live"]):
        why = ("its lease expired" if row["state"] == "held" and same
               else "you do not hold it under that lease")
        raise LeaseLost(f"{why}; nothing was changed. Claim again (POST /v1/claims) to get work",
                        task=row["task"])


async def heartbeat(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID
                    ) -> dict[str, Any]:
    """Extend a held lease by its stage's lease length."""
    async with conn.transaction():
        row = await _locked(conn, p, task_id)
        _check_lease(p, row, lease)
        r = await conn.fetchrow(Q["task_renew"], task_id, row["lease_seconds"], False)
    return {"code": "ok", "lease": _lease_out(r["lease_id"], r["lease_expires_at"]), "task": r["task"]}


async def progress(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                   note: str, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Record progress on a held task and renew its lease."""
    async with conn.transaction():
        row = await _locked(conn, p, task_id)
        _check_lease(p, row, lease)
        r = await conn.fetchrow(Q["task_renew"], task_id, row["lease_seconds"], True)
        ev = await _event(conn, task_id, "progress", p, {"note": note, "artifacts": artifacts,
                                                       "lease": str(lease), "stage": row["stage_key"]})
    return {"code": "ok", "task": r["task"], "event": ev,
            "lease": _lease_out(r["lease_id"], r["lease_expires_at"])}


async def transition(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                     kind: str, to: str, text: str | None, artifacts: list[dict[str, Any]]
                     ) -> dict[str, Any]:
    """Advance or reject a held task to stage `to`, releasing the hold."""
    # The common case in one round trip; NULL: a refusal, a guard, the rework cap or a new route,
    # which the statement-by-statement path below decides and words.
    fast = await conn.fetchrow(Q["transition_fast"], task_id, lease, kind, to, text, artifacts, p.sub, p.family,
                               sorted(p.features), p.oversees)
    if (out := _transition_decided(fast)) is not None:
        return out
    return await _transition_by_statements(conn, p, task_id, lease, kind, to, text, artifacts)


async def transition_as(conn: asyncpg.Connection, signer: Signer, token: str, task_id: uuid.UUID,
                        lease: uuid.UUID, kind: str, to: str, text: str | None, artifacts: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    """`transition` for a bearer token, its database read folded into the one round trip (see claim_as)."""
    jti, sub, family = auth.identity(signer, token)
    fast = await conn.fetchrow(Q["transition_by_token"], jti, sub, family, list(auth.OVERSIGHT), task_id, lease,
                               kind, to, text, artifacts)
    if (out := _transition_decided(fast)) is not None:
        return out
    p = await auth.authenticate(conn, signer, token)
    return await _transition_by_statements(conn, p, task_id, lease, kind, to, text, artifacts)


def _transition_decided(fast: asyncpg.Record | None) -> dict[str, Any] | None:
    """The answer of transition_fast / transition_by_token (recording the wake-ups), or None."""
    if fast is None or fast["task"] is None:
        return None
    if fast["route_id"] is not None:
        wake.ready(fast["route_id"])
    for route in fast["promoted"] or ():
        wake.ready(route)
    return {"code": "ok", "task": fast["task"], "event": fast["event"]}


async def _transition_by_statements(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                                    kind: str, to: str, text: str | None, artifacts: list[dict[str, Any]]
                                    ) -> dict[str, Any]:
    async with conn.transaction():
        # task_lock with the transitions to `to` (and their routes) in the same round trip.
        row = await conn.fetchrow(Q["task_lock_transition"], task_id, kind, to)
        if row is None:  # see _locked: a task moved to another stage while we waited for its lock
            row = await conn.fetchrow(Q["task_lock_transition"], task_id, kind, to)
        if row is None:
            raise NotFound("no such task visible to you; check the id")
        _check_visible(p, row["lane_key"])
        _check_lease(p, row, lease)
        base = row["base_required_features"]
        required = list(base if base is not None else row["required_features"])
        options = row["options"]
        if not options:
            targets = [r["key"] for r in await conn.fetch(Q["transition_targets"], row["stage_id"], kind)]
            hint = f"legal {kind} targets from {row['stage_key']}: {', '.join(targets)}" if targets \
                else f"no {kind} leads out of {row['stage_key']}"
            raise IllegalTransition(f"no {kind} from {row['stage_key']} to {to!r}; {hint}", task=row["task"])
        chosen = next((o for o in options if set(o["required_features"]) <= p.features), None)
        if chosen is None:
            closest = min(options, key=lambda o: len(set(o["required_features"]) - p.features))
            raise NotEligible(f"{kind} {row['stage_key']} → {to} needs "
                              f"{', '.join(p.missing(closest['required_features']))}", task=row["task"])
        if chosen["has_guard"] and not await conn.fetchval(Q["guard_holds"], task_id, chosen["id"]):
            raise GuardFailed(f"the guard on {row['stage_key']} → {to} is false for this task; "
                              "fix what it checks (GET /v1/workflows shows it) and try again", task=row["task"])
        from_stage = row["stage_key"]
        rework = dict(row["rework_by_stage"])
        data: dict[str, Any] = {"kind": kind, "from": from_stage, "to": to, "artifacts": artifacts,
                                "lease": str(lease)}
        if kind == "reject":
            data["reason"] = text
            done_here = int(rework.get(from_stage, 0))
            cap = row["max_rework"]
            if cap is not None and done_here + 1 > cap:
                reason = (f"rework cap reached: {done_here} reject(s) out of {from_stage} already "
                          f"(cap {cap}); a human must decide")
                task = await conn.fetchval(Q["task_set_blocked"], task_id, reason, row["attempts"])
                ev = await _event(conn, task_id, "blocked", p, {"reason": reason, "rework_cap": cap,
                                                              "refused": data})
                return {"code": "blocked", "task": task, "event": ev}
            rework[from_stage] = done_here + 1
        else:
            data["note"] = text
        if chosen["to_terminal"]:
            state, route = "done", None
        else:
            state = "ready"
            route = chosen["route_id"]  # the route, found with the transition; created if new
            if route is None:
                route = await _route(conn, row["lane_id"], row["lane_key"], chosen["to_stage_id"], required)
        r = await conn.fetchrow(Q["task_transition_event"], task_id, chosen["to_stage_id"], route, state,
                                1 if kind == "reject" else 0, rework, p.sub, p.family, data)
        task, ev = r["task"], r["event"]
        if state == "done":
            await _promote_dependents(conn, task_id)
        else:
            wake.ready(route)
    return {"code": "ok", "task": task, "event": ev}


async def _promote_dependents(conn: asyncpg.Connection, task_id: uuid.UUID) -> None:
    ids = [r["id"] for r in await conn.fetch(Q["dependents_lock"], task_id)]
    if ids:
        for r in await conn.fetch(Q["dependents_promote"], ids):
            wake.ready(r["route_id"])


async def release(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                  reason: str | None) -> dict[str, Any]:
    """Give a held task back: attempts +1, which may escalate it or block it for a human."""
    async with conn.transaction():
        row = await _locked(conn, p, task_id)
        _check_lease(p, row, lease)
        attempts = row["attempts"] + 1
        ctx = {"reason": reason, "lease": str(lease)}
        cand = {"id": task_id, "max_attempts": row["max_attempts"], "escalate_after": row["escalate_after"],
                "required_features": row["required_features"], "lane_id": row["lane_id"],
                "lane_key": row["lane_key"], "stage_id": row["stage_id"],
                "rework_by_stage": row["rework_by_stage"]}
        if attempts >= row["max_attempts"]:
            task = await conn.fetchval(Q["task_set_blocked"], task_id, MAX_ATTEMPTS_REASON, attempts)
            ev = await _event(conn, task_id, "blocked", p, {"reason": MAX_ATTEMPTS_REASON,
                                                          "attempts": attempts, "release_reason": reason,
                                                          "lease": str(lease)})
            return {"code": "blocked", "task": task, "event": ev}
        escalated = await _exhausted_or_escalated(conn, p, cand, attempts, ctx)
        if not escalated:
            route = await _route(conn, row["lane_id"], row["lane_key"], row["stage_id"],
                                 list(row["required_features"]))
            await conn.fetchval(Q["task_set_ready"], task_id, route, list(row["required_features"]), True,
                                attempts, dict(row["rework_by_stage"]))
            wake.ready(route)
        ev = await _event(conn, task_id, "released", p, {"reason": reason, "attempts": attempts,
                                                       "lease": str(lease), "escalated": escalated})
        task = (await conn.fetchrow(Q["task_get"], task_id))["task"]
    return {"code": "ok", "task": task, "event": ev}


async def block(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                reason: str) -> dict[str, Any]:
    """Park a held task for a human: not claimable until unblocked; the hold is released."""
    async with conn.transaction():
        row = await _locked(conn, p, task_id)
        _check_lease(p, row, lease)
        task = await conn.fetchval(Q["task_set_blocked"], task_id, reason, row["attempts"])
        ev = await _event(conn, task_id, "blocked", p, {"reason": reason, "lease": str(lease),
                                                      "stage": row["stage_key"]})
    return {"code": "ok", "task": task, "event": ev}


async def unblock(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, note: str | None
                  ) -> dict[str, Any]:
    """Make a blocked task claimable again; attempts and this stage's rework count start over."""
    async with conn.transaction():
        row = await _locked(conn, p, task_id)
        if not p.has("seat:overseer"):
            lane_feature = f"lane:{row['lane_key']}"
            bundles = [set(r["required_features"]) | set(row["required_features"]) | {lane_feature}
                       for r in await conn.fetch(Q["transitions_from_stage"], row["stage_id"])]
            if not any(b <= p.features for b in bundles):
                closest = min(bundles, key=lambda b: len(b - p.features)) if bundles else {lane_feature}
                raise NotEligible("unblocking needs seat:overseer, or the features to work this stage: "
                                  f"missing {', '.join(p.missing(closest))}", task=row["task"])
        if row["state"] != "blocked":
            raise Conflict("the task is not blocked; nothing to do", task=row["task"])
        route = await _route(conn, row["lane_id"], row["lane_key"], row["stage_id"],
                             list(row["required_features"]))
        rework = dict(row["rework_by_stage"])
        rework.pop(row["stage_key"], None)
        task = await conn.fetchval(Q["task_set_ready"], task_id, route, list(row["required_features"]), True,
                                   0, rework)
        wake.ready(route)
        ev = await _event(conn, task_id, "unblocked", p, {"note": note, "previous_attempts": row["attempts"]})
    return {"code": "ok", "task": task, "event": ev}


_CARDS: dict[Any, dict[str, Any]] = {}


async def stage_card(conn: asyncpg.Connection, stage_id: Any) -> dict[str, Any]:
    """The role card of a stage (its instructions and ways out); cached, since it never changes."""
    card = _CARDS.get(stage_id)
    if card is None:
        row = await conn.fetchrow(Q["stage_card"], stage_id)
        card = dict(row) if row else {}
        if len(_CARDS) > 10_000:
            _CARDS.clear()
        _CARDS[stage_id] = card
    return card


async def card_of(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> dict[str, Any]:
    """The role card for a task's current stage, if the caller may see the task."""
    row = await conn.fetchrow(Q["task_get"], task_id)
    if row is None:
        raise NotFound("no such task visible to you; check the id")
    _check_visible(p, row["lane_key"])
    return {"task_id": str(task_id), **await stage_card(conn, row["stage_id"])}


async def lane_cards(conn: asyncpg.Connection, p: Principal, lane_key: str) -> dict[str, Any]:
    """Every stage's role card for the workflow version a lane is bound to, in workflow order."""
    # The feature first: an outsider learns nothing about which lanes exist.
    if not (p.has(f"lane:{lane_key}") or p.oversees):
        raise NotEligible(f"reading lane {lane_key}'s cards needs feature lane:{lane_key}")
    rows = await conn.fetch(Q["lane_stages"], lane_key)
    if not rows:
        raise NotFound(f"no lane {lane_key!r}; GET /v1/me lists the lanes your features name")
    cards = [await stage_card(conn, r["stage_id"]) for r in rows if r["stage_id"] is not None]
    head = cards[0] if cards else {}
    return {"lane": lane_key, "workflow": head.get("workflow"),
            "workflow_version": head.get("workflow_version"), "cards": cards}


async def get(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> dict[str, Any]:
    """One task, if the caller may see its lane."""
    row = await conn.fetchrow(Q["task_get"], task_id)
    if row is None:
        raise NotFound("no such task visible to you; check the id")
    _check_visible(p, row["lane_key"])
    task: dict[str, Any] = row["task"]
    return task


async def events(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, after: int, limit: int
                 ) -> list[dict[str, Any]]:
    """A task's events in order, after the given event id."""
    await get(conn, p, task_id)
    return [r["event"] for r in await conn.fetch(Q["events_of_task"], task_id, after, limit)]


async def me(conn: asyncpg.Connection, p: Principal) -> dict[str, Any]:
    """Who the caller is, what it may do now, and what it holds."""
    held = await conn.fetch(Q["held_by_agent"], p.sub)
    return {
        "sub": p.sub,
        "family": p.family,
        "features": sorted(p.features),
        "scope": list(p.scope) if p.scope is not None else None,
        "max_active": p.max_active,
        "lanes": sorted(f.split(":", 1)[1] for f in p.features if f.startswith("lane:")),
        "held": [{"task": r["task"], "lease": _lease_out(r["lease_id"], r["lease_expires_at"])} for r in held],
    }
