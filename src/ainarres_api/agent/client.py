"""A typed Python client for the AINARRES HTTP API (async `AsyncClient`, sync `Client`), on httpx.

Every verb returns the service's JSON envelope; every refusal raises `Refused` with the stable
`code`, the HTTP status, the `detail` that says what to do next and, where the service sent it,
the current `task`. Retries are only made where they are safe: a request that never left (a
connection error) is always retried; one that may have been applied is retried only when repeating
it cannot change anything twice (reads, heartbeats, a create with its idempotency key, which is
generated once per logical call and reused on every retry, and a claim, whose retry is recognised
through `already_holding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypedDict, cast

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
MAX_WAIT_SECONDS = 60.0  # the service's bound on one long-poll claim

Verb = Literal["advance", "reject", "release", "block"]
Json = dict[str, Any]
OversightView = Literal["board", "feed", "stuck", "demand", "agents", "track-record"]
Arts = Sequence[Mapping[str, Any]] | None  # artifacts: references {type, uri|path|sha|name, hash?}


class Lease(TypedDict):
    id: str
    expires_at: str


class Task(TypedDict, total=False):
    id: str
    project: str
    lane: str
    stage: str
    state: str
    title: str
    payload: dict[str, Any]
    priority: int
    required_features: list[str]
    depends_on: list[str]
    attempts: int
    rework_count: int
    blocked: bool
    blocked_reason: str | None
    holder: str | None
    lease_expires_at: str | None
    created_at: str
    updated_at: str


class Event(TypedDict, total=False):
    id: int
    task_id: str
    type: str
    actor: str | None
    family: str | None
    data: dict[str, Any]
    created_at: str


class Result(TypedDict, total=False):
    """A verb's answer: `code` ("ok", "created", "existing", "blocked"), the task and the event."""

    code: str
    task: Task
    event: Event | None
    lease: Lease
    next: Any  # advance/reject with claim_next: the next claim's answer, or its refusal's problem document


class Claim(TypedDict, total=False):
    """A claim's answer: `code` "claimed" with task and lease (and the stage's card, if any), or "empty"."""

    code: str
    task: Task | None
    lease: Lease | None
    event: Event | None
    card: Any
    recovered: bool


class Heartbeat(TypedDict):
    code: str
    lease: Lease
    task: Task


class Me(TypedDict, total=False):
    sub: str
    family: str
    features: list[str]
    scope: list[str] | None
    max_active: int
    lanes: list[str]
    held: list[dict[str, Any]]


class Page(TypedDict):
    items: list[dict[str, Any]]
    next: Any


class Refused(Exception):
    """The service refused the call; nothing was changed. `code` is stable, `detail` says what to do."""

    def __init__(self, code: str, status: int, detail: str, task: Task | None = None,
                 body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.code = code
        self.status = status
        self.detail = detail
        self.task = task
        self.body: dict[str, Any] = dict(body or {"code": code, "status": status, "detail": detail})


class Unreachable(Exception):
    """The service could not be reached or answered with something that is not the API."""


@dataclass(frozen=True)
class Call:
    """One HTTP request, described before it is sent (so a retry resends exactly the same thing)."""

    method: str
    path: str
    body: Any = None
    params: Mapping[str, Any] | None = None
    idempotent: bool = False  # repeating it after it may have been applied changes nothing twice
    wait: float = 0.0  # seconds the server may hold the request open (long poll)
    claim: bool = False


def _clean(body: Mapping[str, Any]) -> Json:
    return {k: v for k, v in body.items() if v is not None}


def _next(claim_next: bool | str) -> dict[str, Any] | None:
    """The `next` of an advance or reject: a lane's key claims from it, True from any of the caller's lanes."""
    if isinstance(claim_next, str):
        return {"lane": claim_next}
    return {} if claim_next else None


def _artifacts(artifacts: Arts) -> list[dict[str, Any]] | None:
    return [dict(a) for a in artifacts] if artifacts else None


class Calls:
    """Builds the request of every endpoint; shared by the async and the sync client."""

    @staticmethod
    def create(lane: str, title: str, *, payload: Mapping[str, Any] | None = None,
               priority: int | None = None, required_features: Sequence[str] | None = None,
               depends_on: Sequence[str] | None = None,
               idempotency_key: str | None = None) -> Call:
        # The key is fixed here, once per logical call, so every retry of this Call is the same create.
        key = idempotency_key or f"client-{uuid.uuid4()}"
        body = _clean({"lane": lane, "title": title,
                       "payload": dict(payload) if payload is not None else None, "priority": priority,
                       "required_features": list(required_features or []) or None,
                       "depends_on": [str(d) for d in depends_on or []] or None, "idempotency_key": key})
        return Call("POST", "/v1/tasks", body, idempotent=True)

    @staticmethod
    def claim(lane: str | None = None, wait_seconds: float = 0) -> Call:
        wait = max(0.0, min(float(wait_seconds), MAX_WAIT_SECONDS))
        return Call("POST", "/v1/claims", _clean({"lane": lane, "wait_seconds": wait or None}),
                    idempotent=True, wait=wait, claim=True)

    @staticmethod
    def heartbeat(task_id: str, lease: str) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/heartbeat", {"lease": str(lease)}, idempotent=True)

    @staticmethod
    def progress(task_id: str, lease: str, note: str,
                 artifacts: Arts = None) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/progress",
                    _clean({"lease": str(lease), "note": note, "artifacts": _artifacts(artifacts)}))

    @staticmethod
    def advance(task_id: str, lease: str, to: str, note: str | None = None,
                artifacts: Arts = None, claim_next: bool | str = False) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/advance",
                    _clean({"lease": str(lease), "to": to, "note": note, "artifacts": _artifacts(artifacts),
                            "next": _next(claim_next)}))

    @staticmethod
    def reject(task_id: str, lease: str, to: str, reason: str,
               artifacts: Arts = None, claim_next: bool | str = False) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/reject",
                    _clean({"lease": str(lease), "to": to, "reason": reason,
                            "artifacts": _artifacts(artifacts), "next": _next(claim_next)}))

    @staticmethod
    def release(task_id: str, lease: str, reason: str | None = None) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/release", _clean({"lease": str(lease), "reason": reason}))

    @staticmethod
    def block(task_id: str, lease: str, reason: str) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/block", {"lease": str(lease), "reason": reason})

    @staticmethod
    def unblock(task_id: str, note: str | None = None) -> Call:
        return Call("POST", f"/v1/tasks/{task_id}/unblock", _clean({"note": note}))

    @staticmethod
    def usage(task_id: str, *, model: str | None = None, input_tokens: int | None = None,
              output_tokens: int | None = None, cost: str | Decimal | None = None, currency: str | None = None,
              wall_seconds: float | None = None, event: int | None = None, family: str | None = None,
              idempotency_key: str | None = None) -> Call:
        # The key is fixed here, once per logical call, so every retry of this Call is the same report.
        key = idempotency_key or f"client-{uuid.uuid4()}"
        body = _clean({"model": model, "input_tokens": input_tokens, "output_tokens": output_tokens,
                       "cost": str(cost) if cost is not None else None, "currency": currency,
                       "wall_seconds": wall_seconds, "event": event, "family": family, "idempotency_key": key})
        return Call("POST", f"/v1/tasks/{task_id}/usage", body, idempotent=True)

    @staticmethod
    def get(path: str, params: Mapping[str, Any] | None = None) -> Call:
        return Call("GET", path, params=_clean(params or {}) or None, idempotent=True)

    @staticmethod
    def post(path: str, body: Any = None, *, idempotent: bool = False) -> Call:
        return Call("POST", path, body, idempotent=idempotent)

    @staticmethod
    def patch(path: str, body: Any) -> Call:
        return Call("PATCH", path, body, idempotent=True)

    @staticmethod
    def delete(path: str) -> Call:
        return Call("DELETE", path, idempotent=True)


def refusal(status: int, body: Any) -> Refused:
    """The `Refused` for an error response (problem+json, or whatever came back)."""
    if isinstance(body, Mapping) and isinstance(body.get("code"), str):
        task = body.get("task")
        return Refused(body["code"], status, str(body.get("detail") or body.get("title") or ""),
                       cast(Task, task) if isinstance(task, Mapping) else None, body)
    code = {401: "unauthenticated", 403: "not_eligible", 404: "not_found", 409: "conflict",
            413: "payload_too_large", 422: "invalid"}.get(status, "internal" if status >= 500 else "invalid")
    return Refused(code, status, f"HTTP {status}: {str(body)[:500]}")


def _retryable_status(status: int) -> bool:
    return status in (502, 503, 504)


def _delay(attempt: int, backoff: float) -> float:
    return float(backoff * (2 ** attempt) * (0.5 + random.random()))


def _answer(call: Call, resp: httpx.Response, retried: bool) -> Any:
    """The decoded answer, or raise `Refused`; a retried claim meeting its own hold is that claim."""
    try:
        body = resp.json() if resp.content else None
    except ValueError:
        body = resp.text
    if resp.status_code < 400:
        return body
    err = refusal(resp.status_code, body)
    if call.claim and retried and err.code == "already_holding" and err.body.get("lease"):
        # The first attempt was applied but its answer was lost: the hold it made is ours.
        return {"code": "claimed", "task": err.task, "lease": err.body["lease"], "event": None,
                "recovered": True}
    raise err


def _unsent(exc: httpx.TransportError) -> bool:
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def seconds_left(lease: Mapping[str, Any]) -> float:
    """Seconds until a lease's `expires_at`, by this machine's clock."""
    exp = datetime.fromisoformat(str(lease["expires_at"]).replace("Z", "+00:00"))
    if exp.tzinfo is None:
        exp = exp.replace(tzinfo=UTC)
    return (exp - datetime.now(UTC)).total_seconds()


def beat_interval(lease: Mapping[str, Any], every: float | None = None) -> float:
    """How long to wait before the next heartbeat: a third of what is left, within [0.2, 60] s."""
    if every is not None:
        return every
    return max(0.2, min(60.0, seconds_left(lease) / 3))


class _Base:
    def __init__(self, url: str, token: str | None, retries: int, backoff: float, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        h = {"Accept": "application/json", "User-Agent": "ainarres-client"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def _timeout(self, call: Call) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=self.timeout + call.wait)

    def _may_retry(self, call: Call, attempt: int, exc: httpx.TransportError | None,
                   status: int | None) -> bool:
        if attempt >= self.retries:
            return False
        if exc is not None:
            return _unsent(exc) or call.idempotent
        return status is not None and _retryable_status(status) and call.idempotent


class AsyncClient(_Base):
    """The AINARRES API over asyncio: `async with AsyncClient(url, token) as c: await c.claim()`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, retries: int = 3,
                 backoff: float = 0.2, timeout: float = 30.0, http: httpx.AsyncClient | None = None) -> None:
        super().__init__(url, token, retries, backoff, timeout)
        self._own = http is None
        self.http = http or httpx.AsyncClient(base_url=self.url)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def send(self, call: Call) -> Any:
        """Send one described request, retrying where that is safe; raise `Refused` or `Unreachable`."""
        attempt = 0
        while True:
            try:
                resp = await self.http.request(call.method, call.path, json=call.body, params=call.params,
                                               headers=self._headers(), timeout=self._timeout(call))
            except httpx.TransportError as exc:
                if not self._may_retry(call, attempt, exc, None):
                    raise Unreachable(f"{call.method} {self.url}{call.path}: {exc!r}") from exc
            else:
                if not self._may_retry(call, attempt, None, resp.status_code):
                    return _answer(call, resp, attempt > 0)
            await asyncio.sleep(_delay(attempt, self.backoff))
            attempt += 1

    async def create(self, lane: str, title: str, *, payload: Mapping[str, Any] | None = None,
                     priority: int | None = None, required_features: Sequence[str] | None = None,
                     depends_on: Sequence[str] | None = None, idempotency_key: str | None = None) -> Result:
        """Create a task at its lane's initial stage (`code` "created", or "existing" for a known key)."""
        return cast(Result, await self.send(Calls.create(
            lane, title, payload=payload, priority=priority, required_features=required_features,
            depends_on=depends_on, idempotency_key=idempotency_key)))

    async def claim(self, lane: str | None = None, *, wait_seconds: float = 0) -> Claim:
        """Claim the best task you may do; with `wait_seconds`, long-poll until one comes or time is up."""
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            left = deadline - time.monotonic()
            out = cast(Claim, await self.send(Calls.claim(lane, max(0.0, left))))
            if out.get("code") != "empty" or deadline - time.monotonic() <= 0.05:
                return out

    async def heartbeat(self, task_id: str, lease: str) -> Heartbeat:
        """Extend a held lease."""
        return cast(Heartbeat, await self.send(Calls.heartbeat(task_id, lease)))

    async def progress(self, task_id: str, lease: str, note: str,
                       artifacts: Arts = None) -> Result:
        """Record progress (renews the lease)."""
        return cast(Result, await self.send(Calls.progress(task_id, lease, note, artifacts)))

    async def advance(self, task_id: str, lease: str, to: str, note: str | None = None,
                      artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        """Move a held task forward to stage `to`; the hold is released. `claim_next` (True, or a lane's key): claim
        the next task in the same call; the answer's `next` is that claim's answer (or its refusal's problem)."""
        return cast(Result, await self.send(Calls.advance(task_id, lease, to, note, artifacts, claim_next)))

    async def reject(self, task_id: str, lease: str, to: str, reason: str,
                     artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        """Send a held task back to stage `to` for rework; the hold is released. `claim_next`: as for advance."""
        return cast(Result, await self.send(Calls.reject(task_id, lease, to, reason, artifacts, claim_next)))

    async def release(self, task_id: str, lease: str, reason: str | None = None) -> Result:
        """Give a held task back (attempts +1)."""
        return cast(Result, await self.send(Calls.release(task_id, lease, reason)))

    async def block(self, task_id: str, lease: str, reason: str) -> Result:
        """Park a held task for a human."""
        return cast(Result, await self.send(Calls.block(task_id, lease, reason)))

    async def unblock(self, task_id: str, note: str | None = None) -> Result:
        """Make a blocked task claimable again."""
        return cast(Result, await self.send(Calls.unblock(task_id, note)))

    async def usage(self, task_id: str, **report: Any) -> Json:
        """Record what work on a task cost: model, input_tokens, output_tokens, cost (decimal text) with its
        currency, wall_seconds, event (the transition it paid for); leave out what is unknown."""
        return cast(Json, await self.send(Calls.usage(task_id, **report)))

    async def task(self, task_id: str) -> Task:
        """Read one task."""
        return cast(Task, await self.send(Calls.get(f"/v1/tasks/{task_id}")))

    async def events(self, task_id: str, after: int = 0, limit: int = 200) -> Page:
        """A task's events, oldest first."""
        return cast(Page, await self.send(Calls.get(f"/v1/tasks/{task_id}/events",
                                                     {"after": after, "limit": limit})))

    async def me(self) -> Me:
        """Who you are, your effective features, what you hold."""
        return cast(Me, await self.send(Calls.get("/v1/me")))

    async def card(self, task_id: str) -> Json:
        """The role card of a task's current stage: instructions and the ways out."""
        return cast(Json, await self.send(Calls.get(f"/v1/tasks/{task_id}/card")))

    async def oversee(self, view: OversightView, **filters: Any) -> Page:
        """An oversight read (seat:overseer or seat:monitor): `await c.oversee("stuck", lane="dev")`."""
        return cast(Page, await self.send(Calls.get(f"/v1/{view}", filters)))

    async def get(self, path: str, **params: Any) -> Any:
        """Any read (admin and oversight lists included): `await c.get("/v1/families")`."""
        return await self.send(Calls.get(path, params))

    async def post(self, path: str, body: Any = None) -> Any:
        """Any other call, sent once (never retried after it may have been applied)."""
        return await self.send(Calls.post(path, body))

    # Administration (seat:admin; denials also seat:overseer).
    async def create_feature(self, name: str, description: str = "") -> Json:
        return cast(Json, await self.post("/v1/features", {"name": name, "description": description}))

    async def create_family(self, key: str, features: Sequence[str], *, description: str = "",
                            max_active: int = 1) -> Json:
        return cast(Json, await self.post("/v1/families", {
            "key": key, "features": list(features), "description": description, "max_active": max_active}))

    async def update_family(self, key: str, **changes: Any) -> Json:
        return cast(Json, await self.send(Calls.patch(f"/v1/families/{key}", _clean(changes))))

    async def mint_token(self, family: str, *, ttl_seconds: int | None = None,
                         scope: Sequence[str] | None = None, sub: str | None = None) -> Json:
        return cast(Json, await self.post("/v1/tokens", _clean({
            "family": family, "ttl_seconds": ttl_seconds, "scope": list(scope) if scope is not None else None,
            "sub": sub})))

    async def revoke_token(self, jti: str) -> None:
        await self.send(Calls.delete(f"/v1/tokens/{jti}"))

    async def deny(self, family: str, feature: str, reason: str, expires_at: str | None = None) -> Json:
        return cast(Json, await self.post(f"/v1/families/{family}/denials", _clean({
            "feature": feature, "reason": reason, "expires_at": expires_at})))

    async def lift(self, family: str, feature: str) -> None:
        await self.send(Calls.delete(f"/v1/families/{family}/denials/{feature}"))

    async def create_workflow(self, workflow: Mapping[str, Any]) -> Json:
        return cast(Json, await self.post("/v1/workflows", dict(workflow)))

    async def create_project(self, slug: str, context: Mapping[str, Any] | None = None) -> Json:
        return cast(Json, await self.post("/v1/projects", {"slug": slug, "context": dict(context or {})}))

    async def create_lane(self, project: str, key: str, workflow: str,
                          context: Mapping[str, Any] | None = None) -> Json:
        return cast(Json, await self.post("/v1/lanes", {
            "project": project, "key": key, "workflow": workflow, "context": dict(context or {})}))

    @contextlib.asynccontextmanager
    async def held(self, claim: Mapping[str, Any], *, every: float | None = None) -> AsyncIterator[Hold]:
        """Hold a claimed task: heartbeat in the background while the block runs, release on an exception.

        Inside, finish with `h.advance(...)`, `h.reject(...)`, `h.release(...)` or `h.block(...)`.
        Leaving normally without finishing keeps the hold (it expires on its own).
        """
        task, lease = claim.get("task"), claim.get("lease")
        if not task or not lease:
            raise ValueError("held() needs a claim answer with a task and a lease (code 'claimed')")
        h = Hold(self, str(task["id"]), cast(Lease, dict(lease)), cast(Task, dict(task)))
        beats = asyncio.create_task(h._beat(every), name=f"heartbeat {h.task_id}")
        try:
            yield h
        except BaseException as exc:
            beats.cancel()
            if not h.finished and not h.lost.is_set():
                with contextlib.suppress(Refused, Unreachable):
                    reason = f"the holder failed: {type(exc).__name__}: {exc}"[:2000]
                    await asyncio.shield(self.release(h.task_id, h.lease["id"], reason))
                h.finished = True
            raise
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats


@dataclass
class Hold:
    """A task held under a lease, heartbeated by `AsyncClient.held` until a finishing verb."""

    client: AsyncClient
    task_id: str
    lease: Lease
    task: Task
    finished: bool = False
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    refusal: Refused | None = None
    beats: int = 0

    async def _beat(self, every: float | None) -> None:
        while not self.finished:
            await asyncio.sleep(beat_interval(self.lease, every))
            if self.finished:
                return
            try:
                out = await self.client.heartbeat(self.task_id, self.lease["id"])
            except Refused as exc:
                self.refusal = exc
                self.lost.set()
                return
            except Unreachable:
                continue  # try again at the next beat; the lease may still be alive
            self.lease = out["lease"]
            self.beats += 1

    async def _finish(self, out: Any) -> Result:
        self.finished = True
        return cast(Result, out)

    async def progress(self, note: str, artifacts: Arts = None) -> Result:
        out = await self.client.progress(self.task_id, self.lease["id"], note, artifacts)
        if "lease" in out:
            self.lease = out["lease"]
        return out

    async def advance(self, to: str, note: str | None = None,
                      artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        out = await self.client.advance(self.task_id, self.lease["id"], to, note, artifacts, claim_next=claim_next)
        return await self._finish(out)

    async def reject(self, to: str, reason: str, artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        out = await self.client.reject(self.task_id, self.lease["id"], to, reason, artifacts, claim_next=claim_next)
        return await self._finish(out)

    async def release(self, reason: str | None = None) -> Result:
        return await self._finish(await self.client.release(self.task_id, self.lease["id"], reason))

    async def block(self, reason: str) -> Result:
        return await self._finish(await self.client.block(self.task_id, self.lease["id"], reason))


class Client(_Base):
    """The AINARRES API, blocking: `with Client(url, token) as c: c.claim()`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, *, retries: int = 3,
                 backoff: float = 0.2, timeout: float = 30.0, http: httpx.Client | None = None) -> None:
        super().__init__(url, token, retries, backoff, timeout)
        self._own = http is None
        self.http = http or httpx.Client(base_url=self.url)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    def send(self, call: Call) -> Any:
        """Send one described request, retrying where that is safe; raise `Refused` or `Unreachable`."""
        attempt = 0
        while True:
            try:
                resp = self.http.request(call.method, call.path, json=call.body, params=call.params,
                                         headers=self._headers(), timeout=self._timeout(call))
            except httpx.TransportError as exc:
                if not self._may_retry(call, attempt, exc, None):
                    raise Unreachable(f"{call.method} {self.url}{call.path}: {exc!r}") from exc
            else:
                if not self._may_retry(call, attempt, None, resp.status_code):
                    return _answer(call, resp, attempt > 0)
            time.sleep(_delay(attempt, self.backoff))
            attempt += 1

    def create(self, lane: str, title: str, *, payload: Mapping[str, Any] | None = None,
               priority: int | None = None, required_features: Sequence[str] | None = None,
               depends_on: Sequence[str] | None = None, idempotency_key: str | None = None) -> Result:
        """Create a task at its lane's initial stage (`code` "created", or "existing" for a known key)."""
        return cast(Result, self.send(Calls.create(
            lane, title, payload=payload, priority=priority, required_features=required_features,
            depends_on=depends_on, idempotency_key=idempotency_key)))

    def claim(self, lane: str | None = None, *, wait_seconds: float = 0) -> Claim:
        """Claim the best task you may do; with `wait_seconds`, long-poll until one comes or time is up."""
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while True:
            left = deadline - time.monotonic()
            out = cast(Claim, self.send(Calls.claim(lane, max(0.0, left))))
            if out.get("code") != "empty" or deadline - time.monotonic() <= 0.05:
                return out

    def heartbeat(self, task_id: str, lease: str) -> Heartbeat:
        """Extend a held lease."""
        return cast(Heartbeat, self.send(Calls.heartbeat(task_id, lease)))

    def progress(self, task_id: str, lease: str, note: str,
                 artifacts: Arts = None) -> Result:
        """Record progress (renews the lease)."""
        return cast(Result, self.send(Calls.progress(task_id, lease, note, artifacts)))

    def advance(self, task_id: str, lease: str, to: str, note: str | None = None,
                artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        """Move a held task forward to stage `to`; the hold is released. `claim_next`: as AsyncClient.advance."""
        return cast(Result, self.send(Calls.advance(task_id, lease, to, note, artifacts, claim_next)))

    def reject(self, task_id: str, lease: str, to: str, reason: str,
               artifacts: Arts = None, *, claim_next: bool | str = False) -> Result:
        """Send a held task back to stage `to` for rework; the hold is released. `claim_next`: as for advance."""
        return cast(Result, self.send(Calls.reject(task_id, lease, to, reason, artifacts, claim_next)))

    def release(self, task_id: str, lease: str, reason: str | None = None) -> Result:
        """Give a held task back (attempts +1)."""
        return cast(Result, self.send(Calls.release(task_id, lease, reason)))

    def block(self, task_id: str, lease: str, reason: str) -> Result:
        """Park a held task for a human."""
        return cast(Result, self.send(Calls.block(task_id, lease, reason)))

    def unblock(self, task_id: str, note: str | None = None) -> Result:
        """Make a blocked task claimable again."""
        return cast(Result, self.send(Calls.unblock(task_id, note)))

    def usage(self, task_id: str, **report: Any) -> Json:
        """Record what work on a task cost (see AsyncClient.usage)."""
        return cast(Json, self.send(Calls.usage(task_id, **report)))

    def task(self, task_id: str) -> Task:
        """Read one task."""
        return cast(Task, self.send(Calls.get(f"/v1/tasks/{task_id}")))

    def events(self, task_id: str, after: int = 0, limit: int = 200) -> Page:
        """A task's events, oldest first."""
        call = Calls.get(f"/v1/tasks/{task_id}/events", {"after": after, "limit": limit})
        return cast(Page, self.send(call))

    def me(self) -> Me:
        """Who you are, your effective features, what you hold."""
        return cast(Me, self.send(Calls.get("/v1/me")))

    def card(self, task_id: str) -> Json:
        """The role card of a task's current stage: instructions and the ways out."""
        return cast(Json, self.send(Calls.get(f"/v1/tasks/{task_id}/card")))

    def oversee(self, view: OversightView, **filters: Any) -> Page:
        """An oversight read (seat:overseer or seat:monitor): `c.oversee("stuck", lane="dev")`."""
        return cast(Page, self.send(Calls.get(f"/v1/{view}", filters)))

    def get(self, path: str, **params: Any) -> Any:
        """Any read (admin and oversight lists included): `c.get("/v1/families")`."""
        return self.send(Calls.get(path, params))

    def post(self, path: str, body: Any = None) -> Any:
        """Any other call, sent once (never retried after it may have been applied)."""
        return self.send(Calls.post(path, body))

    def create_feature(self, name: str, description: str = "") -> Json:
        return cast(Json, self.post("/v1/features", {"name": name, "description": description}))

    def create_family(self, key: str, features: Sequence[str], *, description: str = "",
                      max_active: int = 1) -> Json:
        return cast(Json, self.post("/v1/families", {
            "key": key, "features": list(features), "description": description, "max_active": max_active}))

    def update_family(self, key: str, **changes: Any) -> Json:
        return cast(Json, self.send(Calls.patch(f"/v1/families/{key}", _clean(changes))))

    def mint_token(self, family: str, *, ttl_seconds: int | None = None, scope: Sequence[str] | None = None,
                   sub: str | None = None) -> Json:
        return cast(Json, self.post("/v1/tokens", _clean({
            "family": family, "ttl_seconds": ttl_seconds, "scope": list(scope) if scope is not None else None,
            "sub": sub})))

    def revoke_token(self, jti: str) -> None:
        self.send(Calls.delete(f"/v1/tokens/{jti}"))

    def deny(self, family: str, feature: str, reason: str, expires_at: str | None = None) -> Json:
        return cast(Json, self.post(f"/v1/families/{family}/denials", _clean({
            "feature": feature, "reason": reason, "expires_at": expires_at})))

    def lift(self, family: str, feature: str) -> None:
        self.send(Calls.delete(f"/v1/families/{family}/denials/{feature}"))

    def create_workflow(self, workflow: Mapping[str, Any]) -> Json:
        return cast(Json, self.post("/v1/workflows", dict(workflow)))

    def create_project(self, slug: str, context: Mapping[str, Any] | None = None) -> Json:
        return cast(Json, self.post("/v1/projects", {"slug": slug, "context": dict(context or {})}))

    def create_lane(self, project: str, key: str, workflow: str,
                    context: Mapping[str, Any] | None = None) -> Json:
        return cast(Json, self.post("/v1/lanes", {
            "project": project, "key": key, "workflow": workflow, "context": dict(context or {})}))

