"""The verbs' FastAPI route class: FastAPI's declaration, FastAPI's dependencies and parsers, less of its per-request
machinery (ADR 0030).

A verb's route is an `APIRoute` like any other: FastAPI builds its dependency tree, its body and path fields and
its /openapi.json entry from the endpoint's signature (api/verbs.py). What this class changes is only how a
request is handed to that declaration. FastAPI's generic handler (`get_request_handler` and the
`request_response` around it) does, per request, work a verb never needs: two `AsyncExitStack`s, a
`Response` for dependencies that might set headers, background tasks, a dependency cache keyed per request,
the recursive solver's checks of each node for generators, scopes and overrides, the content-type parsed
through `email.message`. Measured in process (docs/performance.md, 2026-12-05 fourth session) that is ~0.3 ms
of CPU in a claim-then-advance cycle of ~1.3.

The handler here, made once per route from the route's own `dependant`:
- runs the route's dependencies — the same callables FastAPI would call (`deps.judge_queries`,
  `deps.agent_verb`), in the same order, before the body is judged;
- judges the path parameters and the body with FastAPI's own functions (`request_params_to_args`,
  `request_body_to_args`) against the route's own fields: the same values, the same errors;
- raises what FastAPI raises (`RequestValidationError`), and the app's exception handlers answer as for any
  route (Starlette's `wrap_app_handling_exceptions`, as FastAPI's `request_response` does).

Whatever it does not serve goes to FastAPI's own handler for the route, built as usual and kept: a request with a
query string, a content type other than exactly `application/json`, an empty body or one that is not JSON, a
request while FastAPI's OpenTelemetry is on, or an app with dependency overrides (tests). A route whose
declaration it cannot serve (a `yield` dependency, a dependency with parameters of its own, query/header/cookie
parameters, a form body, a body bound of its own, an endpoint that is not a coroutine declared to return a
Response) is refused when the app is built, so a change to a verb's signature cannot quietly take the verb off
this path or onto a wrong one.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_typed_return_annotation, request_body_to_args, request_params_to_args
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.telemetry import get_telemetry_data
from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_JSON = b"application/json"


def _servable(route: APIRoute) -> str | None:
    """Why this class cannot serve a route's declaration, or None if it can."""
    d = route.dependant
    if d.query_params or d.header_params or d.cookie_params:
        return "it takes query, header or cookie parameters"
    if len(d.body_params) != 1 or d.request_param_name is None:
        return "its endpoint must take one body and the request"
    if isinstance(d.body_params[0].field_info, params.Form):
        return "its body is a form"
    if route.max_body_size is not None:
        return "it bounds its own body (max_body_size)"
    if not inspect.iscoroutinefunction(d.call):
        return "its endpoint is not a coroutine function"
    returns = get_typed_return_annotation(d.call) if d.call is not None else None
    if not (inspect.isclass(returns) and issubclass(returns, Response)):
        return "its endpoint is not declared to return a Response"
    if any(p for p in (d.background_tasks_param_name, d.response_param_name, d.http_connection_param_name,
                       d.security_scopes_param_name, d.websocket_param_name)):
        return "its endpoint takes a response, background tasks or security scopes"
    for sub in d.dependencies:
        if not _request_only(sub):
            return f"its dependency {sub.call!r} takes more than the request, or yields"
    return None


def _request_only(sub: Dependant) -> bool:
    """A dependency that is a coroutine of the request alone (no parameters or dependencies of its own)."""
    takes_more = (sub.dependencies or sub.path_params or sub.query_params or sub.header_params
                  or sub.cookie_params or sub.body_params or sub.response_param_name
                  or sub.background_tasks_param_name or sub.security_scopes_param_name)
    call = sub.call
    fn = call if inspect.isfunction(call) or inspect.ismethod(call) else getattr(call, "__call__", None)  # noqa: B004
    return (sub.request_param_name is not None and not takes_more and sub.concurrency is None
            and inspect.iscoroutinefunction(fn))  # not a generator: an async generator is no coroutine function


class VerbRoute(APIRoute):
    """An APIRoute whose requests, when plain (see the module's text), are solved by a handler made from the
    route's own declaration; the rest go to FastAPI's handler, kept as `fastapi_app`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (why := _servable(self)) is not None:
            raise TypeError(f"{self.path}: a verb route cannot be served by VerbRoute: {why}")
        self.fastapi_app: ASGIApp = self.app
        self.app = self._serve

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._plain(scope):
            return await self.fastapi_app(scope, receive, send)
        request = Request(scope, receive, send)

        async def solve(scope: Scope, receive: Receive, send: Send) -> None:
            try:  # as FastAPI's handler reads it: inside the exception handlers, any failure but an HTTPException a 400
                raw = await request.body()
            except HTTPException:
                raise
            except Exception as exc:
                raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, RecursionError):  # not JSON, or nested past what Python's parser follows
                body = None
            if body is None:  # empty, `null` or not JSON: FastAPI's handler judges it (and words the refusal)
                return await self.fastapi_app(scope, _replay(raw, receive), send)
            d = self.dependant
            values: dict[str, Any] = {}
            for sub in d.dependencies:
                solved = await sub.call(**{sub.request_param_name: request})  # type: ignore[misc,arg-type]
                if sub.name is not None:
                    values[sub.name] = solved
            path_values, errors = request_params_to_args(d.path_params, request.path_params)
            body_values, body_errors = await request_body_to_args(d.body_params, body, self._embed_body_fields)
            if errors or body_errors:
                raise RequestValidationError(errors + body_errors, body=body)
            values.update(path_values)
            values.update(body_values)
            values[d.request_param_name] = request  # type: ignore[index]
            response = await d.call(**values)  # type: ignore[misc]
            await response(scope, receive, send)

        await wrap_app_handling_exceptions(solve, request)(scope, receive, send)

    def _plain(self, scope: Scope) -> bool:
        """A request this handler serves: no query string, `Content-Type: application/json` exactly, no
        dependency overrides on the app, FastAPI's telemetry off for it (on, FastAPI's handler records it)."""
        if scope.get("query_string") or get_telemetry_data() is not None:
            return False
        provider = self.dependency_overrides_provider
        if provider is not None and getattr(provider, "dependency_overrides", None):
            return False
        types = [v for k, v in scope["headers"] if k == b"content-type"]
        return types == [_JSON]


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over a body already read, then whatever the client sends next (a disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
