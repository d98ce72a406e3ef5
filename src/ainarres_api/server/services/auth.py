"""Tokens: signing with a pinned algorithm, verification, and the caller's live features."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
import uuid
from collections.abc import Collection, Mapping
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


class KeyMismatch(Exception):
    """This process's signing key is not the one the database's tokens are signed with (db/migrations/0026)."""


async def hold_key(conn: asyncpg.Connection, signer: Signer, *, rotate: bool = False) -> None:
    """Record the signer's key as the database's (the first start), or check that it is the recorded one:
    KeyMismatch otherwise, naming both fingerprints and the way out. `rotate` records it in place of the old."""
    if rotate:
        await conn.execute(Q["signing_key_rotate"], signer.algorithm, signer.fingerprint)
        return
    row = await conn.fetchrow(Q["signing_key_hold"], signer.algorithm, signer.fingerprint)
    if row is None:  # another process recorded it after this statement's snapshot: read it in a new one
        row = await conn.fetchrow(Q["signing_key_hold"], signer.algorithm, signer.fingerprint)
    if (row["algorithm"], row["fingerprint"]) != (signer.algorithm, signer.fingerprint):
        raise KeyMismatch(
            f"this database's tokens are signed with another key ({row['algorithm']}, fingerprint "
            f"{row['fingerprint']}, in force since {row['set_at']:%Y-%m-%d %H:%M} UTC) than this process holds "
            f"({signer.algorithm}, {signer.fingerprint}): every token would be refused. Give it the service's key "
            "(AINARRES_JWT_SECRET or AINARRES_JWT_SECRET_FILE, or the key files, as on the other replicas; with none, "
            "the key is the file jwt-secret in AINARRES_DATA_DIR). To change the key on purpose, mint a token with "
            "the new one first: `ainarres token --family admin --rotate-key` (docs/operations.md)")


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
    def fingerprint(self) -> str:
        """Which key this is, to compare with the database's record (never the key: a digest of it)."""
        key = self._verify_key if isinstance(self._verify_key, bytes) else str(self._verify_key).encode()
        if self.algorithm != "HS256":  # the public key itself, whatever PEM spelling the file has
            from cryptography.hazmat.primitives import serialization

            key = serialization.load_pem_public_key(key).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        # The secret exactly as it signs (a trailing newline in AINARRES_JWT_SECRET is part of it).
        return hashlib.sha256(b"ainarres-signing-key\0" + self.algorithm.encode() + b"\0" + key).hexdigest()[:32]

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


@dataclass(frozen=True)
class Identity:
    """Who a verified token names: its signature, issuer, audience and expiry checked, nothing read yet. What
    the caller may do is read from the database on every call, by `authenticate`, or by the statement of a
    verb that moves a task (the claim, the transition), which reads it with `principal_of` and is `admit`ted."""

    jti: uuid.UUID
    sub: str
    family: str


def identity(signer: Signer, token: str) -> Identity:
    """The identity a bearer token names, once its signature, issuer, audience and expiry check out."""
    claims = signer.verify(token)
    try:
        jti = uuid.UUID(str(claims["jti"]))
    except ValueError:
        raise Unauthenticated("the token's jti is not a uuid; present a token minted by this service") from None
    return Identity(jti, str(claims["sub"]), str(claims["family"]))


def named(who: Identity | Principal) -> Identity:
    """The identity of a caller, whether it was read already or not."""
    return who if isinstance(who, Identity) else Identity(uuid.UUID(who.jti), who.sub, who.family)


# Why principal_of refuses a caller (migration 0023: the rule is there, once), in words for it.
_REFUSED = {
    "unknown": "this token was not issued by this service; ask an admin for one",
    "revoked": "this token has been revoked; ask an admin for a new one",
    "expired": "the token has expired; ask an admin for a new one (POST /v1/tokens)",
    "disabled": "family {family} is disabled; an admin can re-enable it",
    "other_family": "this sub belongs to another family",
}


async def admit(conn: asyncpg.Connection, row: Mapping[str, Any], who: Identity, *, seen: bool = False
                ) -> Principal:
    """The caller a row of `principal_of` describes (read alone, or inside a verb's statement, which changed
    nothing if it is refused), or the refusal (401). An agent is recorded on its first call (no statement that
    read it changed anything then: it held nothing), and seen — here, before the work, unless the statement
    that read the row recorded it (`seen`: the claim, the transition), as this would only come after a
    committed move and could fail it."""
    if (refused := row["refused"]) is not None:
        raise Unauthenticated(_REFUSED[refused].format(family=row["family_key"]))
    if row["agent_family"] is None:
        await conn.execute(Q["agent_ensure"], row["sub"], row["family_key"])
    elif row["seen_stale"] and not seen:
        await conn.execute(Q["agent_touch"], row["sub"])
    return Principal(
        sub=row["sub"],
        family=row["family_key"],
        jti=str(who.jti),
        features=frozenset(row["features"]),
        max_active=row["max_active"],
        scope=tuple(row["scope"]) if row["scope"] is not None else None,
    )


async def read(conn: asyncpg.Connection, who: Identity) -> Principal:
    """The caller's effective features, read from the database now (or its refusal)."""
    return await admit(conn, await conn.fetchrow(Q["resolve_principal"], who.jti, who.sub, who.family), who)


async def authenticate(conn: asyncpg.Connection, signer: Signer, token: str) -> Principal:
    """Verify a bearer token and read the caller's effective features from the database now."""
    return await read(conn, identity(signer, token))


# How long a token may live, whoever mints it (POST /v1/tokens, `ainarres token`): at least a minute, so a
# caller can use what it was given; at most a year.
TOKEN_TTL_MIN, TOKEN_TTL_MAX = 60, 365 * 86400


async def unregistered(conn: asyncpg.Connection, features: Collection[str]) -> list[str]:
    """Which of `features` are not registered (the one registry check: families, denials, bans, flags,
    workflows, required features, token scopes), sorted."""
    known = {r["name"] for r in await conn.fetch(Q["registered_features"], list(features))}
    return sorted(set(features) - known)


async def feature_exists(conn: asyncpg.Connection, feature: str) -> None:
    """Refuse the request with 404 if a feature its path names is not registered (a body's: `registered`)."""
    if await unregistered(conn, [feature]):
        raise NotFound(f"no feature {feature!r} is registered; GET /v1/features lists them")


async def registered(conn: asyncpg.Connection, field: str, features: Collection[str]) -> None:
    """Refuse the request if the body's `field` names a feature that is not registered: a 422 on that field,
    in one wording wherever a body names features (ADR 0025)."""
    if unknown := await unregistered(conn, features):
        lanes = " (a lane:<key> feature comes with its lane: POST /v1/lanes)" if any(
            f.startswith("lane:") for f in unknown) else ""
        raise Invalid(f"{field}: not registered: {', '.join(unknown)} (GET /v1/features lists them; POST "
                      f"/v1/features registers one){lanes}")


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
    if not TOKEN_TTL_MIN <= ttl_seconds <= TOKEN_TTL_MAX:
        raise Invalid(f"ttl_seconds: a token lives between {TOKEN_TTL_MIN} seconds and {TOKEN_TTL_MAX // 86400} days "
                      f"({TOKEN_TTL_MAX} seconds); {ttl_seconds} is outside")
    async with conn.transaction():
        fam = await conn.fetchrow(Q["family_for_mint"], family)
        if fam is None:
            raise NotFound(f"no family {family!r}; create it first (POST /v1/families)")
        if fam["disabled"]:
            raise Conflict(f"family {family} is disabled; re-enable it before minting tokens")
        if scope is not None:
            await registered(conn, "scope", scope)  # not a permission missing: no such feature
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
