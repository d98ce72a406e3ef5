"""One rule for each kind of input, whichever operation takes it (found by fuzzing the published contract):
an instant, an unregistered feature, a trailing slash, a 422's `errors[]`, numbers in an idempotent retry."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from ainarres_api.server.api.contract import QUERY_UNCHECKED
from tests.helpers import make_world

NAIVE = "2030-01-01T00:00:00"


@pytest.mark.parametrize("bad", [NAIVE, 1900000000, "1900000000", 1900000000000, "2030-01-01T00:00Z",
                                 "2030-01-01T00:00:00+0100", "2030-01-01 00:00:00Z"])
async def test_an_instant_that_is_not_rfc3339_with_its_offset_is_refused_everywhere(admin, bad):
    """A denial's end and the flow's `since` are read alike: a time without a zone, a number (seconds or
    milliseconds, which pydantic would guess from its size) or a looser form is not guessed at."""
    await make_world(admin)
    r = await admin.call("POST", "/v1/families/cheap/denials",
                         {"feature": "role:dev", "reason": "x", "expires_at": bad}, 422)
    assert r.json()["errors"][0]["field"] == "expires_at" and "RFC 3339" in r.json()["detail"], r.json()
    r = await admin.call("GET", "/v1/flow", params={"since": str(bad)}, expect=422)
    assert r.json()["errors"][0]["field"].endswith("since") and "RFC 3339" in r.json()["detail"]
    assert (await admin.get("/v1/families/cheap/denials"))["items"] == []  # the refused denial changed nothing


async def test_an_instant_is_answered_in_utc_whatever_offset_it_came_with(admin):
    await make_world(admin)
    made = await admin.post("/v1/families/cheap/denials",
                            {"feature": "role:dev", "reason": "x", "expires_at": "2030-01-01T01:00:00+01:00"}, 201)
    flow = await admin.get("/v1/flow", params={"since": "2030-01-01T01:00:00+01:00"})
    r = await admin.client.get("/v1/flow?since=2030-01-01T01:00:00+01:00", headers=admin._headers())  # `+` as sent
    assert r.status_code == 200 and r.json()["since"] == flow["since"], r.text
    assert made["expires_at"].startswith("2030-01-01T00:00:00") and flow["since"].startswith("2030-01-01T00:00:00")
    assert made["expires_at"].endswith(("Z", "+00:00")) and flow["since"].endswith(("Z", "+00:00")), (made, flow)


@pytest.mark.parametrize("path,body", [
    ("/v1/families/cheap/denials", {"feature": "role:unheard-of", "reason": "x"}),
    ("/v1/governance/bans", {"family": "cheap", "feature": "role:unheard-of", "reason": "x"}),
    ("/v1/governance/lifts", {"family": "cheap", "feature": "role:unheard-of", "reason": "x"}),
    ("/v1/governance/flags", {"kind": "quality", "family": "cheap", "feature": "role:unheard-of",
                              "task_id": "00000000-0000-4000-8000-000000000000", "note": "x"}),
])
async def test_a_feature_that_is_not_registered_is_invalid_on_every_operation(admin, path, body):
    """An unregistered feature named in a body is 422 `invalid` naming `feature` (404 is for what a path names)."""
    w = await make_world(admin)
    caller = admin
    if path.endswith("/flags"):  # an auditor's act
        await admin.post("/v1/features", {"name": "role:auditor"}, 201)
        await admin.post("/v1/families", {"key": "audit", "features": ["role:auditor"]}, 201)
        caller = await w.agent("audit")
    r = await caller.call("POST", path, body, 422)
    assert r.json()["code"] == "invalid"
    assert [e["field"] for e in r.json()["errors"]] == ["feature"]
    assert "/v1/features" in r.json()["detail"]
    trail = await admin.get("/v1/governance/trail")
    assert not [e for e in trail["items"] if e.get("feature") == "role:unheard-of"]


async def test_a_missing_family_in_a_body_is_still_not_found(admin):
    await make_world(admin)
    r = await admin.call("POST", "/v1/governance/bans", {"family": "nobody", "feature": "role:dev", "reason": "x"},
                         404)
    assert r.json()["code"] == "not_found"


async def test_a_trailing_slash_redirects_relatively_never_to_the_hosts_a_client_names(admin):
    """Starlette's redirect built an absolute URL from the Host header: a client (or a proxy's internal name)
    chose where the caller was sent. The redirect names the path alone, query kept."""
    await make_world(admin)
    r = await admin.client.request("GET", "/v1/board/", params={"limit": "2"},
                                   headers={**admin._headers(), "Host": "evil.example"})
    assert r.status_code == 307 and r.headers["location"] == "/v1/board?limit=2", (r.status_code, r.headers)
    # Only to an operation that takes the method (GET /v1/tasks is not one), and with the path as it was sent.
    assert (await admin.call("GET", "/v1/tasks/", expect=404)).json()["code"] == "not_found"
    url = admin.client.base_url.copy_with(raw_path=b"/board/%FF/")
    assert (await admin.client.request("GET", url)).headers["location"] == "/board/%FF"
    r = await admin.client.request("POST", "/mcp/")
    assert r.status_code == 307 and r.headers["location"] == "/mcp"
    for path in ("/v1/nothing-here/", "//evil.example/", "//v1/tasks/"):  # no route: a 404, never off this server
        url = admin.client.base_url.copy_with(path=path)  # as sent, not read as a URL of another host
        r = await admin.client.request("GET", url, headers=admin._headers())
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json", (path, r.text)
        assert "location" not in r.headers
        assert r.json()["code"] == "not_found"


async def _invalid(admin: Any, method: str, path: str, body: Any = None, **kw: Any) -> list[dict[str, Any]]:
    r = await admin.call(method, path, body, 422, **kw)
    assert r.json()["code"] == "invalid"
    assert isinstance(r.json().get("errors"), list), r.json()
    return list(r.json()["errors"])


async def test_every_invalid_carries_errors_naming_its_fields(admin):
    """The docs promise `errors[]` on every `invalid`: refusals decided by the service (not by the request's
    schema) carry it too."""
    await make_world(admin)
    assert [e["field"] for e in await _invalid(admin, "GET", "/v1/board", params={"cursor": "x"})] == ["query.cursor"]
    missing = await _invalid(admin, "PUT", "/v1/governance/policies/system/*", {"strike_threshold": 3})
    assert {e["field"] for e in missing} == {"ban_base_seconds", "ban_cap_seconds", "recommend_after_bans",
                                            "recommend_after_flags"}
    assert [e["field"] for e in await _invalid(admin, "POST", "/v1/families",
                                                {"key": "f", "features": ["role:unheard-of"]})] == ["features"]
    deep = "{\"a\":" * 50_000 + "1" + "}" * 50_000  # deeper than the JSON parser goes
    r = await admin.client.request("POST", "/v1/tasks", content=deep.encode(),
                                   headers={**admin._headers(), "Content-Type": "application/json"})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["body"], r.text[:300]


async def test_an_idempotent_retry_compares_numbers_as_numbers(admin, db):
    """`1.0` and `1` are one JSON number: an encoder that writes integers as floats retries the same create."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    first = await dev.create("dev", "t", idempotency_key="k-1", payload={"n": 1, "m": [2, {"x": 3}]})
    again = await dev.create("dev", "t", 200, idempotency_key="k-1", payload={"n": 1.0, "m": [2.0, {"x": 3e0}]})
    assert again["code"] == "existing" and again["task"]["id"] == first["task"]["id"]
    other = await dev.post("/v1/tasks", {"lane": "dev", "title": "t", "idempotency_key": "k-1",
                                         "payload": {"n": 1.5, "m": [2, {"x": 3}]}}, 409)
    assert other["code"] == "conflict"
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE idempotency_key = 'k-1'") == 1


async def test_a_query_parameter_the_operation_does_not_take_is_refused_not_ignored(admin):
    """`?limt=5` silently ignored reads as "limit honoured"; refused like an unknown body field, naming what the
    operation takes (as /openapi.json lists it), after the token is judged."""
    await make_world(admin)
    r = await admin.call("GET", "/v1/board", params={"limt": "5"}, expect=422)
    assert [e["field"] for e in r.json()["errors"]] == ["query.limt"] and "limit" in r.json()["detail"]
    assert "limit" in r.json()["detail"]
    await admin.get("/v1/board", params={"limit": "5"})
    r = await admin.client.post("/v1/claims", params={"x": "1"}, json={"lane": "dev"},
                                headers={"Authorization": "Bearer nonsense"})
    assert r.status_code == 401  # the token first, as for any bad input
    r = await admin.call("POST", "/v1/claims", {"lane": "dev"}, 422, params={"wait": "30"})
    assert "takes none" in r.json()["detail"]
    schema = (await admin.client.get("/openapi.json")).json()
    for path, ops in schema["paths"].items():  # documented on every operation (a query it does not take; and,
        for method, op in ops.items():           # whatever the method, a compressed body: app.BodyLimit)
            assert "422" in op["responses"] and "413" in op["responses"], (method, path)
    # The probes and the index a browser opens ignore a query string: a load balancer's cache-buster must not
    # take a healthy replica out of rotation, nor a link's tracking parameters show an error.
    for path in QUERY_UNCHECKED:
        r = await admin.client.get(path, params={"cache-buster": "1"})
        assert r.status_code in (200, 303), (path, r.status_code, r.text)
    r = await admin.call("GET", "/v1/board", params={f"x{i}": "1" for i in range(1000)}, expect=422)
    assert len(r.json()["errors"]) == 20  # a thousand unknown names earn no longer answer


async def test_a_caller_without_the_seat_is_refused_for_that_before_its_query_or_body_is_judged(admin):
    """The caller first, then the request's form, whichever part is wrong: a worker without seat:admin asking
    `/v1/families?limt=5` or posting a body that is not JSON gets 403, as it does for a bad body field (the query
    judge, an app-wide dependency, ran before the route's seat check and answered 422; found by a review)."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    for call in (dev.call("GET", "/v1/families", params={"limt": "5"}),
                 dev.client.post("/v1/families", content=b"{not json", headers={**dev._headers(),
                                                                                 "Content-Type": "application/json"}),
                 dev.client.post("/v1/families", content=b"[" * 5000 + b"]" * 5000,  # nested past the parser: 400
                                 headers={**dev._headers(), "Content-Type": "application/json"}),
                 dev.call("POST", "/v1/families", {"key": "x", "bogus": 1})):
        r = await call
        assert (r.status_code, r.json()["code"]) == (403, "not_eligible"), r.text
        assert "seat:admin" in r.json()["detail"]
    assert (await admin.call("GET", "/v1/families", params={"limt": "5"}, expect=422)).json()["code"] == "invalid"
    r = await admin.client.post("/v1/families", content=b"[" * 5000 + b"]" * 5000,
                                headers={**admin._headers(), "Content-Type": "application/json"})
    assert (r.status_code, r.json()["code"]) == (422, "invalid"), r.text  # the seat held: the body's own refusal
    assert "could not be parsed" in r.json()["detail"]  # FastAPI's 400 for it, answered as every unreadable body
    r = await dev.call("GET", "/v1/governance/trail", params={"limt": "5"})  # seat:overseer, monitor or auditor
    assert r.status_code == 403, r.text


async def test_a_parameter_given_twice_that_is_taken_once_is_refused(admin):
    """`?lane=a&lane=b` answered for one of them silently: which? Refused; a list parameter may repeat."""
    await make_world(admin)
    r = await admin.call("GET", "/v1/features", params=[("limit", "1"), ("limit", "2")], expect=422)
    assert [e["field"] for e in r.json()["errors"]] == ["query.limit"] and "once" in r.json()["detail"]
    await admin.get("/v1/board", params=[("state", "ready"), ("state", "held")])  # `state` is a list


async def test_the_same_situation_gets_the_same_answer_on_every_operation(admin, db):
    """From a review of ADR 0025 across every operation: a workflow or feature a policy names, a token's scope,
    numbers sent as strings, a problem type's title."""
    w = await make_world(admin)
    # A policy for a workflow that does not exist would be stored and govern nothing: 404, as for a feature.
    r = await admin.call("PUT", "/v1/governance/policies/workflow/no-such-flow", {"strike_threshold": 3}, 404)
    assert "no workflow" in r.json()["detail"]
    assert not await db.fetchval("SELECT count(*) FROM governance_policies WHERE key = 'no-such-flow'")
    # An unregistered feature in a token's scope is the input's fault (422 on `scope`), not a missing permission.
    r = await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["role:unheard-of"]}, 422)
    assert [e["field"] for e in r.json()["errors"]] == ["scope"]
    assert (await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["role:reviewer"]}, 403)
            ).json()["code"] == "not_eligible"  # registered, not the family's: a permission
    # A number sent as a string is refused for a float field as for an integer one.
    dev = await w.agent("cheap")
    for body in ({"lane": "dev", "wait_seconds": "0"}, {"lane": "dev", "wait_seconds": float("nan")}):
        r = await dev.client.post("/v1/claims", content=__import__("json").dumps(body).encode(),
                                  headers={**dev._headers(), "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "wait_seconds", r.text
    # One title per problem type, whoever answers.
    r = await admin.call("GET", "/v1/no-such-thing", expect=404)
    assert r.json()["title"] == "Not found"


async def test_settings_that_could_never_take_effect_are_refused(admin):
    await make_world(admin)
    r = await admin.call("PUT", "/v1/governance/policies/workflow/dev",
                         {"ban_base_seconds": 86400, "ban_cap_seconds": 60}, 422)
    assert [e["field"] for e in r.json()["errors"]] == ["ban_cap_seconds"]
    # The year bound is UTC's: an offset cannot carry an instant past it.
    r = await admin.call("POST", "/v1/families/cheap/denials",
                         {"feature": "role:dev", "reason": "x", "expires_at": "9000-12-31T23:59:59-23:59"}, 422)
    assert "9000" in r.json()["detail"]


async def test_a_redirect_never_names_a_dot_segment(admin):
    """`/v1/families/%2E%2E/` would redirect to `/v1/families/..`, which a client resolves to `/v1/`."""
    await make_world(admin)
    url = admin.client.base_url.copy_with(raw_path=b"/v1/families/%2E%2E/")
    r = await admin.client.request("GET", url, headers=admin._headers())
    assert r.status_code == 404 and "location" not in r.headers, (r.status_code, r.headers)


async def test_an_empty_page_parameter_is_the_first_page_on_every_listing(admin):
    """A generic paginator starting with `after=` worked on five administration listings and not on tokens,
    the trail or a task's events."""
    w = await make_world(admin)
    for path in ("/v1/features", "/v1/families", "/v1/workflows", "/v1/projects", "/v1/lanes", "/v1/tokens"):
        first = await admin.get(path)
        assert (await admin.get(path, params={"after": ""}))["items"] == first["items"], path
    trail = await admin.get("/v1/governance/trail")
    assert (await admin.get("/v1/governance/trail", params={"before": ""}))["items"] == trail["items"]
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "t"))["task"]["id"]
    events = await dev.get(f"/v1/tasks/{task}/events")
    assert (await dev.get(f"/v1/tasks/{task}/events", params={"after": ""}))["items"] == events["items"]


async def test_a_compressed_body_is_refused_saying_so(admin, db):
    """Read as it came, a gzipped body was "not valid JSON", which told the client nothing."""
    import gzip
    import json

    before = await db.fetchval("SELECT count(*) FROM features")
    for body in (gzip.compress(json.dumps({"name": "role:zipped"}).encode()), b'{"name": "role:zipped"}'):
        r = await admin.client.post("/v1/features", content=body, headers={
            **admin._headers(), "Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body", r.text
        assert "uncompressed" in r.json()["detail"]
    assert await db.fetchval("SELECT count(*) FROM features") == before
    await admin.client.post("/v1/features", json={"name": "role:plain"},
                            headers={**admin._headers(), "Content-Encoding": "identity"})
    assert await db.fetchval("SELECT count(*) FROM features") == before + 1


async def test_a_denial_that_would_never_take_effect_is_refused(admin, db):
    """A year typed wrong (2025 for 2027) made a 201 denial that denied nothing."""
    await make_world(admin)
    r = await admin.call("POST", "/v1/families/cheap/denials",
                         {"feature": "role:dev", "reason": "x", "expires_at": "2001-01-01T00:00:00Z"}, 422)
    assert r.json()["errors"][0]["field"] == "expires_at" and "passed" in r.json()["detail"]
    assert not await db.fetchval("SELECT count(*) FROM denials WHERE family_key = 'cheap'")


async def test_a_task_held_past_its_lease_reads_as_abandoned(admin, db):
    """`/v1/me` said nothing was held while `GET /v1/tasks/{id}` said "held by you", with no word of the lease
    having passed (the board's rows said `abandoned`). The task read now says it too."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    task = (await dev.create("dev", "t"))["task"]["id"]
    await dev.claim("dev")
    assert "abandoned" not in await dev.get(f"/v1/tasks/{task}")  # a live hold: left out, never false or null
    await db.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", task)
    read = await dev.get(f"/v1/tasks/{task}")
    assert read["state"] == "held" and read["abandoned"] is True
    assert (await dev.get("/v1/me"))["held"] == []
    board = (await admin.get("/v1/board", params={"state": "held"}))["items"]
    assert [(b["id"], b["abandoned"]) for b in board] == [(task, True)]


@pytest.mark.parametrize("path,body,listing,field", [
    ("/v1/features", {"name": "role:Dev"}, "/v1/features", "name"),
    ("/v1/families", {"key": "Cheap", "features": ["role:dev"]}, "/v1/families", "key"),
    ("/v1/lanes", {"project": "acme", "key": "DEV", "workflow": "dev"}, "/v1/lanes", "key"),
    ("/v1/features", {"name": "lane:Dev"}, "/v1/features", "name"),
])
async def test_a_key_that_differs_from_one_that_exists_only_in_case_is_refused(admin, path, body, listing, field):
    """`role:Dev` beside `role:dev`: a model retyping a key would make a second thing that nothing else names, and
    work requiring it would match no one (SPEC: typos are refused, not silently unmatched). 409 naming the one that
    exists; nothing is created."""
    await make_world(admin)  # role:dev, family cheap, lane dev (and its feature lane:dev), project acme
    before = await admin.get(listing, params={"limit": 200})
    r = await admin.call("POST", path, body, 409)
    assert r.json()["code"] == "conflict" and "only in case" in r.json()["detail"], r.json()
    existing = body[field].lower()  # the world's keys are lower-case (a feature's kind always is)
    assert repr(existing) in r.json()["detail"], r.json()
    assert await admin.get(listing, params={"limit": 200}) == before


async def test_two_look_alikes_sent_at_once_cannot_both_be_created(admin, db, dsn):
    """The check and the insert are serialised per key in any case: with both creates waiting on that lock (held
    here), the first in creates, the second finds it and is refused."""
    holder = await asyncpg.connect(dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext('ainarres:key:' || $1))", "feature:role:pair")
        sent = [asyncio.create_task(admin.call("POST", "/v1/features", {"name": name}, None))
                for name in ("role:pair", "role:PAIR")]
        for _ in range(2000):  # until both creates are seen waiting on the lock (the event), bounded
            if await db.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 2:
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("the creates did not wait on the key's lock")
        await tx.commit()
        answers = sorted(r.status_code for r in await asyncio.gather(*sent))
    finally:
        await holder.close()
    assert answers == [201, 409], answers
    assert await db.fetchval("SELECT count(*) FROM features WHERE lower(name) = 'role:pair'") == 1
