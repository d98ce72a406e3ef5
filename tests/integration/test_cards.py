"""Role cards: stage and transition instructions as data, versioned with their workflow."""

from __future__ import annotations

import copy
from typing import Any

from tests.helpers import DEV_WORKFLOW, Api, make_world


def carded(todo: str, review: str, reject: str) -> dict[str, Any]:
    """DEV_WORKFLOW with instructions on two stages and on the reject out of review."""
    wf = copy.deepcopy(DEV_WORKFLOW)
    wf["stages"][0]["instructions"] = todo
    wf["stages"][1]["instructions"] = review
    wf["transitions"][2]["instructions"] = reject
    return wf


V1 = carded("# Build it\nWrite the program; run `make check`.", "# Review\nRe-run the checks.",
            "Name the failing check in the reason.")
V2 = carded("# Build it, v2\nNow with tests first.", "# Review v2", "Say what to fix.")


def card_of(cards: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(c for c in cards["cards"] if c["stage"] == stage)


async def test_claim_returns_the_card_with_its_instructions(admin: Api) -> None:
    w = await make_world(admin, workflow=V1)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    task = (await dev.create("dev", "write it"))["task"]

    c = await dev.claim("dev")
    card = c["card"]
    assert card["workflow"] == "dev" and card["workflow_version"] == 1 and card["stage"] == "todo"
    assert card["instructions"] == V1["stages"][0]["instructions"]
    assert card["initial"] is True and card["terminal"] is False
    assert card["lease_seconds"] == 60 and card["max_attempts"] == 3 and card["escalate_after"] == 2
    assert card["transitions"] == [{"kind": "advance", "to": "review", "required_features": ["role:dev"],
                                    "guard": None, "instructions": ""}]
    assert await dev.get(f"/v1/tasks/{task['id']}/card") == {"task_id": task["id"], **card,
                                                            "context": c["context"]}

    await dev.verb(task["id"], "advance", lease=c["lease"]["id"], to="review")
    c2 = await rev.claim("dev")
    card2 = c2["card"]
    assert card2["stage"] == "review" and card2["instructions"] == V1["stages"][1]["instructions"]
    assert card2["max_rework"] == 2
    ways = {(t["kind"], t["to"]): t["instructions"] for t in card2["transitions"]}
    assert ways == {("advance", "done"): "", ("reject", "todo"): V1["transitions"][2]["instructions"]}


async def test_the_workflow_shows_transition_instructions(admin: Api) -> None:
    await make_world(admin, workflow=V1)
    wf = await admin.get("/v1/workflows/dev")
    assert [t["instructions"] for t in wf["transitions"]] == ["", "", V1["transitions"][2]["instructions"]]
    assert [s["instructions"] for s in wf["stages"]] == [V1["stages"][0]["instructions"],
                                                          V1["stages"][1]["instructions"], ""]


async def test_a_new_version_leaves_the_old_lanes_cards_alone(admin: Api) -> None:
    w = await make_world(admin, workflow=V1)
    dev = await w.agent("cheap")
    before = await dev.get("/v1/lanes/dev/cards")
    assert before["workflow"] == "dev" and before["workflow_version"] == 1
    assert [c["stage"] for c in before["cards"]] == ["todo", "review", "done"]
    assert card_of(before, "done")["terminal"] is True and card_of(before, "done")["transitions"] == []

    await admin.post("/v1/workflows", V2, 201)  # version 2 of the same key
    await admin.post("/v1/lanes", {"project": "acme", "key": "dev2", "workflow": "dev"}, 201)
    await admin.patch("/v1/families/cheap", {"features": ["lane:dev", "lane:dev2", "role:dev"]})

    assert await dev.get("/v1/lanes/dev/cards") == before
    newer = await dev.get("/v1/lanes/dev2/cards")
    assert newer["workflow_version"] == 2
    assert card_of(newer, "todo")["instructions"] == V2["stages"][0]["instructions"]
    assert card_of(newer, "review")["transitions"][1]["instructions"] == V2["transitions"][2]["instructions"]

    # A claim in the old lane still works from the old card, in the new one from the new card.
    await dev.create("dev", "old")
    old = await dev.claim("dev")
    assert old["card"] == card_of(before, "todo")
    await dev.verb(old["task"]["id"], "release", lease=old["lease"]["id"])
    await dev.create("dev2", "new")
    new = await dev.claim("dev2")
    assert new["card"]["workflow_version"] == 2 and new["card"] == card_of(newer, "todo")


async def test_cards_need_the_lane_feature_or_a_seat(admin: Api) -> None:
    w = await make_world(admin, workflow=V1)
    await admin.post("/v1/workflows", {**V1, "key": "other"}, 201)
    await admin.post("/v1/lanes", {"project": "acme", "key": "other", "workflow": "other"}, 201)
    dev = await w.agent("cheap")

    r = await dev.call("GET", "/v1/lanes/other/cards", expect=403)
    assert r.json()["code"] == "not_eligible" and "lane:other" in r.json()["detail"]
    # An unknown lane answers like a lane you lack: outsiders learn nothing about which lanes exist.
    r = await dev.call("GET", "/v1/lanes/nope/cards", expect=403)
    assert r.json()["code"] == "not_eligible" and "lane:nope" in r.json()["detail"]
    r = await Api(admin.client, None).call("GET", "/v1/lanes/dev/cards", expect=401)
    assert r.json()["code"] == "unauthenticated"

    await admin.post("/v1/families", {"key": "watchers", "features": ["seat:monitor"]}, 201)
    monitor = await w.agent("watchers")
    assert (await monitor.get("/v1/lanes/other/cards"))["workflow"] == "other"
    r = await monitor.call("GET", "/v1/lanes/nope/cards", expect=404)
    assert r.json()["code"] == "not_found"

    # A revoked lane feature takes effect on the very next call.
    assert (await dev.get("/v1/lanes/dev/cards"))["lane"] == "dev"
    await admin.post("/v1/families/cheap/denials", {"feature": "lane:dev", "reason": "paused"}, 201)
    await dev.call("GET", "/v1/lanes/dev/cards", expect=403)
