"""The graceful drain of one API process (docs/operations.md "Drain", ADR 0018).

`Drain.begin()` (on SIGTERM: ops/runtime.py `DrainingServer`) turns the process away from new work at
once, while the listener stays open:

- `/readyz` answers 503, so a load balancer's health check takes the process out of rotation;
- a new request (other than /healthz, /readyz, /metrics) is answered 503 `unavailable` with Retry-After
  and `Connection: close`: nothing was done, send it again (another process answers);
- every response still being served carries `Connection: close`, so no client or proxy reuses the
  connection;
- the waiting long-poll claims are answered at once (`empty`: claim again; the wake hub's `drain`);
- the open event streams end with a comment saying to reconnect (Last-Event-ID resumes them elsewhere).

Requests in flight finish. `settled()` returns once none is left (or the bound passes); the server then
closes the listener and shuts down as usual. Nothing here imports the web framework's routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from starlette.datastructures import URL
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ainarres_api.server.api import problems
from ainarres_api.server.errors import Unavailable

log = logging.getLogger("ainarres.drain")

PROBES = frozenset({"/healthz", "/readyz", "/metrics"})  # answered while draining, never waited for
STREAMS = frozenset({"/v1/events/stream"})  # ended when the drain begins
RETRY_AFTER_SECONDS = 1
DETAIL = ("this API process is shutting down; nothing was done. Send the request again: another process "
          "answers it (behind a load balancer, at once)")
_GOODBYE = b": this process is shutting down; reconnect (Last-Event-ID resumes the stream)\n\n"


class Drain:
    """Whether this process drains, what to tell when it begins, and how many requests it still serves."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._began = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hooks: list[Callable[[], None]] = []

    def on_begin(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Call `hook` when the drain begins (at once if it has); returns a function that unregisters it."""
        if self.draining:
            hook()
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    def begin(self) -> None:
        """Stop taking new work (see the module docstring). Call it on the event loop's thread."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d request(s) in flight", self.in_flight)
        self._began.set()
        for hook in list(self._hooks):
            try:
                hook()
            except Exception:  # a hook failing must not stop the drain
                log.exception("a drain hook failed")

    async def began(self) -> None:
        """Return once the drain has begun."""
        await self._began.wait()

    async def settled(self, seconds: float) -> bool:
        """Wait until no request is in flight (True), or `seconds` pass (False)."""
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()


class Draining:
    """The drain at the door: refuses new requests while draining, counts the ones in flight, ends streams."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in PROBES:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _refuse(scope, receive, send)
            return
        drain = self.drain

        async def closing(msg: Message) -> None:
            if msg["type"] == "http.response.start" and drain.draining:
                msg = {**msg, "headers": [*(msg.get("headers") or []), (b"connection", b"close")]}
            await send(msg)

        drain._enter()
        try:
            if scope.get("path") in STREAMS:
                await self._stream(scope, receive, closing)
            else:
                await self.app(scope, receive, closing)
        finally:
            drain._leave()

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a stream until it ends or the drain begins; then end it with a comment saying to reconnect."""
        started = finished = False

        async def tracking(msg: Message) -> None:
            nonlocal started, finished
            if msg["type"] == "http.response.start":
                started = True
            elif msg["type"] == "http.response.body" and not msg.get("more_body", False):
                finished = True
            await send(msg)

        serving = asyncio.ensure_future(self.app(scope, receive, tracking))
        stopping = asyncio.ensure_future(self.drain.began())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
        if not serving.cancelled():
            serving.result()  # the stream ended by itself (or failed: raised here as it would have been)
            return
        if not started:
            await _refuse(scope, receive, send)
        elif not finished:
            await send({"type": "http.response.body", "body": _GOODBYE, "more_body": False})


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    resp = problems.refusal(Unavailable(DETAIL, retry_after=RETRY_AFTER_SECONDS), URL(scope=scope).path)
    resp.headers["Connection"] = "close"
    await resp(scope, receive, send)
