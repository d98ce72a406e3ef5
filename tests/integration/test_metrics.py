"""/metrics counts what was done; logs are JSON lines with a request id and never a token."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from ainarres_api.server.logs import JsonFormatter, redact
from ainarres_api.server.metrics import Metrics, verb_of
from tests.helpers import make_world


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_what_happened(admin, client, db):
    w = await make_world(admin)
    dev, dev2, rev = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
    # Two releases of one task: attempts reach escalate_after (2), so it goes to tier:2 (not cheap's).
    first = (await dev.create("dev", "hard"))["task"]["id"]
    for _ in range(2):
        c = await dev.claim("dev")
        assert c["task"]["id"] == first
        await dev.verb(c["task"]["id"], "release", lease=c["lease"]["id"], reason="not for me")
    ids = [(await dev.create("dev", f"t{i}"))["task"]["id"] for i in range(3)]
    again = await dev.create("dev", "same", idempotency_key="k1")
    await dev.create("dev", "same", idempotency_key="k1", expect=200)
    assert again["code"] == "created"

    assert (await rev.claim("dev"))["code"] == "empty"
    c1 = await dev.claim("dev")
    assert c1["task"]["id"] == ids[0]
    await dev.verb(c1["task"]["id"], "heartbeat", lease=c1["lease"]["id"])
    await dev.verb(c1["task"]["id"], "heartbeat", lease="00000000-0000-0000-0000-000000000000", expect=409)
    await dev.verb(c1["task"]["id"], "advance", lease=c1["lease"]["id"], to="review")
    c = await dev.claim("dev")
    await dev.verb(c["task"]["id"], "block", lease=c["lease"]["id"], reason="needs a human")
    # dev2 walks away from a task; its lease runs out; dev reclaims it.
    c2 = await dev2.claim("dev")
    await db.execute(
        "UPDATE tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1", c2["task"]["id"]
    )
    r = await dev.claim("dev")
    assert r["task"]["id"] == c2["task"]["id"] and r["event"]["data"]["reclaimed"] is True

    m = await scrape(client)
    assert val(m, "ainarres_verb_calls_total", verb="create", code="created") == 5
    assert val(m, "ainarres_verb_calls_total", verb="create", code="existing") == 1
    assert val(m, "ainarres_verb_calls_total", verb="claim", code="claimed") == 6
    assert val(m, "ainarres_verb_calls_total", verb="claim", code="empty") == 1
    assert val(m, "ainarres_verb_calls_total", verb="heartbeat", code="ok") == 1
    assert val(m, "ainarres_verb_calls_total", verb="heartbeat", code="lease_lost") == 1
    assert val(m, "ainarres_verb_calls_total", verb="release", code="ok") == 2
    assert val(m, "ainarres_verb_calls_total", verb="block", code="ok") == 1
    assert val(m, "ainarres_verb_calls_total", verb="advance", code="ok") == 1
    assert val(m, "ainarres_claims_total", result="claimed") == 6
    assert val(m, "ainarres_claims_total", result="empty") == 1
    assert val(m, "ainarres_verb_duration_seconds_count", verb="claim") == 7
    assert val(m, "ainarres_verb_duration_seconds_bucket", verb="create", le="+Inf") == 6
    assert val(m, "ainarres_verb_duration_seconds_count", verb="unblock") == 0
    assert val(m, "ainarres_reclaims_total") == 1
    assert val(m, "ainarres_escalations_total") == 1
    assert val(m, "ainarres_blocks_total") == 1
    assert val(m, "ainarres_events_recorded_total", type="created") == 5
    assert val(m, "ainarres_events_recorded_total", type="claimed") == 6
    # Pending now: 5 created − 1 in review − 1 blocked − 1 held = 2 in todo (one of them escalated),
    # and 1 in review; one live lease (the reclaimed task), none expired.
    assert val(m, "ainarres_pending_tasks", lane="dev", stage="todo") == 2
    assert val(m, "ainarres_pending_tasks", lane="dev", stage="review") == 1
    assert val(m, "ainarres_live_leases", lane="dev") == 1
    assert val(m, "ainarres_expired_leases", lane="dev") == 0
    assert val(m, "ainarres_longpoll_waiters") == 0
    assert val(m, "ainarres_claims_in_flight") == 0
    assert val(m, "ainarres_db_pool_max_connections") >= 1
    # Read after the scrape gave its connection back: nothing else is in flight.
    assert val(m, "ainarres_db_pool_connections", state="busy") == 0
    assert val(m, "ainarres_db_pool_connections", state="idle") >= 1

    # A second scrape counts only what happened since the first.
    rv = await rev.claim("dev")
    await rev.verb(rv["task"]["id"], "advance", lease=rv["lease"]["id"], to="done")
    m2 = await scrape(client)
    assert val(m2, "ainarres_events_recorded_total", type="claimed") == 7
    assert val(m2, "ainarres_escalations_total") == 1 and val(m2, "ainarres_reclaims_total") == 1
    assert val(m2, "ainarres_pending_tasks", lane="dev", stage="review") == 0
    assert val(m2, "ainarres_verb_calls_total", verb="advance", code="ok") == 2
    assert ids


async def test_a_claim_made_for_next_counts_as_a_claim(admin, client):
    """A runner that takes its next task with each advance makes no claim requests: its claims are still counted,
    or a dashboard of claims per second would read zero and an alert on it would fire."""
    w = await make_world(admin)
    dev, rev = await w.agent("cheap"), await w.agent("reviewers")
    for i in range(2):
        await dev.create("dev", f"t{i}")
    c = await dev.claim("dev")
    moved = await dev.verb(c["task"]["id"], "advance", lease=c["lease"]["id"], to="review", next={"lane": "dev"})
    assert moved["next"]["code"] == "claimed"
    last = await dev.verb(moved["next"]["task"]["id"], "advance", lease=moved["next"]["lease"]["id"], to="review",
                          next={"lane": "dev"})
    assert last["next"]["code"] == "empty"
    r = await rev.claim("dev")
    refused = await rev.verb(r["task"]["id"], "reject", lease=r["lease"]["id"], to="todo", reason="no",
                             next={"lane": "nope"})
    assert refused["next"]["code"] == "not_eligible"  # an unknown lane: no lane feature for it

    m = await scrape(client)
    assert val(m, "ainarres_verb_calls_total", verb="claim", code="claimed") == 3  # 2 requests, 1 next
    assert val(m, "ainarres_verb_calls_total", verb="claim", code="empty") == 1
    assert val(m, "ainarres_verb_calls_total", verb="claim", code="not_eligible") == 1
    assert val(m, "ainarres_claims_total", result="claimed") == 3
    assert val(m, "ainarres_claims_total", result="empty") == 1
    assert val(m, "ainarres_verb_duration_seconds_count", verb="claim") == 5
    assert val(m, "ainarres_verb_calls_total", verb="advance", code="ok") == 2
    assert val(m, "ainarres_verb_calls_total", verb="reject", code="ok") == 1
    assert val(m, "ainarres_claims_in_flight") == 0


def test_registries_are_per_app():
    a, b = Metrics(), Metrics()
    a.observe("claim", "empty", 0.01)
    assert b.verb_calls.labels("claim", "empty")._value.get() == 0
    assert a.verb_calls.labels("claim", "empty")._value.get() == 1


def test_verbs_are_recognised_by_method_and_path():
    assert verb_of("POST", "/v1/tasks") == "create"
    assert verb_of("POST", "/v1/claims") == "claim"
    assert verb_of("POST", "/v1/tasks/abc/unblock") == "unblock"
    assert verb_of("GET", "/v1/tasks/abc") is None
    assert verb_of("POST", "/v1/tasks/abc/events") is None
    assert verb_of("POST", "/v1/families") is None


async def test_logs_are_json_with_request_id_and_never_a_token(admin, client):
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        r = await client.get(
            "/v1/me", headers={"Authorization": f"Bearer {admin.token}", "X-Request-ID": "req-42"}
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
        r = await client.get("/v1/me", headers={"Authorization": "Bearer not.a.token"})
        assert r.status_code == 401
        generated = r.headers["x-request-id"]
        assert len(generated) == 32
        r = await client.get("/v1/me", headers={"X-Request-ID": "bad id with spaces"})
        assert r.headers["x-request-id"] != "bad id with spaces"
        logging.getLogger("ainarres.test").warning("leak? Bearer %s", admin.token)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    text = buf.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    access = [ln for ln in lines if ln["logger"] == "ainarres.access"]
    first = next(ln for ln in access if ln.get("request_id") == "req-42")
    assert (first["method"], first["path"], first["status"]) == ("GET", "/v1/me", 200)
    assert first["duration_ms"] >= 0 and first["level"] == "info" and "ts" in first
    assert any(ln.get("request_id") == generated and ln["status"] == 401 for ln in access)
    assert admin.token not in text and "not.a.token" not in text
    assert admin.token.split(".")[1] not in text
    assert any("[redacted" in ln["msg"] for ln in lines if ln["logger"] == "ainarres.test")


def test_redact_scrubs_bearer_tokens_and_jwts():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert jwt not in redact(f"token={jwt}")
    assert "s3cret" not in redact("Authorization: Bearer s3cret")
    assert redact("nothing to hide") == "nothing to hide"


async def test_metrics_answer_through_a_database_outage(app, admin, client):
    """Found by an operator review: with the database out of reach, /metrics was a 503 as a whole — an outage read
    as a dead process, and this process's own figures were lost with it. It answers: `ainarres_database_up 0`, the
    queue's gauges left out (unknown, not zero), the process's own figures kept; back to 1 once it can read."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "queued")
    up = (await client.get("/metrics")).text
    assert "ainarres_database_up 1.0" in up and "ainarres_pending_tasks{" in up
    st = app.state.ainarres
    real = st.pool
    dead = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1)
    st.pool = dead
    try:
        r = await client.get("/metrics")
    finally:
        st.pool = real
        await dead.close()
    assert r.status_code == 200, r.text
    assert "ainarres_database_up 0.0" in r.text and "ainarres_pending_tasks{" not in r.text
    assert 'ainarres_verb_calls_total{code="created",verb="create"}' in r.text  # the process's own, kept
    assert "ainarres_database_up 1.0" in (await client.get("/metrics")).text
