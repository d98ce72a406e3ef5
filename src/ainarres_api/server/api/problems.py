"""problem+json: the documents every refusal is rendered as (the app's exception handlers, and a verb's `next`
claim refused after its transition was applied)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ainarres_api.server.api.deps import AppState, authorization, bearer_of, lacking, lent_of
from ainarres_api.server.errors import AinarresError, Invalid, NotFound, PayloadTooLarge, Unauthenticated
from ainarres_api.server.services import auth

log = logging.getLogger("ainarres")

PROBLEM = "application/problem+json"


def document(status: int, code: str, title: str, detail: str, instance: str | None = None,
             **extra: Any) -> dict[str, Any]:
    """An RFC 9457 problem document with AINARRES's stable `code`, as JSON-ready data."""
    body: dict[str, Any] = {"type": f"urn:ainarres:problem:{code}", "title": title, "status": status,
                            "code": code, "detail": detail}
    if instance:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items() if v is not None})
    return jsonable_encoder(body)  # type: ignore[no-any-return]


def problem(status: int, code: str, title: str, detail: str, instance: str | None = None,
            **extra: Any) -> JSONResponse:
    """An RFC 9457 problem document with AINARRES's stable `code`, as the response."""
    headers = {"WWW-Authenticate": 'Bearer realm="ainarres"'} if status == 401 else None
    return JSONResponse(document(status, code, title, detail, instance, **extra), status_code=status,
                        media_type=PROBLEM, headers=headers)


def refused(exc: AinarresError, path: str) -> dict[str, Any]:
    """The problem document of a domain refusal."""
    return document(exc.status, exc.code, exc.title, exc.detail, path, task=exc.task, **exc.extra)


def refusal(exc: AinarresError, path: str) -> JSONResponse:
    """A domain refusal as problem+json."""
    resp = problem(exc.status, exc.code, exc.title, exc.detail, path, task=exc.task, **exc.extra)
    if (after := exc.extra.get("retry_after")) is not None:
        resp.headers["Retry-After"] = str(after)
    return resp


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def invalid(errors: Sequence[Mapping[str, Any]], path: str, content_type: str | None = None) -> JSONResponse:
    """FastAPI-style validation errors (loc, msg, type) as a 422 naming each field."""
    out = []
    not_json = content_type is not None and not _json_type(content_type)
    for e in errors:
        field = _field(e.get("loc", ()))
        msg = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
            field = "body"
        elif field == "body" and (not_json or content_type is None) and e.get("type") in (
                "model_attributes_type", "dict_type", "missing"):
            # A body sent without Content-Type: application/json (curl -d sends a form) is not read as JSON.
            msg = (f"the body was not read as JSON (Content-Type: {content_type or 'none'}); send it with "
                   "Content-Type: application/json")
        out.append({"field": field, "detail": msg})
    detail = "; ".join(f"{e['field']}: {e['detail']}" for e in out[:10]) or "invalid request"
    return problem(422, "invalid", "Invalid request", detail + " (see /docs for the request's shape)", path,
                   errors=out)


def _json_type(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def http_error(exc: StarletteHTTPException, path: str) -> JSONResponse:
    """A Starlette HTTPException (404, 405, an unreadable or oversized body) as problem+json."""
    if exc.status_code == 413:  # the body limit's, met while the body was read: the same 413 as before it
        return refusal(PayloadTooLarge(str(exc.detail)), path)
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
        detail = (f"{path} does not take this method; it takes {allowed} (see /docs)" if allowed
                  else f"{path} does not take this method (see /docs)")
        resp = problem(405, "method_not_allowed", "Method not allowed", detail, path)
        resp.headers.update(exc.headers or {})
        return resp
    if exc.status_code == 400:  # FastAPI could not read the body (e.g. JSON nested too deep)
        return refusal(Invalid("body: the body could not be parsed as JSON"), path)
    kind = {404: NotFound, 401: Unauthenticated}.get(exc.status_code, Invalid)  # its code and its one title
    detail = "no such endpoint; /docs lists them" if exc.status_code == 404 else str(exc.detail)
    resp = problem(exc.status_code, kind.code, kind.title, detail, path)
    resp.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return resp


async def caller_refused(request: Request) -> JSONResponse | None:
    """The 401 the request's token earns if its route takes a caller and the token is bad, or the 403 a caller
    lacking the route's seat earns (`deps.require`); else None.

    For the refusals FastAPI gives before it solves a route's caller (a body that is not JSON, or cannot be
    parsed; a query parameter the route does not take, judged by an app-wide dependency that runs first), so
    that the caller is judged before the request's form — a bad token before a bad body (SPEC §2), a missing
    seat before an unknown query parameter, as before a bad body field. Error paths only.
    """
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if not _takes_caller(dependant):
        return None
    st: AppState = request.app.state.ainarres
    try:
        # An agent endpoint's token may be verified already (a path or query refused after it): its connection is
        # still lent to the request, so a second one is not asked for (with the pool taken by such requests, the
        # wait would never end).
        if (lent := lent_of(request.scope)) is not None:
            caller = await lent.principal()
        else:
            token = bearer_of(authorization(request.scope["headers"]))
            async with st.pool.acquire() as conn:
                caller = await auth.authenticate(conn, st.signer, token)
        for needs in _seats(dependant):
            if (refused := lacking(caller, needs)) is not None:
                raise refused
    except AinarresError as exc:
        return refusal(exc, request.url.path)
    return None


def _seats(dependant: Any) -> list[tuple[str, ...]]:
    """The features a route's `require` dependencies ask for (each: one of them), its dependencies' included."""
    out = []
    for d in dependant.dependencies:
        if (needs := getattr(d.call, "needs", None)) is not None:
            out.append(needs)
        out += _seats(d)
    return out


def _takes_caller(dependant: Any) -> bool:
    """Whether a FastAPI route's dependencies read the bearer token (every endpoint but the public ones)."""
    return dependant is not None and any(isinstance(d.call, HTTPBearer) or _takes_caller(d)
                                         for d in dependant.dependencies)


def crash(exc: Exception, path: str) -> JSONResponse:
    """The 500 for anything unexpected: logged with a reference the client can quote."""
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error ref=%s path=%s", ref, path, exc_info=exc)
    return problem(500, "internal", "Internal error",
                   f"the service failed (ref {ref}); nothing you sent was at fault. Retry, or report it", path)
