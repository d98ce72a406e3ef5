"""The connection pool and the one place asyncpg errors become domain errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from ainarres_api.server.errors import AinarresError, Conflict, Invalid, NotFound, Unavailable

# Constraint name → the refusal a client should see. Anything unlisted is a bug and stays a 500.
_CONSTRAINTS: dict[str, AinarresError] = {
    "features_pkey": Conflict("that feature is already registered; GET /v1/features lists them"),
    "features_name_format": Invalid("name: a feature is kind:key, e.g. role:reviewer or lane:dev"),
    "families_pkey": Conflict("a family with that key exists; PATCH /v1/families/{key} changes it"),
    "families_key_format": Invalid("key: letters, digits and _.+@- only, at most 100 characters"),
    "family_features_feature_fkey": Invalid("features: register every feature first (POST /v1/features)"),
    "denials_feature_fkey": Invalid("feature: register it first (POST /v1/features)"),
    "denials_pkey": Conflict("that denial exists; DELETE it first to change it"),
    "projects_slug_key": Conflict("a project with that slug exists"),
    "projects_slug_format": Invalid("slug: lowercase letters, digits, _ and - only, at most 64 characters"),
    "workflows_key_format": Invalid("key: lowercase letters, digits, _ and - only, at most 64 characters"),
    "lanes_key_key": Conflict("a lane with that key exists (lane keys are unique across projects)"),
    "lanes_key_format": Invalid("key: letters, digits and _.+- only, at most 96 characters"),
    "agents_sub_format": Invalid("sub: letters, digits and _.:@+- only, at most 128 characters"),
    "tasks_title_length": Invalid("title: between 1 and 200 characters"),
    "events_append_only": Conflict("events are append-only"),
}


def translate(exc: asyncpg.PostgresError) -> AinarresError | None:
    """The domain error for a database error raised by a client's request, if it is one."""
    name = getattr(exc, "constraint_name", None)
    if name and name in _CONSTRAINTS:
        proto = _CONSTRAINTS[name]
        return type(proto)(proto.detail)
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound(f"a referenced row does not exist ({name})")
    if isinstance(exc, asyncpg.LockNotAvailableError):
        # lock_timeout (AINARRES_LOCK_TIMEOUT_MS): another transaction holds a row this call needs.
        return Unavailable("a row this call needs is locked by another transaction and the lock did not come in "
                           "time; nothing was changed. Retry after Retry-After seconds", retry_after=1)
    if isinstance(exc, (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)):
        return Conflict("the request collided with a concurrent change and was rolled back; nothing "
                        "changed. Send it again")
    if isinstance(exc, asyncpg.DataError) and not isinstance(
            exc, (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)):
        return Invalid(f"a value is out of range for the database: {exc.args[0] if exc.args else exc}")
    if isinstance(exc, (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)):
        # Bodies are checked field by field (api/schemas.py); this catches path segments and queries.
        return Invalid("a path segment or query parameter holds a NUL (\\u0000) character; remove it")
    return None


# The integers a response can carry: orjson (api/deps.py FastJSONResponse) renders no integer outside them.
_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1


def _json_int(text: str) -> int | float:
    """A JSON integer as read back from jsonb: PostgreSQL writes a number it stores as numeric in full
    (a client's 1e300 comes back as 1 and 300 zeros), so one outside 64 bits is read as the float it was."""
    value = int(text)
    return value if _MIN_INT <= value <= _MAX_INT else float(text)


def _json_loads(text: str) -> Any:
    # orjson reads an integer beyond 64 bits as the float it stands for already, and is the hot path's
    # decoder (every task and event a verb answers); the standard library only for what orjson refuses.
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_int=_json_int)


def _json_dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(value)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=_json_dumps, decoder=_json_loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset on release. asyncpg's default runs one more statement per release
    (advisory unlock, CLOSE ALL, UNLISTEN *, RESET ALL); the service never leaves session state on
    a pooled connection (no SET, LISTEN, cursors or session advisory locks: those live on their own
    connections or in transactions), and asyncpg still rolls back a transaction left open."""


async def create_pool(dsn: str, *, min_size: int, max_size: int, pgbouncer: bool = False,
                      lock_timeout_ms: int = 0, statement_timeout_ms: int = 0) -> asyncpg.Pool:
    """A pool whose connections speak JSON natively; pooler-safe when asked.

    `lock_timeout_ms`: how long a statement waits for a row lock before it fails (55P03, a 503 for the
    caller) instead of holding its connection while another transaction sits on the row;
    `statement_timeout_ms` bounds every statement (a guard's JSONPath included). 0: no bound. Both are
    session defaults sent at connection start, with the time zone (UTC: times are rendered with +00:00,
    and a guard reads a time without a zone as UTC); behind PgBouncer, which refuses unknown startup
    parameters, set them on the database role instead (docs/operations.md).
    """
    kwargs: dict[str, Any] = {}
    if pgbouncer:
        # PgBouncer in transaction mode cannot keep named prepared statements across transactions.
        kwargs["statement_cache_size"] = 0
    else:
        kwargs["server_settings"] = {"lock_timeout": str(lock_timeout_ms),
                                     "statement_timeout": str(statement_timeout_ms), "timezone": "UTC"}
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, reset=_keep_session, **kwargs
    )
    assert pool is not None
    return pool


@contextlib.asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Turn constraint violations raised inside the block into domain errors."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        err = translate(exc)
        if err is None:
            raise
        raise err from exc
