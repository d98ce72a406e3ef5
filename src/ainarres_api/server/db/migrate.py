"""Forward-only numbered migrations, each in its own transaction, under an advisory lock."""

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


async def apply(conn: asyncpg.Connection) -> list[int]:
    """Apply every missing migration; safe to call from several replicas at once."""
    applied_now: list[int] = []
    # Another replica may be migrating (wait for it), and a migration may take long: no session bounds here.
    await conn.execute("SET lock_timeout = 0; SET statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS ainarres_migrations (
                   version    integer     NOT NULL,
                   name       text        NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now(),
                   CONSTRAINT ainarres_migrations_pkey PRIMARY KEY (version))"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM ainarres_migrations")}
        for mig in available():
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO ainarres_migrations (version, name) VALUES ($1, $2)", mig.version, mig.name
                )
            log.info("applied migration %04d_%s", mig.version, mig.name)
            applied_now.append(mig.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        await conn.execute("RESET lock_timeout; RESET statement_timeout")
    return applied_now
