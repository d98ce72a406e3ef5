"""The first hour of an agent (issue 13, items 0–4): it sees where the work lives, a claim that can never
match is refused with its cause, an empty claim says whether waiting helps, and refusals say what to do."""

from __future__ import annotations

import uuid
from typing import Any

from tests.helpers import Api, make_world


async def _world_with_context(admin: Api) -> Any:
    await admin.post("/v1/features", {"name": "role:dev"}, None)
    await admin.post("/v1/features", {"name": "role:reviewer"}, None)
    w = await make_world(admin)
    await admin.post("/v1/projects", {"slug": "calc", "context": {"repo": "https://example.com/calc.git"}}, 201)
    await admin.post("/v1/lanes", {"project": "calc", "key": "calc", "workflow": "dev",
                                   "context": {"branch_prefix": "calc/"}}, 201)
    await admin.post("/v1/families", {"key": "calcdev", "features": ["lane:calc", "role:dev"]}, 201)
    return w


# 0. An agent token with only the lane's features reads the project's and lane's context.
async def test_the_claim_and_the_cards_carry_where_the_work_lives(admin: Api) -> None:
    w = await _world_with_context(admin)
    dev = await w.agent("calcdev")
    tid = (await dev.create("calc", "add"))["task"]["id"]
    c = await dev.claim("calc")
    want = {"project": {"slug": "calc", "context": {"repo": "https://example.com/calc.git"}},
            "lane": {"key": "calc", "context": {"branch_prefix": "calc/"}}}
    assert c["context"] == want
    assert "block" in c["card"]["when_stuck"]
    assert (await dev.get(f"/v1/tasks/{tid}/card"))["context"] == want
    assert (await dev.get("/v1/lanes/calc/cards"))["context"] == want


# 1. A claim that can never match is refused, naming the cause; the same in a long poll, at once.
async def test_a_claim_that_can_never_match_is_refused_with_its_cause(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    for body in ({"lane": "backnd"}, {"lane": "backnd", "wait_seconds": 30}):
        r = await dev.call("POST", "/v1/claims", body, 403)
        assert r.json()["code"] == "not_eligible" and "lane:backnd" in r.json()["detail"]
    # Unknown and unheld lanes answer alike (no lane enumeration).
    await admin.post("/v1/projects", {"slug": "other"}, 201)
    await admin.post("/v1/lanes", {"project": "other", "key": "secret", "workflow": "dev"}, 201)
    r = await dev.call("POST", "/v1/claims", {"lane": "secret"}, 403)
    assert r.json()["detail"].replace("secret", "backnd") == (
        await dev.call("POST", "/v1/claims", {"lane": "backnd"}, 403)).json()["detail"]
    # A family whose role is denied: every way out of the lane's stages needs what it lacks.
    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "too many rejects"}, 201)
    await admin.post("/v1/families", {"key": "idle", "features": ["lane:dev"]}, 201)
    for who in (dev, await w.agent("idle")):
        r = await who.call("POST", "/v1/claims", {"lane": "dev", "wait_seconds": 30}, 403)
        assert "can ever match" in r.json()["detail"] and "role:" in r.json()["detail"], r.text
    r = await dev.call("POST", "/v1/claims", {}, 403)
    assert "role:dev is denied to family cheap" in r.json()["detail"] and "too many rejects" in r.json()["detail"]


async def test_an_empty_claim_says_whether_work_may_come(admin: Api) -> None:
    w = await make_world(admin)
    dev, other = await w.agent("cheap"), await w.agent("cheap")
    first = (await dev.create("dev", "first"))["task"]["id"]
    await dev.create("dev", "after", depends_on=[first])
    assert (await other.claim("dev"))["task"]["id"] == first
    empty = await dev.claim("dev")
    assert empty["code"] == "empty" and empty["pending"] == {"held": 1, "waiting": 1, "blocked": 0}
    assert "wait" in empty["hint"]


# 2. Another agent's live lease is named as such, not as expired.
async def test_presenting_another_agents_lease_says_so(admin: Api) -> None:
    w = await make_world(admin)
    dev, thief = await w.agent("cheap"), await w.agent("cheap")
    tid = (await dev.create("dev", "mine"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    r = await thief.call("POST", f"/v1/tasks/{tid}/heartbeat", {"lease": lease}, 409)
    assert r.json()["code"] == "lease_lost" and "another agent" in r.json()["detail"]
    assert "expired" not in r.json()["detail"]


# 3. A body sent without Content-Type: application/json is told to send it.
async def test_a_body_without_the_json_content_type_is_told_what_to_send(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    r = await dev.client.post("/v1/claims", content=b'{"lane": "dev"}',
                              headers={"Authorization": f"Bearer {dev.token}",
                                       "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and "Content-Type: application/json" in r.json()["detail"], r.text


# 4. A create refused while the lane is denied names the denial and its reason.
async def test_a_denied_lane_is_named_as_denied(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await admin.post("/v1/families/cheap/denials", {"feature": "lane:dev", "reason": "audit in progress"}, 201)
    r = await dev.call("POST", "/v1/tasks", {"lane": "dev", "title": "x"}, 403)
    detail = r.json()["detail"]
    assert "lane:dev is denied to family cheap" in detail and "audit in progress" in detail


# Issue 9, item 7: a retry of an applied advance/reject is told the truth.
async def test_a_retried_transition_answers_its_original_outcome(admin: Api) -> None:
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    tid = (await dev.create("dev", "retry me"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    body = {"lease": lease, "to": "review", "note": "done", "artifacts": [{"type": "branch", "name": "feat/x"}]}
    first = await dev.verb(tid, "advance", **body)
    again = await dev.verb(tid, "advance", **body)
    assert again["replay"] is True and again["event"] == first["event"] and again["task"]["stage"] == "review"
    # A different target, text or artifacts on the finished lease is still lease_lost; so is another agent.
    for other in ({**body, "note": "different"}, {**body, "artifacts": []}, {**body, "to": "todo"}):
        r = await dev.call("POST", f"/v1/tasks/{tid}/advance", other, 409)
        assert r.json()["code"] == "lease_lost"
    await (await w.agent("cheap")).call("POST", f"/v1/tasks/{tid}/advance", body, 409)
    # A reject replays too, and the review goes on from where it is.
    rl = (await rev.claim("dev"))["lease"]["id"]
    rj = {"lease": rl, "to": "todo", "reason": "no test"}
    first = await rev.verb(tid, "reject", **rj)
    again = await rev.verb(tid, "reject", **rj)
    assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
    events = (await dev.get(f"/v1/tasks/{tid}/events"))["items"]
    assert [e["type"] for e in events].count("transition") == 2  # nothing applied twice


async def test_a_retried_release_or_block_answers_its_original_outcome(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "retry me"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    first = await dev.verb(tid, "release", lease=lease, reason="context full")
    again = await dev.verb(tid, "release", lease=lease, reason="context full")
    assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
    assert again["task"]["attempts"] == 1  # applied once
    await dev.call("POST", f"/v1/tasks/{tid}/release", {"lease": lease, "reason": "other"}, 409)
    await dev.call("POST", f"/v1/tasks/{tid}/block", {"lease": lease, "reason": "context full"}, 409)
    lease = (await dev.claim("dev"))["lease"]["id"]
    first = await dev.verb(tid, "block", lease=lease, reason="needs a key")
    again = await dev.verb(tid, "block", lease=lease, reason="needs a key")
    assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
    # A release without a reason on that ended lease was never sent: not a replay of the block (found by a review).
    r = await dev.call("POST", f"/v1/tasks/{tid}/release", {"lease": lease}, 409)
    assert r.json()["code"] == "lease_lost"


async def test_a_retried_progress_records_one_event(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "note it"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    first = await dev.verb(tid, "progress", lease=lease, note="half", artifacts=[{"type": "file", "path": "a"}])
    again = await dev.verb(tid, "progress", lease=lease, note="half", artifacts=[{"type": "file", "path": "a"}])
    assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
    other = await dev.verb(tid, "progress", lease=lease, note="more")  # a new note is a new event
    assert other["event"]["id"] > first["event"]["id"] and "replay" not in other
    await dev.verb(tid, "advance", lease=lease, to="review")
    again = await dev.verb(tid, "progress", lease=lease, note="more")  # its answer lost, the hold ended since
    assert again["replay"] is True and again["event"]["id"] == other["event"]["id"]
    types = [e["type"] for e in (await dev.get(f"/v1/tasks/{tid}/events"))["items"]]
    assert types.count("progress") == 2


async def test_a_branch_artifact_can_name_its_repository(admin: Api) -> None:
    w = await make_world(admin)
    dev = await w.agent("cheap")
    tid = (await dev.create("dev", "branch"))["task"]["id"]
    lease = (await dev.claim("dev"))["lease"]["id"]
    art = {"type": "branch", "name": "feat/x", "repo": "https://example.com/calc.git"}
    out = await dev.verb(tid, "advance", lease=lease, to="review", artifacts=[art])
    assert out["event"]["data"]["artifacts"] == [art]


async def test_a_retried_progress_after_a_takeover_never_answers_the_new_holders_lease(admin: Api, db: Any) -> None:
    """A's progress was applied, its answer lost; A's lease ran out and B took the task over. A's retry is told
    the truth about A's own lease — its hold has ended (expires_at null) — never B's lease as if it were A's
    (found by a concurrency review)."""
    w = await make_world(admin)
    a, b = await w.agent("cheap"), await w.agent("cheap")
    tid = (await a.create("dev", "taken over"))["task"]["id"]
    mine = (await a.claim("dev"))["lease"]["id"]
    first = await a.verb(tid, "progress", lease=mine, note="half")
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
                     uuid.UUID(tid))
    theirs = (await b.claim("dev"))["lease"]["id"]
    for moved_on in (False, True):  # while B holds it, and after B has moved it on
        if moved_on:
            await b.verb(tid, "advance", lease=theirs, to="review")
        again = await a.verb(tid, "progress", lease=mine, note="half")
        assert again["replay"] is True and again["event"]["id"] == first["event"]["id"]
        assert again["lease"] == {"id": mine, "expires_at": None}, again["lease"]


async def test_the_first_start_can_leave_the_admin_token_out_of_stdout(dsn: str, settings: Any, db: Any,
                                                                      capsys: Any) -> None:
    """Found by an operator review: in a container stdout is the log driver's, and the first start's 30-day admin
    token went there. AINARRES_BOOTSTRAP_TOKEN=false: the admin family is made, no token is minted or printed, and
    the start says how to mint one (`ainarres token`, which prints to the operator's terminal)."""
    from asgi_lifespan import LifespanManager

    from ainarres_api.server.app import create_app

    app = create_app(settings.model_copy(update={"bootstrap_token": False}), dsn=dsn)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        out = capsys.readouterr().out
    assert "AINARRES_BOOTSTRAP_TOKEN=false" in out and "ainarres token --family admin" in out
    assert "eyJ" not in out and "admin token (shown once" not in out
    assert await db.fetchval("SELECT count(*) FROM families WHERE key = 'admin'") == 1
    assert await db.fetchval("SELECT count(*) FROM tokens") == 0
