"""Request-scoped dependencies: the app state, a pooled connection, and the authenticated caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, get_args, get_origin

import asyncpg
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from ainarres_api.server.api import render
from ainarres_api.server.api.contract import QUERY_UNCHECKED
from ainarres_api.server.errors import NotEligible, Unauthenticated
from ainarres_api.server.services import auth
from ainarres_api.server.services.auth import Principal, Signer
from ainarres_api.server.services.oversight import EventClock
from ainarres_api.server.services.tasks import Limits
from ainarres_api.server.services.wake import Wake
from ainarres_api.server.settings import Settings


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (datetimes, uuids natively): responses are the hot path's largest CPU cost
    after the SQL. Verbs return it directly, which also skips FastAPI's response-model pass."""

    def render(self, content: Any) -> bytes:
        return render.dumps(content)


@dataclass
class AppState:
    """What the lifespan opens and every request shares."""

    settings: Settings
    pool: asyncpg.Pool
    signer: Signer
    limits: Limits
    wake: Wake
    events: EventClock
    long_polls: dict[str, int] = field(default_factory=dict)  # waiting claims per agent sub, this process


async def state_of(request: Request) -> AppState:
    """The typed application state (async: FastAPI runs a plain `def` dependency in a thread)."""
    st: AppState = request.app.state.ainarres
    return st


State = Annotated[AppState, Depends(state_of)]


async def connection(st: State) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection for the request; services open their own transactions on it."""
    async with st.pool.acquire() as conn:
        yield conn


Conn = Annotated[asyncpg.Connection, Depends(connection)]

def authorization(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The request's Authorization header, if it has one; two or more are refused, not read one of them: a proxy
    in front could read another than this service does and act on a different identity."""
    found = [v for k, v in headers if k == b"authorization"]
    if len(found) > 1:
        raise Unauthenticated("send one Authorization header, not several")
    return found[0].decode("latin-1") if found else None


class Bearer(HTTPBearer):
    """HTTPBearer, refusing a request with more than one Authorization header (`authorization`)."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        authorization(request.scope["headers"])
        return await super().__call__(request)


_bearer = Bearer(auto_error=False, scheme_name="HTTPBearer", description="a token minted by POST /v1/tokens")


_NO_TOKEN = "send Authorization: Bearer <token>; an admin mints tokens with POST /v1/tokens"


def token_of(creds: HTTPAuthorizationCredentials | None) -> str:
    """The bearer token of the request's credentials (HTTPBearer's reading of Authorization), or 401."""
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise Unauthenticated(_NO_TOKEN)
    return creds.credentials


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def bearer_token(creds: Credentials) -> str:
    """The bearer token the request carries."""
    return token_of(creds)


def bearer_of(authorization: str | None) -> str:
    """The bearer token in an Authorization header's value, read as `bearer_token` (HTTPBearer) reads it."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        raise Unauthenticated(_NO_TOKEN)
    return credentials


Token = Annotated[str, Depends(bearer_token)]


async def current_caller(st: State, token: Token) -> Principal:
    """The caller of this request, with its effective features read from the database now."""
    async with st.pool.acquire() as conn:
        return await auth.authenticate(conn, st.signer, token)


Caller = Annotated[Principal, Depends(current_caller)]


class Lent:
    """A verified token, the caller it names once read (`principal`, or a verb's own statement: `caller`), and
    the pooled connection the request works on, which the handler may give back early (a long poll does,
    before it waits)."""

    def __init__(self, conn: asyncpg.Connection, pool: asyncpg.Pool, token: str, who: auth.Identity) -> None:
        self._conn: asyncpg.Connection | None = conn
        self._pool = pool
        self.token = token
        self.who = who
        self.caller: Principal | None = None  # read: by `principal`, or by the statement of a verb that reads it

    async def principal(self) -> Principal:
        """The caller, read from the database on this request's connection (once)."""
        if self.caller is None:
            self.caller = await auth.read(self.conn, self.who)
        return self.caller

    @property
    def conn(self) -> asyncpg.Connection:
        """The connection; only until release()."""
        assert self._conn is not None, "the connection was given back"
        return self._conn

    async def release(self) -> None:
        """Give the connection back to the pool (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


_LENT = "ainarres.lent"


def lent_of(scope: Scope) -> Lent | None:
    """The token and connection an agent endpoint's dependency lent this request, if it did."""
    lent: Lent | None = scope.get(_LENT)
    return lent


class AgentAuth(Bearer):
    """The authentication of an agent endpoint, as one dependency that is also its security scheme: the bearer
    token read as HTTPBearer reads it and verified (services.auth.identity), and a pooled connection the work
    then uses; with `reads`, the caller's features read from the database now (services.auth.read) — before the
    body is judged. Without (the verbs: api/verbs.py), `verbs.run` reads them before a verb's work, or the
    statement of a verb that moves a task reads them itself, in the same round trip (ADR 0027); a refusal
    decided before the caller was read waits for that read, so a bad token is still refused first.

    One dependency node on purpose: FastAPI solves each node of a route's dependency tree on every request,
    and these routes are the hot path; being the HTTPBearer scheme itself, it is what /openapi.json shows
    as the route's security requirement. `ReleaseLent` gives the connection back when the request ends,
    whatever happened, so it is not a `yield` dependency."""

    def __init__(self, *, reads: bool) -> None:
        super().__init__(auto_error=False, scheme_name="HTTPBearer", description="a token minted by POST /v1/tokens")
        self.reads = reads

    async def __call__(self, request: Request) -> Lent:  # type: ignore[override]
        token = token_of(await super().__call__(request))
        st: AppState = request.app.state.ainarres
        who = auth.identity(st.signer, token)
        lent = Lent(await st.pool.acquire(), st.pool, token, who)
        request.scope[_LENT] = lent
        if self.reads:
            await lent.principal()
        return lent


agent_call = AgentAuth(reads=True)  # an agent route that reads the board: its caller is read first
agent_verb = AgentAuth(reads=False)  # a verb (api/verbs.py): its caller is read by its work
Agent = Annotated[Lent, Depends(agent_call)]
AgentVerb = Annotated[Lent, Depends(agent_verb)]


class ReleaseLent:
    """Gives back the connection an agent endpoint's caller was authenticated on, when the request ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            lent = scope.pop(_LENT, None)
            if lent is not None:
                await lent.release()


def lacking(caller: Principal, any_of: tuple[str, ...]) -> NotEligible | None:
    """The refusal of a caller holding none of `any_of` (a route's `require`), else None."""
    return None if any(caller.has(f) for f in any_of) else NotEligible(f"this call needs {' or '.join(any_of)}")


def require(*any_of: str) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency that lets the call through only if the caller holds one of `any_of` (kept on it as `needs`,
    for the refusals decided before FastAPI reaches it: problems.caller_refused)."""

    async def check(caller: Caller) -> Principal:
        if (refused := lacking(caller, any_of)) is not None:
            raise refused
        return caller

    check.needs = any_of  # type: ignore[attr-defined]
    return check


Admin = Annotated[Principal, Depends(require("seat:admin"))]
Governor = Annotated[Principal, Depends(require("seat:admin", "seat:overseer"))]


MAX_NAMED = 20  # unknown names an answer lists at most: a request of a thousand names earns no longer answer


def _repeatable(annotation: Any) -> bool:
    """Whether a parameter's annotation is a list (`?state=a&state=b`), through Optional and Annotated."""
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin is not None and any(_repeatable(a) for a in get_args(annotation) if a is not type(None))


def _query_params(dependant: Any) -> dict[str, bool]:
    """The query parameters a route takes, its own and its dependencies' (each: may it repeat?)."""
    out = {p.alias: _repeatable(p.field_info.annotation) for p in dependant.query_params}
    for sub in dependant.dependencies:
        out |= _query_params(sub)
    return out


_JUDGE = "_ainarres_query_judge"


async def judge_queries(request: Request) -> None:
    """An app-wide dependency: every documented operation refuses a query parameter it does not take
    (`?limt=5`), and one it takes once given twice (`?lane=a&lane=b`: which would be heard?), as an unknown body
    field is refused: ignored, the caller would believe it had asked for something it did not get. What a route
    takes is read from its own declaration (its parameters and its dependencies'), once per route. A request
    without a query string (every verb) returns at once. A validation error, so that a bad token is still
    refused first (problems.caller_refused)."""
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema or route.path_format in QUERY_UNCHECKED:
        return
    judge: _QueryJudge | None = getattr(route, _JUDGE, None)  # kept on the route: per app, gone with it
    if judge is None:
        judge = _QueryJudge(_query_params(route.dependant))
        setattr(route, _JUDGE, judge)
    judge.judge(request.query_params)


class _QueryJudge:
    def __init__(self, names: dict[str, bool]) -> None:
        self.names = names
        self.takes = f"it takes {', '.join(sorted(names))}" if names else "it takes none"

    def judge(self, given: Any) -> None:
        errors = []
        for k in sorted(set(given)):
            if k not in self.names:
                errors.append({"type": "extra_forbidden", "loc": ("query", k), "input": given[k],
                               "msg": f"this operation takes no query parameter {k!r}; {self.takes}"})
            elif not self.names[k] and len(values := given.getlist(k)) > 1:
                errors.append({"type": "repeated", "loc": ("query", k), "input": values,
                               "msg": f"give {k} once (it was given {len(values)} times)"})
        if errors:
            raise RequestValidationError(errors[:MAX_NAMED])
