"""Limits at the door: uvicorn's options for `ainarres serve`, a request-head guard, and a per-agent rate limit.

uvicorn (0.30+) offers a concurrency limit (`limit_concurrency`: a plain 503 past it), a keep-alive
time-out, and a header size limit for its h11 parser only (`h11_max_incomplete_event_size`). It has
no header or body read time-out, and its httptools parser (the fast one, which `serve` uses) reads a
header of any size. `GuardedHttpTools` adds those three to the httptools protocol: a request head
over `max_head_bytes` is answered 431 and the connection closed, a head not complete within
`head_timeout` seconds (slow-loris) or a body that stops arriving for `body_timeout` seconds is
answered 408 and closed. A reverse proxy in front does the same for every connection before it
reaches a worker (docs/operations.md, "Limits").
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

from starlette.datastructures import URL
from starlette.types import ASGIApp, Receive, Scope, Send

from ainarres_api.server.api import problems
from ainarres_api.server.errors import AinarresError, Invalid, PayloadTooLarge, RateLimited, Unavailable
from ainarres_api.server.settings import Settings

log = logging.getLogger("ainarres.door")

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is a dependency; h11 then limits header size alone
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments that put the configured limits on `uvicorn.run` (HTTP parser included)."""
    opts: dict[str, Any] = {
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
        "timeout_keep_alive": settings.http_keepalive_seconds,
        "limit_concurrency": settings.http_max_concurrency or None,
        "http": guarded_httptools(settings) if HttpToolsProtocol is not None else "h11",
    }
    return opts


def guarded_httptools(settings: Settings) -> type[asyncio.Protocol]:
    """The httptools protocol with the head size limit and the head and body read time-outs of `settings`."""
    assert HttpToolsProtocol is not None
    return type("GuardedHttpTools", (_Guard, HttpToolsProtocol), {
        "max_head_bytes": settings.http_max_header_bytes,
        "head_timeout": settings.http_header_timeout_seconds,
        "body_timeout": settings.http_body_timeout_seconds,
    })


def _raw_problem(status: int, reason: str, refusal: AinarresError) -> bytes:
    """The door's refusal as the app renders one (type, title and `errors[]` from the error tree), under the
    door's own status (400, 408, 431)."""
    doc = {"type": f"urn:ainarres:problem:{refusal.code}", "title": refusal.title, "status": status,
           "code": refusal.code, "detail": refusal.detail, **refusal.extra}
    body = json.dumps(doc, separators=(",", ":")).encode()
    after = f"retry-after: {refusal.extra['retry_after']}\r\n" if "retry_after" in refusal.extra else ""
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n{after}"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


_HEAD, _BODY, _IDLE, _REFUSED = "head", "body", "idle", "refused"


class _Guard:
    """Mixed in before uvicorn's HttpToolsProtocol (see guarded_httptools); uses its transport, cycle
    and flow control, and keeps a per-connection state: reading a head, reading a body, or idle."""

    max_head_bytes: ClassVar[int] = 16_384
    head_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0

    transport: asyncio.Transport
    cycle: Any
    flow: Any
    limit_concurrency: int | None
    connections: set[Any]
    tasks: set[Any]

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._state = _HEAD
        self._head_bytes = self._parsed_head = 0
        self._timer: asyncio.TimerHandle | None = None
        self._arm(self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._state == _REFUSED:
            return
        if self._state == _IDLE:  # the next request on a kept-alive connection begins
            self._state, self._head_bytes = _HEAD, 0
            self._arm(self.head_timeout)
        if self._state == _HEAD:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if self._state == _HEAD and self._head_bytes > self.max_head_bytes:
            self._head_too_large()
        elif self._state == _BODY:
            self._arm(self.body_timeout)  # an idle time-out: each piece of the body restarts it

    def on_message_begin(self) -> None:
        self._parsed_head = 0
        super().on_message_begin()  # type: ignore[misc]

    def on_url(self, url: bytes) -> None:
        self._parsed_head += len(url)
        super().on_url(url)  # type: ignore[misc]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head += len(name) + len(value) + 4
        super().on_header(name, value)  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        # A head that arrived whole in one read: measured from what the parser handed over.
        if self._parsed_head > self.max_head_bytes:
            self._head_too_large()
            return
        # uvicorn's own test of AINARRES_HTTP_MAX_CONCURRENCY, made first so that the refusal is the service's
        # problem+json with Retry-After, not uvicorn's text/plain "Service Unavailable". Not for a request pipelined
        # behind one still running: its answer must come after that one's, as uvicorn queues it.
        limit = self.limit_concurrency
        if limit is not None and not self._busy() and (len(self.connections) >= limit or len(self.tasks) >= limit):
            log.warning("refused a request: %d connections, %d requests at once (AINARRES_HTTP_MAX_CONCURRENCY=%d)",
                        len(self.connections), len(self.tasks), limit)
            self._refuse(503, "Service Unavailable", Unavailable(
                f"this process is serving as many connections and requests as it may at once ({limit}, "
                "AINARRES_HTTP_MAX_CONCURRENCY); nothing was done. Retry after Retry-After seconds (another "
                "replica may have room)", retry_after=1))
            return
        self._state = _BODY
        self._arm(self.body_timeout)
        super().on_headers_complete()  # type: ignore[misc]

    def on_body(self, body: bytes) -> None:
        if self._state != _REFUSED:
            super().on_body(body)  # type: ignore[misc]

    def on_message_complete(self) -> None:
        if self._state == _REFUSED:
            return
        self._state = _IDLE
        self._disarm()
        super().on_message_complete()  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        """What uvicorn answers to a request its parser cannot read (a malformed request line, header or
        Content-Length, a bad chunk): problem+json like every other refusal, not uvicorn's text/plain."""
        self._refuse(400, "Bad Request", Invalid(
                     "the request is not valid HTTP/1.1 (its request line, a header, Content-Length or the chunked "
                     "body is malformed); send it with an HTTP client library"))

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _busy(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._state == _HEAD:
            if self._busy():  # a pipelined head while the previous response runs: wait for it
                self._arm(self.head_timeout)
            elif self._head_bytes:
                self._refuse(408, "Request Timeout", Invalid(
                    f"the request line and headers must arrive within {self.head_timeout:g} seconds"))
            else:
                self.transport.close()
        elif self._state == _BODY:
            if self.flow.read_paused:  # the application has not read what it was sent yet: not the client's delay
                self._arm(self.body_timeout)
            elif self.cycle is not None and self.cycle.response_started:
                self.transport.close()
            else:
                self._refuse(408, "Request Timeout", Invalid(
                    f"the request body stopped arriving for {self.body_timeout:g} seconds"))

    def _head_too_large(self) -> None:
        self._refuse(431, "Request Header Fields Too Large",
                     PayloadTooLarge(f"the request line and headers are limited to {self.max_head_bytes} bytes"))

    def _refuse(self, status: int, reason: str, refusal: AinarresError) -> None:
        self._disarm()
        self._state = _REFUSED
        running = self._busy()
        if not (running and self.cycle.response_started):
            self.transport.write(_raw_problem(status, reason, refusal))
        if running:  # the application reading the body learns that the client is gone
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()


EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
_MAX_KEYS = 100_000


class Buckets:
    """Token buckets by key: `rate` tokens a second up to `burst`; memory bounded at _MAX_KEYS keys."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take one token for `key`: 0 if there was one, else the seconds until there is."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            if key not in self._buckets and len(self._buckets) >= _MAX_KEYS:
                self._prune(now)
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
        if len(self._buckets) >= _MAX_KEYS:  # all busy: forget them rather than grow without bound
            self._buckets.clear()


class RateLimit:
    """Per-agent request rate limit, per process: a token bucket keyed by the bearer token's `sub` (its
    signature checked, no database read), or by client address for requests without a valid token.
    Past it: 429 `rate_limited` with Retry-After. Health, readiness and metrics are not counted."""

    def __init__(self, app: ASGIApp, settings: Settings, signer: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.signer = signer
        self.buckets = (Buckets(settings.rate_limit_per_second, settings.rate_limit_burst, clock)
                        if settings.rate_limit_per_second > 0 else None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.buckets is None or scope["type"] != "http" or scope.get("path") in EXEMPT:
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(self._key(scope))
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry = max(1, math.ceil(wait))
        err = RateLimited(f"too many requests; retry after {retry} second{'s' if retry != 1 else ''} "
                          f"(at most {self.buckets.rate:g} a second, bursts of {self.buckets.burst:g})",
                          retry_after=retry)
        resp = problems.refusal(err, URL(scope=scope).path)
        resp.headers["Retry-After"] = str(retry)
        await resp(scope, receive, send)

    def _key(self, scope: Scope) -> str:
        auth = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), None)
        if auth is not None and self.signer is not None and len(auth) <= 8192:
            scheme, _, token = auth.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                try:
                    claims = self.signer().verify(token.strip())
                except (AinarresError, AttributeError):  # a bad token, or no state yet: by address
                    pass
                else:
                    return f"sub:{claims['sub']}"
        client = scope.get("client")
        return f"addr:{client[0] if client else '?'}"
