"""The pooled path: the service through a real PgBouncer in transaction mode, as compose.yaml runs it.

PgBouncer (the Debian package; skipped where it is not installed) stands in front of the test's
PostgreSQL with fewer server connections than the service's pool, so a transaction can only find a
server connection by sharing: any session state the service relied on (a session advisory lock, a
SET, a named prepared statement) would land on the wrong connection. The verbs run through it, the
migrations run through it from several clients at once, and a long poll on one replica is woken by
a change made on another (NOTIFY through the pooler, LISTEN on a direct connection).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from ainarres_api.ops import embedded
from ainarres_api.server.app import create_app
from ainarres_api.server.db import migrate
from ainarres_api.server.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world
from tests.integration import test_smoke
from tests.integration.test_longpoll import waiting_claim, woken

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None)
pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer): the pooled path is not exercised here",
)

# Server connections PgBouncer may open per database: fewer than the service's pool (10), so transactions share.
SERVER_CONNECTIONS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def bouncer(pg_server: Any) -> Iterator[int]:
    """PgBouncer in transaction mode on 127.0.0.1:port in front of the test PostgreSQL's socket, as the
    PostgreSQL's own OS user (PgBouncer refuses root; only that user may open the socket)."""
    assert PGBOUNCER is not None
    socket_dir = parse_qs(urlparse(embedded.admin_uri(pg_server)).query)["host"][0]
    owner = Path(socket_dir).owner()
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="ainarres-pgbouncer-", dir="/tmp"))
    (work / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={socket_dir} user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {work / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {SERVER_CONNECTIONS}\nmax_client_conn = 500\n"
        f"logfile = {work / 'pgbouncer.log'}\npidfile = {work / 'pgbouncer.pid'}\n"
    )
    (work / "users.txt").write_text('"postgres" ""\n')
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(work, owner)
        for f in work.iterdir():
            shutil.chown(f, owner)
        as_owner = ["runuser", "-u", owner, "--"]
    proc = subprocess.Popen([*as_owner, PGBOUNCER, "-q", str(work / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"pgbouncer did not start: {(work / 'pgbouncer.log').read_text(errors='replace')}"
                time.sleep(0.1)  # a child process starting: nothing to wait on but its port
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _pooled(dsn: str, port: int) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{urlparse(dsn).path.lstrip('/')}"


@pytest.fixture
def settings(tmp_path: Path, dsn: str) -> Settings:
    # As compose.yaml: AINARRES_PGBOUNCER=true, and the LISTEN connection straight to PostgreSQL.
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                    pool_max_size=10, pgbouncer=True, listen_database_url=dsn, wake_sweep_seconds=300)


@pytest.fixture
async def app(settings: Settings, dsn: str, bouncer: int) -> AsyncIterator[Any]:
    application = create_app(settings, dsn=_pooled(dsn, bouncer))
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30):
        yield application


async def test_every_verb_through_pgbouncer(app: Any, admin: Api, db: asyncpg.Connection) -> None:
    await test_smoke.test_walkthrough(admin)
    # The service's statements reached PostgreSQL through PgBouncer's few server connections only (besides
    # the one direct LISTEN connection).
    backends = await db.fetch("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
                              "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    names = [r["application_name"] for r in backends]
    assert names.count("ainarres-listen") == 1 and len(names) - 1 <= SERVER_CONNECTIONS, names


async def test_a_long_poll_is_woken_by_a_change_on_another_replica(
        app: Any, admin: Api, settings: Settings, dsn: str, bouncer: int) -> None:
    other = create_app(settings, dsn=_pooled(dsn, bouncer))
    async with LifespanManager(other, startup_timeout=30, shutdown_timeout=30), \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://replica.test") as c:
        w = await make_world(admin)
        waiter = await waiting_claim(app, await w.agent("cheap"))
        maker = Api(c, (await w.agent("cheap")).token)
        made = await maker.create("dev", "made on the other replica")
        got = await woken(waiter)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]


async def test_migrations_run_once_through_pgbouncer_from_several_replicas(pg_server: Any, bouncer: int) -> None:
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin_conn = await asyncpg.connect(embedded.admin_uri(pg_server))
    try:
        await admin_conn.execute(f'CREATE DATABASE "{name}"')
        # Lock and statement time-outs as compose sets them on the role: the runner must lift them for itself.
        await admin_conn.execute(f"ALTER DATABASE \"{name}\" SET lock_timeout = '50ms'")
        direct = embedded.database_uri(pg_server, name)
        pooled = _pooled(direct, bouncer)
        conns = [await asyncpg.connect(pooled, statement_cache_size=0) for _ in range(4)]
        try:
            applied = await asyncio.gather(*(migrate.apply(c) for c in conns))
            again = await migrate.apply(conns[0])
        finally:
            for c in conns:
                await c.close()
        every = [m.version for m in migrate.available()]
        assert sorted(v for run in applied for v in run) == every, applied  # each migration applied once
        assert again == []
        check = await asyncpg.connect(direct)
        try:
            assert [r["version"] for r in await check.fetch(
                "SELECT version FROM ainarres_migrations ORDER BY version")] == every
            # No lock left behind on a pooled server connection, and no session setting changed.
            assert await check.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
            assert await check.fetchval("SHOW lock_timeout") == "50ms"
        finally:
            await check.close()
    finally:
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


@pytest.mark.parametrize("args", [["migrate"], ["token", "--family", "admin"]], ids=["migrate", "token"])
async def test_the_operator_commands_through_pgbouncer(admin: Api, dsn: str, bouncer: int, args: list[str]) -> None:
    """`ainarres migrate` and `ainarres token` pointed at the pooler, as an operator of compose.yaml would (the
    service started through it, so the admin family exists): they keep no named prepared statement a shared
    server connection could already hold, and send no session setting PgBouncer refuses. (Debian 12's PgBouncer,
    1.18, keeps no prepared statements for its clients; from 1.22 `max_prepared_statements` defaults to 200 and
    would hide the `migrate` case, not the `token` one's startup setting.)"""
    from tests.acceptance.test_readme import ainarres_command, clean_env

    # The pooler's server connections are warm with other clients' statements first (the service's pool).
    busy = [await asyncpg.connect(_pooled(dsn, bouncer)) for _ in range(SERVER_CONNECTIONS)]
    try:
        for c in busy:
            await c.fetchval("SELECT count(*) FROM ainarres_migrations")
        env = clean_env(AINARRES_DATABASE_URL=_pooled(dsn, bouncer), AINARRES_PGBOUNCER="true",
                        AINARRES_JWT_SECRET=TEST_SECRET)
        for _ in range(3):
            proc = await asyncio.create_subprocess_exec(*ainarres_command(), *args, env=env,
                                                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 90)
            assert proc.returncode == 0, (out, err)
            assert "token" in json.loads(out) if args[0] == "token" else json.loads(out)["code"] == "ok"
    finally:
        for c in busy:
            await c.close()
