"""A database a newer build has migrated is refused, by the app and by every command that would use it, with
one clear line and nothing changed: migrations only go forward, and an older build's statements may not fit
the newer schema (a rolling upgrade's old replica restarting, a rollback)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from asgi_lifespan import LifespanManager

from ainarres_api.server.app import create_app
from ainarres_api.server.db import migrate
from ainarres_api.server.settings import Settings
from tests.acceptance.test_readme import ainarres_command, clean_env, free_port
from tests.conftest import TEST_SECRET


async def _from_the_future(db: asyncpg.Connection) -> str:
    """Record a migration this build does not ship, as a newer build would have; returns its name as shown."""
    version: int = await db.fetchval(
        "INSERT INTO ainarres_migrations (version, name) SELECT max(version) + 1, 'from_the_future' "
        "FROM ainarres_migrations RETURNING version")
    return f"{version:04d}_from_the_future"


async def _schema(db: asyncpg.Connection) -> list[Any]:
    return [tuple(r) for r in await db.fetch(
        "SELECT version, name, applied_at FROM ainarres_migrations ORDER BY version")]


async def test_the_app_and_the_migration_runner_refuse_it(settings: Settings, dsn: str,
                                                          db: asyncpg.Connection) -> None:
    newest = await _from_the_future(db)
    before = await _schema(db)
    last = migrate.available()[-1]
    with pytest.raises(migrate.SchemaNewer) as refused:
        async with LifespanManager(create_app(settings, dsn=dsn), startup_timeout=30):
            pass
    detail = str(refused.value)
    assert newest in detail and f"{last.version:04d}_{last.name}" in detail and "run the newer build" in detail
    with pytest.raises(migrate.SchemaNewer):
        await migrate.apply(db)
    with pytest.raises(migrate.SchemaNewer):
        await migrate.check(db)
    assert await _schema(db) == before


async def test_the_check_passes_a_database_this_build_migrated_or_an_empty_one(db: asyncpg.Connection) -> None:
    await migrate.check(db)  # the test database: every migration of this build, none newer
    await db.execute("DELETE FROM ainarres_migrations")
    await migrate.check(db)  # a migration table with nothing recorded yet
    await db.execute("DROP TABLE ainarres_migrations")
    await migrate.check(db)  # no migration table yet: a first start


async def test_the_check_waits_for_a_migration_in_progress_and_sees_it(dsn: str, db: asyncpg.Connection) -> None:
    """A newer build migrating at this moment holds the migration lock: the check waits for it, then refuses."""
    newer = await asyncpg.connect(dsn)
    checker = await asyncpg.connect(dsn)
    try:
        tx = newer.transaction()
        await tx.start()
        await newer.execute("SELECT pg_advisory_xact_lock($1)", migrate.MIGRATION_LOCK_KEY)
        name = await _from_the_future(newer)  # not committed yet: a plain read would not see it
        pid = await checker.fetchval("SELECT pg_backend_pid()")
        check = asyncio.ensure_future(migrate.check(checker))
        while not await db.fetchval(  # the check is waiting on the lock (a state to poll, no event to wait on)
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND pid = $1", pid):
            assert not check.done(), check
            await asyncio.sleep(0.01)
        await tx.commit()
        with pytest.raises(migrate.SchemaNewer, match=name):
            await check
    finally:
        await newer.close()
        await checker.close()


@pytest.mark.parametrize("args", [["migrate"], ["token", "--family", "admin"], ["serve"], ["serve", "--workers", "2"],
                                  ["demo", "--exit"]],
                         ids=["migrate", "token", "serve", "serve-workers", "demo"])
async def test_every_command_refuses_it_with_one_json_line(dsn: str, db: asyncpg.Connection,
                                                          args: list[str]) -> None:
    newest = await _from_the_future(db)
    before = await _schema(db)
    if args[0] in ("serve", "demo"):
        args = [*args, "--port", str(free_port())]
    proc = await asyncio.create_subprocess_exec(
        *ainarres_command(), *args, env=clean_env(AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=TEST_SECRET),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:  # it served instead of refusing: stop it
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, (out, err)
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1, out  # nothing served, no "serving …" line, no admin token
    doc = json.loads(lines[0])
    assert doc["code"] == "schema_newer" and newest in doc["detail"], doc
    assert "Traceback" not in err.decode(), err
    assert await _schema(db) == before


async def _from_another_branch(db: asyncpg.Connection) -> tuple[str, str]:
    """Record this build's newest migration under another name, as a branch that numbered its own migration the
    same would have; returns (the database's, this build's) as shown."""
    last = migrate.available()[-1]
    await db.execute("UPDATE ainarres_migrations SET name = 'from_another_branch' WHERE version = $1", last.version)
    return f"{last.version:04d}_from_another_branch", f"{last.version:04d}_{last.name}"


async def test_a_database_another_build_migrated_under_the_same_number_is_refused(
        settings: Settings, dsn: str, db: asyncpg.Connection) -> None:
    theirs, mine = await _from_another_branch(db)
    before = await _schema(db)
    for attempt in (migrate.apply(db), migrate.check(db)):
        with pytest.raises(migrate.SchemaForeign) as refused:
            await attempt
        assert theirs in str(refused.value) and mine in str(refused.value)
    with pytest.raises(migrate.SchemaForeign):
        async with LifespanManager(create_app(settings, dsn=dsn), startup_timeout=30):
            pass
    assert await _schema(db) == before


async def test_the_migrate_command_names_the_other_build_s_migration(dsn: str, db: asyncpg.Connection) -> None:
    theirs, mine = await _from_another_branch(db)
    proc = await asyncio.create_subprocess_exec(
        *ainarres_command(), "migrate", env=clean_env(AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=TEST_SECRET),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 1, (out, err)
    doc = json.loads(out.decode().strip())
    assert doc["code"] == "schema_foreign" and theirs in doc["detail"] and mine in doc["detail"], doc
    assert "Traceback" not in err.decode(), err
