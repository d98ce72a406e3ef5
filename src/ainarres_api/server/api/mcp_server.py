"""The MCP face at /mcp: the nine verbs, `me`, `show_task` and `show_card` as tools for a model.

Built on the official `mcp` SDK (MCPServer, streamable HTTP, stateful sessions). Every HTTP request
to /mcp is authenticated with the same bearer token and the same `services.auth.authenticate` as
the REST API, so features are read live on every call; tools then call the services directly on a
pooled connection. A refusal is a tool error (isError) whose text and structured content carry the
stable `code`. While an agent holds a task, the MCP session remembers its id and lease, so a model
may omit both; an explicit `lease` always wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field, ValidationError
from pydantic_core import to_jsonable_python
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from ainarres_api import __version__
from ainarres_api.server.api import schemas
from ainarres_api.server.api.deps import AppState
from ainarres_api.server.db.pool import translate
from ainarres_api.server.errors import AinarresError, Invalid, Unauthenticated
from ainarres_api.server.services import auth, claiming, tasks, wake
from ainarres_api.server.services.auth import Principal

log = logging.getLogger("ainarres.mcp")

PATH = "/mcp"
_SESSION_HEADER = "mcp-session-id"
_MAX_MEMORIES = 10_000

REFUSALS = """\
Every refusal comes back as a tool error whose text is JSON: {"code", "status", "detail", "task"?}.
The detail says what to do next. The codes:
- unauthenticated: your token is missing, expired or revoked. Stop; ask your operator for a new token.
- not_eligible: you lack a feature this needs (the detail names it). Do not retry the same call:
  pick another target from the card, or release the task.
- not_found: no such task or lane visible to you. Check the id (claim, me and show_task show ids).
- lease_lost: you no longer hold the task (your hold expired, or it was finished or taken over).
  Stop working on it; nothing you sent was applied. Call claim for new work.
- already_holding: you already hold as many tasks as you may. The refusal carries the task and its
  lease (now remembered): finish it with advance, reject, release or block, then claim again.
- illegal_transition: no such way out of the task's stage; the detail lists the legal targets.
- guard_failed: the transition's condition on the task (the card's `guard`) is false. Fix what it
  checks (e.g. record the missing result with progress), then try again; or release/block.
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

TOOLS: dict[str, str] = {
    "me": """\
Who you are (sub, family), your effective features, the lanes you may work in, and the tasks you
hold with their leases (this session then remembers them). Call it first, and whenever you are
unsure what you hold. `remembered` shows what this session uses when you omit task_id and lease.""",
    "claim": """\
Take the best task you may do now and hold it. Returns code "claimed" with `task`, `lease` (your
proof of holding; this session remembers it) and `card` (what to do at this stage: `instructions`,
and `transitions`, the legal ways out). Returns code "empty" when nothing is available: not an
error; pass wait_seconds (up to 60) to wait for work, or try again later. You hold at most as many
tasks as your family allows, usually one.
Refusals: already_holding (you already hold a task: the refusal carries it and its lease, now
remembered; finish it with advance, reject, release or block, then claim again).""",
    "create_task": """\
Create a new task in a lane, at the first stage of the lane's workflow: to split work into pieces
or to hand work to others. Needs the lane's feature and the role that takes the workflow's first
step. Put what the worker needs in `payload` (references, not large content). When you retry, pass
the same `idempotency_key`: the same key with the same content returns the existing task (code
"existing") instead of a duplicate.
Refusals: not_eligible (you may not create in this lane), not_found (no such lane), conflict (the
key was used for different content: use a new key), invalid, payload_too_large.""",
    "heartbeat": """\
Keep your hold on a task alive without reporting anything. A hold expires after the card's
lease_seconds; call this (or progress) well before that while you work.
Refusals: lease_lost (you no longer hold the task: stop working on it and claim again), not_found.""",
    "progress": """\
Record what you have done so far on the task you hold: a short note, and artifacts (references to
work products: a branch, commit, file path or URL). Renews your hold. Call it at milestones and
every few minutes; reviewers and humans read these notes.
Refusals: lease_lost (stop; claim again), not_found, invalid, payload_too_large.""",
    "advance": """\
Finish your stage: move the task you hold forward to stage `to` (a transition of kind advance on
its card), with a note and artifacts saying what you did. Your hold ends.
Refusals: illegal_transition (no advance from this stage to `to`; the detail lists the legal
targets), not_eligible (you lack the features that way out needs: pick another target, or
release), guard_failed (a condition on the task, the card's guard, is false: fix what it checks,
then retry), lease_lost (stop; claim again).""",
    "reject": """\
Send the task you hold back to an earlier stage `to` for rework (a transition of kind reject on its
card), with the reason: what exactly must be fixed. Usually a reviewer's verb. Your hold ends. If
the stage's rework cap is reached, the task is blocked for a human instead (code "blocked").
Refusals: illegal_transition (the detail lists the legal targets), not_eligible, guard_failed,
lease_lost (stop; claim again).""",
    "release": """\
Give the task you hold back unfinished so that someone else (perhaps a stronger agent) can take it:
when you cannot do it. Counts as a failed attempt; repeated attempts escalate the task or block it
for a human (code "blocked"). Your hold ends.
Refusals: lease_lost, not_found.""",
    "block": """\
Park the task you hold for a human: when work cannot go on without a decision, access or
information you cannot get. Say exactly what is needed in `reason`. Your hold ends; the task stays
out of the queue until someone unblocks it.
Refusals: lease_lost, not_found, invalid.""",
    "unblock": """\
Make a blocked task claimable again once what blocked it is resolved (its attempts start over). No
hold needed; needs seat:overseer, or the features to work the task's stage.
Refusals: not_eligible, conflict (the task is not blocked), not_found.""",
    "show_task": """\
Read one task (default: the one you hold in this session) and its history, oldest first: claims,
progress notes with artifacts, transitions, and the reasons of rejections. Reviewers: read the
worker's notes and artifacts here.
Refusals: not_found.""",
    "show_card": """\
Read role cards: a stage's instructions and its legal ways out (transitions, with the features they
need and any guard). With `task_id` (default: the task you hold), the card of that task's current
stage; with `lane`, every stage's card of the lane's workflow.
Refusals: not_eligible (you lack the lane's feature, or no such lane), not_found (no such task).""",
}

# The tools check their arguments with the HTTP bodies' models; the lease is resolved afterwards
# (remembered or given) and checked by the service, so the models get a stand-in.
_ANY_LEASE = uuid.UUID(int=0)

TaskIdArg = Annotated[str | None, Field(
    description="the task's id; omit it to mean the task you hold in this session")]
LeaseArg = Annotated[str | None, Field(
    description="the lease from claim; omit it to use the one this session remembers")]
ArtifactsArg = Annotated[list[dict[str, Any]] | None, Field(
    description="references to work products, each {type, uri|path|sha|name, hash?}, e.g. "
                '{"type": "commit", "sha": "4f2a…"} or {"type": "file", "path": "src/app.py"}')]
ToArg = Annotated[str, Field(description="the target stage's key, from the card's transitions")]


# -- authentication ----------------------------------------------------------------------------------

class Agent(AuthenticatedUser):
    """The authenticated caller of one MCP HTTP request (scope["user"]).

    Being an AuthenticatedUser lets the SDK bind each MCP session to the agent that opened it: a
    request for the session with another agent's token is answered as if the session did not exist.
    """

    def __init__(self, principal: Principal, token: str) -> None:
        super().__init__(AccessToken(token=token, client_id=principal.family, scopes=[],
                                     subject=principal.sub))
        self.principal = principal
        self.bearer = token


def _bearer(scope: Scope) -> str | None:
    for k, v in scope.get("headers") or []:
        if k == b"authorization":
            scheme, _, cred = bytes(v).decode("latin-1").partition(" ")
            token = cred.strip()
            if scheme.lower() == "bearer" and token:
                return token
    return None


class _Guard:
    """Authenticates every request to /mcp before the SDK sees it; 401 problem+json otherwise."""

    def __init__(self, face: McpFace) -> None:
        self.face = face

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        st = self.face.state()
        token = _bearer(scope)
        try:
            if token is None:
                raise Unauthenticated("send Authorization: Bearer <token> with every MCP request; an admin "
                                      "mints tokens with POST /v1/tokens")
            async with st.pool.acquire() as conn:
                principal = await auth.authenticate(conn, st.signer, token)
        except Unauthenticated as exc:
            body = {"type": f"urn:ainarres:problem:{exc.code}", "title": exc.title, "status": exc.status,
                    "code": exc.code, "detail": exc.detail, "instance": scope.get("path")}
            resp = JSONResponse(body, status_code=401, media_type="application/problem+json",
                                headers={"WWW-Authenticate": 'Bearer realm="ainarres"'})
            await resp(scope, receive, send)
            return
        scope["user"] = Agent(principal, token)
        await self.face.manager_app(scope, receive, send)


# -- what a session remembers ------------------------------------------------------------------------

@dataclass
class Memory:
    """The holds one MCP session knows of: task id → lease id, and the task claimed last."""

    leases: dict[str, str] = field(default_factory=dict)
    last: str | None = None

    def hold(self, task_id: str, lease: str) -> None:
        self.leases[task_id] = lease
        self.last = task_id

    def forget(self, task_id: str) -> None:
        self.leases.pop(task_id, None)
        if self.last == task_id:
            self.last = next(reversed(self.leases), None)

    def current(self) -> str | None:
        if self.last in self.leases:
            return self.last
        return next(reversed(self.leases), None)


@dataclass
class Call:
    """One tool call: the caller, what its session remembers, and the shared state."""

    agent: Agent
    memory: Memory
    st: AppState

    @property
    def p(self) -> Principal:
        return self.agent.principal

    def db(self) -> Any:
        """A pooled connection for the call (services open their own transactions on it)."""
        return self.st.pool.acquire()

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


def _validated(model: type[schemas.Body], **fields: Any) -> Any:
    """The tool's arguments checked by the same model, so the same bounds, as the HTTP body."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        errs = [{"field": ".".join(str(p) for p in e["loc"]) or "arguments", "detail": e["msg"]}
                for e in exc.errors()]
        raise Invalid("; ".join(f"{e['field']}: {e['detail']}" for e in errs[:10]), errors=errs) from None


def _artifacts(body: Any) -> list[dict[str, Any]]:
    return [a.model_dump(exclude_none=True) for a in body.artifacts]


# -- the server --------------------------------------------------------------------------------------

class McpFace:
    """The MCP server, its per-session memory and the ASGI endpoint the app routes /mcp to."""

    def __init__(self, state: Callable[[], AppState]) -> None:
        self.state = state
        self._memories: OrderedDict[tuple[str, ...], Memory] = OrderedDict()
        root = logging.getLogger()
        saved = (root.handlers[:], root.level)
        self.server: MCPServer[Any] = MCPServer(
            "ainarres", title="AINARRES", version=__version__, instructions=INSTRUCTIONS,
            description="Pull, hold and move your own work in a shared PostgreSQL-backed queue.",
        )
        # MCPServer configures the root logger (logging.basicConfig); the service owns logging.
        root.handlers[:], root.level = saved
        self._register()
        self._manager_app: StreamableHTTPASGIApp | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the MCP session manager for the app's lifetime (call inside the app's lifespan)."""
        # A session manager runs once; each lifespan gets a new one, so an app may be restarted.
        self.server.streamable_http_app(
            streamable_http_path=PATH, stateless_http=False,
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
                self._memories.clear()

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

    def _memory(self, ctx: Context[Any, Any], agent: Agent) -> Memory:
        # One memory per MCP session (and agent: the SDK binds a session to the agent that opened it).
        # Sessionless requests (the 2026-07-28 protocol) share one memory per token.
        headers = ctx.headers or {}
        sid = headers.get(_SESSION_HEADER)
        key = ("session", sid, agent.principal.sub) if sid else ("token", agent.principal.jti)
        mem = self._memories.get(key)
        if mem is None:
            mem = self._memories[key] = Memory()
            while len(self._memories) > _MAX_MEMORIES:  # bounded: sessions end without telling us
                self._memories.popitem(last=False)
        else:
            self._memories.move_to_end(key)
        return mem

    async def _run(self, ctx: Context[Any, Any],
                   body: Callable[[Call], Awaitable[dict[str, Any]]]) -> CallToolResult:
        """Resolve the caller, run the tool's service calls, and shape the result or the refusal."""
        try:
            call = self._call(ctx)
            with wake.recording() as rec:
                out = await body(call)
            call.st.wake.publish(rec)  # the services committed: wake claims waiting for this work
            return _ok(out)
        except AinarresError as exc:
            return _refusal(exc)
        except asyncpg.PostgresError as exc:
            err = translate(exc)
            if err is None:
                raise
            return _refusal(err)

    def _call(self, ctx: Context[Any, Any]) -> Call:
        request = ctx.request_context.request
        agent = getattr(request, "scope", {}).get("user") if request is not None else None
        if not isinstance(agent, Agent):  # every request to PATH passes the guard; this is a backstop
            raise Unauthenticated("send Authorization: Bearer <token> with every MCP request")
        return Call(agent, self._memory(ctx, agent), self.state())

    async def _claim(self, call: Call, lane: str | None, wait_seconds: float) -> dict[str, Any]:
        """Claim; while there is nothing and time is left, wait for a wake-up and claim again."""
        st, p = call.st, call.p
        if wait_seconds <= 0:
            async with st.pool.acquire() as conn:
                return await tasks.claim(conn, p, lane, st.limits)
        return await claiming.claim_waiting(st.pool, st.signer, st.wake, st.limits, call.agent.bearer, p, lane,
                                            wait_seconds)

    def _register(self) -> None:
        srv, run, face = self.server, self._run, self
        reading = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
        acting = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

        def tool(name: str, title: str, hints: ToolAnnotations) -> Callable[[Any], Any]:
            return srv.tool(name=name, title=title, annotations=hints, description=TOOLS[name])

        def _end(call: Call, task_id: uuid.UUID, out: dict[str, Any]) -> dict[str, Any]:
            call.memory.forget(str(task_id))  # the hold ended
            return out

        async def _held(call: Call, task_id: str | None, lease: str | None,
                        fn: Callable[[asyncpg.Connection, uuid.UUID, uuid.UUID], Awaitable[dict[str, Any]]]
                        ) -> tuple[uuid.UUID, dict[str, Any]]:
            """Run a verb on a held task (remembered unless named); a lease found dead is forgotten."""
            tid = call.task_id(task_id)
            used = call.lease(tid, lease)
            try:
                lid = uuid.UUID(used)
            except ValueError:
                raise Invalid(f"lease: {used!r} is not a lease id (a UUID, as claim returns)") from None
            try:
                async with call.db() as conn:
                    return tid, await fn(conn, tid, lid)
            except AinarresError as exc:
                if exc.code == "lease_lost" and call.memory.leases.get(str(tid)) == used:
                    call.memory.forget(str(tid))
                raise

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

        @tool("claim", "Take the next task", acting)
        async def claim(
            ctx: Context[Any, Any],
            lane: Annotated[str | None, Field(description="claim only from this lane (see me)")] = None,
            wait_seconds: Annotated[float, Field(
                description="if nothing is available, wait up to this many seconds (0-60) for work")] = 0,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.ClaimIn, lane=lane, wait_seconds=wait_seconds)
                try:
                    out = await face._claim(call, args.lane, args.wait_seconds)
                except AinarresError as exc:
                    held, lease = exc.task, exc.extra.get("lease")
                    if exc.code == "already_holding" and held and lease:
                        call.memory.hold(str(held["id"]), lease["id"])
                    raise
                if out["code"] == "claimed":
                    call.memory.hold(str(out["task"]["id"]), out["lease"]["id"])
                return out
            return await run(ctx, body)

        @tool("create_task", "Create a task", acting)
        async def create_task(
            ctx: Context[Any, Any],
            lane: Annotated[str, Field(description="the lane's key (me lists yours)")],
            title: Annotated[str, Field(description="a short imperative title, at most 200 characters")],
            payload: Annotated[dict[str, Any] | None, Field(
                description="what the worker needs: a JSON object (goal, repo, paths, checks)")] = None,
            priority: Annotated[int, Field(description="higher is claimed first; default 0")] = 0,
            required_features: Annotated[list[str] | None, Field(
                description='extra features a claimer must have, e.g. ["area:backend"]')] = None,
            depends_on: Annotated[list[str] | None, Field(
                description="ids of tasks that must finish before this one can be claimed")] = None,
            idempotency_key: Annotated[str | None, Field(
                description="a key of your choosing that makes retries safe")] = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.TaskCreate, lane=lane, title=title, payload=payload,
                                  priority=priority, required_features=required_features,
                                  depends_on=depends_on, idempotency_key=idempotency_key)
                async with call.db() as conn:
                    out, created = await tasks.create(conn, call.p, args.model_dump(mode="json"),
                                                      call.st.limits)
                return {"code": "created" if created else "existing", **out}
            return await run(ctx, body)

        @tool("heartbeat", "Keep my hold alive", acting)
        async def heartbeat(ctx: Context[Any, Any], task_id: TaskIdArg = None,
                            lease: LeaseArg = None) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                tid, out = await _held(call, task_id, lease,
                                       lambda conn, tid, lid: tasks.heartbeat(conn, call.p, tid, lid))
                call.memory.hold(str(tid), out["lease"]["id"])
                return out
            return await run(ctx, body)

        @tool("progress", "Report progress", acting)
        async def progress(
            ctx: Context[Any, Any],
            note: Annotated[str, Field(description="what you did or found, in a few sentences")],
            artifacts: ArtifactsArg = None, task_id: TaskIdArg = None, lease: LeaseArg = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.ProgressIn, lease=_ANY_LEASE, note=note, artifacts=artifacts)
                _, out = await _held(call, task_id, lease, lambda conn, tid, lid: tasks.progress(
                    conn, call.p, tid, lid, args.note, _artifacts(args)))
                return out
            return await run(ctx, body)

        @tool("advance", "Finish my stage", acting)
        async def advance(
            ctx: Context[Any, Any], to: ToArg,
            note: Annotated[str | None, Field(description="what you did, for the next stage")] = None,
            artifacts: ArtifactsArg = None, task_id: TaskIdArg = None, lease: LeaseArg = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.AdvanceIn, lease=_ANY_LEASE, to=to, note=note,
                                  artifacts=artifacts)
                tid, out = await _held(call, task_id, lease, lambda conn, tid, lid: tasks.transition(
                    conn, call.p, tid, lid, "advance", args.to, args.note, _artifacts(args)))
                return _end(call, tid, out)
            return await run(ctx, body)

        @tool("reject", "Send back for rework", acting)
        async def reject(
            ctx: Context[Any, Any], to: ToArg,
            reason: Annotated[str, Field(description="what must be fixed, specific enough to act on")],
            artifacts: ArtifactsArg = None, task_id: TaskIdArg = None, lease: LeaseArg = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.RejectIn, lease=_ANY_LEASE, to=to, reason=reason,
                                  artifacts=artifacts)
                tid, out = await _held(call, task_id, lease, lambda conn, tid, lid: tasks.transition(
                    conn, call.p, tid, lid, "reject", args.to, args.reason, _artifacts(args)))
                return _end(call, tid, out)
            return await run(ctx, body)

        @tool("release", "Give the task back", acting)
        async def release(
            ctx: Context[Any, Any],
            reason: Annotated[str | None, Field(description="why you are giving it back")] = None,
            task_id: TaskIdArg = None, lease: LeaseArg = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.ReleaseIn, lease=_ANY_LEASE, reason=reason)
                tid, out = await _held(call, task_id, lease, lambda conn, tid, lid: tasks.release(
                    conn, call.p, tid, lid, args.reason))
                return _end(call, tid, out)
            return await run(ctx, body)

        @tool("block", "Park for a human", acting)
        async def block(
            ctx: Context[Any, Any],
            reason: Annotated[str, Field(description="what a human must decide or provide")],
            task_id: TaskIdArg = None, lease: LeaseArg = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                args = _validated(schemas.BlockIn, lease=_ANY_LEASE, reason=reason)
                tid, out = await _held(call, task_id, lease, lambda conn, tid, lid: tasks.block(
                    conn, call.p, tid, lid, args.reason))
                return _end(call, tid, out)
            return await run(ctx, body)

        @tool("unblock", "Unblock a task", acting)
        async def unblock(
            ctx: Context[Any, Any],
            task_id: Annotated[str, Field(description="the blocked task's id")],
            note: Annotated[str | None, Field(description="what was resolved")] = None,
        ) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                tid = call.task_id(task_id)
                args = _validated(schemas.UnblockIn, note=note)
                async with call.db() as conn:
                    out = await tasks.unblock(conn, call.p, tid, args.note)
                return out
            return await run(ctx, body)

        @tool("show_task", "Show a task and its history", reading)
        async def show_task(ctx: Context[Any, Any], task_id: TaskIdArg = None) -> CallToolResult:
            async def body(call: Call) -> dict[str, Any]:
                tid = call.task_id(task_id)
                async with call.db() as conn:
                    task = await tasks.get(conn, call.p, tid)
                    history = await tasks.events(conn, call.p, tid, 0, 200)
                return {"code": "ok", "task": task, "events": history}
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
