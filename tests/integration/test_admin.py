"""Administration over HTTP: every endpoint's success shape and its refusals; a refusal writes nothing."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest

from tests.helpers import DEV_WORKFLOW, Api, make_world

PROBLEM = "application/problem+json"


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"], body
    return body


def _names_field(body: dict[str, Any], field: str) -> None:
    fields = [e.get("field") for e in body.get("errors") or []]
    assert field in fields or body["detail"].startswith(f"{field}:") or f"{field}: " in body["detail"], body


async def _count(db: asyncpg.Connection, table: str) -> int:
    n: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return n


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- features -----------------------------------------------------------------------------------


async def test_feature_register_get_and_refusals(admin, db):
    f = await admin.post("/v1/features", {"name": "role:dev", "description": "writes code"}, 201)
    assert f["name"] == "role:dev" and f["kind"] == "role" and f["description"] == "writes code"
    assert f["created_at"]
    assert await admin.get("/v1/features/role:dev") == f
    n = await _count(db, "features")

    dup = _problem(await admin.call("POST", "/v1/features", {"name": "role:dev"}), 409, "conflict")
    assert "already" in dup["detail"]
    for bad in ["nocolon", "Role:dev", "role:", ":dev", "role:dev ok", "role:" + "x" * 200, ""]:
        body = _problem(await admin.call("POST", "/v1/features", {"name": bad}), 422, "invalid")
        _names_field(body, "name")
    _names_field(_problem(await admin.call("POST", "/v1/features", {}), 422, "invalid"), "name")
    _problem(await admin.call("POST", "/v1/features", {"name": "role:x", "extra": 1}), 422, "invalid")
    assert await _count(db, "features") == n

    _problem(await admin.call("GET", "/v1/features/role:ghost"), 404, "not_found")


async def test_feature_list_pages_with_after_limit_and_next(admin):
    for name in ("area:c", "area:a", "area:b", "role:x"):
        await admin.post("/v1/features", {"name": name}, 201)
    everything = await admin.get("/v1/features")
    names = [f["name"] for f in everything["items"]]
    assert names == sorted(names)
    assert {"area:a", "area:b", "area:c", "role:x", "seat:admin", "seat:overseer", "seat:monitor"} <= set(
        names
    )
    assert everything["next"] is None

    p1 = await admin.get("/v1/features", params={"kind": "area", "limit": 2})
    assert [f["name"] for f in p1["items"]] == ["area:a", "area:b"] and p1["next"] == "area:b"
    p2 = await admin.get("/v1/features", params={"kind": "area", "limit": 2, "after": p1["next"]})
    assert [f["name"] for f in p2["items"]] == ["area:c"] and p2["next"] is None

    walked, after = [], ""
    while True:
        page = await admin.get("/v1/features", params={"limit": 3, "after": after})
        walked += [f["name"] for f in page["items"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert walked == names

    for params in ({"limit": 0}, {"limit": 501}, {"limit": "x"}):
        _names_field(
            _problem(await admin.call("GET", "/v1/features", params=params), 422, "invalid"), "query.limit"
        )


# --- families -----------------------------------------------------------------------------------


async def test_family_create_get_list_and_refusals(admin, db):
    for name in ("role:dev", "lane:dev"):
        await admin.post("/v1/features", {"name": name}, 201)
    fam = await admin.post(
        "/v1/families",
        {
            "key": "opencode+qwen3.6",
            "features": ["role:dev", "lane:dev"],
            "description": "cheap coder",
            "max_active": 2,
        },
        201,
    )
    assert fam["key"] == "opencode+qwen3.6" and fam["features"] == ["lane:dev", "role:dev"]
    assert fam["max_active"] == 2 and fam["disabled"] is False and fam["denials"] == []
    assert fam["description"] == "cheap coder" and fam["created_at"] and fam["updated_at"]
    assert await admin.get("/v1/families/opencode+qwen3.6") == fam

    listed = await admin.get("/v1/families")
    assert [f["key"] for f in listed["items"]] == ["admin", "opencode+qwen3.6"] and listed["next"] is None
    p1 = await admin.get("/v1/families", params={"limit": 1})
    assert [f["key"] for f in p1["items"]] == ["admin"] and p1["next"] == "admin"
    p2 = await admin.get("/v1/families", params={"limit": 1, "after": "admin"})
    assert [f["key"] for f in p2["items"]] == ["opencode+qwen3.6"]

    counts = (await _count(db, "families"), await _count(db, "family_features"))
    body = _problem(
        await admin.call("POST", "/v1/families", {"key": "x", "features": ["role:dev", "role:ghost"]}),
        422,
        "invalid",
    )
    assert (
        "features" in body["detail"] and "role:ghost" in body["detail"] and "role:dev" not in body["detail"]
    )
    _problem(
        await admin.call("POST", "/v1/families", {"key": "opencode+qwen3.6", "features": []}), 409, "conflict"
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/families", {"key": "bad key!", "features": []}), 422, "invalid"
        ),
        "key",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/families", {"key": "y", "features": ["nocolon"]}), 422, "invalid"
        ),
        "features.0",
    )
    _names_field(
        _problem(await admin.call("POST", "/v1/families", {"key": "y", "max_active": 0}), 422, "invalid"),
        "max_active",
    )
    assert (await _count(db, "families"), await _count(db, "family_features")) == counts

    _problem(await admin.call("GET", "/v1/families/ghost"), 404, "not_found")


async def test_family_patch(admin, db):
    for name in ("role:dev", "lane:dev", "tier:2"):
        await admin.post("/v1/features", {"name": name}, 201)
    before = await admin.post("/v1/families", {"key": "cheap", "features": ["role:dev"]}, 201)

    got = await admin.patch("/v1/families/cheap", {"features": ["lane:dev", "tier:2"]})
    assert got["features"] == ["lane:dev", "tier:2"] and got["max_active"] == 1 and got["disabled"] is False
    got = await admin.patch("/v1/families/cheap", {"max_active": 5})
    assert got["max_active"] == 5 and got["features"] == ["lane:dev", "tier:2"]
    got = await admin.patch("/v1/families/cheap", {"disabled": True, "description": "paused"})
    assert got["disabled"] is True and got["description"] == "paused" and got["max_active"] == 5
    assert _ts(got["updated_at"]) >= _ts(before["updated_at"])
    got = await admin.patch("/v1/families/cheap", {"features": []})
    assert got["features"] == [] and got["disabled"] is True
    await admin.patch("/v1/families/cheap", {"features": ["role:dev"], "disabled": False})

    snapshot = await admin.get("/v1/families/cheap")
    rows = await _count(db, "family_features")
    body = _problem(
        await admin.call("PATCH", "/v1/families/cheap", {"features": ["lane:dev", "role:ghost"]}),
        422,
        "invalid",
    )
    assert "role:ghost" in body["detail"]
    _names_field(
        _problem(await admin.call("PATCH", "/v1/families/cheap", {"disabled": "yes"}), 422, "invalid"),
        "disabled",
    )
    _names_field(
        _problem(await admin.call("PATCH", "/v1/families/cheap", {"max_active": 0}), 422, "invalid"),
        "max_active",
    )
    _problem(await admin.call("PATCH", "/v1/families/cheap", {"key": "renamed"}), 422, "invalid")
    assert await admin.get("/v1/families/cheap") == snapshot
    assert await _count(db, "family_features") == rows

    _problem(await admin.call("PATCH", "/v1/families/ghost", {"disabled": True}), 404, "not_found")
    assert await _count(db, "families") == 2


# --- tokens -------------------------------------------------------------------------------------


async def test_token_mint_shapes(admin, client, db):
    w = await make_world(admin)
    tok = await admin.post("/v1/tokens", {"family": "cheap", "ttl_seconds": 120}, 201)
    assert set(tok) >= {"token", "sub", "jti", "expires_at"}
    assert tok["sub"].startswith("cheap.") and uuid.UUID(tok["jti"])
    rec = await admin.get(f"/v1/tokens/{tok['jti']}")
    assert rec["family"] == "cheap" and rec["sub"] == tok["sub"] and rec["revoked_at"] is None
    assert rec["scope"] is None
    assert (_ts(rec["expires_at"]) - _ts(rec["issued_at"])).total_seconds() == 120
    assert _ts(tok["expires_at"]) == _ts(rec["expires_at"])
    me = await Api(client, tok["token"]).get("/v1/me")
    assert me["sub"] == tok["sub"] and me["family"] == "cheap"

    scoped = await admin.post(
        "/v1/tokens", {"family": "capable", "scope": ["tier:2", "lane:dev", "lane:dev"]}, 201
    )
    assert scoped["scope"] == ["lane:dev", "tier:2"]
    assert (await admin.get(f"/v1/tokens/{scoped['jti']}"))["scope"] == ["lane:dev", "tier:2"]
    default = await admin.get(
        f"/v1/tokens/{(await admin.post('/v1/tokens', {'family': 'cheap'}, 201))['jti']}"
    )
    assert (_ts(default["expires_at"]) - _ts(default["issued_at"])).total_seconds() == 3600

    named = await admin.post("/v1/tokens", {"family": "cheap", "sub": "cheap-worker-1"}, 201)
    assert named["sub"] == "cheap-worker-1"
    again = await admin.post("/v1/tokens", {"family": "cheap", "sub": "cheap-worker-1"}, 201)
    assert again["sub"] == "cheap-worker-1" and again["jti"] != named["jti"]
    # Two tokens, one agent.
    a1, a2 = Api(client, named["token"]), Api(client, again["token"])
    assert (await a1.get("/v1/me"))["sub"] == (await a2.get("/v1/me"))["sub"] == "cheap-worker-1"
    assert await db.fetchval("SELECT count(*) FROM agents WHERE sub = 'cheap-worker-1'") == 1
    assert w is not None


async def test_token_refusals_record_nothing(admin, db):
    await make_world(admin)
    await admin.post("/v1/tokens", {"family": "cheap", "sub": "worker-1"}, 201)
    n = await _count(db, "tokens")
    body = _problem(
        await admin.call("POST", "/v1/tokens", {"family": "reviewers", "sub": "worker-1"}), 409, "conflict"
    )
    assert "cheap" in body["detail"]
    _problem(await admin.call("POST", "/v1/tokens", {"family": "admin", "sub": "worker-1"}), 409, "conflict")
    _problem(await admin.call("POST", "/v1/tokens", {"family": "ghost"}), 404, "not_found")
    _problem(
        await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["role:reviewer"]}),
        403,
        "not_eligible",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/tokens", {"family": "cheap", "ttl_seconds": 1}), 422, "invalid"
        ),
        "ttl_seconds",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/tokens", {"family": "cheap", "sub": "bad sub"}), 422, "invalid"
        ),
        "sub",
    )
    _names_field(
        _problem(await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["x"]}), 422, "invalid"),
        "scope.0",
    )
    assert await _count(db, "tokens") == n


async def test_token_list_get_never_hold_the_token_and_revoke(admin, client):
    await make_world(admin)
    minted = [await admin.post("/v1/tokens", {"family": f}, 201) for f in ("cheap", "cheap", "reviewers")]
    listed = await admin.call("GET", "/v1/tokens", expect=200)
    jtis = [t["jti"] for t in listed.json()["items"]]
    assert {m["jti"] for m in minted} <= set(jtis)
    assert all("token" not in t for t in listed.json()["items"])
    only_cheap = (await admin.get("/v1/tokens", params={"family": "cheap"}))["items"]
    assert {t["jti"] for t in only_cheap} == {minted[0]["jti"], minted[1]["jti"]}
    assert len((await admin.get("/v1/tokens", params={"limit": 1}))["items"]) == 1
    texts = [listed.text]
    for m in minted:
        r = await admin.call("GET", f"/v1/tokens/{m['jti']}", expect=200)
        assert "token" not in r.json()
        texts.append(r.text)
    for text in texts:
        for m in minted:
            assert m["token"] not in text and m["token"].split(".")[-1] not in text
        assert admin.token not in text

    victim = Api(client, minted[0]["token"])
    await victim.get("/v1/me")
    r = await admin.delete(f"/v1/tokens/{minted[0]['jti']}")
    assert r.status_code == 204 and r.content == b""
    assert (await admin.get(f"/v1/tokens/{minted[0]['jti']}"))["revoked_at"] is not None
    assert (await victim.call("GET", "/v1/me")).status_code == 401
    assert (await Api(client, minted[1]["token"]).call("GET", "/v1/me")).status_code == 200

    ghost = uuid.uuid4()
    _problem(await admin.call("DELETE", f"/v1/tokens/{ghost}"), 404, "not_found")
    _problem(await admin.call("GET", f"/v1/tokens/{ghost}"), 404, "not_found")
    _names_field(_problem(await admin.call("DELETE", "/v1/tokens/not-a-uuid"), 422, "invalid"), "path.jti")


# --- denials ------------------------------------------------------------------------------------


async def test_denials(admin, db):
    await make_world(admin)
    d = await admin.post(
        "/v1/families/cheap/denials",
        {"feature": "role:dev", "reason": "broke the build", "expires_at": "2999-01-01T00:00:00Z"},
        201,
    )
    assert d["family"] == "cheap" and d["feature"] == "role:dev" and d["reason"] == "broke the build"
    assert _ts(d["expires_at"]).year == 2999 and d["created_by"].startswith("admin.") and d["created_at"]
    await admin.post("/v1/families/cheap/denials", {"feature": "lane:dev", "reason": "pause"}, 201)
    items = (await admin.get("/v1/families/cheap/denials"))["items"]
    assert [(i["feature"], i["active"]) for i in items] == [("lane:dev", True), ("role:dev", True)]
    assert [i["feature"] for i in (await admin.get("/v1/families/cheap"))["denials"]] == [
        "lane:dev",
        "role:dev",
    ]
    assert (await admin.get("/v1/families/reviewers/denials"))["items"] == []

    n = await _count(db, "denials")
    _problem(
        await admin.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "again"}),
        409,
        "conflict",
    )
    body = _problem(
        await admin.call("POST", "/v1/families/cheap/denials", {"feature": "role:ghost", "reason": "typo"}),
        422,
        "invalid",
    )
    assert body["detail"].startswith("feature")
    _names_field(
        _problem(
            await admin.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev"}), 422, "invalid"
        ),
        "reason",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/families/cheap/denials", {"feature": "nocolon", "reason": "x"}),
            422,
            "invalid",
        ),
        "feature",
    )
    _problem(
        await admin.call("POST", "/v1/families/ghost/denials", {"feature": "role:dev", "reason": "x"}),
        404,
        "not_found",
    )
    _problem(await admin.call("GET", "/v1/families/ghost/denials"), 404, "not_found")
    assert await _count(db, "denials") == n

    r = await admin.delete("/v1/families/cheap/denials/role:dev")
    assert r.status_code == 204 and r.content == b""
    assert [i["feature"] for i in (await admin.get("/v1/families/cheap/denials"))["items"]] == ["lane:dev"]
    # Lifted already: what was asked holds, so a DELETE retried after a lost answer is not refused.
    assert (await admin.delete("/v1/families/cheap/denials/role:dev")).status_code == 204
    _problem(await admin.call("DELETE", "/v1/families/cheap/denials/role:ghost"), 404, "not_found")
    _problem(await admin.call("DELETE", "/v1/families/ghost/denials/lane:dev"), 404, "not_found")
    assert await _count(db, "denials") == n - 1


async def test_a_denial_and_its_removal_are_on_the_governance_trail(admin, db):
    """A denial without an end is a permanent ban in all but name (SPEC §8: with a reason on the trail); one made
    and removed with DELETE left no record anywhere (found by a review of SPEC against the code). Refused ones,
    and a DELETE of what is lifted already, add nothing."""
    await make_world(admin)
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "broke the build"}, 201)
    await admin.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "again"}, 409)
    assert (await admin.delete("/v1/families/cheap/denials/role:dev")).status_code == 204
    assert (await admin.delete("/v1/families/cheap/denials/role:dev")).status_code == 204  # a retry
    trail = (await admin.get("/v1/governance/trail"))["items"]
    assert [(e["action"], e["family"], e["feature"]) for e in trail] == [
        ("lift", "cheap", "role:dev"), ("deny", "cheap", "role:dev")]
    lifted, denied = trail
    assert denied["reason"] == "broke the build" and denied["data"] == {"expires_at": None}
    assert denied["actor"].startswith("admin.") and denied["actor_family"] == "admin"
    assert "DELETE /v1/families/cheap/denials/role:dev" in lifted["reason"]
    assert lifted["data"] == {"was": "denial", "expires_at": None, "denied_for": "broke the build"}


async def test_a_denial_after_an_expired_governance_ban_is_the_admins_and_deletable(admin, db):
    """A reflexive ban's row stays after it expires. A DELETE then is 204 (nothing in force: lifted already),
    and a new denial replacing it is an admin's denial (it kept `governance = 'reflexive'` and so became a
    governance ban without an end, which DELETE refused; found by a review)."""
    await make_world(admin)
    await db.execute("INSERT INTO denials (family_key, feature, reason, expires_at, created_by, governance) "
                     "VALUES ('cheap', 'role:dev', 'strikes', now() - interval '1 minute', 'governance', 'reflexive')")
    assert (await admin.delete("/v1/families/cheap/denials/role:dev")).status_code == 204
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "admin decided"}, 201)
    assert await db.fetchval("SELECT governance FROM denials WHERE family_key = 'cheap' AND feature = 'role:dev'") \
        is None
    assert (await admin.delete("/v1/families/cheap/denials/role:dev")).status_code == 204
    assert await db.fetchval("SELECT count(*) FROM denials WHERE family_key = 'cheap'") == 0
    assert [e["action"] for e in (await admin.get("/v1/governance/trail"))["items"]] == ["lift", "deny"]


async def test_a_denial_over_a_governance_ban_in_force_points_to_the_lift(admin):
    await make_world(admin)
    await admin.post("/v1/governance/bans", {"family": "cheap", "feature": "role:dev", "reason": "bad"}, 201)
    r = await admin.call("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "x"}, 409)
    assert "/v1/governance/lifts" in r.json()["detail"], r.json()


# --- workflows ----------------------------------------------------------------------------------


async def _features(admin: Api, *names: str) -> None:
    for name in names:
        await admin.post("/v1/features", {"name": name}, 201)


async def test_workflow_versions(admin, db):
    await _features(admin, "role:dev", "role:reviewer")
    v1 = await admin.post("/v1/workflows", DEV_WORKFLOW, 201)
    assert v1["key"] == "dev" and v1["version"] == 1
    assert [s["key"] for s in v1["stages"]] == ["todo", "review", "done"]
    todo = v1["stages"][0]
    assert todo["initial"] is True and todo["terminal"] is False and todo["lease_seconds"] == 60
    assert todo["max_attempts"] == 3 and todo["escalate_after"] == 2
    assert v1["stages"][1]["max_rework"] == 2 and v1["stages"][2]["terminal"] is True
    assert v1["transitions"][0] == {
        "from": "todo",
        "to": "review",
        "kind": "advance",
        "required_features": ["role:dev"],
        "guard": None,
        "instructions": "",
    }

    second = copy.deepcopy(DEV_WORKFLOW)
    second["stages"].insert(2, {"key": "qa"})
    second["transitions"][1] = {
        "from": "review",
        "to": "qa",
        "kind": "advance",
        "required_features": ["role:reviewer"],
        "guard": "$.payload.checks_passed == true",
    }
    second["transitions"].append({"from": "qa", "to": "done", "kind": "advance"})
    v2 = await admin.post("/v1/workflows", second, 201)
    assert v2["version"] == 2 and [s["key"] for s in v2["stages"]] == ["todo", "review", "qa", "done"]
    assert v2["transitions"][1]["guard"] == '($."payload"."checks_passed" == true)'

    latest = await admin.get("/v1/workflows/dev")
    assert latest["version"] == 2 and latest == v2
    assert await admin.get("/v1/workflows/dev", params={"version": 1}) == v1
    assert (await admin.get("/v1/workflows/dev", params={"version": 2})) == v2
    listed = await admin.get("/v1/workflows")
    assert [(w["key"], w["version"]) for w in listed["items"]] == [("dev", 2)]
    assert await _count(db, "workflows") == 2

    _problem(await admin.call("GET", "/v1/workflows/ghost"), 404, "not_found")
    _problem(await admin.call("GET", "/v1/workflows/dev", params={"version": 3}), 404, "not_found")
    _names_field(
        _problem(await admin.call("GET", "/v1/workflows/dev", params={"version": 0}), 422, "invalid"),
        "query.version",
    )


def _wf(stages: list[dict[str, Any]], transitions: list[dict[str, Any]], key: str = "flow") -> dict[str, Any]:
    return {"key": key, "stages": stages, "transitions": transitions}


def _t(a: str, b: str, kind: str = "advance", **kw: Any) -> dict[str, Any]:
    return {"from": a, "to": b, "kind": kind, **kw}


BAD_WORKFLOWS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "no initial": (
        _wf([{"key": "a"}, {"key": "done", "terminal": True}], [_t("a", "done")]),
        ["exactly one stage must be initial, found 0"],
    ),
    "two initials": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "b", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("b", "done")],
        ),
        ["exactly one stage must be initial, found 2 (a, b)"],
    ),
    "no terminal": (
        _wf([{"key": "a", "initial": True}, {"key": "b"}], [_t("a", "b"), _t("b", "a", "reject")]),
        ["at least one stage must be terminal"],
    ),
    "transition to an unknown stage": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("a", "ghost")],
        ),
        ["transitions[1]", "to: no stage 'ghost'"],
    ),
    "transition from an unknown stage": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("ghost", "done")],
        ),
        ["transitions[1]", "from: no stage 'ghost'"],
    ),
    "transition out of a terminal stage": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("done", "a", "reject")],
        ),
        ["transitions[1]", "a terminal stage has no way out"],
    ),
    "unregistered required feature": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done", required_features=["role:dev", "role:ghost"])],
        ),
        ["features not registered: role:ghost"],
    ),
    "invalid guard": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done", guard="$.payload.(((")],
        ),
        ["transitions[0].guard", "not a valid JSON path predicate"],
    ),
    "non-terminal stage with no way out": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "stuck"}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("a", "stuck")],
        ),
        ["stages[stuck]", "needs at least one transition out"],
    ),
    "unreachable stage": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "island"}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("island", "done")],
        ),
        ["not reachable from a: island"],
    ),
    "duplicate stage keys": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "a"}, {"key": "done", "terminal": True}],
            [_t("a", "done")],
        ),
        ["duplicate keys: a"],
    ),
    "no way to a terminal stage": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "b"}, {"key": "done", "terminal": True}, {"key": "c"}],
            [_t("a", "b"), _t("b", "a", "reject"), _t("c", "done")],
        ),
        ["no terminal stage can be reached"],
    ),
    "escalation after max attempts": (
        _wf(
            [
                {"key": "a", "initial": True, "max_attempts": 2, "escalate_after": 3},
                {"key": "done", "terminal": True},
            ],
            [_t("a", "done")],
        ),
        ["escalate_after (3) is above max_attempts (2)"],
    ),
    "self transition": (
        _wf(
            [{"key": "a", "initial": True}, {"key": "done", "terminal": True}],
            [_t("a", "done"), _t("a", "a")],
        ),
        ["a transition must change the stage"],
    ),
}

_WF_TABLES = ("workflows", "stages", "transitions")


async def _wf_counts(db: asyncpg.Connection) -> tuple[int, ...]:
    return tuple([await _count(db, t) for t in _WF_TABLES])


@pytest.mark.parametrize("case", list(BAD_WORKFLOWS))
async def test_workflow_refusal_names_the_problem_and_writes_nothing(admin, db, case):
    await _features(admin, "role:dev")
    body_in, expected = BAD_WORKFLOWS[case]
    before = await _wf_counts(db)
    body = _problem(await admin.call("POST", "/v1/workflows", body_in), 422, "invalid")
    problems = [e["detail"] for e in body["errors"]]
    for phrase in expected:
        assert any(phrase in p for p in problems), (phrase, problems)
        assert phrase in body["detail"]
    assert await _wf_counts(db) == before
    _problem(await admin.call("GET", "/v1/workflows/flow"), 404, "not_found")


async def test_workflow_refusal_names_every_problem_in_one_response(admin, db):
    await _features(admin, "role:dev")
    # A sound first version, so a refused second one must not become version 2 either.
    await admin.post(
        "/v1/workflows",
        _wf([{"key": "a", "initial": True}, {"key": "done", "terminal": True}], [_t("a", "done")]),
        201,
    )
    before = await _wf_counts(db)
    everything_wrong = _wf(
        [{"key": "a", "initial": True}, {"key": "b", "initial": True}, {"key": "stuck"}, {"key": "c"}],
        [
            _t("a", "ghost"),
            _t("a", "stuck", required_features=["role:ghost"]),
            _t("a", "c", guard="$.(("),
            _t("c", "a", "reject"),
        ],
    )
    body = _problem(await admin.call("POST", "/v1/workflows", everything_wrong), 422, "invalid")
    problems = " | ".join(e["detail"] for e in body["errors"])
    for phrase in [
        "exactly one stage must be initial, found 2",
        "at least one stage must be terminal",
        "to: no stage 'ghost'",
        "stages[stuck]",
        "stages[b]",
        "features not registered: role:ghost",
        "transitions[2].guard",
    ]:
        assert phrase in problems, (phrase, problems)
    assert len(body["errors"]) >= 7
    assert await _wf_counts(db) == before
    assert (await admin.get("/v1/workflows/flow"))["version"] == 1


async def test_workflow_shape_refusals(admin, db):
    before = await _wf_counts(db)
    good_stages = [{"key": "a", "initial": True}, {"key": "done", "terminal": True}]
    cases: list[tuple[dict[str, Any], str]] = [
        (_wf(good_stages, [_t("a", "done", "sideways")]), "transitions.0.kind"),
        (_wf([], []), "stages"),
        ({"key": "Bad Key", "stages": good_stages, "transitions": []}, "key"),
        (
            _wf(
                [{"key": "a", "initial": True, "lease_seconds": 0}, {"key": "done", "terminal": True}],
                [_t("a", "done")],
            ),
            "stages.0.lease_seconds",
        ),
        (
            _wf(
                [{"key": "a", "initial": True, "colour": "red"}, {"key": "done", "terminal": True}],
                [_t("a", "done")],
            ),
            "stages.0.colour",
        ),
    ]
    for body_in, field in cases:
        _names_field(_problem(await admin.call("POST", "/v1/workflows", body_in), 422, "invalid"), field)
    assert await _wf_counts(db) == before


# --- projects -----------------------------------------------------------------------------------


async def test_projects(admin, db):
    p = await admin.post(
        "/v1/projects", {"slug": "acme", "context": {"repo": "https://git.example/acme"}}, 201
    )
    assert p["slug"] == "acme" and p["context"] == {"repo": "https://git.example/acme"}
    assert uuid.UUID(p["id"]) and p["created_at"]
    assert await admin.get("/v1/projects/acme") == p
    plain = await admin.post("/v1/projects", {"slug": "beta"}, 201)
    assert plain["context"] == {}
    listed = await admin.get("/v1/projects")
    assert [x["slug"] for x in listed["items"]] == ["acme", "beta"] and listed["next"] is None
    p1 = await admin.get("/v1/projects", params={"limit": 1})
    assert [x["slug"] for x in p1["items"]] == ["acme"] and p1["next"] == "acme"
    assert [x["slug"] for x in (await admin.get("/v1/projects", params={"after": "acme"}))["items"]] == [
        "beta"
    ]

    n = await _count(db, "projects")
    _problem(await admin.call("POST", "/v1/projects", {"slug": "acme"}), 409, "conflict")
    for bad in ["Acme", "has space", "-dash", "", "x" * 65]:
        _names_field(
            _problem(await admin.call("POST", "/v1/projects", {"slug": bad}), 422, "invalid"), "slug"
        )
    _names_field(
        _problem(await admin.call("POST", "/v1/projects", {"slug": "c", "context": "repo"}), 422, "invalid"),
        "context",
    )
    big = {"blob": "x" * 70_000}  # a JSON field over its bound is too large, like a task's payload (ADR 0005)
    assert "context is " in _problem(
        await admin.call("POST", "/v1/projects", {"slug": "c", "context": big}), 413, "payload_too_large"
    )["detail"]
    assert await _count(db, "projects") == n
    _problem(await admin.call("GET", "/v1/projects/ghost"), 404, "not_found")


# --- lanes --------------------------------------------------------------------------------------


async def test_lane_create_registers_its_feature(admin, db):
    await _features(admin, "role:dev", "role:reviewer")
    await admin.post("/v1/workflows", DEV_WORKFLOW, 201)
    await admin.post("/v1/projects", {"slug": "acme"}, 201)
    _problem(await admin.call("GET", "/v1/features/lane:backend"), 404, "not_found")
    lane = await admin.post(
        "/v1/lanes",
        {"project": "acme", "key": "backend", "workflow": "dev", "context": {"branch": "main"}},
        201,
    )
    assert lane["key"] == "backend" and lane["project"] == "acme" and lane["workflow"] == "dev"
    assert lane["workflow_version"] == 1 and lane["feature"] == "lane:backend"
    assert lane["context"] == {"branch": "main"} and lane["created_at"] and "id" not in lane
    f = await admin.get("/v1/features/lane:backend")
    assert f["kind"] == "lane"
    assert await admin.get("/v1/lanes/backend") == lane

    await admin.post("/v1/projects", {"slug": "beta"}, 201)
    await admin.post("/v1/lanes", {"project": "beta", "key": "frontend", "workflow": "dev"}, 201)
    assert [x["key"] for x in (await admin.get("/v1/lanes"))["items"]] == ["backend", "frontend"]
    assert [x["key"] for x in (await admin.get("/v1/lanes", params={"project": "beta"}))["items"]] == [
        "frontend"
    ]
    p1 = await admin.get("/v1/lanes", params={"limit": 1})
    assert [x["key"] for x in p1["items"]] == ["backend"] and p1["next"] == "backend"

    counts = (await _count(db, "lanes"), await _count(db, "features"))
    _problem(
        await admin.call("POST", "/v1/lanes", {"project": "ghost", "key": "x", "workflow": "dev"}),
        404,
        "not_found",
    )
    _problem(
        await admin.call("POST", "/v1/lanes", {"project": "acme", "key": "x", "workflow": "ghost"}),
        404,
        "not_found",
    )
    # Lane keys are unique across projects: lane:<key> is one feature.
    _problem(
        await admin.call("POST", "/v1/lanes", {"project": "acme", "key": "backend", "workflow": "dev"}),
        409,
        "conflict",
    )
    _problem(
        await admin.call("POST", "/v1/lanes", {"project": "beta", "key": "backend", "workflow": "dev"}),
        409,
        "conflict",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/lanes", {"project": "acme", "key": "bad key", "workflow": "dev"}),
            422,
            "invalid",
        ),
        "key",
    )
    _names_field(
        _problem(
            await admin.call("POST", "/v1/lanes", {"project": "acme", "workflow": "dev"}), 422, "invalid"
        ),
        "key",
    )
    assert (await _count(db, "lanes"), await _count(db, "features")) == counts
    _problem(await admin.call("GET", "/v1/lanes/ghost"), 404, "not_found")


async def test_lane_keeps_the_workflow_version_it_was_bound_to(admin, db):
    w = await make_world(admin)  # lane dev over workflow dev v1 (initial stage todo)
    v2 = copy.deepcopy(DEV_WORKFLOW)
    v2["stages"][0]["key"] = "backlog"
    v2["transitions"][0]["from"] = "backlog"
    v2["transitions"][2]["to"] = "backlog"
    assert (await admin.post("/v1/workflows", v2, 201))["version"] == 2
    await admin.post("/v1/lanes", {"project": "acme", "key": "next", "workflow": "dev"}, 201)
    v3 = copy.deepcopy(v2)
    v3["stages"][0]["key"] = "inbox"
    v3["transitions"][0]["from"] = "inbox"
    v3["transitions"][2]["to"] = "inbox"
    assert (await admin.post("/v1/workflows", v3, 201))["version"] == 3

    assert (await admin.get("/v1/lanes/dev"))["workflow_version"] == 1
    assert (await admin.get("/v1/lanes/next"))["workflow_version"] == 2
    bound = await db.fetch(
        "SELECT l.key, w.version FROM lanes l JOIN workflows w ON w.id = l.workflow_id ORDER BY l.key"
    )
    assert [(r["key"], r["version"]) for r in bound] == [("dev", 1), ("next", 2)]

    await admin.patch("/v1/families/cheap", {"features": ["lane:dev", "lane:next", "role:dev"]})
    agent = await w.agent("cheap")
    assert (await agent.create("dev", "old"))["task"]["stage"] == "todo"
    assert (await agent.create("next", "newer"))["task"]["stage"] == "backlog"
