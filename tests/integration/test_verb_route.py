"""The verbs' route class (api/verb_route.py, ADR 0030): a plain request is solved from the route's own FastAPI
declaration, with FastAPI's dependencies and parsers, and answered exactly as FastAPI's own handler answers it;
anything else goes to FastAPI's handler."""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import JSONResponse, Response

from ainarres_api.server.api import verbs
from ainarres_api.server.api.verb_route import VerbRoute
from tests.helpers import Api, make_world

BAD = "00000000-0000-0000-0000-000000000000"


def _verb_routes(app: Any) -> dict[str, VerbRoute]:
    return {r.path: r for r in app.router.routes if isinstance(r, VerbRoute)}


def test_every_verb_is_served_by_the_verb_route():
    from pydantic import SecretStr

    from ainarres_api.server.app import create_app
    from ainarres_api.server.settings import Settings

    app = create_app(Settings(jwt_secret=SecretStr("s" * 40)), dsn="postgresql://nowhere/none", bootstrap=False)
    assert set(_verb_routes(app)) == {v.path for v in verbs.VERBS}


def test_a_declaration_it_cannot_serve_is_refused_when_the_app_is_built():
    """A verb whose signature grew a query parameter (or a dependency with its own parameters) must not be
    served half-judged: building the app fails, naming the route."""
    app = FastAPI()

    async def with_query(request: Request, lane: str, body: dict[str, Any]) -> Response: ...

    with pytest.raises(TypeError, match=r"/x: .*query"):
        app.router.add_api_route("/x", with_query, methods=["POST"], route_class_override=VerbRoute)

    async def needs(lane: str) -> str:
        return lane

    async def with_dep(request: Request, body: dict[str, Any], got: str = Depends(needs)) -> Response: ...

    with pytest.raises(TypeError, match=r"/y: .*takes more than the request"):
        app.router.add_api_route("/y", with_dep, methods=["POST"], route_class_override=VerbRoute)

    # Found by a review: declarations the route would have served otherwise than FastAPI.
    async def form(request: Request, body: Annotated[str, Form()]) -> Response: ...

    def sync(request: Request, body: dict[str, Any]) -> Response: ...

    async def returns_dict(request: Request, body: dict[str, Any]) -> dict[str, Any]: ...

    async def plain(request: Request, body: dict[str, Any]) -> Response: ...

    for path, endpoint, why, kw in [("/form", form, "form", {}), ("/sync", sync, "coroutine", {}),
                                    ("/dict", returns_dict, "Response", {}),
                                    ("/bound", plain, "max_body_size", {"max_body_size": 10})]:
        with pytest.raises(TypeError, match=why):
            app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=VerbRoute, **kw)


async def _who(*, request: Request) -> str:
    return request.headers.get("x-who", "")


async def test_a_dependency_taking_the_request_by_keyword_is_served():
    async def endpoint(request: Request, body: dict[str, Any], got: Annotated[str, Depends(_who)]) -> Response:
        return JSONResponse({"got": got, "body": body})

    app = FastAPI()
    app.router.add_api_route("/x", endpoint, methods=["POST"], route_class_override=VerbRoute)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/x", json={"a": 1}, headers={"x-who": "me"})
    assert r.status_code == 200 and r.json() == {"got": "me", "body": {"a": 1}}


class _Counted:
    """FastAPI's own handler of a route, counting the requests handed to it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await self.inner(scope, receive, send)


async def test_plain_requests_are_solved_by_the_route_and_the_rest_by_fastapi(app, admin: Api):
    world = await make_world(admin)
    agent = await world.agent("cheap")
    routes = _verb_routes(app)
    claims = routes["/v1/claims"]
    counted = claims.fastapi_app = _Counted(claims.fastapi_app)
    await agent.create("dev", "one")
    got = await agent.claim("dev")
    assert got["code"] == "claimed" and counted.calls == 0
    c, h = agent.client, agent._headers()
    r = await c.post("/v1/claims?lane=dev", headers=h, json={"lane": "dev"})  # a query string: FastAPI's path
    assert r.status_code == 422 and counted.calls == 1, r.text
    r = await c.post("/v1/claims", headers={**h, "content-type": "application/json; charset=utf-8"},
                     content=b'{"lane": "dev"}')
    assert r.status_code == 409 and counted.calls == 2, r.text  # judged by FastAPI: already holding one
    r = await c.post("/v1/claims", headers={**h, "content-type": "application/json"}, content=b'{"lane": ')
    assert r.status_code == 422 and r.json()["code"] == "invalid" and counted.calls == 3, r.text


def _requests(task: str, lease: str) -> list[tuple[str, str, Any, bool]]:
    """(path, body as sent, with a good token?) — every one refused, or answered without moving anything."""
    t = f"/v1/tasks/{task}"
    return [
        ("/v1/claims", {"lane": 5}, True),
        ("/v1/claims", {"lane": "dev", "wait_seconds": -1}, True),
        ("/v1/claims", {"lane": "dev", "bogus": 1}, True),
        ("/v1/claims", [], True),
        ("/v1/claims", "dev", True),
        ("/v1/claims", {"lane": "x" * 5000}, True),
        ("/v1/claims", {"lane": "nowhere"}, True),
        ("/v1/claims", {"lane": "dev"}, False),
        ("/v1/tasks", {"lane": "dev"}, True),
        ("/v1/tasks", {"lane": "dev", "title": "t", "priority": "high"}, True),
        ("/v1/tasks/not-a-uuid/advance", {"lease": lease, "to": "review"}, True),
        ("/v1/tasks/not-a-uuid/advance", {"lease": "nope"}, True),
        (f"{t}/advance", {"to": "review"}, True),
        (f"{t}/advance", {"lease": "nope", "to": "review"}, True),
        (f"{t}/advance", {"lease": "nope", "to": "review"}, False),
        (f"/v1/tasks/{BAD}/advance", {"lease": lease, "to": "review"}, True),
        (f"{t}/advance", {"lease": BAD, "to": "review"}, True),
        (f"{t}/progress", {"lease": lease, "note": 7}, True),
        (f"{t}/heartbeat", {"lease": lease, "extend_seconds": "soon"}, True),
        (f"{t}/reject", {"lease": lease, "to": "todo"}, True),
        (f"{t}/release", {"lease": lease, "reason": {"x": 1}}, True),
        (f"{t}/block", {"lease": lease}, True),
        (f"{t}/unblock", {"note": "x" * 3000}, True),
        (f"{t}/usage", {"input_tokens": -1}, True),
        (f"{t}/advance", {"lease": lease, "to": "nowhere"}, True),
    ]


async def test_the_route_answers_as_fastapis_own_handler_does(app, admin: Api):
    """The same requests, once through the verb route and once through FastAPI's handler (which an app with
    dependency overrides always takes): the same status, content type and document."""
    world = await make_world(admin)
    agent = await world.agent("cheap")
    await agent.create("dev", "one")
    held = await agent.claim("dev")
    task, lease = held["task"]["id"], held["lease"]["id"]
    bad = Api(agent.client, agent.token[:-4] + "AAAA")

    async def answers() -> list[tuple[int, str, Any]]:
        out = []
        for path, body, good in _requests(task, lease):
            r = await (agent if good else bad).call("POST", path, body)
            out.append((r.status_code, r.headers["content-type"], r.json()))
        return out

    routes = _verb_routes(app)
    for route in routes.values():
        route.fastapi_app = _Counted(route.fastapi_app)
    ours = await answers()
    assert sum(r.fastapi_app.calls for r in routes.values()) == 0  # type: ignore[attr-defined]
    app.dependency_overrides[_requests] = _requests  # any override at all: FastAPI's handler for every request
    try:
        theirs = await answers()
    finally:
        app.dependency_overrides.clear()
    assert sum(r.fastapi_app.calls for r in routes.values()) == len(ours)  # type: ignore[attr-defined]
    for (path, body, _), a, b in zip(_requests(task, lease), ours, theirs, strict=True):
        assert a == b, (path, body, a, b)
    assert {a[0] for a in ours} >= {401, 404, 409, 422}, ours
    # and nothing moved: the task is still held under the same lease
    r = await agent.verb(task, "heartbeat", lease=lease)
    assert r["code"] == "ok"


async def _send_half(app: Any, token: str) -> tuple[int, bytes]:
    """A claim whose client declares 100 bytes of body, sends 9 and goes away: (status, body) of the answer."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/claims", "raw_path": b"/v1/claims", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"t"), (b"authorization", f"Bearer {token}".encode()),
                         (b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
    parts = [{"type": "http.request", "body": b'{"lane": ', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_a_client_that_leaves_mid_body_is_answered_as_fastapi_answers_it(app, admin: Api):
    """Found by a review: the body read outside the exception handlers let the disconnect escape as a 500."""
    world = await make_world(admin)
    agent = await world.agent("cheap")
    ours = await _send_half(app, agent.token)
    app.dependency_overrides[_requests] = _requests
    try:
        theirs = await _send_half(app, agent.token)
    finally:
        app.dependency_overrides.clear()
    assert ours == theirs and ours[0] < 500, (ours, theirs)
