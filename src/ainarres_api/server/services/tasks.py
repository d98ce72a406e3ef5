"""The nine agent verbs and the task reads: the rules of the substrate."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import (
    AinarresError,
    AlreadyHolding,
    Conflict,
    GuardFailed,
    IllegalTransition,
    Invalid,
    LeaseLost,
    NotEligible,
    NotFound,
    Unauthenticated,
)
from ainarres_api.server.services import auth, wake
from ainarres_api.server.services.auth import Identity, Principal
from ainarres_api.server.services.digest import request_digest

MAX_ATTEMPTS_REASON = "max attempts exceeded"
# A human act's reason on the governance trail: at most this long (the trail's bound for every act).
TRAIL_REASON_MAX = 2000
# One claim never walks more than this many recovery steps (blocks/escalations) before answering.
_MAX_CLAIM_STEPS = 32
_SEATS = sorted(auth.OVERSIGHT)  # the transition's visibility rule: a caller holding one sees every lane


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


async def _visible(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> asyncpg.Record:
    """The task (task_get), if the caller may see it (may_see)."""
    row = await conn.fetchrow(Q["task_get"], task_id, sorted(p.features), p.oversees)
    if row is None or not row["visible"]:
        raise _refused("not_found", None)
    return row


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


async def create(conn: asyncpg.Connection, p: Principal, body: dict[str, Any], limits: Limits
                 ) -> tuple[dict[str, Any], bool]:
    """Create a task at its lane's initial stage; returns (task, created) — idempotent by key."""
    lane_key = body["lane"]
    _payload_size_ok(body.get("payload", {}), limits, "payload")
    async with conn.transaction():
        # The feature first: an outsider learns nothing about which lanes exist.
        if not p.has(f"lane:{lane_key}"):
            raise NotEligible(f"creating in lane {lane_key} needs feature lane:{lane_key}"
                              f"{await _why_missing(conn, p, [f'lane:{lane_key}'])}; create it with the token of an "
                              "agent whose family holds it (GET /v1/me lists your lanes)")
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
            await auth.registered(conn, "required_features", required)
        depends = sorted({str(d) for d in body.get("depends_on") or []})
        idem = body.get("idempotency_key")
        same = {k: v for k, v in body.items() if k != "idempotency_key"} | {
            "required_features": required, "depends_on": depends}
        req_hash = request_digest(same) if idem else None
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
            raise NotFound(f"depends_on: no such task: {', '.join(missing)}; check the ids (a task in a lane you "
                           "cannot see does not exist for you)")
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


# Why a held-task verb changed nothing, by the verdict its statement gave (lease_state, not_found).
_LEASE_WORDS = {
    "expired": "your lease on it expired (it has not been taken over yet)",
    "foreign": "it is held by another agent under that lease; present your own lease",
    "ended": "you no longer hold it under that lease (the hold ended: finished, released, blocked, or taken "
             "over after it expired)",
}


def _refused(verdict: str, task: dict[str, Any] | None, sub: str | None = None) -> AinarresError:
    """The refusal for a held-task verb's verdict (not_found or a lease_state); for a hold that ended, the detail
    says which way, from the task as it is now (SPEC §3: expired and recovered, or held by another agent)."""
    if verdict == "not_found":
        return NotFound("no such task visible to you; check the id")
    words = _LEASE_WORDS[verdict]
    if verdict == "ended" and task is not None:
        if task.get("state") != "held":
            words = f"this lease holds nothing: the task is now {task.get('state')} (stage {task.get('stage')})"
        elif task.get("holder") == sub:  # another claim under this identity (a worker sharing the token too)
            words = "the task is held under another lease of this identity; this one holds nothing"
        else:
            words = "another agent holds the task now (taken over after this lease expired, or claimed after " \
                    "the task was given back)"
    return LeaseLost(f"{words}; nothing was changed. Claim again (POST /v1/claims) to get work", task=task)


async def claim(conn: asyncpg.Connection, who: Identity | Principal, lane: str | None, limits: Limits,
                prefer: Collection[int] = (), after: int | None = None) -> tuple[dict[str, Any], Principal]:
    """Take the best task the caller may do, recovering expired leases on the way. The statement reads the
    caller (refused: 401, nothing done); the answer, and the caller as it read it (which a refusal carries too).
    `after`: the event of the move whose `next` this claim is, kept on the claim's event (`next_of`); a hold a
    claim for that move took already is answered again (`replay: true`), never a second one."""
    me = auth.named(who)
    read: list[Principal] = []
    with _carrying(read):
        for _ in range(_MAX_CLAIM_STEPS):
            row = await conn.fetchrow(Q["claim"], me.jti, me.sub, me.family, lane, limits.max_routes, list(prefer),
                                      after)
            p = await auth.admit(conn, row, me, seen=True)
            read.append(p)
            verdict = row["verdict"]
            if verdict in ("take", "again"):
                out = {"code": "claimed", "task": row["task"],
                       "lease": _lease_out(row["lease_id"], row["lease_expires_at"]),
                       "card": await stage_card(conn, row["stage_id"]), "event": row["event"],
                       "context": row["context"]}
                return (out | {"replay": True} if verdict == "again" else out), p
            if verdict == "empty":
                return {"code": "empty", "task": None, "lease": None}, p
            if verdict == "full":
                await _refuse_if_full(conn, p)  # counted again with a fresh snapshot: a hold may have ended
            elif verdict == "recover":
                await _recover(conn, p, row["candidate"])
            # stale (a claim of this agent committed meanwhile, or its first: admit recorded it), or recovered:
            # claim again with a new snapshot
        return {"code": "empty", "task": None, "lease": None}, read[-1]


async def prospects(conn: asyncpg.Connection, p: Principal, lane: str | None) -> dict[str, Any]:
    """After a claim found nothing: refuse a claim that can never match (a lane unknown or not held, every way
    out of the lane's stages needing a feature the caller lacks), else say what work exists that the caller
    may not take yet, so that a harness can decide to wait or stop."""
    row = await conn.fetchrow(Q["claim_prospects"], sorted(p.features), lane)
    if row["lanes"] == 0:
        if lane is not None:
            # Unknown and unheld lanes answer alike: no lane enumeration.
            raise NotEligible(f"claiming from lane {lane} needs feature lane:{lane}"
                              f"{await _why_missing(conn, p, [f'lane:{lane}'])}; GET /v1/me lists your lanes")
        raise NotEligible("you hold no lane feature (lane:<key>), so no claim can ever match; ask an admin to "
                          "provision your family with a lane")
    ways = row["ways"]
    if ways and not any(not w["missing"] for w in ways):
        closest = min(ways, key=lambda w: len(w["missing"]))
        where = f"lane {lane}" if lane else "any of your lanes"
        raise NotEligible(
            f"no claim in {where} can ever match: every way out of its stages needs a feature you lack; the "
            f"closest, {closest['kind']} out of {closest['lane']}/{closest['stage']}, needs "
            f"{', '.join(closest['missing'])}{await _why_missing(conn, p, closest['missing'])}")
    pending = {"held": row["held"], "waiting": row["waiting"], "blocked": row["blocked"]}
    if pending["held"] or pending["waiting"]:
        hint = ("work exists that you may not take yet (held by others, or waiting on dependencies): wait for it "
                "(wait_seconds) or claim again later")
    elif pending["blocked"]:
        hint = "the only work left is blocked for a human; nothing will come until someone unblocks it"
    else:
        hint = "no work is queued for you now; new tasks wake a waiting claim (wait_seconds)"
    return {"code": "empty", "task": None, "lease": None, "pending": pending, "hint": hint}


async def _why_missing(conn: asyncpg.Connection, p: Principal, features: list[str]) -> str:
    """Why the caller lacks features its family may hold: the active denials among them, worded."""
    rows = await conn.fetch(Q["denials_of"], p.family, features)
    if not rows:
        return ""
    parts = [f"{r['feature']} is denied to family {p.family}"
             + (f" until {r['expires_at'].isoformat()}" if r["expires_at"] else "") + f" ({r['reason']})"
             for r in rows]
    return " — " + "; ".join(parts)


async def _refuse_if_full(conn: asyncpg.Connection, p: Principal) -> None:
    """Refuse the claim if the agent holds max_active live leases (read in a statement of its own)."""
    rows = await conn.fetch(Q["held_by_agent"], p.sub)
    if len(rows) >= p.max_active:
        first = rows[0]
        raise AlreadyHolding(
            f"you already hold {len(rows)} task(s) and family {p.family} allows {p.max_active}; "
            "finish one (advance, reject, release or block) before claiming another",
            task=first["task"], lease=_lease_out(first["lease_id"], first["lease_expires_at"]),
        )


async def _recover(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> None:
    """Apply what an expired hold a claim met is due (recovery_due: block or escalate)."""
    async with conn.transaction():
        cand = await conn.fetchrow(Q["claim_recover"], task_id)
        if cand is None or cand["due"] is None:  # someone else recovered it, or nothing is due any more
            return
        prev = {"previous_holder": cand["holder"], "previous_lease": str(cand["lease_id"])}
        await _apply_due(conn, p, cand, cand["attempts"], prev)


async def _apply_due(conn: asyncpg.Connection, p: Principal | None, row: Mapping[str, Any], attempts: int,
                     ctx: dict[str, Any]) -> dict[str, Any]:
    """Block or escalate a task after a failed hold, as `row["due"]` says; returns the event."""
    if row["due"] == "block":
        await conn.fetchval(Q["task_set_blocked"], row["id"], MAX_ATTEMPTS_REASON, attempts)
        return await _event(conn, row["id"], "blocked", p, {"reason": MAX_ATTEMPTS_REASON, "attempts": attempts,
                                                           **ctx})
    required = list(row["escalated"])
    route = await _route(conn, row["lane_id"], row["lane_key"], row["stage_id"], required)
    await conn.fetchval(Q["task_escalate"], row["id"], route, required, attempts)
    wake.ready(route)
    return await _event(conn, row["id"], "escalated", p, {"from_tier": row["tier"], "to_tier": row["tier"] + 1,
                                                         "attempts": attempts, **ctx})


async def heartbeat(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID
                    ) -> dict[str, Any]:
    """Extend a held lease by its stage's lease length."""
    r = await conn.fetchrow(Q["renew"], task_id, lease, p.sub, p.family, False, None, [],
                            sorted(p.features), p.oversees)
    if r["verdict"] != "ok":
        raise _refused(r["verdict"], r["task"], p.sub)
    return {"code": "ok", "lease": _lease_out(r["lease_id"], r["lease_expires_at"]), "task": r["task"]}


async def progress(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                   note: str, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Record progress on a held task and renew its lease."""
    r = await conn.fetchrow(Q["renew"], task_id, lease, p.sub, p.family, True, note, artifacts,
                            sorted(p.features), p.oversees)
    if r["verdict"] not in ("ok", "replay"):
        raise _refused(r["verdict"], r["task"], p.sub)
    out = {"code": "ok", "task": r["task"], "event": r["event"],
           "lease": _lease_out(r["lease_id"], r["lease_expires_at"])}
    return out | {"replay": True} if r["verdict"] == "replay" else out


async def transition(conn: asyncpg.Connection, who: Identity | Principal, task_id: uuid.UUID, lease: uuid.UUID,
                     kind: str, to: str, text: str | None, artifacts: list[dict[str, Any]]
                     ) -> tuple[dict[str, Any], Principal]:
    """Advance or reject a held task to stage `to`, releasing the hold. The statement reads the caller
    (refused: 401, nothing done); the answer, and the caller as it read it (which a refusal carries too)."""
    me = auth.named(who)
    args = (task_id, lease, kind, to, text, artifacts, me.jti, me.sub, me.family, _SEATS)
    read: list[Principal] = []
    with _carrying(read):
        for _ in range(3):
            r, capped = await _move(conn, me, args, task_id, kind, to, read, finishing=False)
            if r["verdict"] == "no_route":  # routes are append-only: creating one ahead of the move is harmless
                async with conn.transaction():
                    await _route(conn, r["lane_id"], r["lane_key"], r["to_stage_id"], list(r["base_required"]))
                continue
            if r["verdict"] == "dependents":
                r, capped = await _move(conn, me, args, task_id, kind, to, read, finishing=True)
                if r["verdict"] in ("no_route", "dependents"):
                    continue
            p = read[-1]
            return capped or await _transitioned(conn, p, r, task_id, kind, to, lease, text, artifacts), p
        raise AssertionError("transition: the target route was not found after creating it")


async def _move(conn: asyncpg.Connection, me: Identity, args: tuple[Any, ...], task_id: uuid.UUID, kind: str,
                to: str, read: list[Principal], *, finishing: bool) -> tuple[asyncpg.Record, dict[str, Any] | None]:
    """The transition statement once, the caller it read admitted (and kept in `read`), with what its verdict
    owes in its own transaction: a reject's strike and rework cap (`_settle`); `finishing`, a task others wait on
    finished and its dependents promoted, in a statement after the lock, whose snapshot sees every prerequisite
    that finished meanwhile. An advance that finishes nothing pays for no transaction of its own."""
    if kind == "advance" and not finishing:
        r = await _transition_statement(conn, args, to, finishing)
        read.append(await auth.admit(conn, r, me, seen=True))
        return r, None
    # A reject also strikes the producer of the rejected work (governance, ADR 0015), and one past the rework cap
    # blocks the task: both in the same transaction.
    async with conn.transaction():
        r = await _transition_statement(conn, args, to, finishing)
        p = await auth.admit(conn, r, me, seen=True)
        read.append(p)
        if finishing and r["verdict"] == "ok":
            await _promote_dependents(conn, task_id)
        return r, await _settle(conn, p, task_id, kind, r)


async def _transition_statement(conn: asyncpg.Connection, args: tuple[Any, ...], to: str, finishing: bool
                                ) -> asyncpg.Record:
    try:
        return await conn.fetchrow(Q["transition"], *args, finishing)
    except asyncpg.QueryCanceledError:
        # The statement time-out: a transition's own work is a few index lookups, so what ran long is its guard
        # (a JSONPath over a large payload). Refused; the statement changed nothing.
        raise GuardFailed(f"the guard on the way to {to!r} did not finish within the statement time-out "
                          "(AINARRES_STATEMENT_TIMEOUT_MS); nothing was changed. Try again later; if it keeps "
                          "happening, ask an admin to simplify the guard") from None


@contextlib.contextmanager
def _carrying(read: list[Principal]) -> Iterator[None]:
    """A refusal raised once the caller was read carries it (AinarresError.caller), so that it is not read again
    before the refusal is answered (api/verbs.py `run`)."""
    try:
        yield
    except AinarresError as exc:
        if read and not isinstance(exc, Unauthenticated):
            exc.caller = read[-1]
        raise


async def _settle(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, kind: str, r: asyncpg.Record
                  ) -> dict[str, Any] | None:
    """What a transition's verdict still owes inside its transaction (the task still locked): the rework cap's
    block for a human (transition_capped), whose answer it returns, and a reject's strike."""
    capped = None
    if r["verdict"] == "rework_cap":
        c = await conn.fetchrow(Q["transition_capped"], task_id, r["rework_here"], r["stage_key"], r["max_rework"],
                                p.sub, p.family, r["refused_call"])
        capped = {"code": "blocked", "task": c["task"], "event": c["event"]}
    if kind == "reject" and (capped is not None or r["verdict"] == "ok"):
        strike = await conn.fetchrow(Q["governance_strike"], task_id, (capped or r)["event"]["id"], p.family)
        if strike["banned"]:
            wake.narrowed()  # the banned family's waiting claims look again, and are refused if nothing is left
    return capped


async def _transitioned(conn: asyncpg.Connection, p: Principal, r: asyncpg.Record, task_id: uuid.UUID, kind: str,
                        to: str, lease: uuid.UUID, text: str | None, artifacts: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    """The answer to a transition statement's verdict (recording the wake-up), or its refusal, with what a
    refusal names read now (the rare paths run statements of their own)."""
    verdict, task, stage = r["verdict"], r["task"], r["stage_key"]
    if verdict == "ok":
        if r["route_id"] is not None:
            wake.ready(r["route_id"])
        return {"code": "ok", "task": task, "event": r["event"]}
    if verdict == "ended" and (ev := await conn.fetchval(Q["transition_replay"], task_id, p.sub, lease, kind, to,
                                                         artifacts, text)):
        # The same call, already applied (its first answer was lost): its outcome again, marked as a replay.
        return {"code": "blocked" if ev["type"] == "blocked" else "ok", "task": task, "event": ev, "replay": True}
    if verdict in ("illegal_transition", "not_eligible"):
        o = await conn.fetchrow(Q["transition_options"], r["stage_id"], kind, to)
        if verdict == "illegal_transition":
            targets = list(o["targets"] or [])
            hint = f"legal {kind} targets from {stage}: {', '.join(targets)}" if targets \
                else f"no {kind} leads out of {stage}"
            raise IllegalTransition(f"no {kind} from {stage} to {to!r}; {hint}", task=task)
        closest = min((set(opt) for opt in o["options"]), key=len)
        raise NotEligible(f"{kind} {stage} → {to} needs {', '.join(sorted(closest))}", task=task)
    if verdict == "guard_failed":
        # A guard reads the task (task_json: its payload as created, its counters), which no verb edits: sending
        # the move again changes nothing.
        raise GuardFailed(f"the guard on {stage} → {to} (the card shows it) is false for this task, which it reads "
                          "as it stands (the payload it was created with, its counters); take another way out the "
                          "card lists, or block the task for a human if none fits", task=task)
    raise _refused(verdict, task, p.sub)


async def _promote_dependents(conn: asyncpg.Connection, task_id: uuid.UUID) -> None:
    ids = [r["id"] for r in await conn.fetch(Q["dependents_lock"], task_id)]
    if ids:
        for r in await conn.fetch(Q["dependents_promote"], ids, task_id):
            wake.ready(r["route_id"])


async def _lock(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID | None
                ) -> asyncpg.Record:
    """The task locked (task_lock) with the state of `lease` on it; refused if the caller may not see it."""
    row = await conn.fetchrow(Q["task_lock"], task_id, p.sub, lease, sorted(p.features), p.oversees)
    if row is None or not row["visible"]:
        raise _refused("not_found", None)
    return row


async def release(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                  reason: str | None) -> dict[str, Any]:
    """Give a held task back: attempts +1, which may escalate it or block it for a human."""
    async with conn.transaction():
        row = await _lock(conn, p, task_id, lease)
        if row["lease"] == "ended" and (ev := await _replay(conn, p, task_id, lease, ("released", "reason", reason),
                                                            ("blocked", "release_reason", reason))):
            return {"code": "blocked" if ev["type"] == "blocked" else "ok", "task": row["task"], "event": ev,
                    "replay": True}
        if row["lease"] != "ok":
            raise _refused(row["lease"], row["task"], p.sub)
        attempts = row["attempts"] + 1
        if row["due"] is not None:
            ev = await _apply_due(conn, p, row, attempts, {"release_reason" if row["due"] == "block" else "reason":
                                                            reason, "lease": str(lease)})
            task = (await conn.fetchrow(Q["task_get"], task_id, [], True))["task"]
            if row["due"] == "block":
                return {"code": "blocked", "task": task, "event": ev}
            released = await _event(conn, task_id, "released", p, {"reason": reason, "attempts": attempts,
                                                                   "lease": str(lease), "escalated": True})
            return {"code": "ok", "task": task, "event": released}
        task = await _back_in_queue(conn, row, task_id, attempts, dict(row["rework_by_stage"]), to_tail=True)
        ev = await _event(conn, task_id, "released", p, {"reason": reason, "attempts": attempts,
                                                       "lease": str(lease), "escalated": False})
    return {"code": "ok", "task": task, "event": ev}


async def _back_in_queue(conn: asyncpg.Connection, row: asyncpg.Record, task_id: uuid.UUID, attempts: int,
                         rework: dict[str, Any], *, to_tail: bool) -> dict[str, Any]:
    """A locked task (`_lock`'s row) back in its route's queue with these counts — at the tail of its priority, or
    in its place — its waiters woken once the request succeeds; the task as it is now."""
    required = list(row["required_features"])
    route = await _route(conn, row["lane_id"], row["lane_key"], row["stage_id"], required)
    task: dict[str, Any] = await conn.fetchval(Q["task_set_ready"], task_id, route, required, to_tail, attempts,
                                               rework)
    wake.ready(route)
    return task


async def give_back(conn: asyncpg.Connection, p: Principal, task_id: Any, lease: Any) -> None:
    """Give back a task claimed for a client that left before the answer (a waiting claim whose connection closed
    as it was made): ready again in its place, its attempts as they were (no hold failed), with a `released` event
    saying so. Nothing if the hold has ended meanwhile."""
    task_id, lease = uuid.UUID(str(task_id)), uuid.UUID(str(lease))
    async with conn.transaction():
        row = await _lock(conn, p, task_id, lease)
        if row["lease"] != "ok":
            return
        await _back_in_queue(conn, row, task_id, row["attempts"], dict(row["rework_by_stage"]), to_tail=False)
        await _event(conn, task_id, "released", p, {"reason": "the claimer left before the claim's answer",
                                                    "attempts": row["attempts"], "lease": str(lease),
                                                    "escalated": False, "counted": False})


async def block(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                reason: str) -> dict[str, Any]:
    """Park a held task for a human: not claimable until unblocked; the hold is released."""
    r = await conn.fetchrow(Q["block_held"], task_id, lease, p.sub, p.family, reason, sorted(p.features), p.oversees)
    if r["verdict"] == "ended" and (ev := await _replay(conn, p, task_id, lease, ("blocked", "reason", reason))):
        return {"code": "ok", "task": r["task"], "event": ev, "replay": True}
    if r["verdict"] != "ok":
        raise _refused(r["verdict"], r["task"], p.sub)
    return {"code": "ok", "task": r["task"], "event": r["event"]}


async def _replay(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, lease: uuid.UUID,
                  *calls: tuple[str, str, str | None]) -> dict[str, Any] | None:
    """The event of the caller's own call that already ended its hold under `lease`, if the call is the same
    (an event type, and the field of its data that must equal the call's text), for a retry to be told."""
    for type_, key, value in calls:
        ev: dict[str, Any] | None = await conn.fetchval(Q["replay_of"], task_id, p.sub, lease, type_, key, value)
        if ev is not None:
            return ev
    return None


async def unblock(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID, note: str | None, *,
                  on_trail: bool = False) -> dict[str, Any]:
    """Make a blocked task claimable again. A human's unblock (seat:overseer: ADR 0006) starts attempts and this
    stage's rework count over; an agent's keeps them, or blocking and unblocking a task would take the rework
    cap, the escalation and the max-attempts block out of the workflow.

    Lifting a block the substrate made (max attempts, the rework cap) is a human's decision (SPEC §8): whichever
    call makes it, the note is its reason on the governance trail, written here with the unblock. `on_trail`: the
    overseer's call (POST /v1/governance/unblock), which puts every unblock it makes on the trail."""
    async with conn.transaction():
        row = await _lock(conn, p, task_id, None)
        substrate = row["state"] == "blocked" and row["blocked_by"] == "substrate"
        if substrate and not p.has("seat:overseer"):
            # The substrate parked it (max attempts, the rework cap): a human decides whether it goes on.
            raise NotEligible(f"the substrate blocked this task ({row['blocked_reason']}); a human must lift it: only "
                              "seat:overseer may unblock it (the board's Needs you inbox, or POST "
                              "/v1/governance/unblock)", task=row["task"])
        if substrate and not (note and note.strip() and len(note) <= TRAIL_REASON_MAX):
            raise Invalid(f"note: lifting a block the substrate made is a human's decision, recorded on the "
                          f"governance trail: say what was decided (1–{TRAIL_REASON_MAX} characters)")
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
        rework, attempts = dict(row["rework_by_stage"]), row["attempts"]
        human = p.has("seat:overseer")
        if human:
            rework.pop(row["stage_key"], None)
            attempts = 0
        task = await _back_in_queue(conn, row, task_id, attempts, rework, to_tail=True)
        ev = await _event(conn, task_id, "unblocked", p, {"note": note, "previous_attempts": row["attempts"],
                                                          "counts_reset": human})
        if substrate or on_trail:
            await conn.execute(Q["trail_unblock"], p.sub, p.family, task_id, note, row["blocked_by"],
                               row["blocked_reason"])
    return {"code": "ok", "task": task, "event": ev}


_CARDS: dict[Any, dict[str, Any]] = {}

# On every card: what to do when its instructions cannot be followed.
WHEN_STUCK = ("If these instructions cannot be followed (access, information or a decision you cannot get), block "
              "the task with a reason that says exactly what is needed: a human will see it. Release it instead "
              "only if another agent could do it and you cannot (it counts as a failed attempt). Never advance work "
              "you did not do.")


async def stage_card(conn: asyncpg.Connection, stage_id: Any) -> dict[str, Any]:
    """The role card of a stage (its instructions and ways out); cached, since it never changes."""
    card = _CARDS.get(stage_id)
    if card is None:
        row = await conn.fetchrow(Q["stage_card"], stage_id)
        card = {**dict(row), "when_stuck": WHEN_STUCK} if row else {}
        if len(_CARDS) > 10_000:
            _CARDS.clear()
        _CARDS[stage_id] = card
    return card


async def card_of(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> dict[str, Any]:
    """The role card for a task's current stage, if the caller may see the task."""
    row = await _visible(conn, p, task_id)
    return {"task_id": str(task_id), **await stage_card(conn, row["stage_id"]),
            "context": await conn.fetchval(Q["lane_context_of"], row["lane_key"])}


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
            "workflow_version": head.get("workflow_version"), "cards": cards,
            "context": await conn.fetchval(Q["lane_context_of"], lane_key)}


async def get(conn: asyncpg.Connection, p: Principal, task_id: uuid.UUID) -> dict[str, Any]:
    """One task, if the caller may see its lane; `abandoned` when it is held past its lease."""
    row = await _visible(conn, p, task_id)
    task: dict[str, Any] = row["task"]
    return {**task, "abandoned": True} if row["abandoned"] else task


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
