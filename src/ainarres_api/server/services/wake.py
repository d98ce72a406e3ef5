"""Long-poll wake-ups: waiters in this process, one LISTEN connection, coalesced NOTIFY.

A service that commits a change making a task claimable records the task's route with `ready()`
(and `new_route()` when it created a route). The API layer collects what a request recorded and,
once the request has succeeded (so the change has committed), hands it to `Wake.publish`. The hub:

- wakes ONE local waiter per recorded route at once. A woken waiter claims; if it takes a task it
  passes the wake on to the next waiter of the same routes, so a burst of N tasks wakes about N+1
  waiters and a single task does not wake a herd;
- queues the route ids for the other replicas: a flusher sends one `NOTIFY ainarres_ready` per
  coalescing window, on its own connection, so writers never pay the notify lock themselves — and
  only while another replica may be there to hear it. Each process says `hello` when it starts
  listening (every process that hears it answers `here`) and `here` every `sweep_seconds`; one that
  has heard nobody for three of their intervals, while it hears (its own words come back), keeps
  route ids to itself — never a rescan (a lone `ainarres serve` under load would otherwise send
  hundreds of NOTIFYs a second to nobody; ADR 0028);
- hears the other replicas' notifications on one LISTEN connection per process, a direct
  connection outside the pool (poolers in transaction mode cannot hold a LISTEN), and wakes local
  waiters for those routes; if that connection drops, it reconnects and wakes every waiter once;
- sweeps the routes its waiters watch every `sweep_seconds` and at the earliest lease expiry among
  them, and wakes a waiter for each route with claimable work. This covers lost notifications,
  writes made outside the service, and lazy recovery of expired leases on time.

Waiting holds no database connection. Nothing here imports the web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import asyncpg

log = logging.getLogger("ainarres.wake")

CHANNEL = "ainarres_ready"
# pg_notify payloads must stay under 8000 bytes; route ids are split across notifications above this.
_MAX_PAYLOAD = 7000
_RESCAN = "*"
# Presence: a process that starts listening says hello (whoever hears it answers here); here again every sweep
# interval. Each says `<hub id>|<word>:<its sweep seconds>`, so replicas with other intervals judge it by its own.
_HELLO = "hello"
_HERE = "here"
# A replica not heard for this many of its sweep intervals is gone (it says `here` once per interval).
_PEER_INTERVALS = 3
_MAX_INTERVAL = 300.0  # the longest sweep interval a process may be set to (settings: wake_sweep_seconds)

# The sweep: for each watched route, whether it holds ready work, and how long until its earliest
# lease expires (negative: already expired, so a claim would recover it). One probe of tasks_ready
# per route; the held rows of the watched routes are few (one per working agent).
SWEEP_SQL = """
SELECT r.id,
       EXISTS (SELECT 1 FROM tasks t WHERE t.state = 'ready' AND t.route_id = r.id) AS ready,
       extract(epoch FROM h.lease_expires_at - now())::float8 AS expires_in
  FROM unnest($1::int[]) AS r(id)
  LEFT JOIN (SELECT t.route_id, min(t.lease_expires_at) AS lease_expires_at
               FROM tasks t
              WHERE t.state = 'held' AND t.route_id = ANY ($1::int[])
              GROUP BY t.route_id) h ON h.route_id = r.id
"""


# -- recording, from the services ------------------------------------------------------------------

@dataclass
class Recorded:
    """What one request made claimable: route ids (with multiplicity) and whether routes were added."""

    routes: Counter[int] = field(default_factory=Counter)
    rescan: bool = False

    def __bool__(self) -> bool:
        return bool(self.routes) or self.rescan

    def clear(self) -> None:
        self.routes.clear()
        self.rescan = False


_recording: ContextVar[Recorded | None] = ContextVar("ainarres_wake_recording", default=None)


def ready(route_id: int | None) -> None:
    """Record that a task became claimable on `route_id` (published after the request commits)."""
    rec = _recording.get()
    if rec is not None and route_id is not None:
        rec.routes[int(route_id)] += 1


def new_route() -> None:
    """Record that a route was created: waiters must look their eligible routes up again."""
    rec = _recording.get()
    if rec is not None:
        rec.rescan = True


def narrowed() -> None:
    """Record that what some callers may claim has narrowed (a denial, a permanent ban, a family's features
    changed): waiters look again with their features read afresh, and a claim that can no longer ever match is
    refused then (services/claiming.py), not at its deadline."""
    new_route()


def flush(hub: Wake) -> None:
    """Publish what the current request has recorded so far, which has committed, and record afresh: for a
    request that goes on to wait (an advance's `next` long poll), so that others are not woken only when it
    answers."""
    rec = _recording.get()
    if rec:
        hub.publish(rec)
        rec.clear()


@contextlib.contextmanager
def recording() -> Iterator[Recorded]:
    """Collect what the code run inside the block records (a no-op outside any such block)."""
    rec = Recorded()
    token = _recording.set(rec)
    try:
        yield rec
    finally:
        _recording.reset(token)


# -- the hub ---------------------------------------------------------------------------------------

class Waiter:
    """One waiting claim: the routes it watches and the wake-ups it has been handed."""

    def __init__(self, hub: Wake) -> None:
        self._hub = hub
        self.routes: frozenset[int] = frozenset()
        self._event = asyncio.Event()
        self._pending: set[int] = set()
        self._inflight: set[int] = set()
        self._blocked = False
        self.wakeups = 0

    @property
    def signalled(self) -> bool:
        return self._event.is_set()

    @property
    def idle(self) -> bool:
        """Blocked in wait() and not yet woken."""
        return self._blocked and not self._event.is_set()

    def _signal(self, route: int | None) -> None:
        if route is not None:
            self._pending.add(route)
        self.wakeups += 1
        self._event.set()

    def watch(self, routes: Iterable[int]) -> None:
        """Watch exactly these routes from now on."""
        self._hub._watch(self, frozenset(routes))

    def begin(self) -> set[int]:
        """Start a claim attempt; returns the routes this waiter was woken for (probe them first)."""
        self._inflight |= self._pending
        self._pending = set()
        self._event.clear()
        return set(self._inflight)

    def found_nothing(self) -> None:
        """The attempt found nothing to claim: the wake-ups it was handed are answered."""
        self._inflight.clear()

    async def wait(self, seconds: float) -> bool:
        """Until woken (True) or `seconds` pass (False)."""
        if self._event.is_set():
            return True
        self._blocked = True
        self._hub._fire_changed()
        try:
            await asyncio.wait_for(self._event.wait(), seconds)
        except TimeoutError:
            return False
        finally:
            self._blocked = False
        return True


class Wake:
    """The per-process wake-up hub (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, listen_dsn: str, notify_dsn: str, pgbouncer: bool = False,
                 coalesce_seconds: float = 0.005, sweep_seconds: float = 3.0, channel: str = CHANNEL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.id = uuid.uuid4().hex[:12]
        self._pool = pool
        self._listen_dsn = listen_dsn
        self._notify_dsn = notify_dsn
        self._pgbouncer = pgbouncer
        self._coalesce = coalesce_seconds
        self._sweep_seconds = sweep_seconds
        self._channel = channel
        self._waiters: dict[Waiter, None] = {}  # insertion-ordered: the longest waiting wakes first
        self._by_route: dict[int, dict[Waiter, None]] = {}
        self._outbox: set[int] = set()
        self._outbox_rescan = False
        self._outbox_said: list[str] = []  # presence to say (hello, here), sent alone or with route ids
        self._outbox_ready = asyncio.Event()
        self._clock = clock
        self._peers: dict[str, float] = {}  # the other replicas heard, by hub id: until when they count as there
        self._echo_at: float | None = None  # when this process last heard its own presence come back
        self._listening_since = clock()  # since the LISTEN connection was last made (a new one may have missed hellos)
        self._said_at = clock()  # when this process last said hello or here
        self.flushes = 0  # flushes done, whether or not they had anything to send (tests wait on it)
        self.flushing = False  # a flush has taken the outbox and is not done
        self.heard_others = 0  # messages heard from other replicas (tests wait on it)
        self.echoes = 0  # its own presence heard back (tests wait on it)
        self._sweep_now = asyncio.Event()
        self._sweep_running = False
        self._listener: asyncpg.Connection | None = None
        self._notifier: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconnecting: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.closed = False  # no claim waits any more: the process drains or stops
        self._stopped = False
        self.generation = 0  # LISTEN connections made so far
        self.listener_pid: int | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Open the LISTEN connection, say hello, and start the flusher and the sweeper."""
        await self._listen()
        self._say(_HELLO)
        self._tasks = [asyncio.create_task(self._flush_loop(), name="ainarres-wake-flush"),
                       asyncio.create_task(self._sweep_loop(), name="ainarres-wake-sweep")]

    def drain(self) -> None:
        """The process is draining: every waiting claim is woken, sees `closed` and answers now (a claim that
        finds nothing answers `empty` instead of waiting). Publishing and listening go on, so what the
        requests still in flight make claimable is told to the other replicas."""
        self.closed = True
        for w in self._waiters:
            w._signal(None)
        self._fire_changed()

    async def stop(self) -> None:
        """Stop listening; every remaining waiter is woken and sees `closed`."""
        self.drain()
        self._stopped = True
        tasks = [*self._tasks, *([self._reconnecting] if self._reconnecting else [])]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in (self._listener, self._notifier):
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)
        self._listener = self._notifier = None

    # -- waiters

    @contextlib.contextmanager
    def waiter(self) -> Iterator[Waiter]:
        """A registered waiter for the block; wake-ups it leaves unanswered pass to the next one."""
        w = Waiter(self)
        self._waiters[w] = None
        self._fire_changed()
        try:
            yield w
        finally:
            self._watch(w, frozenset())
            self._waiters.pop(w, None)
            leftover = w._inflight | w._pending
            if leftover and not self.closed:
                self._wake_local(Counter(leftover), exclude=w)
            self._fire_changed()

    @property
    def waiting(self) -> int:
        """How many claims are waiting in this process."""
        return len(self._waiters)

    @property
    def waiters(self) -> tuple[Waiter, ...]:
        """The waiting claims, longest waiting first."""
        return tuple(self._waiters)

    def _watch(self, w: Waiter, routes: frozenset[int]) -> None:
        if routes == w.routes:
            return
        for r in w.routes - routes:
            ws = self._by_route.get(r)
            if ws is not None:
                ws.pop(w, None)
                if not ws:
                    del self._by_route[r]
        fresh = False
        for r in routes - w.routes:
            if r not in self._by_route:
                self._by_route[r] = {}
                fresh = True
            self._by_route[r][w] = None
        w.routes = routes
        if fresh:  # learn the lease expiries of routes nobody here watched before
            self._sweep_now.set()

    def _wake_local(self, routes: Counter[int], rescan: bool = False, exclude: Waiter | None = None) -> None:
        if rescan:
            for w in self._waiters:
                if w is not exclude:
                    w._signal(None)
        for r, n in routes.items():
            ws = self._by_route.get(r)
            if not ws:
                continue
            candidates = [w for w in ws if w is not exclude]
            idle = [w for w in candidates if not w.signalled]
            # One waiter per recorded change; a waiter already woken is handed the route too if
            # every waiter is busy, so the wake-up is never dropped while anyone watches the route.
            for w in idle[:n] or candidates[:1]:
                w._signal(r)

    # -- publishing

    def publish(self, rec: Recorded) -> None:
        """Wake local waiters for what a committed change made claimable, and tell the other replicas."""
        if not rec or self._stopped:
            return
        self._wake_local(rec.routes, rec.rescan)
        self._outbox.update(rec.routes)
        self._outbox_rescan = self._outbox_rescan or rec.rescan
        self._outbox_ready.set()

    def _say(self, word: str) -> None:
        if word not in self._outbox_said:
            self._outbox_said.append(word)
        self._outbox_ready.set()

    @property
    def peers(self) -> int:
        """How many other replicas this process has heard within the last three of their sweep intervals."""
        now = self._clock()
        for hub, until in list(self._peers.items()):
            if now >= until:
                del self._peers[hub]
        return len(self._peers)

    @property
    def alone(self) -> bool:
        """Sure that no other replica listens: none heard for three of its sweep intervals, while this process
        hears (its LISTEN connection is up, has been for three intervals — a new one may have missed hellos —
        and its own last words came back, so the connection is not half-open). A process that cannot tell
        sends its wake-ups."""
        now, span = self._clock(), _PEER_INTERVALS * self._sweep_seconds
        hearing = (self._listener is not None and not self._listener.is_closed() and self._reconnecting is None
                   and now - self._listening_since >= span
                   and self._echo_at is not None and now - self._echo_at < span)
        return hearing and not self.peers

    def _payloads(self, routes: set[int], rescan: bool) -> list[str]:
        items = ([_RESCAN] if rescan else []) + [str(r) for r in sorted(routes)]
        out: list[str] = []
        cur: list[str] = []
        size = 0
        for it in items:
            if cur and size + len(it) + 1 > _MAX_PAYLOAD:
                out.append(f"{self.id}|{','.join(cur)}")
                cur, size = [], 0
            cur.append(it)
            size += len(it) + 1
        if cur:
            out.append(f"{self.id}|{','.join(cur)}")
        return out

    async def _flush_loop(self) -> None:
        while True:
            due = self._said_at + self._sweep_seconds - self._clock()
            if due > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._outbox_ready.wait(), due)
            if self._clock() - self._said_at >= self._sweep_seconds:
                self._say(_HERE)  # once a sweep interval, busy or not: the other replicas know this one is there
            # The coalescing window: every change recorded meanwhile rides on the same NOTIFY.
            await asyncio.sleep(self._coalesce)
            self._outbox_ready.clear()
            self.flushing, at = True, self._clock()
            routes, rescan, said = self._outbox, self._outbox_rescan, self._outbox_said
            self._outbox, self._outbox_rescan, self._outbox_said = set(), False, []
            if self.alone:
                # Nobody else listens: the local waiters were woken on publish. A rescan (a new route, narrowed
                # eligibility) is rare and no sweep makes up for it, so it is told whatever this process believes.
                routes = set()
            payloads = [f"{self.id}|{word}:{self._sweep_seconds:g}" for word in said] + (
                self._payloads(routes, rescan) if routes or rescan else [])
            try:
                if payloads:
                    await self._notify(payloads)
                if said:
                    self._said_at = at
            except Exception as exc:  # any failure: a flusher that died would leave this process silent
                # The other replicas' sweeps pick the work up; the next flush reconnects and says it again (not
                # before the next change or the next interval: a database that is down is not asked in a loop).
                log.warning("notify failed (%s); other replicas wake on their next sweep", exc)
                self._outbox_said = [*said, *(w for w in self._outbox_said if w not in said)]
                self._said_at = at
                if self._notifier is not None:
                    self._notifier.terminate()
                self._notifier = None
            finally:
                self.flushes += 1
                self.flushing = False
                self._fire_changed()

    async def _notify(self, payloads: list[str]) -> None:
        if self._notifier is None or self._notifier.is_closed():
            self._notifier = await asyncpg.connect(
                self._notify_dsn, statement_cache_size=0 if self._pgbouncer else 100,
                server_settings={"application_name": "ainarres-notify"})
        await self._notifier.execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", self._channel, payloads)

    # -- listening

    async def _listen(self) -> None:
        conn = await asyncpg.connect(self._listen_dsn, statement_cache_size=0,
                                     server_settings={"application_name": "ainarres-listen"})
        try:
            await conn.add_listener(self._channel, self._heard)
            conn.add_termination_listener(self._lost)
            self.listener_pid = await conn.fetchval("SELECT pg_backend_pid()")
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn
        self._listening_since = self._clock()
        self.generation += 1
        self._fire_changed()

    def _heard(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, body = payload.partition("|")
        word, _, interval = body.partition(":")
        if origin == self.id:  # our own notification: local waiters were woken when it was published
            if word in (_HELLO, _HERE):
                self._echo_at = self._clock()  # and this process hears
                self.echoes += 1
                self._fire_changed()
            return
        if not body:
            return
        try:
            seconds = float(interval)
        except ValueError:  # a build before presence sends route ids only: judged by this process's interval
            seconds = self._sweep_seconds
        if not 0 < seconds <= _MAX_INTERVAL:  # NaN too: a hand-made NOTIFY does not keep a replica forever
            seconds = self._sweep_seconds
        span = _PEER_INTERVALS * max(seconds, self._sweep_seconds)
        self._peers[origin] = self._clock() + span  # whatever it says
        self.heard_others += 1
        self._fire_changed()
        if word == _HELLO:
            self._say(_HERE)
        if word in (_HELLO, _HERE):
            return
        routes: Counter[int] = Counter()
        rescan = False
        for item in body.split(","):
            if item == _RESCAN:
                rescan = True
            elif item.isdigit():
                routes[int(item)] += 1
        self._wake_local(routes, rescan)

    def _lost(self, _conn: Any) -> None:
        if not self._stopped and self._reconnecting is None:
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        try:
            while not self._stopped:
                try:
                    await self._listen()
                    self._say(_HELLO)  # replicas that started while this one was deaf do not know it
                    break
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    log.warning("LISTEN connection lost; reconnecting in %.1fs (%s)", delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            self._reconnecting = None
        # Whatever was notified while we were deaf is unknown: every waiter claims once more.
        self._wake_local(Counter(), rescan=True)

    # -- the sweep

    async def _sweep_loop(self) -> None:
        wait = self._sweep_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep_now.wait(), wait)
            self._sweep_now.clear()
            wait = self._sweep_seconds
            if self._listener is None or self._listener.is_closed():
                self._lost(None)
            routes = list(self._by_route)
            if not routes:
                continue
            self._sweep_running = True
            try:
                async with self._pool.acquire() as conn:
                    rows = await conn.fetch(SWEEP_SQL, routes)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("wake sweep failed: %s", exc)
                continue
            finally:
                self._sweep_running = False
                self._fire_changed()
            due: Counter[int] = Counter()
            for r in rows:
                expires_in = r["expires_in"]
                if r["ready"] or (expires_in is not None and expires_in <= 0):
                    due[r["id"]] += 1
                elif expires_in is not None:
                    # A little after the expiry, so the claim's `lease_expires_at < now()` holds.
                    wait = min(wait, expires_in + 0.02)
            self._wake_local(due)

    # -- observing (operations and tests)

    @property
    def sweeping(self) -> bool:
        """A sweep is asked for or running."""
        return self._sweep_now.is_set() or self._sweep_running

    def _fire_changed(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def until(self, predicate: Callable[[Wake], bool], seconds: float) -> None:
        """Wait until `predicate(self)` holds (checked whenever waiters or the listener change)."""
        async with asyncio.timeout(seconds):
            while not predicate(self):
                await self._changed.wait()
