"""Tokens: signing with a pinned algorithm, verification, and the caller's live features."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jwt

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound, Unauthenticated
from ainarres_api.server.settings import Settings

SEATS = ("seat:admin", "seat:overseer", "seat:monitor")
OVERSIGHT = frozenset(SEATS)  # every seat reads the whole board
_MIN_SECRET_BYTES = 32
# Tokens whose signature this process has verified (see Signer.verify); cleared when full.
_VERIFIED_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: who it is and what it may do on this very call."""

    sub: str
    family: str
    jti: str
    features: frozenset[str]
    max_active: int
    scope: tuple[str, ...] | None = field(default=None)

    def has(self, feature: str) -> bool:
        """Whether the caller's effective features include `feature`."""
        return feature in self.features

    def missing(self, needed: list[str] | tuple[str, ...] | set[str] | frozenset[str]) -> list[str]:
        """The features of `needed` the caller lacks, sorted."""
        return sorted(set(needed) - self.features)

    @property
    def oversees(self) -> bool:
        """Whether the caller may read the whole board."""
        return bool(self.features & OVERSIGHT)


def _load_or_create_secret(data_dir: Path) -> bytes:
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48).encode()
    # O_EXCL so two processes starting at once cannot both write a different key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


class Signer:
    """Signs and verifies AINARRES tokens with exactly one configured algorithm."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.jwt_algorithm
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.leeway_seconds
        self._signing_key: Any
        self._verify_key: Any
        self._verified: dict[str, dict[str, Any]] = {}
        if self.algorithm == "HS256":
            if settings.jwt_secret is not None:
                secret = settings.jwt_secret.get_secret_value().encode()
            else:
                secret = _load_or_create_secret(settings.data_dir)
            if len(secret) < _MIN_SECRET_BYTES:
                raise ValueError(f"AINARRES_JWT_SECRET must be at least {_MIN_SECRET_BYTES} bytes")
            self._signing_key = self._verify_key = secret
        else:
            if settings.jwt_public_key_file is None:
                raise ValueError("RS256 needs AINARRES_JWT_PUBLIC_KEY_FILE")
            self._verify_key = settings.jwt_public_key_file.read_bytes()
            self._signing_key = (
                settings.jwt_private_key_file.read_bytes() if settings.jwt_private_key_file else None
            )

    @property
    def can_sign(self) -> bool:
        """Whether this service holds a key it can mint tokens with."""
        return self._signing_key is not None

    def sign(self, claims: dict[str, Any]) -> str:
        """A compact JWT for `claims`, signed with the configured algorithm."""
        if self._signing_key is None:
            raise Invalid("this service holds no private key and cannot mint tokens")
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token signed by us, unexpired, for us; otherwise Unauthenticated."""
        # A token string that verified once verifies again until it expires: the signature, issuer,
        # audience and required claims are properties of the string. Only exp moves with time, so a
        # remembered token is re-checked against it; revocation and features are read from the
        # database on every call regardless (authenticate).
        known = self._verified.get(token)
        if known is not None:
            if known["exp"] > time.time() - self.leeway:
                return dict(known)
            del self._verified[token]
        claims = self._verify(token)
        if isinstance(claims.get("exp"), (int, float)):
            if len(self._verified) >= _VERIFIED_MAX:
                self._verified.clear()
            self._verified[token] = dict(claims)
        return claims

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._verify_key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "jti", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired; ask an admin for a new one (POST /v1/tokens)") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"the token is not valid here ({type(exc).__name__}); "
                                  "present a token minted by this service") from None
        if not isinstance(claims.get("family"), str) or not isinstance(claims.get("sub"), str):
            raise Unauthenticated("the token names no family or sub; present a token minted by this service")
        return claims


def identity(signer: Signer, token: str) -> tuple[uuid.UUID, str, str]:
    """The (jti, sub, family) a bearer token names, once its signature, issuer, audience and expiry
    check out (no database read: `authenticate`, or a verb that folds the read in, does that)."""
    claims = signer.verify(token)
    try:
        jti = uuid.UUID(str(claims["jti"]))
    except ValueError:
        raise Unauthenticated("the token's jti is not a uuid; present a token minted by this service") from None
    return jti, str(claims["sub"]), str(claims["family"])


class _Lead:
    """What a waiting read is told when it is to run the next statement: the reads that go in it (its own first)."""

    def __init__(self, batch: list[tuple[uuid.UUID, asyncio.Future[Any] | None]]) -> None:
        self.batch = batch


_MAX_GROUP = 256  # reads in one statement at most (a wake-up can bring every long poll's re-read at once)
_ALONE = object()  # what a waiting read is told when the statement it waited for did not run: read for yourself


class Reads:
    """The principal reads of a service (AppState.reads), grouped as a database groups commits (ADR 0023).

    A read that finds none running runs at once, alone, on its caller's connection. Reads that arrive while one
    runs wait; when it ends, the first of them runs one statement (resolve_principals) on its own connection for
    them all (up to _MAX_GROUP), and reads arriving meanwhile wait for the next. Every read still starts after
    its call arrived and before its work (features are read on every call); under load, N calls pay for one
    statement and one round trip instead of N. A read whose statement failed or was cancelled, or that was told
    to run the next one and went away, leaves the reads that waited on it to read alone.
    """

    def __init__(self) -> None:
        self.running = False
        self.waiting: list[tuple[uuid.UUID, asyncio.Future[Any] | None]] = []

    async def read(self, conn: asyncpg.Connection, jti: uuid.UUID) -> asyncpg.Record | None:
        """The principal_of row for `jti`, read now (None: no such token)."""
        if not self.running:
            self.running = True
            return await self._run(conn, [(jti, None)])
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting.append((jti, fut))
        try:
            got = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and isinstance(fut.result(), _Lead):
                self._abandon(fut.result().batch)  # told to lead, but going away: the others read alone
                self._next()
            raise
        if isinstance(got, _Lead):
            return await self._run(conn, got.batch)
        if got is _ALONE:
            return await conn.fetchrow(Q["resolve_principals"], [jti])
        row: asyncpg.Record | None = got
        return row

    async def _run(self, conn: asyncpg.Connection, batch: list[tuple[uuid.UUID, asyncio.Future[Any] | None]]
                   ) -> asyncpg.Record | None:
        try:
            rows = await conn.fetch(Q["resolve_principals"], [j for j, _ in batch])
        except BaseException:
            self._abandon(batch)
            self._next()
            raise
        found = {r["jti"]: r for r in rows}
        for j, f in batch[1:]:
            if f is not None and not f.done():
                f.set_result(found.get(j))
        self._next()
        return found.get(batch[0][0])

    @staticmethod
    def _abandon(batch: list[tuple[uuid.UUID, asyncio.Future[Any] | None]]) -> None:
        for _, f in batch[1:]:
            if f is not None and not f.done():
                f.set_result(_ALONE)

    def _next(self) -> None:
        """Hand the reads that waited to the first of them that is still there, or stop running."""
        waiting: list[tuple[uuid.UUID, asyncio.Future[Any] | None]] = [
            (j, f) for j, f in self.waiting if f is not None and not f.done()]
        self.waiting = waiting[_MAX_GROUP:]  # the rest go in the statement after
        if waiting:
            lead = waiting[0][1]
            assert lead is not None
            lead.set_result(_Lead(waiting[:_MAX_GROUP]))
        else:
            self.running = False


async def authenticate(conn: asyncpg.Connection, signer: Signer, token: str, reads: Reads | None = None
                       ) -> Principal:
    """Verify a bearer token and read the caller's effective features from the database now (grouped with
    the reads of other calls by `reads`, the service's; alone without)."""
    jti, sub, family = identity(signer, token)
    row = await (reads.read(conn, jti) if reads is not None else conn.fetchrow(Q["resolve_principals"], [jti]))
    if row is None or row["sub"] != sub or row["family_key"] != family:
        raise Unauthenticated("this token was not issued by this service; ask an admin for one")
    if row["revoked_at"] is not None:
        raise Unauthenticated("this token has been revoked; ask an admin for a new one")
    if row["expired"]:
        raise Unauthenticated("the token has expired; ask an admin for a new one (POST /v1/tokens)")
    if row["disabled"]:
        raise Unauthenticated(f"family {row['family_key']} is disabled; an admin can re-enable it")
    if row["agent_family"] is not None and row["agent_family"] != row["family_key"]:
        raise Unauthenticated("this sub belongs to another family")
    if row["agent_family"] is None:
        await conn.execute(Q["agent_ensure"], row["sub"], row["family_key"])
    elif row["seen_stale"]:
        await conn.execute(Q["agent_touch"], row["sub"])
    scope = tuple(row["scope"]) if row["scope"] is not None else None
    return Principal(
        sub=row["sub"],
        family=row["family_key"],
        jti=str(jti),
        features=frozenset(row["features"]),
        max_active=row["max_active"],
        scope=scope,
    )


async def mint(
    conn: asyncpg.Connection,
    signer: Signer,
    *,
    family: str,
    ttl_seconds: int,
    scope: list[str] | None = None,
    sub: str | None = None,
    created_by: str | None = None,
) -> dict[str, Any]:
    """Record and sign a token for `family`; a scope may only narrow what the family holds."""
    if not signer.can_sign:
        raise Invalid("this service holds no private key and cannot mint tokens")
    async with conn.transaction():
        fam = await conn.fetchrow(Q["family_for_mint"], family)
        if fam is None:
            raise NotFound(f"no family {family!r}; create it first (POST /v1/families)")
        if fam["disabled"]:
            raise Conflict(f"family {family} is disabled; re-enable it before minting tokens")
        if scope is not None:
            wider = sorted(set(scope) - set(fam["features"]))
            if wider:
                raise NotEligible(
                    "scope may only narrow what the family holds; not provisioned to "
                    f"{family}: {', '.join(wider)}"
                )
            scope = sorted(set(scope))
        if sub is None:
            sub = f"{family}.{secrets.token_hex(6)}"
        else:
            owner = await conn.fetchval(Q["agent_family"], sub)
            if owner is not None and owner != family:
                raise Conflict(f"sub {sub} belongs to family {owner}; name another sub or omit it")
        jti = uuid.uuid4()
        now = datetime.now(UTC).replace(microsecond=0)
        expires = now + timedelta(seconds=ttl_seconds)
        await conn.execute(Q["token_insert"], jti, family, sub, scope, now, expires, created_by)
    claims: dict[str, Any] = {
        "iss": signer.issuer,
        "aud": signer.audience,
        "sub": sub,
        "family": family,
        "jti": str(jti),
        "iat": int(now.timestamp()),
        "exp": int(expires.timestamp()),
    }
    if scope is not None:
        claims["scope"] = scope
    return {"token": signer.sign(claims), "sub": sub, "jti": str(jti), "family": family,
            "scope": scope, "expires_at": expires}
