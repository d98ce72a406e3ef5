"""The application factory: routers, the one error handler, bounded bodies, and the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.telemetry import TelemetryConfig
from starlette.datastructures import URL
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ainarres_api import __version__
from ainarres_api.server import drain as draining
from ainarres_api.server import limits, logs
from ainarres_api.server.api import admin as admin_api
from ainarres_api.server.api import docs, mcp_server, models, outage, problems, verbs
from ainarres_api.server.api import governance as governance_api
from ainarres_api.server.api import oversight as oversight_api
from ainarres_api.server.api import spend as spend_api
from ainarres_api.server.api import tasks as tasks_api
from ainarres_api.server.api import web as web_api
from ainarres_api.server.api.contract import refusals
from ainarres_api.server.api.deps import AppState, FastJSONResponse, ReleaseLent, judge_queries
from ainarres_api.server.db import migrate
from ainarres_api.server.db.pool import create_pool, translate
from ainarres_api.server.errors import AinarresError, Invalid, PayloadTooLarge, Unavailable
from ainarres_api.server.metrics import Metrics, VerbMetrics
from ainarres_api.server.services import admin, auth, oversight, wake
from ainarres_api.server.services.auth import Signer
from ainarres_api.server.services.tasks import Limits
from ainarres_api.server.services.wake import Wake
from ainarres_api.server.settings import Settings

# How long a refused body's drain waits for more of it before the refusal goes anyway.
DRAIN_STALL_SECONDS = 1.0


class BodyLimit:
    """Refuses request bodies above a byte bound before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = (f"request bodies are limited to {max_bytes} bytes; store work products elsewhere and send "
                       "references (artifacts)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        codings = {v.strip().lower() for k, v in scope.get("headers") or [] if k == b"content-encoding"} - {
            b"identity", b""}
        if codings and (b"transfer-encoding" in headers or declared not in (None, b"0")):
            # Read as it came, a compressed body would be "not JSON", which says nothing.
            named = b", ".join(sorted(codings)).decode("latin-1")[:60]
            await self._unread(scope, receive, send, headers, Invalid(
                f"body: Content-Encoding {named} is not accepted; send the body uncompressed"))
            return
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._unread(scope, receive, send, headers, PayloadTooLarge(self.detail))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:  # rendered by problems.http_error as the same 413 as _refuse's
                    raise _TooLarge(413, self.detail)
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._drain(receive)
            await problems.refusal(PayloadTooLarge(self.detail), URL(scope=scope).path)(scope, receive, send)

    async def _unread(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes],
                      refused: AinarresError) -> None:
        """Refuse a request by its headers, before its body is read: drained first, unless the client waits for
        `100 Continue` and so has sent no body (reading would have uvicorn ask for it)."""
        if headers.get(b"expect", b"").lower() != b"100-continue":
            await self._drain(receive)
        await problems.refusal(refused, URL(scope=scope).path)(scope, receive, send)

    async def _drain(self, receive: Receive) -> None:
        """Read and drop what the client is still sending, up to 4× the limit, before the refusal: a server that
        answers and closes with the body unread resets the connection, and the client or the proxy in front may
        lose the refusal with it (tests/acceptance/test_proxy_stack.py). Past the bound, or once nothing has
        arrived for DRAIN_STALL_SECONDS (a client that declared a large body and sends none), the answer goes
        anyway: it is not kept waiting for the body time-out's 408."""
        left = 4 * self.max_bytes
        while left > 0:
            try:
                async with asyncio.timeout(DRAIN_STALL_SECONDS):
                    msg = await receive()
            except TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            left -= len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return


class HeadAsGet:
    """HEAD answered as GET without its body (RFC 9110 §9.3.2: a server that answers GET answers HEAD): FastAPI's
    routes take only the methods they declare. The application sees GET on a copy of the scope; the server keeps
    the original, sees HEAD, and sends the headers alone. The event stream is left out: a stream never ends, so
    its head would never be complete (HEAD there is 405)."""

    def __init__(self, app: ASGIApp, skip: frozenset[str] = draining.STREAMS) -> None:
        self.app = app
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD" and scope["path"] not in self.skip:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    # An HTTPException, because FastAPI turns any other error raised while reading the body into a 400.
    pass


def _without_slash(app: FastAPI, scope: Scope) -> str | None:
    """Where a path with a trailing slash that no route takes goes without it (`/mcp/` → `/mcp`), as a relative
    reference: Starlette's own redirect (off here) builds an absolute URL from the request's Host header, which
    a client chooses (and a proxy may not pass on), so it could send a caller elsewhere."""
    path = scope["path"]
    if len(path) < 2 or not path.endswith("/") or path.startswith("//"):  # `//host/…` would leave this server
        return None
    bare = {**scope, "path": path.rstrip("/") or "/"}
    if any(segment in (".", "..") for segment in bare["path"].split("/")):  # a client would resolve it elsewhere
        return None
    if not any(route.matches(bare)[0] is Match.FULL for route in app.router.routes):  # its method too
        return None
    # The path as the client wrote it (`%2F` and `%FF` kept), less the slash; the decoded one if the server
    # gave none.
    raw = scope.get("raw_path")
    target = raw.decode("latin-1").rstrip("/") if raw else quote(bare["path"])
    query = scope.get("query_string", b"").decode("latin-1")
    return target + (f"?{query}" if query else "")


class _Service(FastAPI):
    """FastAPI with the request log outermost, around the server-error middleware: the 500 that middleware
    renders for a crash carries the request id too, and so does the crash's log line."""

    def build_middleware_stack(self) -> ASGIApp:
        return logs.RequestLog(super().build_middleware_stack())


def _telemetry() -> TelemetryConfig | None:
    """FastAPI's native OpenTelemetry: as FastAPI sets it up when the process is configured for OpenTelemetry
    (an OTEL_* environment variable, as `opentelemetry-instrument` and every exporter read); otherwise off, so
    that no request pays for asking the three global providers whether they are configured (docs/performance.md,
    2026-12-04)."""
    if any(name.startswith("OTEL_") for name in os.environ):
        return None
    return {"tracing": False, "metrics": False, "logs": False}


class PublishWakes:
    """Hands what a request made claimable to the wake-up hub once the request has succeeded.

    Services record the routes they make claimable while they work (services.wake.ready); a
    request answered with a success has committed them, so waiting claims are woken as its
    response starts. A refused request rolled back: what it recorded is dropped.
    """

    def __init__(self, app: ASGIApp, hub: Any) -> None:
        self.app = app
        self.hub = hub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with wake.recording() as rec:

            async def publishing(msg: Message) -> None:
                if msg["type"] == "http.response.start" and rec:
                    if msg["status"] < 400:
                        self.hub().publish(rec)
                    rec.clear()
                await send(msg)

            await self.app(scope, receive, publishing)


def create_app(settings: Settings, *, dsn: str | None = None, bootstrap: bool = True) -> FastAPI:
    """Build the service for one database; `dsn` overrides settings.database_url. Without `bootstrap`, the
    first start's admin token is not made here (`ainarres serve --workers N` makes it once, before them)."""
    target = dsn or settings.database_url
    if not target:
        raise ValueError("create_app needs a database URL (the CLI starts the embedded one)")
    metrics = Metrics()
    mcp = mcp_server.McpFace(lambda: app.state.ainarres, metrics)
    drain = draining.Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        signer = Signer(settings)
        pool = await create_pool(target, min_size=settings.pool_min_size, max_size=settings.pool_max_size,
                                 pgbouncer=settings.pgbouncer, lock_timeout_ms=settings.lock_timeout_ms,
                                 statement_timeout_ms=settings.statement_timeout_ms)
        try:
            async with pool.acquire() as conn:
                await migrate.apply(conn)
                await auth.hold_key(conn, signer)  # never serve with a key the database's tokens do not carry
                boot = await admin.bootstrap(conn, signer, settings.admin_token_ttl_seconds,
                                             mint=settings.bootstrap_token) if bootstrap else None
                metrics.start(await oversight.last_event_id(conn))
            if boot is not None:  # printed once, on the first start against an empty database; never logged
                print(admin.bootstrap_words(boot), file=sys.stdout, flush=True)
            hub = Wake(pool, listen_dsn=settings.listen_database_url or target, notify_dsn=target,
                       pgbouncer=settings.pgbouncer, coalesce_seconds=settings.notify_coalesce_ms / 1000,
                       sweep_seconds=settings.wake_sweep_seconds)
            await hub.start()
            forget_hub = drain.on_begin(hub.drain)  # a drain answers the waiting claims at once
            clock = oversight.EventClock(pool, oversight_api.POLL_SECONDS)
            await clock.start()
            # Under --workers another worker may answer /metrics: this one's gauges are kept current meanwhile.
            fresh = asyncio.create_task(metrics.keep_fresh(pool, hub)) if metrics.multiprocess_dir else None
            try:
                app.state.ainarres = AppState(settings=settings, pool=pool, signer=signer,
                                              limits=Limits(max_payload_bytes=settings.max_payload_bytes,
                                                            max_routes=settings.max_feature_sets,
                                                            max_sets_per_lane=settings.max_required_sets_per_lane),
                                              wake=hub, events=clock)
                async with mcp.running():  # the MCP sessions end before the hub and the pool
                    yield
            finally:
                if fresh is not None:
                    fresh.cancel()
                forget_hub()
                await clock.stop()
                await hub.stop()
        finally:
            await pool.close()

    app = _Service(
        title="AINARRES",
        version=__version__,
        summary="Agents pull, hold and move their own work; PostgreSQL is the single source of truth.",
        lifespan=lifespan,
        telemetry=_telemetry(),
        default_response_class=FastJSONResponse,
        # An operation's id is its route's name (the handler's, or a verb's): stable across moves of a path, so a
        # generated client's method names stay put (test_docs pins them).
        generate_unique_id_function=lambda route: route.name,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # on_http redirects, relatively (_without_slash)
        dependencies=[Depends(judge_queries)],  # an unknown query parameter is refused, as an unknown body field is
    )
    docs.install(app)
    app.state.metrics = metrics
    app.state.drain = drain  # begun on SIGTERM by `ainarres serve` (ops/runtime.py DrainingServer)

    @app.exception_handler(AinarresError)
    async def on_refusal(request: Request, exc: AinarresError) -> JSONResponse:
        return problems.refusal(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await problems.caller_refused(request) or problems.invalid(
            exc.errors(), request.url.path, request.headers.get("content-type") if request.method != "GET" else "")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and (target := _without_slash(app, request.scope)) is not None:
            return RedirectResponse(target, status_code=307)
        if exc.status_code == 400:  # a body FastAPI could not parse, judged before the route's caller
            return await problems.caller_refused(request) or problems.http_error(exc, request.url.path)
        if exc.status_code == 405:  # the router names the methods of one route on the path: name them all
            allowed = sorted({m.upper() for template, ops in app.openapi()["paths"].items()
                              if compile_path(template)[0].match(request.url.path) for m in ops})
            if allowed:
                exc = StarletteHTTPException(405, headers={"Allow": ", ".join(allowed)})
        return problems.http_error(exc, request.url.path)

    # A constraint a client's request broke is a refusal, handled here (Starlette's ExceptionMiddleware).
    # Left to the `Exception` handler it would run in ServerErrorMiddleware, which re-raises after
    # responding: logged as a crash, and raised into in-process clients.
    @app.exception_handler(asyncpg.PostgresError)
    async def on_database_refusal(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
        err = translate(exc)
        if err is None:
            raise exc
        return problems.refusal(err, request.url.path)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        err = outage.refusal_of(exc, request.url.path)
        resp = problems.crash(exc, request.url.path) if err is None else problems.refusal(err, request.url.path)
        # Answered from ServerErrorMiddleware, which raises the exception again once it has: the server then
        # closes the connection. Said in the answer, so that a client does not send its next request on it.
        resp.headers["connection"] = "close"
        return resp

    @app.get("/healthz", tags=["operations"], summary="liveness: the process answers (no database read)",
             description="For a supervisor's liveness probe: 200 while the process serves requests. It reads no "
                         "database; /readyz does.", response_model=models.Health)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["operations"], summary="readiness: the database answers (503 unavailable if not)",
             description="For a load balancer's readiness probe: 200 when the database answers, 503 `unavailable` "
                         "(with Retry-After) when it does not, or from the moment the process begins to drain "
                         "(SIGTERM) until it exits.", response_model=models.Health,
             responses=refusals(Unavailable))
    async def readyz(request: Request) -> Any:
        if drain.draining:
            return problems.refusal(Unavailable("this API process is shutting down (draining); send requests to "
                                                "another", retry_after=draining.RETRY_AFTER_SECONDS),
                                    request.url.path)
        st: AppState = request.app.state.ainarres
        try:
            async with asyncio.timeout(outage.RETRY_AFTER_SECONDS):
                async with st.pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
        except Exception as exc:
            if (unavailable := outage.respond(exc, request.url.path)) is not None:
                return unavailable
            raise
        return {"status": "ok", "version": __version__}

    verbs.add_routes(app)  # matched before every other route
    app.include_router(tasks_api.router)
    app.include_router(admin_api.router)
    app.include_router(oversight_api.router)
    app.include_router(oversight_api.ops)
    app.include_router(governance_api.router)
    app.include_router(spend_api.router)
    app.include_router(web_api.router)
    app.include_router(web_api.pages)
    app.router.routes.append(Route(mcp_server.PATH, endpoint=mcp.endpoint(), include_in_schema=False))
    app.add_middleware(ReleaseLent)  # innermost: an agent endpoint's connection goes back before wake-ups
    app.add_middleware(outage.Outage)  # a database outage: 503 and one log line
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(PublishWakes, hub=lambda: app.state.ainarres.wake)
    app.add_middleware(VerbMetrics, metrics=metrics)  # the request log wraps them all (_Service)
    app.add_middleware(limits.RateLimit, settings=settings, signer=lambda: app.state.ainarres.signer)
    app.add_middleware(draining.Draining, drain=drain)  # a draining process turns new work away first
    app.add_middleware(HeadAsGet)  # outermost: everything inside sees the GET it answers
    return app
