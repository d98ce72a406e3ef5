"""Structured logs: one JSON object a line, each carrying the request id; tokens never appear."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("ainarres_request_id", default=None)

access = logging.getLogger("ainarres.access")

_INBOUND_ID = re.compile(r"^[A-Za-z0-9._:@+=-]{1,128}$")
# Defence in depth: a token that reached a message (an exception's text, a library's log line)
# is scrubbed before the line is written.
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# color_message: uvicorn's copy of the message with ANSI colours, meant for a terminal, never for JSON.
_STANDARD = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime",
                                                                                  "taskName", "color_message"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def redact(text: str) -> str:
    """`text` with bearer tokens and JWTs replaced."""
    return _JWT.sub("[redacted-token]", _BEARER.sub("Bearer [redacted]", text))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, msg, request_id, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _ANSI.sub("", record.getMessage()),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str, separators=(",", ":")))


def configure(level: str = "info", stream: Any = None) -> None:
    """Route every logger (uvicorn's included) through one JSON handler on stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


class RequestLog:
    """Gives each request an id (X-Request-ID in and out) and writes one access line when it ends.

    The line names method, path (never the query string), status and duration; never a header,
    so the Authorization header cannot reach a log. Outermost, so that a crash's 500 is tagged too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inbound = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = inbound if _INBOUND_ID.match(inbound) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0

        async def tagged(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            await send(msg)

        try:
            await self.app(scope, receive, tagged)
        finally:
            if access.isEnabledFor(logging.INFO):
                access.info("request", extra={
                    "method": scope.get("method"), "path": scope.get("path"), "status": status or 500,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
        # Reset only on success: a crash, already answered and logged inside (the app puts this outside its
        # server-error middleware), goes on to the server, whose own log line should still carry this id.
        request_id.reset(token)
