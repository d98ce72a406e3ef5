"""The agent verbs served straight from ASGI, without FastAPI's routing, dependency solving and Request.

Sits inside the app's middlewares (request id, access log, verb metrics, wake publication, body limit)
and in front of FastAPI: `POST /v1/claims`, `POST /v1/tasks` and `POST /v1/tasks/{uuid}/{verb}` are
answered here; every other request (another method, a non-canonical id, an unknown verb) goes on to
FastAPI unchanged. A verb is served exactly as its FastAPI route serves it (api/tasks.py holds the work
of each; the routes remain what /docs shows). The token is checked before the body is parsed, so a
request with a bad token is refused as unauthenticated even when its body is not JSON (SPEC §2); FastAPI's
routes give the same answer from the app's validation handler (problems.caller_refused). Errors are
rendered by the same functions as the app's handlers (api/problems.py); anything unexpected propagates
to the app's crash handler, as from a route.
"""

from __future__ import annotations

import email.message
import json
import re
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import URL
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ainarres_api.server.api import problems
from ainarres_api.server.api import tasks as verbs
from ainarres_api.server.api.deps import AppState, FastJSONResponse, bearer_of
from ainarres_api.server.api.schemas import AdvanceIn, Body, ClaimIn, RejectIn, TaskCreate
from ainarres_api.server.db.pool import translate
from ainarres_api.server.errors import AinarresError
from ainarres_api.server.services import auth

_HELD = re.compile(r"/v1/tasks/([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
                   r"/(heartbeat|progress|advance|reject|release|block|unblock)")

M = TypeVar("M", bound=Body)

# The verbs whose service call reads the caller itself, in the same round trip as its work.
_FOLDED: dict[str, type[Body]] = {"claim": ClaimIn, "advance": AdvanceIn, "reject": RejectIn}


class _Invalid(Exception):
    """The body failed validation; carries FastAPI-shaped errors (loc starting with "body")."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("invalid body")
        self.errors = errors


class FastVerbs:
    """Serves the agent verbs directly; passes everything else to `app` (FastAPI)."""

    def __init__(self, app: ASGIApp, state: Callable[[], AppState]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/v1/claims":
            verb, task_id = "claim", None
        elif path == "/v1/tasks":
            verb, task_id = "create", None
        else:
            m = _HELD.fullmatch(path)
            if m is None:
                await self.app(scope, receive, send)
                return
            verb, task_id = m.group(2), uuid.UUID(m.group(1))
        try:
            resp = await self._serve(scope, receive, verb, task_id)
        except AinarresError as exc:
            resp = problems.refusal(exc, _path(scope))
        except _Invalid as exc:
            resp = problems.invalid(exc.errors, _path(scope))
        except StarletteHTTPException as exc:  # the body limit's refusal while the body is read
            resp = problems.http_error(exc, _path(scope))
        except asyncpg.PostgresError as exc:
            err = translate(exc)
            if err is None:
                raise  # to the app's crash handler, as from a route
            resp = problems.refusal(err, _path(scope))
        await resp(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, verb: str, task_id: uuid.UUID | None) -> JSONResponse:
        body = await _read_body(receive)
        authorization = content_type = None
        for key, value in scope["headers"]:  # Starlette's Headers.get: the first of each, latin-1
            if key == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif key == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        token = bearer_of(authorization)
        st = self.state()
        conn = await st.pool.acquire()
        lent = True
        try:
            if verb in _FOLDED:
                # The claim and advance/reject read the caller from the database in their own round
                # trip (services/tasks.py claim_as, transition_as): check the token's signature now, and
                # if the body is bad, read the caller first, so a bad token is still refused first.
                auth.identity(st.signer, token)
                try:
                    parsed = _parse(_FOLDED[verb], body, content_type)
                except (_Invalid, StarletteHTTPException):
                    await auth.authenticate(conn, st.signer, token)
                    raise
                if isinstance(parsed, ClaimIn):
                    if parsed.wait_seconds <= 0:
                        return FastJSONResponse(await verbs.claim_now_as(conn, st.signer, token, parsed, st.limits))
                    caller = await auth.authenticate(conn, st.signer, token)
                    lent = False  # a long poll holds no connection while it waits
                    await st.pool.release(conn)
                    return FastJSONResponse(await verbs.claim_waiting(parsed, caller, token, st, receive))
                assert task_id is not None and isinstance(parsed, AdvanceIn | RejectIn)
                return FastJSONResponse(await verbs.transition_as(conn, st.signer, token, task_id, verb, parsed))
            caller = await auth.authenticate(conn, st.signer, token)
            if verb == "claim":
                claim = _parse(ClaimIn, body, content_type)
                if claim.wait_seconds <= 0:
                    return FastJSONResponse(await verbs.claim_now(conn, caller, claim, st.limits))
                lent = False  # a long poll holds no connection while it waits
                await st.pool.release(conn)
                return FastJSONResponse(await verbs.claim_waiting(claim, caller, token, st, receive))
            if verb == "create":
                out, status = await verbs.create_task(conn, caller, _parse(TaskCreate, body, content_type),
                                                      st.limits)
                return FastJSONResponse(out, status_code=status)
            assert task_id is not None
            model, work = verbs.HELD_VERBS[verb]
            return FastJSONResponse(await work(conn, caller, task_id, _parse(model, body, content_type)))
        finally:
            if lent:
                await st.pool.release(conn)


def _path(scope: Scope) -> str:
    """The path as the app's handlers see it (`request.url.path`)."""
    return URL(scope=scope).path


async def _read_body(receive: Receive) -> bytes:
    """The whole request body, read as Starlette's Request.body() reads it."""
    chunks: list[bytes] = []
    while True:
        msg = await receive()  # through the body limit's wrapper: may raise its 413
        if msg["type"] == "http.request":
            if chunk := msg.get("body", b""):
                chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)
        elif msg["type"] == "http.disconnect":
            # FastAPI turns a failure to read the body into a 400 (rendered as a 422); nobody is listening.
            raise StarletteHTTPException(status_code=400, detail="There was an error parsing the body")


def _parse(model: type[M], body: bytes, content_type: str | None) -> M:
    """The body validated by `model`, accepted and refused exactly as FastAPI does for a body parameter."""
    is_json = content_type == "application/json" or _is_json(content_type)
    if is_json:
        try:
            return model.model_validate_json(body)
        except ValidationError:
            # pydantic's JSON parser refuses some bodies Python's json module reads (a BOM, UTF-16, lone
            # surrogate escapes) and words its refusals differently: judge again as FastAPI does.
            pass
    if not body:
        raise _Invalid([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    value: Any = body
    if is_json:
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            raise _Invalid([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                             "input": {}, "ctx": {"error": e.msg}}]) from e
        except Exception as e:
            raise StarletteHTTPException(status_code=400, detail="There was an error parsing the body") from e
    try:
        return model.model_validate(value, from_attributes=True)
    except ValidationError as e:
        raise _Invalid([{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]) from e


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body with this Content-Type as JSON (none at all: no, it is strict)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")

