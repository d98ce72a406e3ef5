"""The API's own documentation: /openapi.json with the contract a client is built from, and /docs (Swagger UI)
and /redoc (ReDoc) served with their scripts and styles from the installed `fastapi_standalone_docs`
package (Swagger UI's dist and ReDoc's standalone bundle, patched there to take its logo from beside the
page), so they work with no internet.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.routing import APIRoute

from ainarres_api.server.api import contract
from ainarres_api.server.errors import AinarresError, NotFound

ASSETS_PATH = "/docs/static"
# The assets the two pages load: where each is in the package, and its media type; nothing else is served.
ASSETS = {
    "swagger-ui-bundle.js": ("swagger", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger", "text/css; charset=utf-8"),
    "redoc.standalone.js": ("redoc", "text/javascript; charset=utf-8"),
    "favicon.png": ("fastapi", "image/png"),
}
# The ReDoc bundle loads its logo from `<the page's path>/logo-mini.svg`.
REDOC_LOGO = "logo-mini.svg"
_CACHE = {"Cache-Control": "public, max-age=86400"}
# Swagger UI would otherwise ask an online validator for a badge.
SWAGGER_PARAMETERS = {"validatorUrl": None}

TAGS = [
    {"name": "agent verbs", "description": "Create, claim and move tasks: what an agent calls."},
    {"name": "administration", "description": "Features, families, tokens, workflows, projects and lanes "
                                              "(`seat:admin`; denials also `seat:overseer`)."},
    {"name": "agent reads", "description": "What an agent reads: itself (`/v1/me`), a task and its events, a "
                                          "stage's card, a lane's cards — within the lanes it holds."},
    {"name": "oversight", "description": "The board, the feed, stuck work, demand, agents, track records, spend "
                                         "and the live event stream (`seat:overseer`, `seat:monitor` or "
                                         "`seat:admin`; the stream also for any caller, within its lanes); "
                                         "disabling and enabling a family (`seat:overseer` or `seat:admin`)."},
    {"name": "governance", "description": "Strikes, bans and their lifts, auditor flags, recommendations, "
                                          "thresholds and the governance trail (`seat:overseer`; thresholds "
                                          "`seat:admin`; flags `role:auditor`): docs/governance.md."},
    {"name": "operations", "description": "Liveness, readiness, metrics and the index page: no token."},
]


def _static_dir() -> Path:
    return Path(str(importlib.resources.files("fastapi_standalone_docs") / "static"))


def _error_table() -> str:
    rows = sorted(((c.status, c.code, (c.__doc__ or "").strip()) for c in AinarresError.__subclasses__()),
                  key=lambda r: (r[0], r[1]))
    lines = ["| status | code | when |", "| --- | --- | --- |"]
    lines += [f"| {status} | `{code}` | {doc} |" for status, code, doc in rows]
    return "\n".join(lines)


def description() -> str:
    """The Markdown that opens the documentation: how to authenticate, hold work and read refusals."""
    return f"""\
Nobody assigns tasks: an agent asks for the next task it may do, holds it under a lease, and moves it
through its lane's workflow with the agent verbs. Administration provisions what each family of agents
may do; oversight reads the whole board.

## Authentication

Every operation but `/healthz`, `/readyz`, `/metrics` and `/` takes `Authorization: Bearer <token>`. A token is a JWT
minted by an admin with **POST /v1/tokens** (or `ainarres token` on the server); it names the agent
(`sub`), its `family`, and when it expires. The text is shown once; DELETE /v1/tokens/{{jti}} revokes it.

- **Features are read from the database on every call.** What a caller may do is its family's provisioned
  features, minus the family's active denials, read afresh on each request: a change to a family, a denial
  or a revocation bites on the very next call, with no new token.
- **A token's `scope` only narrows.** A token minted with a scope holds the features of the scope that its
  family is provisioned with, never more.
- A missing, malformed, expired, revoked or wrongly signed token, or one of a disabled family, is `401
  unauthenticated` (with `WWW-Authenticate: Bearer`); a valid token without a feature the call needs is
  `403 not_eligible`, and the detail names the feature.

## Leases

**POST /v1/claims** hands the caller the next task it may do (priority first, then age) and a **lease**:
`lease.id` and `lease.expires_at`. Every verb on the held task — heartbeat, progress, advance, reject,
release, block — presents that lease id. Heartbeat or progress renews it. A lease that ran out holds
nothing: a verb presenting it, or any stale or foreign lease, is refused with `409 lease_lost` and changes
nothing; the task is taken over by the next claim that meets it (asking for work is the recovery).

## Long-poll

`wait_seconds` (0 to 60) on POST /v1/claims waits for work instead of answering `empty` at once: the
claim answers as soon as a task it may take becomes claimable (its features are read again each time it
looks), or `empty` (with `pending` and a `hint`) when the time is up. While it waits it holds no database connection.

## Idempotency

- **Create:** send an `idempotency_key` with POST /v1/tasks. The same key with the same request again
  answers the task it created (`200` instead of `201`); the same key with a different request is `409
  conflict`.
- **Verbs are idempotent per lease:** a retry of the same verb with the same lease and the same arguments
  answers the original outcome, so an agent whose answer was lost can always send it again.

## Errors

Every refusal is `application/problem+json` (RFC 9457): `type`, `title`, `status`, a stable `code` to
branch on, a `detail` that says what to do next, and, where it helps, the `task` as it is now (`invalid`
adds `errors[]`, one per field; a body field or a query parameter the operation does not take is refused, not
ignored — the probes and `/` ignore query strings). A refused call changes nothing; a client mistake is never
a 500. Each operation below lists the statuses and codes it can answer with.

{_error_table()}

Besides these, at the door, before any operation: a request that is not valid HTTP/1.1 is `400 invalid`,
one whose head or body stopped arriving `408 invalid`, one whose head is too large `431 payload_too_large`.
A method a path does not take is `405 method_not_allowed` (with `Allow`), and an unexpected failure is `500
internal` with a reference to quote.
"""


def keep_example_nulls(schema: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    """Put the routes' examples back as they were declared: FastAPI's get_openapi leaves every null out of the
    document, the nulls of examples included, and an answer's example without its null fields does not
    validate against the answer's own schema."""
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods or ():
            op = schema["paths"].get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            for status, answer in route.responses.items():
                for media, content in answer.get("content", {}).items():
                    if "example" in content:
                        op["responses"][str(status)]["content"][media]["example"] = jsonable_encoder(content["example"])
            examples = getattr(route.body_field.field_info, "openapi_examples", None) if route.body_field else None
            for content in op.get("requestBody", {}).get("content", {}).values():
                if examples and "examples" in content:
                    content["examples"] = jsonable_encoder(examples)
    return schema


def install(app: FastAPI) -> None:
    """Serve /docs, /redoc and their assets locally, and build /openapi.json with the service's contract."""
    openapi_url = app.openapi_url or "/openapi.json"

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=description(), routes=app.routes, tags=TAGS)
        keep_example_nulls(schema, app.routes)
        contract.complete(schema)  # the Problem component; every operation's 401/413/422/429/503
        bearer = schema.get("components", {}).get("securitySchemes", {}).get("HTTPBearer")
        if bearer is not None:
            bearer["bearerFormat"] = "JWT"
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    static = _static_dir()

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} — API",
                                   swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
                                   swagger_ui_parameters=SWAGGER_PARAMETERS)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} — API",
                              redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_PATH}/favicon.png", with_google_fonts=False)

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        if name not in ASSETS:
            raise NotFound("no such documentation asset; /docs and /redoc load what they need")
        folder, media = ASSETS[name]
        return FileResponse(static / folder / name, media_type=media, headers=_CACHE)

    @app.get(f"/redoc/{REDOC_LOGO}", include_in_schema=False)
    async def redoc_logo() -> FileResponse:
        return FileResponse(static / "redoc" / REDOC_LOGO, media_type="image/svg+xml", headers=_CACHE)
