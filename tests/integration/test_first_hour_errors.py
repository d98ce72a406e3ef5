"""What a newcomer's first mistakes answer: a wrong method names the right ones; a feature without its
kind says what a feature looks like, not which regular expression it failed."""

from __future__ import annotations

import re

import httpx

from tests.helpers import Api


async def test_a_wrong_method_is_method_not_allowed_naming_the_allowed_ones(client: httpx.AsyncClient,
                                                                           admin: Api) -> None:
    r = await client.post("/v1/me", json={}, headers={"Authorization": f"Bearer {admin.token}"})
    assert r.status_code == 405, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "method_not_allowed" and body["status"] == 405
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert "GET" in allowed
    assert all(m in body["detail"] for m in allowed) and "/v1/me" in body["detail"], body
    assert body["detail"] != "Method Not Allowed"


async def test_a_feature_without_its_kind_is_told_kind_key(admin: Api, client: httpx.AsyncClient) -> None:
    body = await admin.post("/v1/features", {"name": "reviewer"}, expect=422)
    assert body["code"] == "invalid"
    assert "kind:key" in body["detail"] and "role:reviewer" in body["detail"], body
    assert "pattern" not in body["detail"] and "^[" not in body["detail"], body
    assert [e["field"] for e in body["errors"]] == ["name"]

    # The same words wherever a feature is named: a family's features.
    body = await admin.post("/v1/families", {"key": "f1", "features": ["lane:x", "reviewer"]}, expect=422)
    assert "kind:key" in body["detail"] and "features.1" in body["detail"], body
    assert not re.search(r"\^\[|\$'|String should match", body["detail"]), body
    # Refused: nothing was made.
    await admin.get("/v1/families/f1", expect=404)

    # Still right for the right shape; and a trailing newline is not a feature.
    await admin.post("/v1/features", {"name": "role:reviewer"}, expect=201)
    await admin.post("/v1/features", {"name": "role:reviewer\n"}, expect=422)


async def test_a_405_names_every_method_the_path_takes(client: httpx.AsyncClient) -> None:
    r = await client.delete("/v1/features")
    assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
    assert r.headers["Allow"] == "GET, POST" and "GET, POST" in r.json()["detail"]
