"""schema.sql, the schema a reader can open in one file, agrees with the migrations that build it."""

from __future__ import annotations

import asyncio
import difflib
import importlib.util
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from ainarres_api.ops import embedded

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("schema_snapshot", ROOT / "scripts" / "schema_snapshot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


snap = _script()


def _diff(expected: str, actual: str, a: str, b: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(), actual.splitlines(), a, b, lineterm="", n=2)
    return "\n".join(list(lines)[:120])


async def _admin(pg_server: Any, sql: str) -> None:
    conn = await asyncpg.connect(embedded.admin_uri(pg_server))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_schema_sql_alone_builds_the_migrated_schema(pg_server: Any, dsn: str) -> None:
    migrated = await asyncio.to_thread(snap.dump, dsn)
    assert "CREATE TABLE public.tasks" in migrated and "CREATE TRIGGER" in migrated, migrated[:2000]
    name = f"schema_{uuid.uuid4().hex[:12]}"
    await _admin(pg_server, f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(embedded.database_uri(pg_server, name))
        try:
            await conn.execute(snap.SNAPSHOT.read_text())
        finally:
            await conn.close()
        built = await asyncio.to_thread(snap.dump, embedded.database_uri(pg_server, name))
    finally:
        await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert built == migrated, "schema.sql does not build the migrated schema: run scripts/schema-snapshot\n" + _diff(
        migrated, built, "migrations", "schema.sql"
    )


async def test_the_committed_snapshot_is_the_migrated_schema(dsn: str) -> None:
    fresh = await asyncio.to_thread(snap.snapshot, dsn)
    committed = snap.SNAPSHOT.read_text()
    assert committed == fresh, (
        "src/ainarres_api/server/db/schema.sql does not match the migrations: run scripts/schema-snapshot "
        "and commit the result\n" + _diff(committed, fresh, "schema.sql (committed)", "migrated database")
    )


async def test_a_schema_change_without_a_new_snapshot_is_seen(dsn: str, db: asyncpg.Connection) -> None:
    # What an unsnapshotted migration leaves behind: the comparison above must notice it.
    await db.execute("CREATE INDEX snapshot_probe ON tasks (title)")
    fresh = await asyncio.to_thread(snap.snapshot, dsn)
    assert fresh != snap.SNAPSHOT.read_text()
    assert "CREATE INDEX snapshot_probe ON public.tasks USING btree (title);" in fresh
