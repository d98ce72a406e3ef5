"""Forward-only numbered migrations, each in its own transaction, under an advisory lock.

The lock is transaction-scoped and every setting is `SET LOCAL`, so the runner leaves no session state
behind and holds through a pooler in transaction mode (PgBouncer): a session lock taken through it may
land on one server connection and its unlock on another (ADR 0017)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("ainarres.migrate")

# Any constant works as long as every replica uses the same one.
MIGRATION_LOCK_KEY = 0x41494E41  # "AINA"
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file shipped inside the package."""

    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """Every migration shipped with this build, in order."""
    found = []
    for entry in resources.files("ainarres_api.server.db").joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m["version"]), m["name"], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001.. without gaps, found {versions}")
    return found


class SchemaRefused(RuntimeError):
    """The database's recorded migrations are not this build's: it must not serve it. `code` says why."""

    code = "schema_refused"


class SchemaNewer(SchemaRefused):
    """The database has migrations this build does not know: it was migrated by a newer build."""

    code = "schema_newer"


class SchemaForeign(SchemaRefused):
    """A migration the database recorded under a number this build ships has another name: another build (a
    branch that numbered its own migration the same) migrated it, and this build's migration of that number
    would be skipped as applied."""

    code = "schema_foreign"


_TABLE = """CREATE TABLE IF NOT EXISTS ainarres_migrations (
                version    integer     NOT NULL,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                CONSTRAINT ainarres_migrations_pkey PRIMARY KEY (version))"""


def _refuse_others(done: dict[int, str], known: list[Migration]) -> None:
    """Refuse a database whose recorded migrations are not all this build's (SchemaForeign, SchemaNewer)."""
    if mine := next((m for m in known if done.get(m.version, m.name) != m.name), None):
        theirs = done[mine.version]
        raise SchemaForeign(
            f"the database's migration {mine.version:04d} is {mine.version:04d}_{theirs}, but this build's is "
            f"{mine.version:04d}_{mine.name}: another build (a branch that numbered its own migration the same) "
            "migrated this database, and this build would skip its own migration as applied. Nothing was changed: "
            "run the build that migrated it, or one that ships both migrations under different numbers")
    if newer := sorted(set(done) - {m.version for m in known}):
        # Forward-only: an older build's statements may not fit the newer schema (a column it does not fill, a
        # rule it applies a second time), so it must not serve this database at all.
        raise SchemaNewer(
            f"the database is at migration {newer[-1]:04d}_{done[newer[-1]]}, newer than this build of ainarres "
            f"(it knows up to {known[-1].version:04d}_{known[-1].name}): run the newer build; migrations only go "
            "forward, so an older build cannot serve this database")


async def check(conn: asyncpg.Connection) -> None:
    """Refuse (SchemaRefused) a database a newer or another build has migrated; changes nothing (a first start's
    check, before anything is printed or served). Under the migration lock, as `apply` reads: a migration
    another process is running is waited for and seen."""
    async with conn.transaction():
        await conn.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        if await conn.fetchval("SELECT to_regclass('ainarres_migrations') IS NOT NULL"):
            rows = await conn.fetch("SELECT version, name FROM ainarres_migrations")
            _refuse_others({r["version"]: r["name"] for r in rows}, available())


async def apply(conn: asyncpg.Connection) -> list[int]:
    """Apply every missing migration; safe to call from several replicas at once, directly or through
    PgBouncer in transaction mode.

    One transaction per migration, each taking the migration lock first (another replica migrating is
    waited for) and reading what is applied under it; a last transaction finds nothing left to do. Refuses
    (SchemaRefused, nothing changed) a database a newer or another build has migrated."""
    applied_now: list[int] = []
    pending = available()
    fresh: bool | None = None  # a database with no migration yet: one log line for all of them, not one each
    while True:
        async with conn.transaction():
            # Another replica may be migrating (wait for it), and a migration may take long: no bounds here.
            await conn.execute("SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(_TABLE)
            done = {r["version"]: r["name"] for r in await conn.fetch("SELECT version, name FROM ainarres_migrations")}
            _refuse_others(done, pending)
            fresh = not done if fresh is None else fresh
            mig = next((m for m in pending if m.version not in done), None)
            if mig is None:
                if fresh and applied_now:  # another replica may have applied some of them meanwhile
                    log.info("created the schema: applied %d migration(s), %s", len(applied_now),
                             ", ".join(f"{v:04d}" for v in applied_now) if len(applied_now) < 4 or
                             applied_now[-1] - applied_now[0] + 1 != len(applied_now)
                             else f"{applied_now[0]:04d} to {applied_now[-1]:04d}")
                return applied_now
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO ainarres_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name)
        log.log(logging.DEBUG if fresh else logging.INFO, "applied migration %04d_%s", mig.version, mig.name)
        applied_now.append(mig.version)
