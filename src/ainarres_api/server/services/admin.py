"""Administration: the vocabulary, families, denials, tokens, workflows, projects and lanes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound, PayloadTooLarge
from ainarres_api.server.services import auth, wake
from ainarres_api.server.services.auth import Principal, Signer

MAX_CONTEXT_BYTES = 65_536


def _bounded_context(context: dict[str, Any]) -> None:
    # Like a task's payload (services/tasks.py): a JSON field over its size bound is 413, not 422 (ADR 0005).
    size = len(json.dumps(context, separators=(",", ":")).encode())
    if size > MAX_CONTEXT_BYTES:
        raise PayloadTooLarge(f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES}. Keep documents "
                              "elsewhere and store references (a repository URL, a path) here")


async def _unlike(conn: asyncpg.Connection, kind: str, key: str) -> None:
    """Refuses a key that differs from one that exists only in case (`role:Dev` beside `role:dev`, lane `Backend`
    beside `backend`): a model retyping a key would make a second thing that nothing else names, and work that
    requires it would match no one (SPEC: typos are refused, not silently unmatched). Inside the create's
    transaction, serialised per key in any case, so that two look-alikes sent at once cannot both pass."""
    await conn.execute(Q["key_lock"], f"{kind}:{key.lower()}")
    other = await conn.fetchval(Q[f"{kind}_look_alike"], key)
    if other is not None:
        raise Conflict(f"a {kind} {other!r} exists, which differs from {key!r} only in case; keys are "
                       f"case-sensitive and look-alikes are refused: use {other!r}")


async def create_feature(conn: asyncpg.Connection, name: str, description: str) -> dict[str, Any]:
    """Register a feature so it can be provisioned, required and denied."""
    async with conn.transaction():
        await _unlike(conn, "feature", name)
        return dict(await conn.fetchrow(Q["feature_insert"], name, description))


async def get_feature(conn: asyncpg.Connection, name: str) -> dict[str, Any]:
    """One registered feature."""
    row = await conn.fetchrow(Q["feature_get"], name)
    if row is None:
        raise NotFound(f"no feature {name!r}; register it with POST /v1/features")
    return dict(row)


async def list_features(conn: asyncpg.Connection, after: str, kind: str | None, limit: int
                        ) -> list[dict[str, Any]]:
    """Registered features in name order, after a cursor."""
    return [dict(r) for r in await conn.fetch(Q["features_list"], after, kind, limit)]


async def get_family(conn: asyncpg.Connection, key: str) -> dict[str, Any]:
    """A family with its provisioned features and its denials."""
    row = await conn.fetchrow(Q["family_get"], key)
    if row is None:
        raise NotFound(f"no family {key!r}; GET /v1/families lists them")
    fam = dict(row)
    fam["features"] = list(fam["features"])
    fam["denials"] = [dict(d) for d in await conn.fetch(Q["denials_of_family"], key)]
    return fam


async def list_families(conn: asyncpg.Connection, after: str, limit: int) -> list[dict[str, Any]]:
    """Families in key order, after a cursor."""
    return [await get_family(conn, r["key"]) for r in await conn.fetch(Q["families_list"], after, limit)]


async def create_family(conn: asyncpg.Connection, key: str, features: list[str], description: str,
                        max_active: int) -> dict[str, Any]:
    """A new family provisioned with registered features."""
    async with conn.transaction():
        await auth.registered(conn, "features", features)
        await _unlike(conn, "family", key)
        await conn.execute(Q["family_insert"], key, description, max_active)
        await conn.execute(Q["family_features_add"], key, sorted(set(features)))
        return await get_family(conn, key)


def may_govern(p: Principal, family: str, feature: str | None, act: str = "deny or lift features of") -> None:
    """ADR 0008: overseers govern other families' work features; seats and their own family are for admins. `act`
    names what was asked, for the refusal (`feature` None: the family as a whole)."""
    if p.has("seat:admin"):
        return
    if feature is not None and feature.startswith("seat:"):
        raise NotEligible(f"only seat:admin may {act.removesuffix(' features of')} a seat:* feature")
    if family == p.family:
        raise NotEligible(f"an overseer may not {act} its own family; ask another overseer or an admin")


def admin_denied(family: str, feature: str) -> NotEligible:
    """The refusal of an overseer's lift of a denial an admin made (either lift: admin.lift, governance.lift)."""
    return NotEligible(f"family {family}'s {feature} was denied by an admin (an administrative decision, as a "
                       "disable is): only seat:admin lifts it")


async def lock_admins(conn: asyncpg.Connection) -> None:
    """Take the lock every change that may take seat:admin from a family holds while it checks and makes the change
    (`keep_an_admin`); first in its transaction, before any family's row."""
    await conn.execute(Q["admins_lock"])


async def keep_an_admin(conn: asyncpg.Connection, family: str, doing: str = "doing this") -> None:
    """Refuse a change that would leave no enabled family able to administer (a lock-out). The caller's transaction
    holds `lock_admins`: two such changes checked at once would each see the other's family still an admin."""
    holds = await conn.fetchval(Q["family_holds_admin"], family)
    if holds and not await conn.fetchval(Q["other_admin_families"], family):
        raise Conflict(f"family {family} is the last one holding seat:admin; {doing} would lock every "
                       "admin out. Provision seat:admin to another family first")


async def _trail_state(conn: asyncpg.Connection, p: Principal, key: str, disabled: bool, reason: str | None) -> None:
    """A disable or an enable that changed the family, on the governance trail (migration 0024), with its reason or
    a note that none was given."""
    act = "disable" if disabled else "enable"
    await conn.execute(Q["trail_family_state"], p.sub, p.family, act, key, reason or f"{act}d; no reason given",
                       p.has("seat:admin"))


async def update_family(conn: asyncpg.Connection, p: Principal, key: str, features: list[str] | None,
                        disabled: bool | None, max_active: int | None, description: str | None
                        ) -> dict[str, Any]:
    """Change what a family holds, or disable it; takes effect on its agents' next call."""
    takes_admin = disabled or (features is not None and "seat:admin" not in features)
    async with conn.transaction():
        if takes_admin:
            await lock_admins(conn)
        fam = await conn.fetchrow(Q["family_lock"], key)
        if fam is None:
            raise NotFound(f"no family {key!r}; GET /v1/families lists them")
        if takes_admin:
            await keep_an_admin(conn, key)
        if features is not None:
            await auth.registered(conn, "features", features)
            await conn.execute(Q["family_features_clear"], key)
            await conn.execute(Q["family_features_add"], key, sorted(set(features)))
            wake.narrowed()
        await conn.execute(Q["family_update"], key, disabled, max_active, description, True)
        if disabled is not None and disabled != fam["disabled"]:
            await _trail_state(conn, p, key, disabled, None)
        return await get_family(conn, key)


async def set_family_disabled(conn: asyncpg.Connection, p: Principal, key: str, disabled: bool,
                              reason: str | None = None) -> dict[str, Any]:
    """Disable or re-enable a family as a governance act (POST /v1/families/{key}/disable|enable).

    ADR 0008: seats are an admin's decision, so a caller without seat:admin may neither disable nor
    re-enable a family provisioned with a seat:* feature (an admin family among them); nobody disables
    their own family (a lock-out) or the last enabled admin family."""
    async with conn.transaction():
        if disabled:
            await lock_admins(conn)
        fam = await conn.fetchrow(Q["family_lock"], key)
        if fam is None:
            raise NotFound(f"no family {key!r}; GET /v1/families lists them")
        if not disabled and fam["disabled_by_admin"] and not p.has("seat:admin"):
            raise NotEligible(f"family {key} was disabled by an admin; only seat:admin may re-enable it")
        if disabled and key == p.family:
            raise Conflict(f"{key} is your own family: disabling it would lock you out; ask another overseer "
                           "or an admin")
        if not p.has("seat:admin"):
            seats = list(await conn.fetchval(Q["family_seats"], key))
            if seats:
                raise NotEligible(f"family {key} holds {', '.join(seats)}: only seat:admin may "
                                  f"{'disable' if disabled else 're-enable'} a family that holds a seat")
        if disabled:
            await keep_an_admin(conn, key)
        await conn.execute(Q["family_update"], key, disabled, None, None, p.has("seat:admin"))
        if disabled != fam["disabled"]:  # a disable of a disabled family (or the reverse) changes nothing to record
            await _trail_state(conn, p, key, disabled, reason)
        return await get_family(conn, key)


async def deny(conn: asyncpg.Connection, p: Principal, family: str, feature: str, reason: str,
               expires_at: datetime | None) -> dict[str, Any]:
    """Veto a feature for a family, now, until lifted or until it expires."""
    if expires_at is not None and expires_at <= datetime.now(UTC):  # it would never take effect
        raise Invalid("expires_at: this time has passed; give a time to come, or leave it out for a denial that "
                      "lasts until lifted")
    await auth.registered(conn, "feature", [feature])
    async with conn.transaction():
        if feature == "seat:admin":
            await lock_admins(conn)
        if await conn.fetchval(Q["family_lock"], family) is None:
            raise NotFound(f"no family {family!r}")
        may_govern(p, family, feature)
        if feature == "seat:admin":
            await keep_an_admin(conn, family)
        row = await conn.fetchrow(Q["denial_insert"], family, feature, reason, expires_at, p.sub, p.family,
                                  p.has("seat:admin"))
        if row is None:
            held = await conn.fetchrow(Q["denial_kind"], family, feature)
            if held is not None and (kind := held["governance"]):
                raise Conflict(f"family {family} is under a {kind} governance ban of {feature}; an overseer lifts "
                               "it with POST /v1/governance/lifts (family, feature, reason)")
            raise Conflict(f"family {family} already has an active denial of {feature}; "
                           "DELETE it first to change it")
        wake.narrowed()
    return {"family": family, **dict(row)}


async def get_denial(conn: asyncpg.Connection, family: str, feature: str) -> dict[str, Any]:
    """One denial of a family."""
    row = await conn.fetchrow(Q["denial_get"], family, feature)
    if row is None:
        raise NotFound(f"family {family!r} has no denial of {feature!r}")
    return {"family": family, **dict(row)}


async def lift(conn: asyncpg.Connection, p: Principal, family: str, feature: str) -> None:
    """Remove a family's denial of a feature (on the governance trail, when it was in force)."""
    may_govern(p, family, feature)
    row = await conn.fetchrow(Q["denial_delete"], family, feature, p.sub, p.family, p.has("seat:admin"))
    if row is None:  # lifted already, or never denied: what was asked holds (a retried DELETE is not refused)
        if not await conn.fetchval(Q["family_known"], family):
            raise NotFound(f"no family {family!r}")
        await auth.feature_exists(conn, feature)
        return
    if not row["lifted"] and not row["governance"] and row["by_admin"]:
        raise admin_denied(family, feature)
    if not row["lifted"]:
        raise Conflict(f"family {family!r}'s denial of {feature!r} is a {row['governance']} governance ban; lift it "
                       "with POST /v1/governance/lifts (family, feature, reason), which records it on the trail")


async def mint_token(conn: asyncpg.Connection, signer: Signer, p: Principal | None, family: str,
                     ttl_seconds: int, scope: list[str] | None, sub: str | None) -> dict[str, Any]:
    """Mint a token for a family (see services.auth.mint)."""
    return await auth.mint(conn, signer, family=family, ttl_seconds=ttl_seconds, scope=scope, sub=sub,
                           created_by=p.sub if p else None)


async def revoke_token(conn: asyncpg.Connection, jti: uuid.UUID) -> None:
    """Revoke a token: refused from its very next call."""
    if await conn.fetchval(Q["token_revoke"], jti) is None:
        raise NotFound("no token with that jti")


async def list_tokens(conn: asyncpg.Connection, family: str | None, limit: int,
                      after: uuid.UUID | None = None) -> list[dict[str, Any]]:
    """Issued tokens in jti order after a cursor (never the token text: it is not stored)."""
    return [dict(r) for r in await conn.fetch(Q["token_list"], family, limit, after)]


async def get_token(conn: asyncpg.Connection, jti: uuid.UUID) -> dict[str, Any]:
    """One issued token's record."""
    row = await conn.fetchrow(Q["token_get"], jti)
    if row is None:
        raise NotFound("no token with that jti")
    return dict(row)


def validate_workflow(stages: list[dict[str, Any]], transitions: list[dict[str, Any]]) -> list[str]:
    """Every structural problem of a workflow definition (empty when it is sound)."""
    problems: list[str] = []
    keys = [s["key"] for s in stages]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        problems.append(f"stages: duplicate keys: {', '.join(dupes)}")
    initial = [s["key"] for s in stages if s.get("initial")]
    terminal = {s["key"] for s in stages if s.get("terminal")}
    if len(initial) != 1:
        problems.append(f"stages: exactly one stage must be initial, found {len(initial)}"
                        + (f" ({', '.join(initial)})" if initial else ""))
    if not terminal:
        problems.append("stages: at least one stage must be terminal")
    for s in stages:
        if s.get("initial") and s.get("terminal"):
            problems.append(f"stages[{s['key']}]: a stage cannot be both initial and terminal")
        ea, ma = s.get("escalate_after"), s.get("max_attempts", 3)
        if ea is not None and ma is not None and ea > ma:
            problems.append(f"stages[{s['key']}]: escalate_after ({ea}) is above max_attempts ({ma}); "
                            "the task would block before it escalates")
    known = set(keys)
    out: dict[str, int] = {k: 0 for k in keys}
    edges: dict[str, set[str]] = {k: set() for k in keys}
    for i, t in enumerate(transitions):
        where = f"transitions[{i}] ({t['from']} → {t['to']})"
        if t["from"] not in known:
            problems.append(f"{where}: from: no stage {t['from']!r} in this workflow")
        if t["to"] not in known:
            problems.append(f"{where}: to: no stage {t['to']!r} in this workflow")
        if t["from"] in terminal:
            problems.append(f"{where}: a terminal stage has no way out")
        if t["from"] == t["to"]:
            problems.append(f"{where}: a transition must change the stage")
        if t["from"] in known and t["to"] in known:
            out[t["from"]] += 1
            edges[t["from"]].add(t["to"])
    for k in keys:
        if k not in terminal and out.get(k, 0) == 0:
            problems.append(f"stages[{k}]: a non-terminal stage needs at least one transition out, "
                            "or its tasks could never move")
    if len(initial) == 1 and not dupes:
        seen, todo = {initial[0]}, [initial[0]]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        unreachable = [k for k in keys if k not in seen]
        if unreachable:
            problems.append(f"stages: not reachable from {initial[0]}: {', '.join(unreachable)}")
        if terminal and not (terminal & seen):
            problems.append("stages: no terminal stage can be reached from the initial stage")
    return problems


async def create_workflow(conn: asyncpg.Connection, key: str, description: str, max_rework: int | None,
                          stages: list[dict[str, Any]], transitions: list[dict[str, Any]]) -> dict[str, Any]:
    """Validate and write a workflow as the next version of its key."""
    problems = validate_workflow(stages, transitions)
    needed = sorted({f for t in transitions for f in t.get("required_features") or []})
    unknown = await auth.unregistered(conn, needed) if needed else []
    if unknown:
        problems.append(f"transitions: features not registered: {', '.join(unknown)}")
    for i, t in enumerate(transitions):
        if t.get("guard"):
            try:
                await conn.fetchval(Q["guard_check"], t["guard"])
            except asyncpg.PostgresError as exc:
                problems.append(f"transitions[{i}].guard: not a valid JSON path predicate: "
                                f"{exc.args[0] if exc.args else exc}")
    if problems:
        raise Invalid("the workflow was refused: " + "; ".join(problems),
                      errors=[{"field": p.split(":", 1)[0], "detail": p} for p in problems])
    async with conn.transaction():
        await conn.execute(Q["workflow_lock"], key)
        wf = await conn.fetchrow(Q["workflow_insert"], key, description, max_rework)
        ids: dict[str, Any] = {}
        for pos, s in enumerate(stages):
            ids[s["key"]] = await conn.fetchval(
                Q["stage_insert"], wf["id"], s["key"], pos, bool(s.get("initial")), bool(s.get("terminal")),
                s.get("lease_seconds") or 300, s.get("max_attempts") or 3, s.get("escalate_after"),
                s.get("max_rework"), s.get("instructions") or "",
            )
        for pos, t in enumerate(transitions):
            await conn.execute(Q["transition_insert"], wf["id"], pos, ids[t["from"]], ids[t["to"]], t["kind"],
                               sorted(set(t.get("required_features") or [])), t.get("guard"),
                               t.get("instructions") or "")
        return await get_workflow(conn, key, wf["version"])


async def get_workflow(conn: asyncpg.Connection, key: str, version: int | None = None) -> dict[str, Any]:
    """A workflow version (the latest unless named) with its stages and transitions."""
    wf = await conn.fetchrow(Q["workflow_get"], key, version)
    if wf is None:
        raise NotFound(f"no workflow {key!r}" + (f" version {version}" if version else ""))
    out = dict(wf)
    out.pop("id")
    out["stages"] = [dict(r) for r in await conn.fetch(Q["stages_of_workflow"], wf["id"])]
    out["transitions"] = [dict(r) | {"required_features": list(r["required_features"])}
                          for r in await conn.fetch(Q["transitions_of_workflow"], wf["id"])]
    return out


async def list_workflows(conn: asyncpg.Connection, after: str, limit: int) -> list[dict[str, Any]]:
    """The latest version of each workflow, in key order."""
    return [await get_workflow(conn, r["key"], r["version"])
            for r in await conn.fetch(Q["workflows_list"], after, limit)]


async def create_project(conn: asyncpg.Connection, slug: str, context: dict[str, Any]) -> dict[str, Any]:
    """A project: a body of work and where its truth lives."""
    _bounded_context(context)
    return dict(await conn.fetchrow(Q["project_insert"], slug, context))


async def get_project(conn: asyncpg.Connection, slug: str) -> dict[str, Any]:
    """One project."""
    row = await conn.fetchrow(Q["project_get"], slug)
    if row is None:
        raise NotFound(f"no project {slug!r}; GET /v1/projects lists them")
    return dict(row)


async def list_projects(conn: asyncpg.Connection, after: str, limit: int) -> list[dict[str, Any]]:
    """Projects in slug order, after a cursor."""
    return [dict(r) for r in await conn.fetch(Q["projects_list"], after, limit)]


async def create_lane(conn: asyncpg.Connection, project: str, key: str, workflow: str,
                      context: dict[str, Any]) -> dict[str, Any]:
    """A lane of a project bound to its workflow's latest version; registers lane:<key>."""
    _bounded_context(context)
    async with conn.transaction():
        proj = await conn.fetchrow(Q["project_get"], project)
        if proj is None:
            raise NotFound(f"no project {project!r}; create it first (POST /v1/projects)")
        wf = await conn.fetchrow(Q["workflow_get"], workflow, None)
        if wf is None:
            raise NotFound(f"no workflow {workflow!r}; create it first (POST /v1/workflows)")
        await _unlike(conn, "lane", key)
        await _unlike(conn, "feature", f"lane:{key}")
        if await conn.fetchval(Q["lane_get"], key) is not None:
            raise Conflict(f"a lane {key!r} exists (lane keys are unique across projects)")
        await conn.execute(Q["lane_insert"], proj["id"], key, wf["id"], context)
        await conn.execute(Q["feature_ensure"], f"lane:{key}", f"take part in lane {key}")
        return await get_lane(conn, key)


async def get_lane(conn: asyncpg.Connection, key: str) -> dict[str, Any]:
    """One lane with its project and workflow version."""
    row = await conn.fetchrow(Q["lane_get"], key)
    if row is None:
        raise NotFound(f"no lane {key!r}; GET /v1/lanes lists them")
    out = dict(row)
    out.pop("id")
    out["feature"] = f"lane:{key}"
    return out


async def list_lanes(conn: asyncpg.Connection, after: str, project: str | None, limit: int
                     ) -> list[dict[str, Any]]:
    """Lanes in key order, after a cursor."""
    return [await get_lane(conn, r["key"]) for r in await conn.fetch(Q["lanes_list"], after, project, limit)]


BOOTSTRAP_FEATURES = {
    "seat:admin": "provision features, families, tokens, workflows, projects and lanes",
    "seat:overseer": "read the whole board and take the human governance acts",
    "seat:monitor": "read the whole board and nothing else",
}


def bootstrap_words(boot: dict[str, Any]) -> str:
    """What the first start prints (on stdout, never logged): the admin token once, or where to mint one."""
    if boot.get("token") is None:
        return ("\nAINARRES bootstrap: the admin family is made; no token printed (AINARRES_BOOTSTRAP_TOKEN=false). "
                "Mint one where the service's database and key are: ainarres token --family admin\n")
    return f"\nAINARRES bootstrap: admin token (shown once, keep it safe):\n{boot['token']}\n"


async def bootstrap(conn: asyncpg.Connection, signer: Signer, ttl_seconds: int, *, mint: bool = True
                    ) -> dict[str, Any] | None:
    """On an empty database: the seat features and the admin family, and one admin token unless not `mint`
    ({"token": None} then); None if the database was not empty."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('ainarres:bootstrap'))")
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM families)"):
            return None
        for name, desc in BOOTSTRAP_FEATURES.items():
            await conn.execute(Q["feature_ensure"], name, desc)
        await conn.execute(Q["family_insert"], "admin", "operators of this AINARRES", 1)
        await conn.execute(Q["family_features_add"], "admin", ["seat:admin", "seat:overseer"])
        if not mint:
            return {"token": None}
        return await auth.mint(conn, signer, family="admin", ttl_seconds=ttl_seconds, sub="admin",
                               created_by="bootstrap")
