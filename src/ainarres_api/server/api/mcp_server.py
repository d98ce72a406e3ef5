"""The MCP face at /mcp: the nine verbs, `me`, `show_task` and `show_card` as tools for a model.

Built on the official `mcp` SDK (MCPServer, streamable HTTP) run stateless: the sessions, and what
each remembers, live in the database (services.mcp_sessions), so any API process serves any request of
a session (ADR 0018). Every HTTP request to /mcp is authenticated with the same bearer token and the
same `services.auth.authenticate` as the REST API, so features are read live on every call; tools then
call the services directly on a pooled connection. A refusal is a tool error (isError) whose text and
structured content carry the stable `code`. While an agent holds a task, the MCP session remembers its
id and lease, so a model may omit both; an explicit `lease` always wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import ConfigDict, Field, ValidationError, WithJsonSchema
from pydantic_core import to_jsonable_python
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from ainarres_api import __version__
from ainarres_api.server.api import outage, schemas, verbs
from ainarres_api.server.api.deps import MAX_NAMED, AppState, Lent, authorization
from ainarres_api.server.errors import AinarresError, Invalid, RateLimited, Unauthenticated
from ainarres_api.server.metrics import VERBS as METRIC_VERBS
from ainarres_api.server.metrics import Metrics
from ainarres_api.server.services import auth, mcp_sessions, pages, tasks, wake
from ainarres_api.server.services.auth import Principal
from ainarres_api.server.services.mcp_sessions import Memory

log = logging.getLogger("ainarres.mcp")

PATH = "/mcp"

REFUSALS = """\
Every refusal comes back as a tool error whose text is JSON: {"code", "status", "detail", "task"?}.
The detail says what to do next. The codes:
- unauthenticated: your token is missing, malformed, expired or revoked, not signed by this service, or its
  family is disabled. Stop; ask your operator for a new token.
- not_eligible: you lack a feature this needs (the detail names it). Do not retry the same call:
  pick another target from the card, or release the task.
- not_found: no such task or lane visible to you. Check the id (claim, me and show_task show ids).
- lease_lost: you no longer hold the task (your hold expired, or it was finished or taken over).
  Stop working on it; nothing you sent was applied. Call claim for new work. (Retrying a call whose
  answer you lost is safe: send the same call again, next; if it was applied, it answers its outcome
  with "replay": true — a move with `next` answers the same `next` too. Name the task_id in a move with
  `next`: without one, the same call sent again is refused, as it could mean the next task's move.)
- rate_limited: too many calls, waiting claims or sessions at once; wait the retry_after seconds.
- unavailable: the service could not reach its database, or a row stayed locked; nothing was changed.
  Wait a few seconds and send the same call again.
- already_holding: you already hold as many tasks as you may. The refusal carries the task and its
  lease (now remembered): finish it with advance, reject, release or block, then claim again.
- illegal_transition: no such way out of the task's stage; the detail lists the legal targets.
- guard_failed: the transition's condition on the task (the card's `guard`) is false. It reads the
  task as created (its payload) and its counters, which no call of yours changes: take another way
  out the card lists, or block for a human. If the detail says the guard did not finish in time,
  try again later.
- conflict: the call clashes with the task's state (e.g. unblocking a task that is not blocked, or an
  idempotency_key reused for a different task). Read the detail; do not repeat the call unchanged.
- payload_too_large: store work products elsewhere and send references (artifacts).
- invalid: an argument is wrong or missing; the detail names it.
"""

INSTRUCTIONS = f"""\
AINARRES is a shared work queue where you pull your own work: nobody assigns tasks. Tasks move
through the stages of a workflow; you may work the stages your features allow.

The loop:
1. `me`: who you are, the lanes you may work in, and what you already hold.
2. `claim`: take the best task you may do now. The answer carries the `task` and its role `card`:
   the card's `instructions` say what to do at this stage, its `transitions` list the ways out
   (advance or reject, to which stage). Code "empty" means nothing is available yet.
3. Do the work outside AINARRES (the task's payload says where). Record milestones with `progress`
   (a note and artifacts: references such as a branch, commit, file path or URL); it also keeps your
   hold alive. Holds expire after the card's lease_seconds; `heartbeat` only keeps a hold alive.
4. End the hold with exactly one of: `advance` (stage done, move it forward), `reject` (send it
   back for rework, naming what to fix), `release` (give it back: you cannot do it), `block` (a
   human must decide). Then claim again.

This session remembers the id and lease of what you hold: you may omit `task_id` and `lease`.

{REFUSALS}"""

# The read tools; the verbs' tools are declared with the verbs (api/verbs.py).
TOOLS: dict[str, str] = {
    "me": """\
Who you are (sub, family), your effective features, the lanes you may work in, and the tasks you
hold with their leases (this session then remembers them). Call it first, and whenever you are
unsure what you hold. `remembered` shows what this session uses when you omit task_id and lease.""",
    "show_task": """\
Read one task (default: the one you hold in this session) and its history, oldest first: claims,
progress notes with artifacts, transitions, and the reasons of rejections; the card of its stage; and
`context`, where the work lives (the project's and lane's context: repository, rules). Reviewers:
read the worker's notes and artifacts here.
Refusals: not_found.""",
    "show_card": """\
Read role cards: a stage's instructions and its legal ways out (transitions, with the features they
need and any guard). With `task_id` (default: the task you hold), the card of that task's current
stage; with `lane`, every stage's card of the lane's workflow.
Refusals: not_eligible (you lack the lane's feature, or no such lane), not_found (no such task).""",
}

TaskIdArg = Annotated[str | None, Field(
    description="the task's id; omit it to mean the task you hold in this session")]
LeaseArg = Annotated[str | None, Field(
    description="the lease from claim; omit it to use the one this session remembers")]
_TASK_ID_REQUIRED = Annotated[str, Field(description="the task's id")]

# -- authentication ----------------------------------------------------------------------------------

class Agent(AuthenticatedUser):
    """The authenticated caller of one MCP HTTP request (scope["user"]), as the SDK expects it. A session
    belongs to the agent that opened it: the guard answers another agent's request for it as if the
    session did not exist (services.mcp_sessions.touch)."""

    def __init__(self, principal: Principal, token: str) -> None:
        super().__init__(AccessToken(token=token, client_id=principal.family, scopes=[],
                                     subject=principal.sub))
        self.principal = principal
        self.bearer = token


def _bearer(scope: Scope) -> str | None:
    """The bearer token of the request (one Authorization header only: deps.authorization), or None."""
    value = authorization(scope.get("headers") or [])
    if value is None:
        return None
    scheme, _, cred = value.partition(" ")
    token = cred.strip()
    return token if scheme.lower() == "bearer" and token else None


class _Guard:
    """Authenticates every request to /mcp before the SDK sees it (401 problem+json otherwise), and keeps the
    MCP sessions in the database (services.mcp_sessions), so any API process serves any request:

    - an `initialize` POST opens a session (429 past the agent's bound, on every process together) and its
      answer carries the new Mcp-Session-Id;
    - a request naming a session is served only if that session is live and the caller's agent opened it
      (else 404, as if it did not exist: the client opens a new one); it is touched, and the tools read
      what it remembers;
    - DELETE ends it; GET is 405 (no server-to-client stream: every answer comes on its POST).

    The SDK itself runs stateless: each request is served on its own, whichever process receives it.
    """

    def __init__(self, face: McpFace) -> None:
        self.face = face

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        st = self.face.state()
        method = scope.get("method")
        sid = next((bytes(v).decode("latin-1") for k, v in scope.get("headers") or [] if k == b"mcp-session-id"),
                   None)
        idle = st.settings.mcp_session_idle_seconds
        opened: str | None = None
        try:
            token = _bearer(scope)
            if token is None:
                raise Unauthenticated("send Authorization: Bearer <token> with every MCP request; an admin "
                                      "mints tokens with POST /v1/tokens")
            async with st.pool.acquire() as conn:
                principal = await auth.authenticate(conn, st.signer, token)
                if method == "GET":
                    await _jsonrpc_error("Method Not Allowed: this server opens no stream; every answer comes on "
                                         "its POST", 405, {"Allow": "POST, DELETE"})(scope, receive, send)
                    return
                if sid is not None and method == "DELETE":
                    if await mcp_sessions.end(conn, sid, principal.sub, idle):
                        await Response(status_code=200)(scope, receive, send)
                    else:
                        await _jsonrpc_error("Session not found", 404)(scope, receive, send)
                    return
                if sid is not None:
                    memory = await mcp_sessions.touch(conn, sid, principal.sub, idle)
                    if memory is None:  # unknown, expired, ended, or another agent's: all alike
                        await _jsonrpc_error("Session not found", 404)(scope, receive, send)
                        return
                    scope[_SESSION] = (sid, memory)
            if sid is None and method == "POST":  # the body is read with no connection held
                body, receive = await _buffered(receive)
                if _initializes(body):
                    async with st.pool.acquire() as conn:
                        opened = await mcp_sessions.open_session(
                            conn, principal.sub, per_agent=st.settings.mcp_sessions_per_agent,
                            at_most=st.settings.mcp_max_sessions, idle_seconds=idle)
        except (Unauthenticated, RateLimited) as exc:
            await _problem(exc, scope, receive, send)
            return
        scope["user"] = Agent(principal, token)
        if opened is None:
            await self.face.manager_app(scope, receive, send)
            return

        status = 0

        async def naming(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                if status < 400:
                    msg = {**msg, "headers": [*(msg.get("headers") or []),
                                              (b"mcp-session-id", opened.encode("latin-1"))]}
            await send(msg)

        try:
            await self.face.manager_app(scope, receive, naming)
        finally:
            if not 0 < status < 400:  # nothing was established: the session is not kept
                async with st.pool.acquire() as conn:
                    await mcp_sessions.end(conn, opened, principal.sub, idle)


_SESSION = "ainarres.mcp_session"  # scope key: (session id, its memory) for a request of a session


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """The request's body (bounded by the app's BodyLimit), and a `receive` that hands it over again."""
    chunks: list[bytes] = []
    first: Message | None = None
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            first = msg
            break
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = b"".join(chunks)
    replayed = False

    async def again() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return first if first is not None else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, again


def _initializes(body: bytes) -> bool:
    """Whether a JSON-RPC body (one message or a batch) is an `initialize` request."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    msgs = doc if isinstance(doc, list) else [doc]
    return any(isinstance(m, dict) and m.get("method") == "initialize" for m in msgs)


def _jsonrpc_error(message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON-RPC error without a request id, as the SDK answers for a session it does not know."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _problem(exc: AinarresError, scope: Scope, receive: Receive, send: Send) -> None:
    body = {"type": f"urn:ainarres:problem:{exc.code}", "title": exc.title, "status": exc.status,
            "code": exc.code, "detail": exc.detail, "instance": scope.get("path")}
    headers = {"WWW-Authenticate": 'Bearer realm="ainarres"'} if exc.status == 401 else {}
    if (after := exc.extra.get("retry_after")) is not None:
        headers["Retry-After"] = str(after)
    resp = JSONResponse(body, status_code=exc.status, media_type="application/problem+json", headers=headers)
    await resp(scope, receive, send)


# -- what a session remembers ------------------------------------------------------------------------

@dataclass
class Call:
    """One tool call: the caller, what its session remembers (from the database), and the shared state."""

    agent: Agent
    memory: Memory
    st: AppState
    memory_id: str = ""
    remembered: dict[str, Any] = field(default_factory=dict)
    again: dict[str, str] | None = None  # the previous call, if it was a verb on a held task (Memory.retry)

    @property
    def p(self) -> Principal:
        return self.agent.principal

    def db(self) -> Any:
        """A pooled connection for the call (services open their own transactions on it)."""
        return self.st.pool.acquire()

    async def keep(self) -> None:
        """Store the memory if the call changed it."""
        now = self.memory.stored()
        if now != self.remembered:
            async with self.db() as conn:
                await mcp_sessions.remember(conn, self.memory_id, self.memory)
            self.remembered = now

    def task_id(self, given: str | None) -> uuid.UUID:
        tid = given or self.memory.current()
        if tid is None:
            raise Invalid("task_id: you hold no task in this session; call claim first (or pass task_id)")
        try:
            return uuid.UUID(tid)
        except ValueError:
            raise Invalid(f"task_id: {tid!r} is not a task id (a UUID, as claim and me show)") from None

    def lease(self, task_id: uuid.UUID, given: str | None) -> str:
        lease = given or self.memory.leases.get(str(task_id))
        if lease is None:
            raise Invalid(f"lease: this session remembers no lease for task {task_id}; pass the lease "
                          "from claim (me shows the leases of what you hold)")
        return lease


# -- results -----------------------------------------------------------------------------------------

def _digest(tool: str, args: dict[str, Any]) -> str:
    """A call as sent (its tool and arguments), for telling the same call sent again."""
    sent = json.dumps([tool, {k: v for k, v in args.items() if v is not None}], sort_keys=True,
                      default=to_jsonable_python)
    return hashlib.sha256(sent.encode()).hexdigest()


def _ok(out: dict[str, Any]) -> CallToolResult:
    data = to_jsonable_python(out)
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data))], structured_content=data)


def _refusal(exc: AinarresError) -> CallToolResult:
    body: dict[str, Any] = {"code": exc.code, "status": exc.status, "detail": exc.detail}
    if exc.task is not None:
        body["task"] = exc.task
    body.update({k: v for k, v in exc.extra.items() if v is not None})
    data = to_jsonable_python(body)
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data))], structured_content=data,
                          is_error=True)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its local `$defs` references replaced by what they name (tool arguments are
    schemas of their own, without a shared `$defs`)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


def _validated(model: type[schemas.Body], /, **fields: Any) -> Any:
    """The tool's arguments checked by the same model, so the same bounds, as the HTTP body."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        errs = [{"field": ".".join(str(p) for p in e["loc"]) or "arguments", "detail": e["msg"]}
                for e in exc.errors()]
        raise Invalid("; ".join(f"{e['field']}: {e['detail']}" for e in errs[:10]), errors=errs) from None


# The arguments a tool call sent that its tool does not take, with the ones it does (set while the SDK validates
# the call's arguments, read by McpFace._run in the same task).
_UNKNOWN_ARGUMENTS: ContextVar[tuple[list[str], list[str]]] = ContextVar("mcp_unknown_arguments",
                                                                           default=([], []))


def _refuse_unknown_arguments(registered: Tool) -> None:
    """Make a registered tool refuse arguments it does not take, as an HTTP body refuses unknown fields: the
    SDK's argument model drops them silently (`artefacts` for `artifacts`, `wait_second`, `lanes`), and the
    model that misspelt one would believe it had been heard. Its schema says `additionalProperties: false`;
    the call itself is refused by McpFace._run as `invalid`, after the caller is authenticated."""
    meta = registered.fn_metadata
    base = meta.arg_model
    known = sorted(f.alias or name for name, f in base.model_fields.items())

    def model_dump_one_level(self: Any) -> dict[str, Any]:
        _UNKNOWN_ARGUMENTS.set((sorted(self.model_extra or {}), known))
        return base.model_dump_one_level(self)

    # Named as the SDK named it, so that its own validation errors name the tool's arguments as before.
    meta.arg_model = type(base.__name__, (base,), {
        "model_config": ConfigDict(**{**base.model_config, "extra": "allow"}),
        "model_dump_one_level": model_dump_one_level, "__module__": base.__module__})
    registered.parameters["additionalProperties"] = False


def _no_unknown_arguments() -> None:
    unknown, known = _UNKNOWN_ARGUMENTS.get()
    if unknown:
        _UNKNOWN_ARGUMENTS.set(([], []))
        named = unknown[:MAX_NAMED]  # as the HTTP face: a call of a thousand names earns no longer answer
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise Invalid(f"{named[0]}: this tool takes no argument {', '.join(map(repr, named))}; {takes}",
                      errors=[{"field": name, "detail": "this tool takes no such argument"} for name in named])


# -- the server --------------------------------------------------------------------------------------

class McpFace:
    """The MCP server, its per-session memory and the ASGI endpoint the app routes /mcp to."""

    def __init__(self, state: Callable[[], AppState], metrics: Metrics | None = None) -> None:
        self.state = state
        self.metrics = metrics  # the verbs' calls counted as over HTTP (server/metrics.py: VerbMetrics)
        root = logging.getLogger()
        saved = (root.handlers[:], root.level)
        self.server: MCPServer[Any] = MCPServer(
            "ainarres", title="AINARRES", version=__version__, instructions=INSTRUCTIONS,
            description="Pull, hold and move your own work in a shared PostgreSQL-backed queue.",
        )
        # MCPServer configures the root logger (logging.basicConfig); the service owns logging.
        root.handlers[:], root.level = saved
        self._register()
        # The SDK's tool list (it offers no public way to reach a registered tool's argument model).
        for registered in self.server._tool_manager.list_tools():
            _refuse_unknown_arguments(registered)
        self._manager_app: StreamableHTTPASGIApp | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the MCP session manager for the app's lifetime (call inside the app's lifespan)."""
        # A session manager runs once; each lifespan gets a new one, so an app may be restarted.
        # Stateless: the SDK keeps nothing between requests; the sessions and what they remember are in the
        # database (the guard, services.mcp_sessions), so any process serves any request (ADR 0018).
        self.server.streamable_http_app(
            streamable_http_path=PATH, stateless_http=True,
            # Callers authenticate with a bearer token, never a cookie, so DNS rebinding gains an
            # attacker nothing; the Host header is left to the deployment (proxies rewrite it).
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        manager = self.server.session_manager
        async with manager.run():
            self._manager_app = StreamableHTTPASGIApp(manager)
            try:
                yield
            finally:
                self._manager_app = None

    async def manager_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._manager_app is None:
            resp = JSONResponse({"code": "unavailable", "detail": "the service is starting or stopping"},
                                status_code=503)
            await resp(scope, receive, send)
            return
        await self._manager_app(scope, receive, send)

    def endpoint(self) -> _Guard:
        """The ASGI app to route PATH to."""
        return _Guard(self)

    async def _run(self, ctx: Context[Any, Any],
                   body: Callable[[Call], Awaitable[dict[str, Any]]]) -> CallToolResult:
        """Resolve the caller, run the tool's service calls, and shape the result or the refusal."""
        call: Call | None = None
        try:
            call = await self._call(ctx)
            # Only the very next call may be a retry; but which task an identical move means, after a move that
            # took a `next` hold and named no task (Memory.retry "next"), stays asked until a move answers it.
            call.again = call.memory.retry
            call.memory.retry = call.again if call.again is not None and "next" in call.again else None
            _no_unknown_arguments()
            with wake.recording() as rec:
                out = await body(call)
            call.st.wake.publish(rec)  # the services committed: wake claims waiting for this work
            result = _ok(out)
        except AinarresError as exc:
            result = _refusal(exc)
        except Exception as exc:
            # What the HTTP face refuses too: a value the database cannot take (translate), or the database out
            # of reach (503 `unavailable`, one log line) — a refusal with its code, not a bare tool error.
            err = outage.refusal_of(exc, PATH)
            if err is None:
                raise
            result = _refusal(err)
        if call is not None:
            try:
                await call.keep()  # what the call taught the memory (a refusal too: a dead lease is forgotten)
            except Exception as exc:
                # The answer stands (a claim it reports has committed): the session only forgets it, and the
                # agent's next claim names what it holds (already_holding).
                if outage.noted(exc, PATH) is None:
                    raise
        return result

    async def _call(self, ctx: Context[Any, Any]) -> Call:
        request = ctx.request_context.request
        scope = getattr(request, "scope", {}) if request is not None else {}
        agent = scope.get("user")
        if not isinstance(agent, Agent):  # every request to PATH passes the guard; this is a backstop
            raise Unauthenticated("send Authorization: Bearer <token> with every MCP request")
        st = self.state()
        session = scope.get(_SESSION)
        if session is not None:  # a request of a session: the guard read its memory
            sid, memory = session
        else:  # sessionless (the 2026-07-28 protocol, or a client that never initialized): one memory per token
            async with st.pool.acquire() as conn:
                sid, memory = await mcp_sessions.token_memory(conn, agent.principal.jti, agent.principal.sub,
                                                              st.settings.mcp_session_idle_seconds)
        return Call(agent, memory, st, sid, memory.stored())

    def _count(self, verb: str, code: str, started: float, next_claim: tuple[str, float] | None) -> None:
        """A verb's call in the metrics, as VerbMetrics counts one over HTTP: the same verbs (metrics.VERBS), a
        move's `next` claim too."""
        if self.metrics is None or verb not in METRIC_VERBS:
            return
        self.metrics.observe(verb, code, time.perf_counter() - started)
        if next_claim is not None:
            self.metrics.observe("claim", *next_claim)

    def _verb_tool(self, verb: verbs.Verb) -> Callable[..., Awaitable[CallToolResult]]:
        """The MCP tool of a verb, made from its declaration: its arguments are the verb's body fields (the
        lease, and the task id of a held task, may be left to what the session remembers); it runs the
        verb's own work with the caller the guard authenticated."""
        fields = verb.body.model_fields
        body_schema = verb.body.model_json_schema()
        takes_lease = "lease" in fields

        async def tool(ctx: Context[Any, Any], **args: Any) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                started = time.perf_counter()
                try:
                    return await work(call, started)
                except AinarresError as exc:  # decided before the verb ran too (the memory, the arguments)
                    self._count(verb.name, exc.code, started, None)
                    raise

            async def work(call: Call, started: float) -> dict[str, Any]:
                sent = _digest(verb.tool, args)
                again = call.again if call.again is not None and call.again["call"] == sent else {}
                if again.get("next"):  # refused until the caller names the task (the marker stays)
                    raise Invalid(
                        f"task_id: this call is the same as your last move, which was applied: it moved task "
                        f"{again['task']}, and its `next` claimed task {again['next']} for you, which you hold now "
                        f"(show_task shows it). Nothing more was done. To move task {again['next']}, send the "
                        f"call with task_id={again['next']}.")
                named = args.pop("task_id", None)
                task_id = call.task_id(named or again.get("task")) if verb.on_task else None
                used = None
                if takes_lease:
                    assert task_id is not None
                    used = args["lease"] = call.lease(task_id, args.get("lease") or again.get("lease"))
                    call.memory.retry = {"call": sent, "task": str(task_id), "lease": used}
                parsed = _validated(verb.body, **args)
                st = call.st
                lent = Lent(await st.pool.acquire(), st.pool, call.agent.bearer, auth.named(call.p))
                lent.caller = call.p  # read by the guard, on this request
                vc = verbs.Call(st, lent)
                try:
                    out, _ = await verbs.run(verb, vc, task_id, parsed)
                    self._count(verb.name, str(out.get("code")), started, vc.next_claim)
                except AinarresError as exc:
                    held, lease = exc.task, exc.extra.get("lease")
                    if exc.code == "already_holding" and held and lease:
                        call.memory.hold(str(held["id"]), lease["id"])
                    if exc.code == "lease_lost" and task_id and call.memory.leases.get(str(task_id)) == used:
                        call.memory.forget(str(task_id))  # a lease found dead is forgotten
                    raise
                finally:
                    await lent.release()
                if out.get("lease") and out.get("task"):  # claimed, or renewed: remember the hold
                    call.memory.hold(str(out["task"]["id"]), out["lease"]["id"])
                if verb.ends_hold and task_id is not None:
                    call.memory.forget(str(task_id))
                nxt = out.get("next") or {}
                if nxt.get("lease") and nxt.get("task"):  # the next claim a transition asked for (or still held)
                    call.memory.hold(str(nxt["task"]["id"]), nxt["lease"]["id"])
                    # Without a task_id, the same call sent next could be this move's retry (its answer lost) or
                    # the move of the task just claimed: it is refused then, naming both. With one, it is a retry.
                    if call.memory.retry is not None and not named:
                        call.memory.retry = {**call.memory.retry, "next": str(nxt["task"]["id"])}
                return out
            return await self._run(ctx, body)

        params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context[Any, Any])]
        if verb.on_task:
            params.append(inspect.Parameter("task_id", inspect.Parameter.KEYWORD_ONLY, default=None if verb.held
                                            else inspect.Parameter.empty,
                                            annotation=TaskIdArg if verb.held else _TASK_ID_REQUIRED))
        for name, f in fields.items():
            if name == "lease":
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                annotation=LeaseArg))
                continue
            # Checked by the verb's body model (_validated), so a refusal is the service's own `invalid`; the
            # model only lends the argument its JSON schema — the body's own, bounds and patterns included.
            shown = _inlined({**body_schema["properties"][name], "$defs": body_schema.get("$defs", {})})
            shown.pop("title", None)
            annotation = Annotated[Any, WithJsonSchema(shown), Field(description=f.description)]
            default = inspect.Parameter.empty if f.is_required() else f.get_default(call_default_factory=True)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
        tool.__signature__ = inspect.Signature(params, return_annotation=CallToolResult)  # type: ignore[attr-defined]
        tool.__annotations__ = {p.name: p.annotation for p in params} | {"return": CallToolResult}
        tool.__name__ = verb.tool
        return tool

    def _register(self) -> None:
        srv, run, face = self.server, self._run, self
        reading = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
        acting = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

        def tool(name: str, title: str, hints: ToolAnnotations) -> Callable[[Any], Any]:
            return srv.tool(name=name, title=title, annotations=hints, description=TOOLS[name])

        @tool("me", "Who am I, what do I hold", reading)
        async def me(ctx: Context[Any, Any]) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                async with call.db() as conn:
                    out = await tasks.me(conn, call.p)
                for h in out["held"]:
                    call.memory.hold(str(h["task"]["id"]), h["lease"]["id"])
                remembered = {"current": call.memory.current(), "leases": dict(call.memory.leases)}
                return {"code": "ok", **out, "remembered": remembered}
            return await run(ctx, body)

        for verb in verbs.VERBS:
            srv.add_tool(face._verb_tool(verb), name=verb.tool, title=verb.tool_title, description=verb.tool_text,
                         annotations=acting)

        @tool("show_task", "Show a task and its history", reading)
        async def show_task(ctx: Context[Any, Any], task_id: TaskIdArg = None) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                tid = call.task_id(task_id)
                async with call.db() as conn:
                    task = await tasks.get(conn, call.p, tid)
                    history, cut = pages.bounded(await tasks.events(conn, call.p, tid, 0, 200),
                                                 call.st.settings.max_read_bytes)
                    card = await tasks.card_of(conn, call.p, tid)
                return {"code": "ok", "task": task, "events": history, "more_events": cut, "card": card,
                        "context": card["context"]}
            return await run(ctx, body)

        @tool("show_card", "Show a role card", reading)
        async def show_card(
            ctx: Context[Any, Any], task_id: TaskIdArg = None,
            lane: Annotated[str | None, Field(description="a lane's key: show all its cards instead")] = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                async with call.db() as conn:
                    if lane is not None and task_id is None:
                        return {"code": "ok", **await tasks.lane_cards(conn, call.p, lane)}
                    return {"code": "ok", "card": await tasks.card_of(conn, call.p, call.task_id(task_id))}
            return await run(ctx, body)
