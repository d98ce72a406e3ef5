"""Authentication and authorisation over HTTP: each refusal SPEC §6 names, biting on the next call."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ainarres_api.server.app import create_app
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import Api, World, make_world

PROBLEM = "application/problem+json"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _forge(claims: dict[str, Any], *, secret: str = TEST_SECRET, alg: str = "HS256") -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # HS512 with our key
        return jwt.encode(claims, secret, algorithm=alg)


def _hs256_raw(claims: dict[str, Any], key: bytes, header: dict[str, Any] | None = None) -> str:
    """An HS256 JWT built by hand, so any bytes (even a PEM public key) can be the HMAC key."""
    head = _b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _rsa_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


async def _raw(client: httpx.AsyncClient, authorization: str | None, path: str = "/v1/me") -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return await client.get(path, headers=headers)


def _assert_401(r: httpx.Response, *, token: str | None = None) -> dict[str, Any]:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    assert r.headers["www-authenticate"].startswith("Bearer")
    body: dict[str, Any] = r.json()
    assert body["code"] == "unauthenticated" and body["status"] == 401 and body["detail"]
    assert TEST_SECRET not in r.text
    if token:
        # The refusal never echoes the token (nor its signature) back.
        sig = token.split(".")[-1]
        assert token not in r.text and (len(sig) < 16 or sig not in r.text)
    return body


def _assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


async def _count(db: asyncpg.Connection, table: str) -> int:
    n: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return n


async def _agent_token(w: World, family: str = "cheap", **mint: Any) -> tuple[Api, str]:
    tok = await w.admin.post("/v1/tokens", {"family": family, **mint}, 201)
    return Api(w.admin.client, tok["token"], tok["sub"]), tok["token"]


# --- missing and malformed tokens ---------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "garbage",
        "Bearer garbage",
        "Bearer a.b.c",
        "Bearer ",
        "Bearer",
        "Basic dXNlcjpwYXNzd29yZA==",
        "Token abc.def.ghi",
    ],
)
async def test_missing_or_malformed_token_is_401(client, authorization):
    r = await _raw(client, authorization)
    _assert_401(r)


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("POST", "/v1/tasks", {"lane": 5}),
        ("POST", "/v1/claims", {"wait_seconds": "forever"}),
        ("POST", f"/v1/tasks/{uuid.uuid4()}/advance", {}),
        ("GET", "/v1/tasks/not-a-uuid", None),
        ("POST", "/v1/features", {"name": "nocolon"}),
        ("POST", "/v1/tokens", {"family": "admin"}),
        ("DELETE", "/v1/tokens/not-a-uuid", None),
        ("PATCH", "/v1/families/admin", {"disabled": "yes"}),
    ],
)
async def test_authentication_comes_before_validation(client, db, method, path, body):
    tokens = await _count(db, "tokens")
    r = await client.request(method, path, json=body, headers={"Authorization": "Bearer nope"})
    _assert_401(r)
    assert await _count(db, "tokens") == tokens


async def test_wrong_scheme_with_a_good_token_is_401(admin, client):
    r = await _raw(client, f"Basic {admin.token}")
    _assert_401(r, token=admin.token)
    assert (await _raw(client, f"Bearer {admin.token}")).status_code == 200


# --- signatures and algorithms ------------------------------------------------------------------


async def test_reissued_claims_with_the_right_secret_are_accepted(admin, client):
    # The control for every forged-token test below: the same claims, re-signed correctly, pass.
    forged = _forge(_claims(admin.token))
    assert (await _raw(client, f"Bearer {forged}")).status_code == 200


async def test_wrong_signature_is_401(admin, client):
    other = _forge(_claims(admin.token), secret="another-secret-" + "y" * 40)
    _assert_401(await _raw(client, f"Bearer {other}"), token=other)
    head, body, sig = admin.token.split(".")
    tampered_sig = (
        f"{head}.{body}.{sig[:-4]}AAAA" if not sig.endswith("AAAA") else f"{head}.{body}.{sig[:-4]}BBBB"
    )
    _assert_401(await _raw(client, f"Bearer {tampered_sig}"), token=tampered_sig)
    claims = _claims(admin.token) | {"sub": "someone-else"}
    swapped = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
    _assert_401(await _raw(client, f"Bearer {swapped}"), token=swapped)


async def test_alg_none_is_401(admin, client):
    claims = _claims(admin.token)
    unsigned = (
        f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(claims).encode())}."
    )
    _assert_401(await _raw(client, f"Bearer {unsigned}"), token=unsigned)
    for alg in ("None", "NONE"):
        t = f"{_b64(json.dumps({'alg': alg}).encode())}.{_b64(json.dumps(claims).encode())}."
        _assert_401(await _raw(client, f"Bearer {t}"))


async def test_rs256_header_is_refused_by_an_hs256_service(admin, client):
    private, public = _rsa_pair()
    claims = _claims(admin.token)
    rs = jwt.encode(claims, private, algorithm="RS256")
    assert jwt.get_unverified_header(rs)["alg"] == "RS256"
    _assert_401(await _raw(client, f"Bearer {rs}"), token=rs)
    # Header says RS256, but the signature is a valid HMAC with the service's own secret.
    confused = _hs256_raw(claims, TEST_SECRET.encode(), header={"alg": "RS256", "typ": "JWT"})
    _assert_401(await _raw(client, f"Bearer {confused}"), token=confused)
    # HS256 signed with an RSA public key as the HMAC secret.
    with_pem = _hs256_raw(claims, public)
    _assert_401(await _raw(client, f"Bearer {with_pem}"), token=with_pem)


@contextlib.asynccontextmanager
async def _service(settings: Settings, dsn: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A service of its own (settings the shared `app` fixture does not have), a client of it, an admin token."""
    application = create_app(settings, dsn=dsn)
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
        st = application.state.ainarres
        async with st.pool.acquire() as conn:
            tok = (await auth.mint(conn, st.signer, family="admin", ttl_seconds=600))["token"]
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test") as client:
            yield client, tok


async def test_hs256_signed_with_the_public_key_is_refused_by_an_rs256_service(dsn, tmp_path: Path):
    """The classic confusion: the server verifies RS256; the attacker HMACs with the public key."""
    private, public = _rsa_pair()
    (tmp_path / "priv.pem").write_bytes(private)
    (tmp_path / "pub.pem").write_bytes(public)
    settings = Settings(
        database_url=None,
        data_dir=tmp_path,
        jwt_algorithm="RS256",
        jwt_private_key_file=tmp_path / "priv.pem",
        jwt_public_key_file=tmp_path / "pub.pem",
        pool_min_size=1,
        pool_max_size=4,
    )
    async with _service(settings, dsn) as (client, tok):
        assert (await _raw(client, f"Bearer {tok}")).status_code == 200
        claims = _claims(tok)
        for forged in (
            _hs256_raw(claims, public),
            _hs256_raw(claims, public.strip()),
            _hs256_raw(claims, public, header={"alg": "RS256", "typ": "JWT"}),
        ):
            _assert_401(await _raw(client, f"Bearer {forged}"), token=forged)


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_other_hmac_algorithms_with_the_right_secret_are_401(admin, client, alg):
    t = _forge(_claims(admin.token), alg=alg)
    assert jwt.get_unverified_header(t)["alg"] == alg
    _assert_401(await _raw(client, f"Bearer {t}"), token=t)


# --- claims -------------------------------------------------------------------------------------


async def test_expired_token_is_401(admin, client, db):
    claims = _claims(admin.token) | {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}
    t = _forge(claims)
    body = _assert_401(await _raw(client, f"Bearer {t}"), token=t)
    assert "expired" in body["detail"]
    # Expiry is also read from the database: a token record that has run out is refused.
    assert (await _raw(client, f"Bearer {admin.token}")).status_code == 200
    await db.execute(
        "UPDATE tokens SET expires_at = now() - interval '1 minute' WHERE jti = $1",
        uuid.UUID(_claims(admin.token)["jti"]),
    )
    body = _assert_401(await _raw(client, f"Bearer {admin.token}"), token=admin.token)
    assert "expired" in body["detail"]


@pytest.mark.parametrize("drop", ["exp", "jti", "iss", "aud", "sub", "iat", "family"])
async def test_token_missing_a_required_claim_is_401(admin, client, drop):
    claims = _claims(admin.token)
    del claims[drop]
    t = _forge(claims)
    _assert_401(await _raw(client, f"Bearer {t}"), token=t)


@pytest.mark.parametrize(
    "claim,value",
    [
        ("iss", "someone-else"),
        ("aud", "another-service"),
        ("aud", ["another-service"]),
        ("jti", "not-a-uuid"),
        ("family", "cheap"),
        ("sub", "not-the-holder"),
    ],
)
async def test_token_with_a_wrong_claim_is_401(admin, client, claim, value):
    await admin.post("/v1/families", {"key": "cheap", "features": []}, 201)
    t = _forge(_claims(admin.token) | {claim: value})
    _assert_401(await _raw(client, f"Bearer {t}"), token=t)


async def test_validly_signed_token_never_issued_is_401(admin, client, db):
    claims = _claims(admin.token) | {"jti": str(uuid.uuid4()), "sub": "admin"}
    t = _forge(claims)
    agents = await _count(db, "agents")
    _assert_401(await _raw(client, f"Bearer {t}"), token=t)
    # ... even when it claims an admin seat in a scope of its own.
    t2 = _forge(claims | {"jti": str(uuid.uuid4()), "scope": ["seat:admin"]})
    _assert_401(await _raw(client, f"Bearer {t2}", "/v1/features"), token=t2)
    assert await _count(db, "agents") == agents


# --- revocation, disabling, scope, denials, provisioning: each bites on the next call -----------


async def test_revoked_token_is_refused_on_the_next_call(admin):
    w = await make_world(admin)
    agent, token = await _agent_token(w)
    await agent.get("/v1/me")
    jti = _claims(token)["jti"]
    await admin.delete(f"/v1/tokens/{jti}")
    _assert_401(await agent.call("GET", "/v1/me"), token=token)
    _assert_401(await agent.call("POST", "/v1/claims", {}), token=token)
    # Another token of the same family is untouched.
    other, _ = await _agent_token(w)
    await other.get("/v1/me")


# The agent last seen a minute ago: due to be recorded seen (at most every 30 s) by its next admitted call.
_AGED = "UPDATE agents SET last_seen_at = now() - interval '1 minute' WHERE sub = $1 RETURNING last_seen_at"

# Each reason principal_of refuses a caller for (migration 0023), how to bring it about, and a word of its detail.
_REFUSALS = {
    "revoked": ("UPDATE tokens SET revoked_at = now() WHERE sub = $1", "revoked"),
    "expired": ("UPDATE tokens SET expires_at = now() - interval '1 second' WHERE sub = $1", "expired"),
    "disabled": ("UPDATE families SET disabled = true WHERE key = (SELECT family_key FROM agents WHERE sub = $1)",
                 "disabled"),
    "other_family": ("UPDATE agents SET family_key = 'reviewers' WHERE sub = $1", "another family"),
    # The token's row names another family than the token does.
    "unknown": ("UPDATE tokens SET family_key = 'reviewers' WHERE sub = $1", "not issued by this service"),
}


@pytest.mark.parametrize("reason", sorted(_REFUSALS))
async def test_a_refused_caller_moves_nothing_where_the_verb_reads_the_caller_itself(admin, db, reason):
    """The claim and the transition read the caller inside their own statement (ADR 0027): a caller refused there
    gets the 401 every route gives, and the statement has locked and changed nothing — the task stays held under
    its lease, no event is written, nothing else is claimed."""
    w = await make_world(admin)
    agent, token = await _agent_token(w)
    first = (await agent.create("dev", "opens the review route"))["task"]["id"]
    await agent.verb(first, "advance", lease=(await agent.claim("dev"))["lease"]["id"], to="review")
    tid = (await agent.create("dev", "held"))["task"]["id"]
    await agent.create("dev", "queued")
    await admin.patch("/v1/families/cheap", {"max_active": 2})  # room for "queued": a claim could take it
    c = await agent.claim("dev")
    assert c["task"]["id"] == tid
    lease = c["lease"]["id"]
    events = await db.fetchval("SELECT count(*) FROM events")
    seen = await db.fetchval(_AGED, agent.sub)  # due to be recorded seen: a refused call must not record it
    sql, words = _REFUSALS[reason]
    await db.execute(sql, agent.sub)
    too_big = [{"type": "url", "uri": "https://x/" + "a" * 2000}] * 10  # an event over its bound (413 otherwise)
    calls = [("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"}),
             ("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review", "next": {"lane": "dev"}}),
             ("POST", f"/v1/tasks/{tid}/reject", {"lease": lease, "to": "todo", "reason": "no"}),
             ("POST", "/v1/claims", {"lane": "dev"}),
             ("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "nowhere"}),  # illegal: refused first
             ("POST", f"/v1/tasks/{uuid.uuid4()}/advance", {"lease": lease, "to": "review"}),  # unknown task
             ("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review", "artifacts": too_big})]
    for method, path, body in calls:
        refused = _assert_401(await agent.call(method, path, body), token=token)
        assert words in refused["detail"], (path, refused["detail"])
    row = await db.fetchrow("SELECT state, holder, lease_id::text AS lease FROM tasks WHERE id = $1", uuid.UUID(tid))
    assert dict(row) == {"state": "held", "holder": agent.sub, "lease": lease}
    assert await db.fetchval("SELECT count(*) FROM tasks WHERE holder = $1", agent.sub) == 1
    assert await db.fetchval("SELECT count(*) FROM events") == events
    assert await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", agent.sub) == seen


@pytest.mark.parametrize("verb", ["advance", "claim"])
async def test_a_refused_caller_waits_for_no_lock(admin, db, dsn, verb):
    """The statement's gate stops a refused caller before it locks anything: while another transaction holds the
    task's row (advance) or the agent's row (claim), the refusal is the 401 at once — not a wait for the lock
    and then `503 unavailable` (lock_timeout), which would also put the lock before the token — nor writes that
    the agent was seen, though it is due to be."""
    w = await make_world(admin)
    agent, token = await _agent_token(w)
    tid = (await agent.create("dev", "held"))["task"]["id"]
    lease = (await agent.claim("dev"))["lease"]["id"]
    seen = await db.fetchval(_AGED, agent.sub)
    other = await asyncpg.connect(dsn)
    try:
        async with other.transaction():
            if verb == "advance":
                await other.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", uuid.UUID(tid))
                call = agent.call("POST", f"/v1/tasks/{tid}/advance", {"lease": lease, "to": "review"})
            else:
                await other.execute("SELECT 1 FROM agents WHERE sub = $1 FOR UPDATE", agent.sub)
                call = agent.call("POST", "/v1/claims", {"lane": "dev"})
            await db.execute("UPDATE tokens SET revoked_at = now() WHERE sub = $1", agent.sub)
            _assert_401(await asyncio.wait_for(call, 60), token=token)
    finally:
        await other.close()
    assert await db.fetchval("SELECT last_seen_at FROM agents WHERE sub = $1", agent.sub) == seen


async def test_revoked_admin_token_cannot_administer(admin, client):
    tok = await admin.post("/v1/tokens", {"family": "admin"}, 201)
    second = Api(client, tok["token"])
    await second.get("/v1/features")
    await admin.delete(f"/v1/tokens/{tok['jti']}")
    _assert_401(await second.call("POST", "/v1/features", {"name": "role:sneaky"}))
    r = await admin.call("GET", "/v1/features/role:sneaky")
    _assert_problem(r, 404, "not_found")


async def test_disabled_family_is_refused_next_call_and_accepted_after_reenable(admin):
    w = await make_world(admin)
    agent, token = await _agent_token(w)
    await agent.get("/v1/me")
    await admin.patch("/v1/families/cheap", {"disabled": True})
    body = _assert_401(await agent.call("GET", "/v1/me"), token=token)
    assert "disabled" in body["detail"]
    _assert_401(await agent.call("POST", "/v1/tasks", {"lane": "dev", "title": "x"}))
    # Minting for a disabled family is refused too.
    r = await admin.call("POST", "/v1/tokens", {"family": "cheap"})
    _assert_problem(r, 409, "conflict")
    await admin.patch("/v1/families/cheap", {"disabled": False})
    me = await agent.get("/v1/me")
    assert me["family"] == "cheap" and "role:dev" in me["features"]


async def test_widening_scope_is_refused_and_nothing_is_recorded(admin, db):
    w = await make_world(admin)
    tokens = await _count(db, "tokens")
    r = await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["lane:dev", "tier:2"]})
    body = _assert_problem(r, 403, "not_eligible")
    assert "tier:2" in body["detail"]
    r = await admin.call("POST", "/v1/tokens", {"family": "cheap", "scope": ["seat:admin"]})
    _assert_problem(r, 403, "not_eligible")
    assert await _count(db, "tokens") == tokens
    assert w is not None


async def test_narrowed_scope_really_narrows(admin):
    w = await make_world(admin)
    narrow, _ = await _agent_token(w, scope=["lane:dev"])
    full = await w.agent("cheap")
    me = await narrow.get("/v1/me")
    assert me["features"] == ["lane:dev"] and me["scope"] == ["lane:dev"]
    task = (await full.create("dev", "needs role:dev"))["task"]
    # Creating needs the first step's role, which the scope dropped.
    _assert_problem(
        await narrow.call("POST", "/v1/tasks", {"lane": "dev", "title": "x"}), 403, "not_eligible"
    )
    # The scope dropped every role: no claim of it can ever match, and it is told so.
    assert "can ever match" in (await narrow.claim("dev", expect=403))["detail"]
    got = await full.claim("dev")
    assert got["code"] == "claimed" and got["task"]["id"] == task["id"]
    # A scope is still bounded by the family: provisioning taken away is gone from the scope too.
    await admin.patch("/v1/families/cheap", {"features": ["role:dev"]})
    assert (await narrow.get("/v1/me"))["features"] == []


async def test_the_database_not_the_token_decides_the_scope(admin, client):
    w = await make_world(admin)
    _, token = await _agent_token(w, scope=["lane:dev"])
    claims = _claims(token)
    assert claims["scope"] == ["lane:dev"]
    del claims["scope"]
    unscoped = Api(client, _forge(claims))
    assert (await unscoped.get("/v1/me"))["features"] == ["lane:dev"]
    widened = Api(client, _forge(claims | {"scope": ["lane:dev", "role:dev", "seat:admin"]}))
    assert (await widened.get("/v1/me"))["features"] == ["lane:dev"]
    _assert_problem(await widened.call("GET", "/v1/features"), 403, "not_eligible")


async def test_denial_mid_token_bites_next_call_and_lifting_restores(admin, db):
    w = await make_world(admin)
    a = await w.agent("cheap")
    b = await w.agent("cheap")
    t1 = (await a.create("dev", "one", priority=10))["task"]
    t2 = (await a.create("dev", "two"))["task"]
    held = await a.claim("dev")
    assert held["task"]["id"] == t1["id"]
    lease = held["lease"]["id"]

    await admin.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "too many bugs"}, 201)
    me = await a.get("/v1/me")
    assert "role:dev" not in me["features"] and "lane:dev" in me["features"]
    assert "role:dev is denied" in (await b.claim("dev", expect=403))["detail"]  # no work it may take now
    events = await _count(db, "events")
    r = await a.call("POST", f"/v1/tasks/{t1['id']}/advance", {"lease": lease, "to": "review"})
    body = _assert_problem(r, 403, "not_eligible")
    assert "role:dev" in body["detail"]
    assert body["task"]["stage"] == "todo" and body["task"]["holder"] == a.sub
    assert await _count(db, "events") == events
    _assert_problem(await a.call("POST", "/v1/tasks", {"lane": "dev", "title": "x"}), 403, "not_eligible")

    await admin.delete("/v1/families/cheap/denials/role:dev")
    assert "role:dev" in (await a.get("/v1/me"))["features"]
    got = await b.claim("dev")
    assert got["code"] == "claimed" and got["task"]["id"] == t2["id"]
    adv = await a.verb(t1["id"], "advance", lease=lease, to="review")
    assert adv["task"]["stage"] == "review"


async def test_denial_of_a_seat_takes_the_seat_away(admin, client):
    second = Api(client, (await admin.post("/v1/tokens", {"family": "admin"}, 201))["token"])
    # Another family keeps seat:admin, so denying it to `admin` locks nobody out.
    await admin.post("/v1/families", {"key": "root2", "features": ["seat:admin"]}, 201)
    other = Api(client, (await admin.post("/v1/tokens", {"family": "root2"}, 201))["token"])
    await admin.post("/v1/families/admin/denials", {"feature": "seat:admin", "reason": "audit"}, 201)
    _assert_problem(await second.call("GET", "/v1/features"), 403, "not_eligible")
    # seat:overseer remains but may not lift a seat denial (nor one on its own family): an admin may.
    _assert_problem(await second.call("DELETE", "/v1/families/admin/denials/seat:admin"), 403, "not_eligible")
    await other.delete("/v1/families/admin/denials/seat:admin")
    await second.get("/v1/features")


async def test_denial_that_already_expired_is_inactive(admin, db):
    w = await make_world(admin)
    a = await w.agent("cheap")
    await a.create("dev", "one")
    past = "2000-01-01T00:00:00Z"  # one that would never take effect is refused (ADR 0025)
    r = await admin.call("POST", "/v1/families/cheap/denials",
                         {"feature": "role:dev", "reason": "long ago", "expires_at": past}, 422)
    assert r.json()["errors"][0]["field"] == "expires_at"
    d = await admin.post("/v1/families/cheap/denials",
                         {"feature": "role:dev", "reason": "a while", "expires_at": "2999-01-01T00:00:00Z"}, 201)
    assert d["feature"] == "role:dev"
    await db.execute("UPDATE denials SET expires_at = now() - interval '1 minute' "
                     "WHERE family_key = 'cheap' AND feature = 'role:dev'")  # ... and then it expired
    listed = (await admin.get("/v1/families/cheap/denials"))["items"]
    assert [(x["feature"], x["active"]) for x in listed] == [("role:dev", False)]
    assert "role:dev" in (await a.get("/v1/me"))["features"]
    assert (await a.claim("dev"))["code"] == "claimed"
    # A denial that expires in the future is active now.
    await admin.post(
        "/v1/families/reviewers/denials",
        {"feature": "role:reviewer", "reason": "for a while", "expires_at": "2999-01-01T00:00:00Z"},
        201,
    )
    rev = await w.agent("reviewers")
    assert "role:reviewer" not in (await rev.get("/v1/me"))["features"]


async def test_provisioning_change_takes_effect_next_call(admin):
    w = await make_world(admin)
    a = await w.agent("cheap")
    await a.create("dev", "one")
    await admin.patch("/v1/families/cheap", {"features": ["lane:dev"]})
    assert (await a.get("/v1/me"))["features"] == ["lane:dev"]
    await a.claim("dev", expect=403)  # no role left: no claim of it can ever match
    await admin.patch("/v1/families/cheap", {"features": ["lane:dev", "role:dev", "area:backend"]})
    assert (await a.get("/v1/me"))["features"] == ["area:backend", "lane:dev", "role:dev"]
    assert (await a.claim("dev"))["code"] == "claimed"
    await admin.patch("/v1/families/cheap", {"max_active": 2})
    assert (await a.get("/v1/me"))["max_active"] == 2


# --- seats --------------------------------------------------------------------------------------


def _admin_calls(jti: str) -> list[tuple[str, str, Any]]:
    wf = {
        "key": "other",
        "stages": [{"key": "a", "initial": True}, {"key": "b", "terminal": True}],
        "transitions": [{"from": "a", "to": "b", "kind": "advance"}],
    }
    return [
        ("POST", "/v1/features", {"name": "role:sneaky"}),
        ("GET", "/v1/features", None),
        ("GET", "/v1/features/role:dev", None),
        ("POST", "/v1/families", {"key": "sneaky", "features": ["seat:admin"]}),
        ("GET", "/v1/families", None),
        ("GET", "/v1/families/cheap", None),
        ("PATCH", "/v1/families/cheap", {"features": ["seat:admin", "lane:dev", "role:dev"]}),
        ("POST", "/v1/tokens", {"family": "admin"}),
        ("POST", "/v1/tokens", {"family": "cheap"}),
        ("GET", "/v1/tokens", None),
        ("GET", f"/v1/tokens/{jti}", None),
        ("DELETE", f"/v1/tokens/{jti}", None),
        ("POST", "/v1/workflows", wf),
        ("GET", "/v1/workflows", None),
        ("GET", "/v1/workflows/dev", None),
        ("POST", "/v1/projects", {"slug": "sneaky"}),
        ("GET", "/v1/projects", None),
        ("GET", "/v1/projects/acme", None),
        ("POST", "/v1/lanes", {"project": "acme", "key": "sneaky", "workflow": "dev"}),
        ("GET", "/v1/lanes", None),
        ("GET", "/v1/lanes/dev", None),
        ("POST", "/v1/families/reviewers/denials", {"feature": "role:reviewer", "reason": "sabotage"}),
        ("GET", "/v1/families/reviewers/denials", None),
        ("DELETE", "/v1/families/capable/denials/tier:2", None),
    ]


_TABLES = ("features", "families", "family_features", "tokens", "workflows", "projects", "lanes", "denials")


async def _snapshot(db: asyncpg.Connection) -> dict[str, Any]:
    snap: dict[str, Any] = {t: await _count(db, t) for t in _TABLES}
    snap["revoked"] = await db.fetchval("SELECT count(*) FROM tokens WHERE revoked_at IS NOT NULL")
    snap["cheap"] = await db.fetch(
        "SELECT feature FROM family_features WHERE family_key = 'cheap' ORDER BY 1"
    )
    return snap


async def test_agent_without_a_seat_is_refused_every_admin_endpoint(admin, db):
    w = await make_world(admin)
    await admin.post("/v1/families/capable/denials", {"feature": "tier:2", "reason": "probation"}, 201)
    agent, token = await _agent_token(w)
    jti = _claims(token)["jti"]
    before = await _snapshot(db)
    for method, path, body in _admin_calls(jti):
        r = await agent.call(method, path, body)
        problem = _assert_problem(r, 403, "not_eligible")
        assert "seat:" in problem["detail"], (method, path, problem)
    assert await _snapshot(db) == before
    await agent.get("/v1/me")  # the token was not revoked by its own attempt


async def test_overseer_may_deny_and_lift_but_not_mint(admin, db):
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "overseers", "features": ["seat:overseer"]}, 201)
    ov, _ = await _agent_token(w, "overseers")
    d = await ov.post("/v1/families/cheap/denials", {"feature": "role:dev", "reason": "slow down"}, 201)
    assert d["created_by"] == ov.sub and d["family"] == "cheap"
    assert [x["feature"] for x in (await ov.get("/v1/families/cheap/denials"))["items"]] == ["role:dev"]
    assert (await ov.get("/v1/families/cheap"))["denials"][0]["feature"] == "role:dev"
    await ov.delete("/v1/families/cheap/denials/role:dev")
    assert (await admin.get("/v1/families/cheap"))["denials"] == []
    before = await _snapshot(db)
    for method, path, body in [
        ("POST", "/v1/tokens", {"family": "cheap"}),
        ("POST", "/v1/tokens", {"family": "overseers"}),
        ("POST", "/v1/features", {"name": "role:sneaky"}),
        ("PATCH", "/v1/families/cheap", {"disabled": True}),
        ("POST", "/v1/families", {"key": "sneaky", "features": []}),
        ("POST", "/v1/projects", {"slug": "sneaky"}),
    ]:
        _assert_problem(await ov.call(method, path, body), 403, "not_eligible")
    assert await _snapshot(db) == before


async def test_monitor_may_neither_deny_nor_lift_nor_mint(admin, db):
    w = await make_world(admin)
    await admin.post("/v1/families", {"key": "monitors", "features": ["seat:monitor"]}, 201)
    await admin.post("/v1/families/capable/denials", {"feature": "tier:2", "reason": "probation"}, 201)
    mon, _ = await _agent_token(w, "monitors")
    before = await _snapshot(db)
    for method, path, body in [
        ("POST", "/v1/families/cheap/denials", {"feature": "role:dev", "reason": "x"}),
        ("DELETE", "/v1/families/capable/denials/tier:2", None),
        ("POST", "/v1/tokens", {"family": "cheap"}),
        ("PATCH", "/v1/families/cheap", {"disabled": True}),
    ]:
        _assert_problem(await mon.call(method, path, body), 403, "not_eligible")
    assert await _snapshot(db) == before


# --- lanes isolate ------------------------------------------------------------------------------


async def test_an_agent_cannot_see_or_touch_another_lanes_tasks(admin, db):
    w = await make_world(admin)
    await admin.post("/v1/lanes", {"project": "acme", "key": "ops", "workflow": "dev"}, 201)
    await admin.post("/v1/families", {"key": "opsdev", "features": ["lane:ops", "role:dev"]}, 201)
    ops = await w.agent("opsdev")
    dev = await w.agent("cheap")
    task = (await ops.create("ops", "ops work"))["task"]
    held = await ops.claim("ops")
    assert held["task"]["id"] == task["id"]
    lease = held["lease"]["id"]
    tid = task["id"]
    events = await _count(db, "events")
    tasks = await _count(db, "tasks")

    _assert_problem(await dev.call("GET", f"/v1/tasks/{tid}"), 404, "not_found")
    _assert_problem(await dev.call("GET", f"/v1/tasks/{tid}/events"), 404, "not_found")
    # Even with the holder's own lease id, a foreign lane's task does not exist for this agent.
    for verb, body in [
        ("heartbeat", {"lease": lease}),
        ("progress", {"lease": lease, "note": "mine now"}),
        ("advance", {"lease": lease, "to": "review"}),
        ("reject", {"lease": lease, "to": "todo", "reason": "no"}),
        ("release", {"lease": lease}),
        ("block", {"lease": lease, "reason": "no"}),
        ("unblock", {}),
    ]:
        r = await dev.call("POST", f"/v1/tasks/{tid}/{verb}", body)
        problem = _assert_problem(r, 404, "not_found")
        assert problem.get("task") is None, "a 404 must not leak the task"
    r = await dev.call("POST", "/v1/tasks", {"lane": "ops", "title": "sneak in"})
    assert "lane:ops" in _assert_problem(r, 403, "not_eligible")["detail"]
    assert "lane:ops" in (await dev.claim("ops", expect=403))["detail"]
    assert tid not in json.dumps(await dev.get("/v1/me"))

    assert await _count(db, "events") == events and await _count(db, "tasks") == tasks
    still = await ops.get(f"/v1/tasks/{tid}")
    assert still["holder"] == ops.sub and still["stage"] == "todo"
    await ops.verb(tid, "heartbeat", lease=lease)


# --- the signing secret stays secret ------------------------------------------------------------


async def test_secret_and_tokens_never_appear_in_logs_or_responses(admin, client, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    w = await make_world(admin)
    agent, token = await _agent_token(w)
    bad = [
        _forge(_claims(token), secret="another-secret-" + "y" * 40),
        _forge(_claims(token) | {"exp": 1}),
        _forge(_claims(token) | {"jti": str(uuid.uuid4())}),
        _forge(_claims(token), alg="HS512"),
        token[:-3],
        "not-a-jwt",
    ]
    responses: list[httpx.Response] = []
    for t in bad:
        r = await _raw(client, f"Bearer {t}")
        _assert_401(r, token=t)
        responses.append(r)
    await admin.delete(f"/v1/tokens/{_claims(token)['jti']}")
    r = await _raw(client, f"Bearer {token}")
    _assert_401(r, token=token)
    responses.append(r)
    for path in ("/v1/tokens", f"/v1/tokens/{_claims(token)['jti']}", "/v1/families/cheap", "/openapi.json"):
        responses.append(await admin.call("GET", path, expect=200))
    for r in responses:
        assert TEST_SECRET not in r.text
    for r in responses[-4:-1]:
        assert token not in r.text and admin.token not in r.text
    logged = caplog.text + capsys.readouterr().out
    assert TEST_SECRET not in logged
    for t in [*bad, token]:
        assert t not in logged
    assert agent.sub is not None


async def test_two_authorization_headers_are_refused_whoever_they_name(admin, client, db):
    """Authorization is a singleton field: with two, a proxy in front could check one identity and the service act
    as the other, so a request with two is refused (401), on every kind of route, and changes nothing."""
    w = await make_world(admin)
    dev = await w.agent("cheap")
    await dev.create("dev", "one")
    before = await _count(db, "events")
    for first, second in ((dev.token, admin.token), (admin.token, dev.token), ("junk", admin.token)):
        headers = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
        for method, path, body in (("POST", "/v1/claims", {"lane": "dev"}), ("GET", "/v1/me", None),
                                   ("GET", "/v1/features", None), ("POST", "/v1/tasks", {"lane": "dev", "title": "x"}),
                                   ("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"})):
            r = await client.request(method, path, json=body, headers=headers)
            problem = _assert_problem(r, 401, "unauthenticated")
            assert "one Authorization header" in problem["detail"], (path, problem)
    assert await _count(db, "events") == before


async def test_a_request_refused_after_its_caller_is_judged_takes_no_second_connection(dsn, tmp_path: Path):
    """An agent endpoint holds the connection its caller was authenticated on until the request ends; a path or a
    query refused after that (a task id that is not a UUID) was answered by judging the token again on a second
    connection — with every connection held by such requests, none ever answered, nor did anything else (found by
    a review: 12 at once hung the service at its default pool of 10). With a pool of one, it answers."""
    settings = Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                        pool_max_size=1)
    async with _service(settings, dsn) as (client, tok):
        h = {"Authorization": f"Bearer {tok}"}
        for call in (client.post("/v1/tasks/not-a-uuid/heartbeat", json={"lease": str(uuid.uuid4())}, headers=h),
                     client.post("/v1/claims", params={"x": "1"}, json={}, headers=h)):
            r = await asyncio.wait_for(call, 30)  # a bound, not a timing: without the fix it never answers
            assert (r.status_code, r.json()["code"]) == (422, "invalid"), r.text
        assert (await asyncio.wait_for(client.get("/v1/me", headers=h), 30)).status_code == 200
