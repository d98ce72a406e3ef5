"""Governance (ADR 0015): producer attribution, strikes and the reflexive ban ladder, the human boundary
(permanent bans, lifts, substrate-made blocks), auditor flags, recommendations, the trail, and the
track-record read at volume."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from jsonschema import Draft202012Validator

from ainarres_api.server.db import migrate
from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict
from ainarres_api.server.services import auth, governance
from ainarres_api.server.services import spend as spend_svc
from ainarres_api.server.services.tasks import MAX_ATTEMPTS_REASON
from tests.helpers import Api, World, make_world, review_flow, second_waits, wait_for_lock

LOOP = review_flow("loop")  # todo → review → done; review rejects back to todo; no rework cap


async def produce(maker: Api, task_id: str) -> None:
    c = await maker.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task_id, c
    await maker.verb(task_id, "advance", lease=c["lease"]["id"], to="review")


async def reject(reviewer: Api, task_id: str, reason: str = "no tests") -> dict[str, Any]:
    c = await reviewer.claim("dev")
    assert c["code"] == "claimed" and c["task"]["id"] == task_id, c
    out: dict[str, Any] = await reviewer.verb(task_id, "reject", lease=c["lease"]["id"], to="todo", reason=reason)
    return out


async def loop(maker: Api, reviewer: Api, task_id: str, times: int) -> None:
    for _ in range(times):
        await produce(maker, task_id)
        await reject(reviewer, task_id)


async def status(admin: Api) -> dict[str, Any]:
    out: dict[str, Any] = await admin.get("/v1/governance")
    return out


def strike_of(st: dict[str, Any], family: str, feature: str) -> dict[str, Any] | None:
    return next((s for s in st["strikes"] if s["family"] == family and s["feature"] == feature), None)


async def ban_seconds(db: asyncpg.Connection, family: str, feature: str) -> float | None:
    return await db.fetchval(  # type: ignore[no-any-return]
        "SELECT extract(epoch FROM expires_at - now())::float8 FROM denials WHERE family_key = $1 AND feature = $2 "
        "AND (expires_at IS NULL OR expires_at > now())", family, feature)


async def expire_bans(db: asyncpg.Connection) -> None:
    """The DB clock instead of a sleep: move every reflexive ban's end into the past."""
    await db.execute("UPDATE denials SET expires_at = now() - interval '1 second' WHERE governance = 'reflexive'")


async def auditor(w: World) -> Api:
    await w.admin.post("/v1/features", {"name": "role:auditor"}, None)
    await w.admin.post("/v1/families", {"key": "audit", "features": ["role:auditor"]}, 201)
    return await w.agent("audit")


# -- attribution and the track record ------------------------------------------------------------------


async def test_a_reject_strikes_the_producer_not_the_reviewer(admin, db):
    w = await make_world(admin, workflow=LOOP)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    t = (await maker.create("dev", "feature"))["task"]["id"]
    await produce(maker, t)
    rj = await reject(reviewer, t)
    assert rj["event"]["data"]["role"] == "role:reviewer"
    advance = await db.fetchval("SELECT data ->> 'role' FROM events WHERE task_id = $1 AND data ->> 'kind' = "
                                "'advance'", t)
    assert advance == "role:dev"

    st = await status(admin)
    assert strike_of(st, "cheap", "role:dev")["strikes"] == 1
    assert strike_of(st, "reviewers", "role:reviewer") is None and len(st["strikes"]) == 1

    # The producer advances again; this time the reviewer passes it: a verdict on cheap's work, not a reject.
    await produce(maker, t)
    c = await reviewer.claim("dev")
    await reviewer.verb(t, "advance", lease=c["lease"]["id"], to="done")
    recs = {r["key"]: r for r in (await admin.get("/v1/track-record"))["items"]}
    cheap = {r["role"]: r for r in recs["cheap"]["roles"]}["role:dev"]
    assert (cheap["deliveries"], cheap["rejected"], cheap["reviewed"], cheap["reviewed_cross"]) == (2, 1, 2, 2)
    assert cheap["reject_rate"] == 0.5 and cheap["cross_family_review_share"] == 1.0
    assert cheap["median_stage_seconds"] is not None and cheap["median_stage_seconds"] >= 0
    assert cheap["strikes"] == 1 and cheap["bans"] == 0
    assert cheap["spend"] is None and recs["cheap"]["spend"] is None  # unknown, never zero
    rev = {r["role"]: r for r in recs["reviewers"]["roles"]}["role:reviewer"]
    assert (rev["deliveries"], rev["rejects_made"], rev["rejected"]) == (1, 1, 0)
    assert (recs["cheap"]["delivered"], recs["cheap"]["rejected"]) == (2, 1)
    assert (recs["reviewers"]["delivered"], recs["reviewers"]["rejects_made"]) == (1, 1)


async def test_no_resolvable_producer_strikes_nobody(admin, db):
    wf = {"key": "noprod",
          "stages": [{"key": "review", "initial": True}, {"key": "todo"}, {"key": "done", "terminal": True}],
          "transitions": [
              {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
              {"from": "review", "to": "todo", "kind": "reject", "required_features": ["role:reviewer"]},
              {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:dev"]}]}
    w = await make_world(admin, workflow=wf)
    reviewer = await w.agent("reviewers")
    t = (await reviewer.create("dev", "straight in review"))["task"]["id"]
    await reject(reviewer, t)
    assert await db.fetchval("SELECT count(*) FROM governance_strikes") == 0
    assert (await status(admin))["strikes"] == []


# -- the reflexive ban ladder ----------------------------------------------------------------------------


async def test_the_ban_ladder_threshold_doubling_cap_expiry_reset(admin, db):
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev",
                     {"strike_threshold": 2, "ban_base_seconds": 3600, "ban_cap_seconds": 7200}, 200)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    features_before = await db.fetch("SELECT * FROM family_features ORDER BY family_key, feature")
    t = (await maker.create("dev", "sloppy"))["task"]["id"]

    await loop(maker, reviewer, t, 1)
    assert strike_of(await status(admin), "cheap", "role:dev")["strikes"] == 1
    assert await ban_seconds(db, "cheap", "role:dev") is None  # below the threshold: no ban

    await loop(maker, reviewer, t, 1)  # the threshold: banned for 1 h, strikes start over
    st = await status(admin)
    s = strike_of(st, "cheap", "role:dev")
    assert (s["strikes"], s["bans"], s["banned"], s["ban_kind"]) == (0, 1, True, "reflexive")
    assert 3500 < await ban_seconds(db, "cheap", "role:dev") <= 3600
    ban = next(b for b in st["bans"] if b["family"] == "cheap")
    assert ban["governance"] == "reflexive" and ban["expires_at"] is not None
    assert [e["action"] for e in st["trail"]][:1] == ["reflexive_ban"]
    assert st["trail"][0]["family"] == "cheap" and "rejected by reviewers" in st["trail"][0]["reason"]

    # The banned family's next claim no longer sees that work; another family's does.
    c = await maker.claim("dev", None)
    assert c.get("code") in ("empty", "not_eligible") and c.get("task") is None
    assert "role:dev" not in (await maker.get("/v1/me"))["features"]

    await expire_bans(db)
    await loop(maker, reviewer, t, 2)  # the second ban doubles: 2 h
    assert 7100 < await ban_seconds(db, "cheap", "role:dev") <= 7200
    await expire_bans(db)
    await loop(maker, reviewer, t, 2)  # the third would be 4 h: capped at 2 h
    assert 7100 < await ban_seconds(db, "cheap", "role:dev") <= 7200
    s = strike_of(await status(admin), "cheap", "role:dev")
    assert (s["strikes"], s["bans"]) == (0, 3)

    # Three reflexive bans (the system default) make a recommendation; nothing permanent happens by itself.
    recs = (await status(admin))["recommendations"]
    assert [(r["family"], r["feature"], r["status"]) for r in recs] == [("cheap", "role:dev", "open")]
    assert await db.fetchval("SELECT count(*) FROM denials WHERE expires_at IS NULL AND family_key = 'cheap'") == 0
    # Governance only removes: provisioning is untouched.
    assert await db.fetch("SELECT * FROM family_features ORDER BY family_key, feature") == features_before


async def test_a_family_banned_a_thousand_times_is_banned_for_the_cap(admin, db):
    """The doubling is bounded before it is computed: past ~1,000 bans 2^bans overflowed, and every reject of the
    family's work in that role was refused as the reviewer's mistake (422) — found by a review."""
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev",
                     {"strike_threshold": 1, "ban_base_seconds": 3600, "ban_cap_seconds": 7200}, 200)
    await db.execute("INSERT INTO governance_strikes (family_key, feature, threshold, bans) "
                     "VALUES ('cheap', 'role:dev', 1, 5000)")
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    t = (await maker.create("dev", "sloppy"))["task"]["id"]
    await produce(maker, t)
    assert (await reject(reviewer, t))["code"] == "ok"
    assert 7100 < await ban_seconds(db, "cheap", "role:dev") <= 7200
    assert strike_of(await status(admin), "cheap", "role:dev")["bans"] == 5001


async def test_governance_never_shortens_or_replaces_a_permanent_ban(admin, db):
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/workflow/loop", {"strike_threshold": 2}, 200)
    maker, reviewer = await w.agent("capable"), await w.agent("reviewers")
    t = (await maker.create("dev", "x"))["task"]["id"]
    await loop(maker, reviewer, t, 1)
    await produce(maker, t)
    await admin.post("/v1/governance/bans", {"family": "capable", "feature": "role:dev", "reason": "human call"}, 201)
    await reject(reviewer, t)  # the second strike: the ladder would ban for 1 h
    row = await db.fetchrow("SELECT expires_at, governance, reason FROM denials WHERE family_key = 'capable'")
    assert (row["expires_at"], row["governance"], row["reason"]) == (None, "permanent", "human call")
    s = strike_of(await status(admin), "capable", "role:dev")
    assert s["bans"] == 1 and s["banned"] and s["banned_until"] is None and s["ban_kind"] == "permanent"
    trail = (await status(admin))["trail"]
    assert trail[0]["action"] == "reflexive_ban" and trail[0]["data"]["applied"] is False


async def test_a_longer_manual_denial_is_not_shortened(admin, db):
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": 1}, 200)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    t = (await maker.create("dev", "x"))["task"]["id"]
    await produce(maker, t)
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "week off",
                                                    "expires_at": "2999-01-01T00:00:00Z"}, 201)
    await reject(reviewer, t)
    row = await db.fetchrow("SELECT expires_at, governance FROM denials WHERE family_key = 'cheap'")
    assert row["expires_at"].year == 2999 and row["governance"] is None


# -- the human boundary ------------------------------------------------------------------------------------


async def test_permanent_ban_and_lift_by_an_overseer_with_the_trail(admin, db):
    w = await make_world(admin, workflow=LOOP)
    maker = await w.agent("cheap")
    t = (await maker.create("dev", "x"))["task"]["id"]
    ban = await admin.post("/v1/governance/bans", {"family": "cheap", "feature": "role:dev",
                                                   "reason": "keeps shipping untested code"}, 201)
    assert ban["action"] == "permanent_ban" and ban["reason"] == "keeps shipping untested code"
    again = await admin.post("/v1/governance/bans", {"family": "cheap", "feature": "role:dev", "reason": "x"}, 409)
    assert again["code"] == "conflict"
    assert (await maker.claim("dev", None)).get("task") is None
    # The admin denial route lifts ordinary denials only: a governance ban is lifted on the trail.
    side = (await admin.delete("/v1/families/cheap/denials/role:dev", 409)).json()
    assert side["code"] == "conflict" and "/v1/governance/lifts" in side["detail"]
    assert (await maker.claim("dev", None)).get("task") is None

    lift = await admin.post("/v1/governance/lifts", {"family": "cheap", "feature": "role:dev",
                                                     "reason": "retrained"}, 200)
    assert lift["action"] == "lift" and lift["data"]["was"] == "permanent"
    c = await maker.claim("dev")
    assert c["task"]["id"] == t
    gone = await admin.post("/v1/governance/lifts", {"family": "cheap", "feature": "role:dev", "reason": "x"}, 404)
    assert gone["code"] == "not_found"
    trail = (await admin.get("/v1/governance/trail"))["items"]
    assert [(e["action"], e["family"], e["reason"]) for e in trail[:2]] == [
        ("lift", "cheap", "retrained"), ("permanent_ban", "cheap", "keeps shipping untested code")]

    # The trail is append-only, like events.
    for statement in ("UPDATE governance_trail SET reason = 'forged'", "DELETE FROM governance_trail",
                      "TRUNCATE governance_trail"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await db.execute(statement)
    assert await db.fetchval("SELECT count(*) FROM governance_trail") == 2


async def test_callers_without_the_seat_or_role_are_refused(admin, db):
    w = await make_world(admin, workflow=LOOP)
    agent = await w.agent("cheap")
    body = {"family": "reviewers", "feature": "role:reviewer", "reason": "x"}
    for path in ("/v1/governance/bans", "/v1/governance/lifts"):
        assert (await agent.post(path, body, 403))["code"] == "not_eligible"
    flag = {"kind": "health", "family": "reviewers", "note": "flaky"}
    assert (await agent.post("/v1/governance/flags", flag, 403))["code"] == "not_eligible"
    assert (await admin.post("/v1/governance/flags", flag, 403))["code"] == "not_eligible"  # no role:auditor
    assert (await agent.get("/v1/governance", 403))["code"] == "not_eligible"
    assert (await agent.call("PUT", "/v1/governance/policies/system/*", {}, 403)).json()["code"] == "not_eligible"
    # An overseer without seat:admin may neither ban a seat nor its own family (ADR 0008).
    await admin.post("/v1/families", {"key": "ovs", "features": ["seat:overseer", "role:dev"]}, 201)
    ovs = await w.agent("ovs")
    assert (await ovs.post("/v1/governance/bans", {"family": "ovs", "feature": "role:dev", "reason": "x"},
                           403))["code"] == "not_eligible"
    assert (await ovs.post("/v1/governance/bans", {"family": "cheap", "feature": "seat:admin", "reason": "x"},
                           403))["code"] == "not_eligible"
    lockout = await admin.post("/v1/governance/bans", {"family": "admin", "feature": "seat:admin", "reason": "x"}, 409)
    assert lockout["code"] == "conflict" and "lock every admin out" in lockout["detail"]
    assert (await admin.post("/v1/governance/bans", {"family": "nope", "feature": "role:dev", "reason": "x"},
                             404))["code"] == "not_found"
    # The system policy needs every threshold.
    assert (await admin.call("PUT", "/v1/governance/policies/system/*", {"strike_threshold": 5},
                             422)).json()["code"] == "invalid"
    assert await db.fetchval("SELECT count(*) FROM governance_trail") == 0  # refusals changed nothing


async def test_what_an_admin_denied_only_an_admin_lifts(admin, db):
    """As with disable: an overseer's lift of an admin's denial (an administrative decision, not a ban) is refused,
    naming the way; the bans overseers make, they lift."""
    w = await make_world(admin, workflow=LOOP)
    await admin.post("/v1/families", {"key": "ovs", "features": ["seat:overseer"]}, 201)
    ovs = await w.agent("ovs")
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "budget"}, 201)
    refused = await ovs.post("/v1/governance/lifts", {"family": "cheap", "feature": "role:dev", "reason": "x"}, 403)
    assert refused["code"] == "not_eligible" and "only seat:admin lifts it" in refused["detail"]
    refused = (await ovs.delete("/v1/families/cheap/denials/role:dev", 403)).json()  # nor through the other door
    assert refused["code"] == "not_eligible" and "only seat:admin lifts it" in refused["detail"]
    assert [d["feature"] for d in (await admin.get("/v1/families/cheap"))["denials"]] == ["role:dev"]
    assert await db.fetchval("SELECT count(*) FROM governance_trail WHERE action = 'lift'") == 0
    # An overseer's own denial, the overseer lifts (either way).
    for lift in ("delete", "governance"):
        await ovs.post("/v1/families/reviewers/denials", {"feature": "role:reviewer", "reason": "slow"}, 201)
        if lift == "delete":
            await ovs.delete("/v1/families/reviewers/denials/role:reviewer", 204)
        else:
            await ovs.post("/v1/governance/lifts", {"family": "reviewers", "feature": "role:reviewer",
                                                    "reason": "fast again"}, 200)
        assert (await admin.get("/v1/families/reviewers"))["denials"] == []
    await ovs.post("/v1/governance/bans", {"family": "reviewers", "feature": "role:reviewer", "reason": "x"}, 201)
    lifted = await ovs.post("/v1/governance/lifts", {"family": "reviewers", "feature": "role:reviewer",
                                                      "reason": "y"}, 200)
    assert lifted["data"]["was"] == "permanent"
    lifted = await admin.post("/v1/governance/lifts", {"family": "cheap", "feature": "role:dev",
                                                       "reason": "budget back"}, 200)
    assert lifted["data"]["was"] == "denial" and (await admin.get("/v1/families/cheap"))["denials"] == []
    gone = await ovs.post("/v1/governance/lifts", {"family": "cheap", "feature": "role:dev", "reason": "x"}, 404)
    assert gone["code"] == "not_found"


# -- flags and recommendations ---------------------------------------------------------------------------


async def test_flags_never_deny_and_make_recommendations_at_the_threshold(admin, db):
    w = await make_world(admin, workflow=LOOP)
    aud = await auditor(w)
    maker = await w.agent("cheap")
    t = (await maker.create("dev", "x"))["task"]["id"]

    q = await aud.post("/v1/governance/flags", {"kind": "quality", "family": "cheap", "feature": "role:dev",
                                                "task_id": t, "note": "tests assert nothing"}, 201)
    assert q["kind"] == "quality" and q["task_id"] == t and q["recommendation"] is None
    no_task = await aud.post("/v1/governance/flags", {"kind": "quality", "family": "cheap", "note": "x"}, 422)
    assert no_task["code"] == "invalid"

    flags = []
    for n in range(3):  # the system default: 3 open flags make a recommendation
        flags.append(await aud.post("/v1/governance/flags", {"kind": "spinning", "family": "cheap",
                                                             "note": f"holds without progress #{n}"}, 201))
    assert [f["recommendation"] is not None for f in flags] == [False, False, True]
    st = await status(admin)
    assert [(r["family"], r["feature"]) for r in st["recommendations"]] == [("cheap", None)]
    assert len(st["flags"]) == 4

    # Flags never deny: no denial, every feature kept, the next claim still gets the work.
    assert await db.fetchval("SELECT count(*) FROM denials") == 0
    assert "role:dev" in (await maker.get("/v1/me"))["features"]
    assert (await maker.claim("dev"))["task"]["id"] == t

    # Dismissing a flag is a human's act; an auditor may not.
    assert (await aud.post(f"/v1/governance/flags/{q['id']}/dismiss", {"reason": "x"}, 403))["code"] == \
        "not_eligible"
    d = await admin.post(f"/v1/governance/flags/{q['id']}/dismiss", {"reason": "looked fine to me"}, 200)
    assert d["dismissed_by"] is not None
    assert (await admin.post(f"/v1/governance/flags/{q['id']}/dismiss", {"reason": "x"}, 409))["code"] == "conflict"
    assert (await admin.post("/v1/governance/flags/999999/dismiss", {"reason": "x"}, 404))["code"] == "not_found"

    # A family-wide recommendation names the feature when accepted; accepted = the permanent ban.
    rec = st["recommendations"][0]
    need = await admin.post(f"/v1/governance/recommendations/{rec['id']}/accept", {"reason": "agreed"}, 422)
    assert need["code"] == "invalid"
    done = await admin.post(f"/v1/governance/recommendations/{rec['id']}/accept",
                            {"reason": "agreed", "feature": "role:dev"}, 200)
    assert done["status"] == "accepted" and done["decided_by"] is not None
    assert await db.fetchval("SELECT governance FROM denials WHERE family_key = 'cheap' AND feature = 'role:dev' "
                             "AND expires_at IS NULL") == "permanent"
    again = await admin.post(f"/v1/governance/recommendations/{rec['id']}/dismiss", {"reason": "x"}, 409)
    assert again["code"] == "conflict"


async def test_an_overseer_may_not_clear_what_is_said_of_its_own_family(admin, db):
    """ADR 0008: an overseer does not judge its own family — neither a flag about it nor a recommendation to ban it
    (found by a review: it could dismiss both); an admin may."""
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 1}, 200)
    await admin.post("/v1/families", {"key": "ovs", "features": ["seat:overseer", "role:dev"]}, 201)
    ovs, aud = await w.agent("ovs"), await auditor(w)
    f = await aud.post("/v1/governance/flags", {"kind": "spinning", "family": "ovs", "note": "loops"}, 201)
    trail = await db.fetchval("SELECT count(*) FROM governance_trail")
    for path, body in ((f"/v1/governance/flags/{f['id']}/dismiss", {}),
                       (f"/v1/governance/recommendations/{f['recommendation']}/dismiss", {}),
                       (f"/v1/governance/recommendations/{f['recommendation']}/accept", {"feature": "role:dev"})):
        r = await ovs.post(path, {"reason": "all fine here", **body}, 403)
        assert r["code"] == "not_eligible" and "its own family" in r["detail"], r
    assert await db.fetchval("SELECT count(*) FROM governance_trail") == trail  # the refusals changed nothing
    assert (await admin.post(f"/v1/governance/flags/{f['id']}/dismiss", {"reason": "seen"}, 200))["dismissed_by"]
    out = await admin.post(f"/v1/governance/recommendations/{f['recommendation']}/dismiss", {"reason": "no"}, 200)
    assert out["status"] == "dismissed"


async def test_one_decision_per_recommendation_when_two_are_sent_at_once(app, admin, db, dsn):
    """A dismiss and an accept of one recommendation at once: the second waits, then is refused (409); no ban is
    applied under a recommendation that reads `dismissed` (found by a review: both answered 200)."""
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 1}, 200)
    rec = (await (await auditor(w)).post("/v1/governance/flags", {"kind": "spinning", "family": "cheap",
                                                                   "note": "loops"}, 201))["recommendation"]
    p = await auth.authenticate(db, app.state.ainarres.signer, str(admin.token))
    outcome = await second_waits(dsn, lambda c: governance.dismiss(c, p, rec, "a one-off"),
                                 lambda c: governance.accept(c, p, rec, "ban it", "role:dev"))
    assert isinstance(outcome, Conflict) and "dismissed already" in str(outcome)
    assert (await admin.get("/v1/governance"))["recommendations"] == []
    assert await db.fetchval("SELECT count(*) FROM denials") == 0
    assert await db.fetchval("SELECT count(*) FROM governance_trail WHERE action = 'accept_recommendation'") == 0


class _PauseAfter:
    """A connection that stops after one statement (its locks taken) until let go."""

    def __init__(self, conn: asyncpg.Connection, query: str) -> None:
        self._c, self._query = conn, query
        self.reached, self.go = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._c, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        out = await self._c.fetch(query, *args)
        if query == self._query:
            self.reached.set()
            await self.go.wait()
        return out


async def test_an_accept_and_a_direct_ban_of_the_same_feature_take_their_locks_in_one_order(app, admin, db, dsn):
    """The accept of a recommendation and a direct ban of its (family, feature), interleaved: the accept holds the
    recommendation when the direct ban starts; the direct ban waits for it before writing anything, and is then
    told the ban is made (found by a review: in opposite orders, one of the two was aborted as a deadlock)."""
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 1}, 200)
    judged = (await (await w.agent("cheap")).create("dev", "judged"))["task"]["id"]
    rec = (await (await auditor(w)).post("/v1/governance/flags", {
        "kind": "quality", "family": "cheap", "feature": "role:dev", "task_id": judged, "note": "sloppy"},
        201))["recommendation"]
    p = await auth.authenticate(db, app.state.ainarres.signer, str(admin.token))
    c1, c2, observer = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        paused = _PauseAfter(c1, Q["recommendations_lock"])
        accepting = asyncio.create_task(governance.accept(paused, p, rec, "agreed", None))  # type: ignore[arg-type]
        await asyncio.wait_for(paused.reached.wait(), 30)
        direct = asyncio.create_task(governance.ban(c2, p, "cheap", "role:dev", "banning it myself"))
        await wait_for_lock(observer, c2.get_server_pid(), "the direct ban")
        paused.go.set()
        accepted, banned = await asyncio.wait_for(asyncio.gather(accepting, direct, return_exceptions=True), 30)
    finally:
        for conn in (c1, c2, observer):
            await conn.close()
    assert accepted["status"] == "accepted", accepted
    assert isinstance(banned, Conflict) and "permanently banned" in str(banned), banned
    assert await db.fetchval("SELECT count(*) FROM denials WHERE family_key = 'cheap' AND expires_at IS NULL") == 1


async def test_a_recommendation_made_while_a_ban_is_under_way_is_left_to_its_own_decision(app, admin, db, dsn):
    """A direct ban locks the open recommendations it decides (none yet); a flag then makes one for the same
    feature, and its accept starts. The ban decides only what it locked: it once updated the new recommendation
    after writing the denial, the order the accept takes the other way round, and one of the two was aborted as
    a deadlock (found by a review, with a denial row held to line the two up)."""

    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 1}, 200)
    judged = (await (await w.agent("cheap")).create("dev", "judged"))["task"]["id"]
    aud = await auditor(w)
    # An expiring (reflexive) denial of the feature: both bans turn it permanent (ON CONFLICT DO UPDATE).
    await db.execute("INSERT INTO denials (family_key, feature, reason, expires_at, created_by, governance) "
                     "VALUES ('cheap', 'role:dev', 'reflexive', now() + interval '1 hour', 'governance', 'reflexive')")
    p = await auth.authenticate(db, app.state.ainarres.signer, str(admin.token))
    c1, c2, x, observer = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        paused = _PauseAfter(c1, Q["recommendations_lock"])
        direct = asyncio.create_task(governance.ban(paused, p, "cheap", "role:dev", "banning it myself"))
        await asyncio.wait_for(paused.reached.wait(), 30)  # locked the open recommendations: none
        rec = (await aud.post("/v1/governance/flags", {"kind": "quality", "family": "cheap", "feature": "role:dev",
                                                        "task_id": judged, "note": "sloppy"}, 201))["recommendation"]
        assert rec is not None
        tx = x.transaction()
        await tx.start()
        await x.execute("SELECT 1 FROM denials WHERE family_key = 'cheap' AND feature = 'role:dev' FOR UPDATE")
        paused.go.set()
        await wait_for_lock(observer, c1.get_server_pid(), "the direct ban's denial")
        accepting = asyncio.create_task(governance.accept(c2, p, rec, "agreed", None))
        await wait_for_lock(observer, c2.get_server_pid(), "the accept's denial")
        await tx.commit()
        outcomes = await asyncio.wait_for(asyncio.gather(direct, accepting, return_exceptions=True), 30)
    finally:
        for conn in (c1, c2, x, observer):
            await conn.close()
    assert not any(isinstance(o, asyncpg.DeadlockDetectedError) for o in outcomes), outcomes
    banned, accepted = outcomes
    assert banned["action"] == "permanent_ban", banned
    assert isinstance(accepted, Conflict) and "permanently banned" in str(accepted), accepted
    # The recommendation the ban did not lock is left to a decision of its own (a dismiss, now).
    assert await db.fetchval("SELECT status FROM governance_recommendations WHERE id = $1", rec) == "open"


async def test_flags_raised_at_once_make_the_recommendation_their_count_reaches(app, admin, db, dsn):
    """Each flag counts the open ones before it; raised at once, each missed the other and the threshold they
    reached together made no recommendation (found by a review: 3 flags at once, none in 4 runs of 5)."""
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 2}, 200)
    await auditor(w)
    p = await auth.authenticate(db, app.state.ainarres.signer, str(admin.token))

    def flag(note: str) -> Any:
        return lambda c: governance.raise_flag(c, p, "health", "cheap", None, None, note)

    second = await second_waits(dsn, flag("first"), flag("second"))
    assert second["recommendation"] is not None
    assert len((await admin.get("/v1/governance"))["recommendations"]) == 1


async def test_a_dismissed_recommendation_bans_nothing(admin, db):
    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/system/*",
                     {"strike_threshold": 3, "ban_base_seconds": 3600, "ban_cap_seconds": 86400,
                      "recommend_after_bans": 3, "recommend_after_flags": 1}, 200)
    aud = await auditor(w)
    f = await aud.post("/v1/governance/flags", {"kind": "integrity", "family": "reviewers", "note": "odd"}, 201)
    rec = f["recommendation"]
    assert rec is not None
    out = await admin.post(f"/v1/governance/recommendations/{rec}/dismiss", {"reason": "a one-off"}, 200)
    assert out["status"] == "dismissed" and out["decision_note"] == "a one-off"
    assert await db.fetchval("SELECT count(*) FROM denials") == 0
    actions = [e["action"] for e in (await status(admin))["trail"]]
    assert actions[:4] == ["dismiss_recommendation", "recommend", "flag", "policy"]


# -- blocks: the substrate's are a human's to lift ---------------------------------------------------------


async def substrate_blocked(admin: Api) -> tuple[Api, str]:
    """An agent of lane `flat` (one attempt a stage) and a task the substrate blocked (its release: max attempts)."""
    flat = {"key": "flat", "stages": [{"key": "todo", "initial": True, "max_attempts": 1},
                                      {"key": "done", "terminal": True}],
            "transitions": [{"from": "todo", "to": "done", "kind": "advance", "required_features": ["role:dev"]}]}
    w = await make_world(admin, workflow=flat, lane="flat")
    dev = await w.agent("cheap")
    t = (await dev.create("flat", "hard"))["task"]["id"]
    c = await dev.claim("flat")
    rel = await dev.verb(t, "release", lease=c["lease"]["id"], reason="cannot")
    assert rel["code"] == "blocked", rel  # max attempts (1): the substrate blocked it
    return dev, t


async def test_a_substrate_block_needs_an_overseer_an_agent_block_does_not(admin, db):
    dev, t = await substrate_blocked(admin)

    stuck = {r["id"]: r for r in (await admin.get("/v1/stuck", params={"kind": "blocked"}))["items"]}
    assert stuck[t]["human_must_lift"] is True and stuck[t]["blocked_by"] == "substrate"

    refused = await dev.verb(t, "unblock", 403, note="let me retry")
    assert refused["code"] == "not_eligible" and "a human must lift it" in refused["detail"]
    assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", t) == "blocked"  # unchanged
    u = await admin.post("/v1/governance/unblock", {"task_id": t, "note": "the API key is fixed now"}, 200)
    assert u["task"]["state"] == "ready"
    # The answer is what /openapi.json says it is (schemathesis rarely reaches a blocked task): `replay` left out.
    components = (await admin.get("/openapi.json"))["components"]
    validator = Draft202012Validator({"$ref": "#/components/schemas/Moved", "components": components})
    assert not [e.message for e in validator.iter_errors(u)], u
    entry = (await status(admin))["trail"][0]
    assert (entry["action"], entry["task_id"], entry["reason"]) == ("unblock", t, "the API key is fixed now")
    assert entry["data"]["blocked_by"] == "substrate"

    # An agent's own block: an agent that may work the stage lifts it.
    c = await dev.claim("flat")
    await dev.verb(t, "block", lease=c["lease"]["id"], reason="need credentials")
    stuck = {r["id"]: r for r in (await admin.get("/v1/stuck", params={"kind": "blocked"}))["items"]}
    assert stuck[t]["human_must_lift"] is False and stuck[t]["blocked_by"] == "agent"
    assert (await dev.verb(t, "unblock", note="found them"))["task"]["state"] == "ready"


async def test_lifting_a_substrate_block_goes_on_the_trail_whichever_call_makes_it(admin, db):
    """SPEC §8: a human's unblock of what the substrate blocked carries a reason on the trail. The unblock verb,
    which an overseer may also call (the task drawer did, without a note), is held to it: a note is required and
    recorded on the trail, as POST /v1/governance/unblock records it (found by a review of SPEC against the code:
    the verb lifted such a block with no reason and no trail entry)."""
    dev, t = await substrate_blocked(admin)

    for body in ({}, {"note": "   "}, {"note": "x" * 2001}):
        refused = await admin.call("POST", f"/v1/tasks/{t}/unblock", body, 422)
        assert [e["field"] for e in refused.json()["errors"]] == ["note"], refused.json()
        assert "governance trail" in refused.json()["detail"]
    assert await db.fetchval("SELECT state FROM tasks WHERE id = $1", t) == "blocked"  # unchanged
    assert await db.fetchval("SELECT count(*) FROM governance_trail WHERE action = 'unblock'") == 0

    u = await admin.post(f"/v1/tasks/{t}/unblock", {"note": "retry with the new key"}, 200)
    assert u["task"]["state"] == "ready" and u["event"]["data"]["note"] == "retry with the new key"
    entry = (await status(admin))["trail"][0]
    assert (entry["action"], entry["task_id"], entry["reason"]) == ("unblock", t, "retry with the new key")
    assert entry["data"] == {"blocked_by": "substrate", "blocked_reason": MAX_ATTEMPTS_REASON}

    # An agent's own block lifted by an agent of the stage is not a human act: nothing on the trail.
    c = await dev.claim("flat")
    await dev.verb(t, "block", lease=c["lease"]["id"], reason="need credentials")
    assert (await dev.verb(t, "unblock"))["task"]["state"] == "ready"
    assert await db.fetchval("SELECT count(*) FROM governance_trail WHERE action = 'unblock'") == 1


async def test_migration_0022_clears_the_capability_thresholds_stored_before_on_the_trail(admin, db):
    """Stored before the refusal, a capability's strike and ban thresholds governed nothing: the migration clears
    them (its flag threshold stays) and says so on the trail; a role's policy is untouched."""
    await make_world(admin)
    await admin.post("/v1/features", {"name": "capability:gpu"}, 201)
    await db.execute("INSERT INTO governance_policies (scope, key, strike_threshold, ban_cap_seconds, "
                     "recommend_after_flags) VALUES ('feature', 'capability:gpu', 1, 600, 2), "
                     "('feature', 'role:dev', 1, 600, 2)")
    sql = next(m.sql for m in migrate.available() if m.version == 22)
    await db.execute(sql)
    rows = {r["key"]: dict(r) for r in await db.fetch(
        "SELECT key, strike_threshold, ban_cap_seconds, recommend_after_flags FROM governance_policies "
        "WHERE scope = 'feature'")}
    assert rows["capability:gpu"] == {"key": "capability:gpu", "strike_threshold": None, "ban_cap_seconds": None,
                                      "recommend_after_flags": 2}
    assert rows["role:dev"]["strike_threshold"] == 1 and rows["role:dev"]["ban_cap_seconds"] == 600
    entry = (await status(admin))["trail"][0]
    assert (entry["actor"], entry["action"]) == ("substrate", "policy") and "capability:gpu" in entry["reason"]
    await db.execute(sql)  # nothing left to clear: no second entry
    assert len([e for e in (await status(admin))["trail"] if e["actor"] == "substrate"]) == 1


async def test_a_workflow_policy_sets_how_many_flags_on_its_tasks_make_a_recommendation(admin):
    """The flag threshold inherits feature → workflow → system like the others: a flag anchored to a task reads
    its workflow's policy (the flag statement asked for no workflow, so a workflow's value was stored and read by
    nothing; found by a review)."""
    w = await make_world(admin, workflow=LOOP)
    aud = await auditor(w)
    t = (await (await w.agent("cheap")).create("dev", "x"))["task"]["id"]
    await admin.call("PUT", "/v1/governance/policies/workflow/loop", {"recommend_after_flags": 1}, 200)
    f = await aud.post("/v1/governance/flags", {"kind": "quality", "family": "cheap", "feature": "role:dev",
                                                "task_id": t, "note": "tests assert nothing"}, 201)
    assert f["recommendation"] is not None  # the system default is 3


async def test_a_reason_of_only_spaces_is_no_reason(admin):
    """The trail's worth is in its reasons: a blank one is refused on every act that writes one."""
    await make_world(admin)
    for path, body in (("/v1/governance/bans", {"family": "cheap", "feature": "role:dev", "reason": "  "}),
                       ("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "\t "})):
        r = await admin.call("POST", path, body, 422)
        assert [e["field"] for e in r.json()["errors"]] == ["reason"], r.json()
    assert (await status(admin))["trail"] == []


async def test_a_capability_policy_takes_only_the_threshold_that_reads_it(admin):
    """Strikes and bans are counted per (family, role): a `capability:` policy's strike threshold was stored and
    governed nothing (found by a review of SPEC against the code). Refused, naming the fields; the flag threshold,
    which auditor flags on a capability do read, is taken."""
    await make_world(admin)
    await admin.post("/v1/features", {"name": "capability:gpu"}, 201)
    r = await admin.call("PUT", "/v1/governance/policies/feature/capability:gpu",
                         {"strike_threshold": 1, "ban_cap_seconds": 600, "recommend_after_flags": 2}, 422)
    assert [e["field"] for e in r.json()["errors"]] == ["strike_threshold", "ban_cap_seconds"], r.json()
    assert "role:<x>" in r.json()["detail"]
    assert not [p for p in (await status(admin))["policies"] if p["key"] == "capability:gpu"]
    ok = await admin.call("PUT", "/v1/governance/policies/feature/capability:gpu", {"recommend_after_flags": 2}, 200)
    assert ok.json()["recommend_after_flags"] == 2
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": 1}, 200)


async def test_demand_names_work_nobody_unbanned_can_serve(admin):
    w = await make_world(admin, workflow=LOOP)
    maker = await w.agent("cheap")
    await maker.create("dev", "x")
    for fam in ("cheap", "capable"):
        await admin.post("/v1/governance/bans", {"family": fam, "feature": "role:dev", "reason": "bad"}, 201)
    rows = (await admin.get("/v1/demand", params={"capable": "false"}))["items"]
    row = next(r for r in rows if r["stage"] == "todo")
    assert row["capable"] is False and row["note"] == "no capable agent"
    assert row["banned_families"] == ["capable", "cheap"]


# -- the track record's read at volume ---------------------------------------------------------------------


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


async def test_track_record_read_never_scans_events(admin, db):
    w = await make_world(admin, workflow=LOOP)
    maker, reviewer = await w.agent("cheap"), await w.agent("reviewers")
    t = (await maker.create("dev", "x"))["task"]["id"]
    await loop(maker, reviewer, t, 1)
    await spend_svc.fold(db)  # the moves above are credited
    # 300k events of history (the events table is append-only, so rows are added, never rewritten), counted
    # before the fold took over crediting (migration 0017's mark): the read must not count them again.
    await db.execute("""
        INSERT INTO events (task_id, type, actor, family, data)
        SELECT $1, 'transition', 'ghost', CASE WHEN g % 2 = 0 THEN 'cheap' ELSE 'reviewers' END,
               jsonb_build_object('kind', CASE WHEN g % 3 = 0 THEN 'reject' ELSE 'advance' END, 'from', 'todo',
                                  'to', 'review')
          FROM generate_series(1, 300000) g""", t)
    await db.execute("UPDATE flow_fold SET credit_from = (SELECT max(id) FROM events)")
    await db.execute("ANALYZE")
    plan = json.loads(await db.fetchval("EXPLAIN (FORMAT JSON) " + Q["track_record_page"], None, None, None,
                                        None, 101))
    touched = [n for n in _nodes(plan[0]["Plan"]) if n.get("Relation Name") == "events"]
    assert not touched, f"the track record reads events: {json.dumps(touched)[:1500]}"
    assert any(n.get("Relation Name") == "track_counts" for n in _nodes(plan[0]["Plan"]))
    # ... and still answers from the rollups.
    recs = {r["key"]: r for r in (await admin.get("/v1/track-record"))["items"]}
    assert (recs["cheap"]["delivered"], recs["cheap"]["rejected"]) == (1, 1)


async def test_concurrent_rejects_each_count_one_strike(admin, db):

    w = await make_world(admin, workflow=LOOP)
    await admin.call("PUT", "/v1/governance/policies/feature/role:dev", {"strike_threshold": 4}, 200)
    makers = [await w.agent("cheap") for _ in range(3)]
    reviewers = [await w.agent("reviewers") for _ in range(3)]
    ids = [(await makers[0].create("dev", f"t{n}"))["task"]["id"] for n in range(3)]
    for m in makers:
        c = await m.claim("dev")
        await m.verb(c["task"]["id"], "advance", lease=c["lease"]["id"], to="review")
    claims = [await r.claim("dev") for r in reviewers]
    assert sorted(c["task"]["id"] for c in claims) == sorted(ids)
    await asyncio.gather(*(r.verb(c["task"]["id"], "reject", lease=c["lease"]["id"], to="todo", reason="no")
                           for r, c in zip(reviewers, claims, strict=True)))
    s = strike_of(await status(admin), "cheap", "role:dev")
    assert (s["strikes"], s["bans"]) == (3, 0)
    recs = {r["key"]: r for r in (await admin.get("/v1/track-record"))["items"]}
    assert (recs["cheap"]["delivered"], recs["cheap"]["rejected"], recs["reviewers"]["rejects_made"]) == (3, 3, 3)


async def test_the_migration_backfill_rebuilds_the_counts_from_events(admin, db):
    """Migration 0013 folds in the moves recorded before it: run its backfill over a history and compare."""
    from pathlib import Path

    import ainarres_api.server.db as dbpkg

    w = await make_world(admin, workflow=LOOP)
    maker, other, reviewer = await w.agent("cheap"), await w.agent("capable"), await w.agent("reviewers")
    t = (await maker.create("dev", "x"))["task"]["id"]
    await loop(maker, reviewer, t, 1)
    await loop(other, reviewer, t, 1)
    await produce(maker, t)
    c = await reviewer.claim("dev")
    await reviewer.verb(t, "advance", lease=c["lease"]["id"], to="done")
    cols = "family_key, role, sum(deliveries), sum(rejects_made), sum(rejected), sum(reviewed), sum(reviewed_cross)"
    await spend_svc.fold(db)  # the counters are folded from the events on read (ADR 0019)
    live = await db.fetch(f"SELECT {cols} FROM track_counts GROUP BY 1, 2 ORDER BY 1, 2")

    migration = (Path(dbpkg.__file__).parent / "migrations" / "0013_governance.sql").read_text()
    backfill = migration[migration.index("-- Backfill"):]
    await db.execute("DELETE FROM track_counts")
    await db.execute(backfill)
    rebuilt = await db.fetch(f"SELECT {cols} FROM track_counts GROUP BY 1, 2 ORDER BY 1, 2")
    assert rebuilt == live and len(live) == 3  # cheap and capable in role:dev, reviewers in role:reviewer


async def test_migration_0025_marks_the_denials_admins_made(admin, db):
    """Denials made before 0025 carry no mark: the migration marks those whose maker's family holds seat:admin."""
    w = await make_world(admin, workflow=LOOP)
    await admin.post("/v1/families", {"key": "ovs", "features": ["seat:overseer"]}, 201)
    ovs = await w.agent("ovs")
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "budget"}, 201)
    await ovs.post("/v1/families/reviewers/denials", {"feature": "role:reviewer", "reason": "slow"}, 201)
    await db.execute("UPDATE denials SET by_admin = false")  # as before the migration
    sql = next(m.sql for m in migrate.available() if m.version == 25)
    await db.execute(sql[sql.index("-- Existing denials"):])
    marks = {r["family_key"]: r["by_admin"] for r in await db.fetch("SELECT family_key, by_admin FROM denials")}
    assert marks == {"cheap": True, "reviewers": False}
