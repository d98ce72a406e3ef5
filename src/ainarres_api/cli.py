"""`ainarres`: serve the API, apply migrations, mint tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from ainarres_api.settings import Settings


def _database(settings: Settings) -> tuple[str, Any]:
    if settings.database_url:
        return settings.database_url, None
    from ainarres_api import embedded

    print(f"AINARRES: no AINARRES_DATABASE_URL; using the embedded PostgreSQL in {settings.data_dir.resolve()}",
          flush=True)
    return embedded.resolve(settings.data_dir)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from ainarres_api.app import create_app

    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    dsn, server = _database(settings)
    app = create_app(settings, dsn=dsn)
    base = f"http://{settings.host}:{settings.port}"
    print(f"AINARRES: serving {base}  (API docs: {base}/docs)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                log_level=settings.log_level, access_log=False)
    del server
    return 0


async def _migrate(dsn: str) -> list[int]:
    import asyncpg

    from ainarres_api.db import migrate

    conn = await asyncpg.connect(dsn)
    try:
        return await migrate.apply(conn)
    finally:
        await conn.close()


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    dsn, _server = _database(settings)
    applied = asyncio.run(_migrate(dsn))
    print(json.dumps({"code": "ok", "applied": applied}))
    return 0


async def _mint(dsn: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    from ainarres_api.db import migrate
    from ainarres_api.db.pool import create_pool
    from ainarres_api.services import admin
    from ainarres_api.services.auth import Signer

    signer = Signer(settings)
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await migrate.apply(conn)
            scope = sorted(set(args.scope.split(","))) if args.scope else None
            return await admin.mint_token(conn, signer, None, args.family,
                                          args.ttl or settings.token_ttl_seconds, scope, args.sub)
    finally:
        await pool.close()


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from ainarres_api.errors import AinarresError

    dsn, _server = _database(settings)
    try:
        out = asyncio.run(_mint(dsn, settings, args))
    except AinarresError as exc:
        print(json.dumps({"code": exc.code, "detail": exc.detail}))
        return 1
    out["expires_at"] = out["expires_at"].isoformat()
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="ainarres", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the API (an embedded PostgreSQL unless AINARRES_DATABASE_URL is set)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)
    m = sub.add_parser("migrate", help="apply pending migrations and exit")
    m.set_defaults(func=cmd_migrate)
    t = sub.add_parser("token", help="mint a token for a family (operator access to the database)")
    t.add_argument("--family", required=True)
    t.add_argument("--ttl", type=int, help="seconds")
    t.add_argument("--scope", help="comma-separated features to narrow the token to")
    t.add_argument("--sub", help="name the agent instead of creating a new one")
    t.set_defaults(func=cmd_token)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ainarres` command."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format='{"level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}')
    rc: int = args.func(args, settings)
    return rc
