"""The signing key's fingerprint in the database (migration 0026, services/auth.py hold_key, ops/runtime.py), as
a review of the fourth session of 2026-12-05 probed it: each test asserts what the change promises."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from pathlib import Path

import asyncpg
import pytest

from ainarres_api.ops import runtime
from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import AinarresError, Unauthenticated
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.helpers import wait_for_lock

SECRET_A = "a-first-secret-of-at-least-32-bytes-0123456789"
SECRET_B = "a-second-secret-of-at-least-32-bytes-987654321"


def _settings(tmp_path: Path, secret: str) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=secret)


async def test_two_replicas_recording_the_first_key_at_once(dsn: str, tmp_path: Path) -> None:
    """A database with no key recorded yet (fresh, just upgraded to 0026, or migrated by `ainarres migrate`,
    which records none) and two replicas starting at once with the SAME, right key: the second's
    `signing_key_hold` waits on the first's insert, finds the conflict, and its SELECT (the statement's snapshot,
    taken before the first committed) sees no row: `hold_key` indexes None and the replica dies with a TypeError
    traceback instead of starting (or saying key_mismatch)."""
    signer = auth.Signer(_settings(tmp_path, SECRET_A))
    first, second, observer = [await asyncpg.connect(dsn) for _ in range(3)]
    try:
        assert await first.fetchval("SELECT count(*) FROM signing_key") == 0
        tx = first.transaction()
        await tx.start()
        await first.fetchrow(Q["signing_key_hold"], signer.algorithm, signer.fingerprint)  # replica 1, in flight
        later = asyncio.create_task(auth.hold_key(second, signer))  # replica 2, same key
        await wait_for_lock(observer, second.get_server_pid(), "the second replica's hold")
        await tx.commit()
        outcome: BaseException | None = None
        try:
            await asyncio.wait_for(later, 30)
        except Exception as exc:
            outcome = exc
        assert outcome is None, f"a replica with the database's own key failed to start: {outcome!r}"
    finally:
        for c in (first, second, observer):
            await c.close()


async def test_a_rotation_whose_token_is_refused_does_not_rotate(dsn: str, db: asyncpg.Connection,
                                                                 tmp_path: Path) -> None:
    """`ainarres token --rotate-key` records the new key (autocommit) before it mints; a mint then refused (a
    family misspelt, a scope not registered, RS256 without a private key) prints a refusal, exit 1 — and the
    database's key has changed anyway: every replica restarted with the old key is refused from then on."""
    await db.execute("INSERT INTO families (key) VALUES ('ops') ON CONFLICT DO NOTHING")
    a, b = _settings(tmp_path / "a", SECRET_A), _settings(tmp_path / "b", SECRET_B)
    ok = argparse.Namespace(family="ops", ttl=None, scope=None, sub=None, rotate_key=False)
    assert (await runtime.mint(dsn, a, ok))["token"]  # key A is the database's
    typo = argparse.Namespace(family="opps", ttl=None, scope=None, sub=None, rotate_key=True)
    with pytest.raises(AinarresError) as refused:
        await runtime.mint(dsn, b, typo)
    assert refused.value.code == "not_found"
    held = await db.fetchval("SELECT fingerprint FROM signing_key")
    assert held == auth.Signer(a).fingerprint, "the refused `token --rotate-key` rotated the key all the same"


def test_two_keys_that_differ_have_different_fingerprints(tmp_path: Path) -> None:
    """The fingerprint strips the key (`key.strip()`), the HMAC key is not stripped when it comes from
    AINARRES_JWT_SECRET (only AINARRES_JWT_SECRET_FILE and the jwt-secret file are). A replica given the secret
    with a trailing newline (a Kubernetes secret made from a file, exported as an env var) and one given it
    through AINARRES_JWT_SECRET_FILE pass the key check, yet refuse each other's tokens: the very failure the
    check is there to catch."""
    plain = auth.Signer(_settings(tmp_path, SECRET_A))
    newline = auth.Signer(_settings(tmp_path, SECRET_A + "\n"))
    now = int(time.time())
    claims = {"sub": "x", "family": "ops", "jti": str(uuid.uuid4()), "iat": now, "exp": now + 600,
              "iss": "ainarres", "aud": "ainarres"}
    token = newline.sign(claims)
    with pytest.raises(Unauthenticated):
        plain.verify(token)  # they are different keys...
    assert plain.fingerprint != newline.fingerprint, "...with one fingerprint: the key check lets them both serve"


def test_an_unusable_secret_is_not_called_no_database(tmp_path: Path) -> None:
    """`signer_of` raises Unstartable with the class's default code: `ainarres token` with a secret
    too short prints {"code": "no_database", "detail": "AINARRES_JWT_SECRET must be at least 32 bytes"}."""
    with pytest.raises(runtime.Unstartable) as exc:
        runtime.signer_of(_settings(tmp_path, "short"))
    assert exc.value.code != "no_database", exc.value.code


def test_masked_hides_a_password_given_as_a_query_parameter() -> None:
    """libpq/asyncpg take the password in the query string as well as in the authority."""
    assert "s3cret" not in runtime.masked("postgresql://ainarres@db:5432/ainarres?password=s3cret")
