"""Test fixtures: one real PostgreSQL per session, a migrated template, a fresh database per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from ainarres_api.ops import embedded
from ainarres_api.server.app import create_app
from ainarres_api.server.db import migrate
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.helpers import Api

TEST_SECRET = "test-secret-" + "x" * 40


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a CI timeout, `timeout pytest`) becomes SystemExit so fixture teardown and atexit run
    # and the session's PostgreSQL is stopped instead of orphaned.
    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One embedded PostgreSQL for the whole session, stopped and deleted at the end."""
    root = Path(tempfile.mkdtemp(prefix="ainarres-test-", dir="/tmp"))
    server = embedded.start(root, cleanup_mode="delete")

    async def tune() -> None:
        # Throwaway data: durability buys nothing here and costs most of the suite's time.
        conn = await asyncpg.connect(embedded.admin_uri(server))
        try:
            for name, value in (("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")):
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    asyncio.run(tune())
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(pg_server: Any) -> str:
    """A database with every migration applied, cloned by each test."""
    name = f"tmpl_{uuid.uuid4().hex[:8]}"

    async def build() -> None:
        conn = await asyncpg.connect(embedded.admin_uri(pg_server))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(embedded.database_uri(pg_server, name))
        try:
            await migrate.apply(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return name


@pytest.fixture
async def dsn(pg_server: Any, template_db: str) -> AsyncIterator[str]:
    """A fresh database cloned from the migrated template, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(embedded.admin_uri(pg_server))
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await conn.close()
    yield embedded.database_uri(pg_server, name)
    conn = await asyncpg.connect(embedded.admin_uri(pg_server))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(database_url=None, data_dir=tmp_path, jwt_secret=TEST_SECRET, pool_min_size=1,
                    pool_max_size=int(os.environ.get("AINARRES_TEST_POOL", "10")))


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[Any]:
    application = create_app(settings, dsn=dsn)
    async with LifespanManager(application, startup_timeout=30, shutdown_timeout=30) as manager:
        assert manager.app is not None
        yield application


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ainarres.test") as c:
        yield c


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test's database, for looking behind the API."""
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def admin(app: Any, client: httpx.AsyncClient) -> Api:
    """An API handle holding a fresh admin token (the bootstrap made the admin family)."""
    st = app.state.ainarres
    async with st.pool.acquire() as conn:
        tok = await auth.mint(conn, st.signer, family="admin", ttl_seconds=3600)
    return Api(client, tok["token"])
