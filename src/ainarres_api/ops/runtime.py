"""What `ainarres serve`, `token` and `demo` share: the database to use and minting a token on it."""

from __future__ import annotations

import argparse
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ainarres_api.server.settings import Settings


def database(settings: Settings) -> tuple[str, Any]:
    """The database URL to use, and the embedded server behind it when no URL is configured."""
    if settings.database_url:
        return settings.database_url, None
    from ainarres_api.ops import embedded

    # stderr: `ainarres token` and `ainarres migrate` print only JSON on stdout.
    print("AINARRES: no AINARRES_DATABASE_URL; using the embedded PostgreSQL in "
          f"{settings.data_dir.resolve()}", file=sys.stderr, flush=True)
    return embedded.resolve(settings.data_dir)


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    """Exit through SystemExit so atexit (the embedded PostgreSQL's stop) runs."""
    raise SystemExit(128 + signum)


async def mint(dsn: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Mint a token for args.family on the database at dsn (migrating it first)."""
    from ainarres_api.server.db import migrate
    from ainarres_api.server.db.pool import create_pool
    from ainarres_api.server.services import admin
    from ainarres_api.server.services.auth import Signer

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
