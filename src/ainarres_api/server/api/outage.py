"""The database out of reach is an outage, not a bug: 503 `unavailable` with Retry-After, one log line.

asyncpg reports an unreachable or restarting server as an OSError (connection refused, reset, timed
out), a PostgresConnectionError (ConnectionDoesNotExistError: the server went away mid-request), an
operator-intervention error (CannotConnectNowError while it starts or stops, AdminShutdownError,
CrashShutdownError), TooManyConnectionsError, or an InterfaceError on a connection or pool that closed.

And one more, from a pooled connection the server terminated while it sat idle (a restart, a fast shutdown):
the FATAL arrives outside any query and leaves asyncpg's protocol consuming an error (state 2), so the next
query on it raises InternalClientError "cannot switch to state N; another operation (2) is in progress"
before the socket's close is noticed (MagicStack/asyncpg#1069). The pool then discards that connection.

And a pooled connection the server closed while a request held it between two statements: asyncpg's pool hands
the closed connection's slot back at once and detaches the request's handle, whose next call raises
InterfaceError "connection has been released back to the pool". The service never uses a connection it gave
back itself (`Lent.release` forgets it), so that error always means the server closed it.
"""

from __future__ import annotations

import logging

import asyncpg
from fastapi.responses import JSONResponse
from starlette.datastructures import URL
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ainarres_api.server.api import problems
from ainarres_api.server.db.pool import translate
from ainarres_api.server.errors import AinarresError, Unavailable

log = logging.getLogger("ainarres.outage")

RETRY_AFTER_SECONDS = 5
DETAIL = (f"the database is unavailable; nothing was done. Retry after {RETRY_AFTER_SECONDS} seconds "
          "(GET /readyz answers 200 once it is back)")

_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionRefusedError, ConnectionResetError, TimeoutError, socket.gaierror
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError, ...
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def as_unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 refusal for an exception that means the database cannot be reached now, else None."""
    if isinstance(exc, _OUTAGES) or (
            isinstance(exc, asyncpg.InterfaceError) and any(
                w in str(exc) for w in ("closed", "closing", "released back to the pool"))) or (
            isinstance(exc, asyncpg.InternalClientError) and "another operation (2) is in progress" in str(exc)):
        return Unavailable(DETAIL, retry_after=RETRY_AFTER_SECONDS)
    return None


def noted(exc: BaseException, path: str) -> Unavailable | None:
    """The 503 refusal for an outage, logged as one line (no traceback), else None."""
    err = as_unavailable(exc)
    if err is not None:
        log.warning("database unavailable: %s: %s (path=%s)", type(exc).__name__, _one_line(exc), path)
    return err


def refusal_of(exc: BaseException, path: str) -> AinarresError | None:
    """The refusal a failure met while talking to the database means, if it means one: a value or a lock the
    database refused (db.pool.translate), or the database out of reach (`noted`: one log line); else None (a bug).
    Every face answers these alike: the HTTP app's last handler, the MCP tools, a move's `next` claim."""
    return (translate(exc) if isinstance(exc, asyncpg.PostgresError) else None) or noted(exc, path)


def respond(exc: BaseException, path: str) -> JSONResponse | None:
    """The 503 response for an outage (logged as one line, no traceback), else None."""
    err = noted(exc, path)
    if err is None:
        return None
    resp = problems.refusal(err, path)
    resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return resp


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


class Outage:
    """Answers a request that met an outage with the 503 (or, if its response had started, ends it), and
    writes one log line instead of the crash handler's traceback and the server's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            path = URL(scope=scope).path
            if as_unavailable(exc) is None:
                raise
            if started:  # a stream: nothing more can be said; the client reconnects (SSE retry)
                log.warning("database unavailable mid-response: %s: %s (path=%s)", type(exc).__name__,
                            _one_line(exc), path)
                return
            resp = respond(exc, path)
            assert resp is not None
            await resp(scope, receive, send)
