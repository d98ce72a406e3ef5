"""What /openapi.json says about refusals: the RFC 9457 problem schema and, per operation, every status
and `code` it can answer with.

Routes declare their refusals as error classes (`refusals(NotFound, LeaseLost, ...)`); the problem
document is one named component (`Problem`), and each status of an operation lists the exact `code`
values that operation can give there.
"""

from __future__ import annotations

from typing import Any

from ainarres_api.server.api.envelopes import Problem
from ainarres_api.server.errors import (
    AinarresError,
    Invalid,
    PayloadTooLarge,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

PROBLEM = "application/problem+json"
PROBLEM_REF = "#/components/schemas/Problem"


_DESCRIPTIONS = {
    400: "The request is not valid HTTP/1.1 (the server's parser refused its request line, a header, "
         "Content-Length or chunking); the connection is closed.",
    401: "Unauthenticated: the token is missing, malformed, expired, revoked or wrongly signed, or its family is "
         "disabled (with `WWW-Authenticate: Bearer`).",
    403: "Not eligible: the caller lacks a feature this needs; the detail names it.",
    404: "Not found (a task, family, project, lane… named in the path or the body), or not visible to the caller.",
    405: "Method not allowed on this path (`Allow` names the ones that are).",
    408: "The request line and headers, or the body, stopped arriving (the server's read time-outs); the "
         "connection is closed.",
    409: "Conflict with the current state; nothing was changed.",
    413: "A body or one of its bounded fields is too large; send references (artifacts) instead.",
    422: "The request is malformed, or names a feature that is not registered; the detail and `errors[]` name "
         "each field (`errors[]` is empty when no one field is at fault).",
    429: "Too many requests; retry after `Retry-After` seconds.",
    431: "The request line and headers are too large (`AINARRES_HTTP_MAX_HEADER_BYTES`); the connection is closed.",
    503: "Unavailable for now (the database, or a lock that did not come in time); retry after `Retry-After`.",
}

# Every operation that reads a body or a token can be refused so; routes add their own on top.
AUTHENTICATED: tuple[type[AinarresError], ...] = (Unauthenticated,)
WITH_BODY: tuple[type[AinarresError], ...] = (Invalid, PayloadTooLarge)


# The headers a refusal carries at some statuses, for a client to act on.
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer realm=\"ainarres\"`: send a bearer token",
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}


def problem_schema(codes: list[str]) -> dict[str, Any]:
    """The problem schema narrowed to the given codes."""
    return {"allOf": [{"$ref": PROBLEM_REF}, {"type": "object", "properties": {"code": {"enum": sorted(codes)}}}]}


def refusals(*errors: type[AinarresError], extra: dict[int, list[str]] | None = None) -> dict[int | str, Any]:
    """FastAPI `responses=` for the given refusals: one entry per status, the exact codes at each.

    `extra` adds codes that are not error classes (405 `method_not_allowed`, for instance).
    """
    by_status: dict[int, set[str]] = {}
    for err in errors:
        by_status.setdefault(err.status, set()).add(err.code)
    for status, codes in (extra or {}).items():
        by_status.setdefault(status, set()).update(codes)
    out: dict[int | str, Any] = {}
    for status in sorted(by_status):
        codes = sorted(by_status[status])
        desc = _DESCRIPTIONS.get(status, "Refused.") + " Codes: " + ", ".join(f"`{c}`" for c in codes) + "."
        out[status] = {"description": desc, "content": {PROBLEM: {"schema": problem_schema(codes)}}}
        if status in _HEADERS:
            out[status]["headers"] = _HEADERS[status]
    return out


def add_components(schema: dict[str, Any]) -> dict[str, Any]:
    """Register the Problem component (and what it references) in an OpenAPI document."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    defs = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in defs.pop("$defs", {}).items():
        components.setdefault(name, sub)
    components["Problem"] = defs
    return schema


# The door's own refusals (server/limits.py), before any route sees the request: a head too large, or a head or
# body that stopped arriving.
_DOOR = {400: ["invalid"], 408: ["invalid"], 431: ["payload_too_large"]}

# What any operation can meet, whatever its route declares: the rate limit (not on the probes) and an outage.
_EVERYWHERE_EXEMPT = {"/healthz", "/readyz", "/metrics"}

# Where a query string is not judged (deps.judge_queries): the probes (uptime checkers and load balancers add
# cache-busters; a 422 would take a healthy replica out of rotation) and the index a browser opens (links carry
# tracking parameters). They take no query parameters and ignore any.
QUERY_UNCHECKED = frozenset({*_EVERYWHERE_EXEMPT, "/"})


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Make every operation of an OpenAPI document tell the whole truth about refusals: FastAPI documents a
    422 as its own JSON shape, which the service never sends (it sends problem+json `invalid`); every
    operation may meet 503 `unavailable` (the database out of reach, a lock that did not come), 400, 408 and
    431 at the door, 413 `payload_too_large` and 422 `invalid` (a body over the bound, or compressed, whatever the
    method; a query parameter it does not take), and every one but the probes 429 `rate_limited`."""
    add_components(schema)
    for path, ops in schema.get("paths", {}).items():
        for op in ops.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            answers = op["responses"]
            extra: list[type[AinarresError]] = [Unavailable]
            if path not in _EVERYWHERE_EXEMPT:
                extra.append(RateLimited)
            # Any request may carry a body, whatever its method: one over the bound is 413, a compressed one 422
            # (app.BodyLimit, before the route); and a query parameter an operation does not take is 422.
            extra += [Invalid, PayloadTooLarge]
            if op.get("security"):
                extra.append(Unauthenticated)
            # The door's own refusals (server/limits.py), before any route: a head too large, a request too slow.
            for status, answer in refusals(*extra, extra=_DOOR).items():
                key = str(status)
                old = answers.get(key)
                old_schema = (old or {}).get("content", {}).get(PROBLEM, {}).get("schema")
                if old_schema is not None and old_schema.get("allOf"):
                    codes = set(old_schema["allOf"][1]["properties"]["code"]["enum"])
                    codes |= set(answer["content"][PROBLEM]["schema"]["allOf"][1]["properties"]["code"]["enum"])
                    answer = refusals(extra={int(key): sorted(codes)})[int(key)]
                answers[key] = answer
    _exact_integers(schema)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema


_INT64 = (-(2**63), 2**63 - 1)


def _exact_integers(node: Any) -> None:
    """Integer bounds as integers: FastAPI's OpenAPI model holds `maximum`/`minimum` as floats, which turns
    2⁶³−1 into 9.223372036854776e18 (2⁶³, a value the service refuses). Every integer here is a 64-bit one."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum"):
                if isinstance(node.get(key), float):
                    node[key] = min(max(int(node[key]), _INT64[0]), _INT64[1])
        for value in node.values():
            _exact_integers(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integers(value)
