"""Prometheus metrics: one registry per app, a middleware timing the verbs, and scrape-time figures.

Counters of verb calls are per process (sum them across replicas). The counters of escalations,
blocks, reclaims and events are read from the events table at scrape time, so they include what
happens inside a claim (lazy recovery) and what every replica did since this process started
watching: on several replicas aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import asyncpg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ainarres_api.server.services.oversight import Scrape

VERBS = ("create", "claim", "heartbeat", "progress", "advance", "reject", "release", "block", "unblock")
_HELD_VERB = re.compile(r"^/v1/tasks/[^/]+/(heartbeat|progress|advance|reject|release|block|unblock)$")
# Verb responses are small envelopes; a larger body is not parsed for its code.
_MAX_PARSED_BODY = 1_048_576
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def verb_of(method: str, path: str) -> str | None:
    """The agent verb a request calls, if it calls one."""
    if method != "POST":
        return None
    if path == "/v1/tasks":
        return "create"
    if path == "/v1/claims":
        return "claim"
    m = _HELD_VERB.match(path)
    return m.group(1) if m else None


def _code_of(body: bytes, status: int) -> str:
    """The stable `code` of a verb's response (envelope or problem+json)."""
    # Verb envelopes start with their code ({"code":"claimed",…}): read it without parsing the body.
    if body.startswith(b'{"code":"'):
        end = body.find(b'"', 9)
        if end > 9 and b"\\" not in body[9:end]:
            return body[9:end].decode()
    if body and len(body) <= _MAX_PARSED_BODY:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("code"), str):
            return str(doc["code"])
    return f"http_{status}"


class Metrics:
    """The app's metrics, in a registry of its own (several apps may share one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.verb_calls = Counter("ainarres_verb_calls", "Agent verb calls by verb and result code "
                                  "(the response's `code`, or the error's)", ["verb", "code"], registry=r)
        self.verb_seconds = Histogram("ainarres_verb_duration_seconds", "Agent verb latency, request to last "
                                      "byte (a claim's includes its long-poll wait)", ["verb"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.claims = Counter("ainarres_claims", "Claims by outcome: claimed or empty", ["result"],
                              registry=r)
        self.claims_in_flight = Gauge("ainarres_claims_in_flight", "Claim requests being served now, "
                                      "long-polling ones included", registry=r)
        self.events = Counter("ainarres_events_recorded", "Events recorded in the database by type "
                              "(every replica) since this process started", ["type"], registry=r)
        self.reclaims = Counter("ainarres_reclaims", "Claims that took over an expired lease (lazy "
                                "recovery; every replica) since this process started", registry=r)
        self.escalations = Counter("ainarres_escalations", "Tasks escalated to a higher tier (every "
                                   "replica) since this process started", registry=r)
        self.blocks = Counter("ainarres_blocks", "Tasks blocked for a human (every replica) since this "
                              "process started", registry=r)
        self.pending = Gauge("ainarres_pending_tasks", "Claimable tasks (ready, plus expired holds) by lane "
                             "and stage, read at scrape time", ["lane", "stage"], registry=r)
        self.live_leases = Gauge("ainarres_live_leases", "Held tasks whose lease is live, by lane",
                                 ["lane"], registry=r)
        self.expired_leases = Gauge("ainarres_expired_leases", "Held tasks whose lease ran out (abandoned, "
                                    "awaiting lazy recovery), by lane", ["lane"], registry=r)
        self.longpoll_waiters = Gauge("ainarres_longpoll_waiters", "Claims waiting on the wake hub for "
                                      "work to appear", registry=r)
        self.streams = Gauge("ainarres_event_streams", "Open event streams (GET /v1/events/stream)",
                             registry=r)
        self.pool_size = Gauge("ainarres_db_pool_connections", "Database pool connections by state",
                               ["state"], registry=r)
        self.pool_max = Gauge("ainarres_db_pool_max_connections", "Database pool size limit", registry=r)
        self._since_event: int | None = None
        # Serialises scrapes: two at once would both count the same events.
        self.lock = asyncio.Lock()
        for v in VERBS:
            self.verb_seconds.labels(v)
        for res in ("claimed", "empty"):
            self.claims.labels(res)

    @property
    def since_event(self) -> int | None:
        """The last event id the counters have seen; None until start()."""
        return self._since_event

    def start(self, last_event_id: int) -> None:
        """Count events from `last_event_id` on (the newest at start: counters begin at zero)."""
        if self._since_event is None:
            self._since_event = last_event_id

    def observe(self, verb: str, code: str, seconds: float) -> None:
        """Record one verb call."""
        self.verb_calls.labels(verb, code).inc()
        self.verb_seconds.labels(verb).observe(seconds)
        if verb == "claim" and code in ("claimed", "empty"):
            self.claims.labels(code).inc()

    def apply(self, scrape: Scrape, pool: asyncpg.Pool, waiters: int | None) -> None:
        """Fold a scrape's database figures into the registry (synchronous: no scrape sees half)."""
        for type_, n in scrape.events.items():
            self.events.labels(type_).inc(n)
        self.reclaims.inc(scrape.reclaimed)
        self.escalations.inc(scrape.events.get("escalated", 0))
        self.blocks.inc(scrape.events.get("blocked", 0))
        self._since_event = scrape.last_event_id
        self.pending.clear()
        for lane, stage, n in scrape.pending:
            self.pending.labels(lane, stage).set(n)
        self.live_leases.clear()
        self.expired_leases.clear()
        for lane, live, expired in scrape.leases:
            self.live_leases.labels(lane).set(live)
            self.expired_leases.labels(lane).set(expired)
        if waiters is not None:
            self.longpoll_waiters.set(waiters)
        size, idle = pool.get_size(), pool.get_idle_size()
        self.pool_size.labels("busy").set(size - idle)
        self.pool_size.labels("idle").set(idle)
        self.pool_max.set(pool.get_max_size())

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        out: bytes = generate_latest(self.registry)
        return out


def waiters_of(hub: Any) -> int | None:
    """How many claims wait on a wake hub, if it says."""
    if hub is None:
        return None
    for name in ("waiters", "waiting", "count"):
        v = getattr(hub, name, None)
        if callable(v):
            v = v()
        if isinstance(v, int):
            return v
        if v is not None and hasattr(v, "__len__"):
            return len(v)
    return None


class VerbMetrics:
    """Counts and times the agent verbs by the `code` of their response."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        verb = verb_of(scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        if verb is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        body: list[bytes] = []
        size = 0

        async def capture(msg: Message) -> None:
            nonlocal status, size
            if msg["type"] == "http.response.start":
                status = msg["status"]
            elif msg["type"] == "http.response.body":
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size <= _MAX_PARSED_BODY:
                    body.append(chunk)
            await send(msg)

        if verb == "claim":
            self.metrics.claims_in_flight.inc()
        try:
            await self.app(scope, receive, capture)
        finally:
            if verb == "claim":
                self.metrics.claims_in_flight.dec()
            code = _code_of(b"".join(body), status) if status else "internal"
            self.metrics.observe(verb, code, time.perf_counter() - started)
