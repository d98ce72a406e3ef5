"""Prometheus metrics: one registry per app, a middleware timing the verbs, and scrape-time figures.

Counters of verb calls, claims and the process gauges (claims in flight, waiting claims, streams, pool)
are kept by each process. Under `ainarres serve --workers N` they are written to PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, set up by the supervisor) and whichever worker answers /metrics
sums every worker's: one scrape is the whole server. Across separate servers (replicas), sum them.

The figures read from the database at scrape time (events recorded by type, reclaims, escalations, blocks
since the server started; pending work and leases now) are every replica's: they are rendered by the
answering process alone (a collector, never summed); on several replicas aggregate them with max(), not
sum(). Under --workers every worker counts events from the same starting point (the supervisor's), so
whichever answers gives the same totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any, Literal

import asyncpg
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ainarres_api.server.services.oversight import Scrape

VERBS = ("create", "claim", "heartbeat", "progress", "advance", "reject", "release", "block", "unblock")
_HELD_VERB = re.compile(r"^/v1/tasks/[^/]+/(heartbeat|progress|advance|reject|release|block|unblock)$")
# The scope key under which an advance or reject that claimed for `next` leaves that claim's (code, seconds):
# counted as a claim call, beside the move (api/verbs.py).
NEXT_CLAIM = "ainarres.next_claim"
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


class _DatabaseFigures:
    """The figures read from the database at scrape time, as a collector: rendered by the process that
    answers the scrape, never written to the multiprocess files (they are every replica's already)."""

    def __init__(self) -> None:
        self.events: Tally[str] = Tally()
        self.reclaims = 0
        self.pending: list[tuple[str, str, int]] = []
        self.leases: list[tuple[str, int, int]] = []

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily("ainarres_events_recorded", "Events recorded in the database by type (every "
                                     "replica) since this server started", labels=["type"])
        for type_, n in sorted(self.events.items()):
            events.add_metric([type_], n)
        yield events
        yield CounterMetricFamily("ainarres_reclaims", "Claims that took over an expired lease (lazy recovery; "
                                  "every replica) since this server started", value=self.reclaims)
        yield CounterMetricFamily("ainarres_escalations", "Tasks escalated to a higher tier (every replica) since "
                                  "this server started", value=self.events.get("escalated", 0))
        yield CounterMetricFamily("ainarres_blocks", "Tasks blocked for a human (every replica) since this server "
                                  "started", value=self.events.get("blocked", 0))
        pending = GaugeMetricFamily("ainarres_pending_tasks", "Claimable tasks (ready, plus expired holds) by lane "
                                    "and stage, read at scrape time", labels=["lane", "stage"])
        for lane, stage, n in self.pending:
            pending.add_metric([lane, stage], n)
        yield pending
        live = GaugeMetricFamily("ainarres_live_leases", "Held tasks whose lease is live, by lane", labels=["lane"])
        expired = GaugeMetricFamily("ainarres_expired_leases", "Held tasks whose lease ran out (abandoned, "
                                    "awaiting lazy recovery), by lane", labels=["lane"])
        for lane, n_live, n_expired in self.leases:
            live.add_metric([lane], n_live)
            expired.add_metric([lane], n_expired)
        yield live
        yield expired


class Metrics:
    """The app's metrics, in a registry of its own (several apps may share one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # Set by `ainarres serve --workers N` before the workers start (prometheus_client reads it at import).
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.verb_calls = Counter("ainarres_verb_calls", "Agent verb calls by verb and result code "
                                  "(the response's `code`, or the error's); a claim made for an advance's or "
                                  "reject's `next` counts as a claim call", ["verb", "code"], registry=r)
        self.verb_seconds = Histogram("ainarres_verb_duration_seconds", "Agent verb latency, request to last "
                                      "byte (a claim's includes its long-poll wait; a `next` claim's is its own "
                                      "part of the move's request)", ["verb"],
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.claims = Counter("ainarres_claims", "Claims by outcome: claimed or empty", ["result"],
                              registry=r)
        # Each process's own figure; under --workers, summed over the live workers.
        live: Literal["livesum"] = "livesum"
        self.claims_in_flight = Gauge("ainarres_claims_in_flight", "Claim requests being served now, "
                                      "long-polling ones included (not the claims of `next`: see "
                                      "ainarres_longpoll_waiters)", registry=r, multiprocess_mode=live)
        self.longpoll_waiters = Gauge("ainarres_longpoll_waiters", "Claims waiting on the wake hub for "
                                      "work to appear", registry=r, multiprocess_mode=live)
        self.streams = Gauge("ainarres_event_streams", "Open event streams (GET /v1/events/stream)",
                             registry=r, multiprocess_mode=live)
        self.pool_size = Gauge("ainarres_db_pool_connections", "Database pool connections by state",
                               ["state"], registry=r, multiprocess_mode=live)
        self.pool_max = Gauge("ainarres_db_pool_max_connections", "Database pool size limit", registry=r,
                              multiprocess_mode=live)
        self.database_up = Gauge("ainarres_database_up", "1 if the last scrape read the database's figures, 0 if "
                                 "it could not (they are left out then: pending work, leases)", registry=r,
                                 multiprocess_mode="livemostrecent")
        self.database = _DatabaseFigures()
        r.register(self.database)
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
        self.database_up.set(1)  # read from it just now

    def observe(self, verb: str, code: str, seconds: float) -> None:
        """Record one verb call."""
        self.verb_calls.labels(verb, code).inc()
        self.verb_seconds.labels(verb).observe(seconds)
        if verb == "claim" and code in ("claimed", "empty"):
            self.claims.labels(code).inc()

    def unreadable(self, pool: asyncpg.Pool, waiters: int | None, *, down: bool = True) -> None:
        """A scrape that could not read the database: this process's own figures, the database's gauges left out
        (unknown, not zero), its counters as last read, and `ainarres_database_up` 0 if it is out of reach (`down`;
        not for a pool too busy to lend a connection in time)."""
        self.database.pending, self.database.leases = [], []
        if down:
            self.database_up.set(0)
        self.process_figures(pool, waiters)

    def apply(self, scrape: Scrape, pool: asyncpg.Pool, waiters: int | None) -> None:
        """Fold a scrape's database figures into the registry (synchronous: no scrape sees half)."""
        self.database_up.set(1)
        db = self.database
        db.events.update(scrape.events)
        db.reclaims += scrape.reclaimed
        self._since_event = scrape.last_event_id
        db.pending = list(scrape.pending)
        db.leases = list(scrape.leases)
        self.process_figures(pool, waiters)

    def process_figures(self, pool: asyncpg.Pool, waiters: int | None) -> None:
        """Set this process's gauges: its pool, and the claims waiting in it."""
        if waiters is not None:
            self.longpoll_waiters.set(waiters)
        size, idle = pool.get_size(), pool.get_idle_size()
        self.pool_size.labels("busy").set(size - idle)
        self.pool_size.labels("idle").set(idle)
        self.pool_max.set(pool.get_max_size())

    async def keep_fresh(self, pool: asyncpg.Pool, hub: Any, every: float = 1.0) -> None:
        """Under --workers: keep this process's gauges current (a scrape is answered by another worker)."""
        while True:
            with contextlib.suppress(Exception):
                self.process_figures(pool, waiters_of(hub))
            await asyncio.sleep(every)

    def render(self) -> bytes:
        """The registry in Prometheus text format (under --workers: every worker's, summed)."""
        if self.multiprocess_dir is None:
            out: bytes = generate_latest(self.registry)
            return out
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        merged.register(self.database)
        return bytes(generate_latest(merged))


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
            if (nxt := scope.get(NEXT_CLAIM)) is not None:
                self.metrics.observe("claim", *nxt)
