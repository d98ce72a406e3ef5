"""Oversight: the board, the feed, stuck work, demand, agents, families' track record, the stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from ainarres_api.server.db.queries import Q
from ainarres_api.server.errors import Invalid, NotEligible
from ainarres_api.server.services import pages, spend
from ainarres_api.server.services.auth import Principal
from ainarres_api.server.services.pages import BAD_CURSOR, decode_cursor, encode_cursor

log = logging.getLogger("ainarres.oversight")

STATES = ("waiting", "ready", "held", "blocked", "done")
NO_CAPABLE_AGENT = "no capable agent"
StuckKind = Literal["silent_hold", "treadmill", "blocked"]


@dataclass(frozen=True)
class Filters:
    """The filters every oversight list understands (each list documents which it applies)."""

    project: str | None = None
    lane: str | None = None
    stage: str | None = None
    family: str | None = None
    states: tuple[str, ...] | None = None


_EVENT_ID = re.compile(r"[0-9]{1,19}")
EVENT_ID_MAX = 2**63 - 1


def event_id(raw: str, name: str) -> int:
    """An event id a client sent back (a cursor, Last-Event-ID): ASCII digits within bigint, else 422."""
    if not _EVENT_ID.fullmatch(raw) or int(raw) > EVENT_ID_MAX:
        raise Invalid(f"{name}: send back the id of the last event you received (a number from 0 to "
                      f"{EVENT_ID_MAX})")
    return int(raw)


def _time_id_cursor(cursor: str | None) -> tuple[datetime | None, uuid.UUID | None]:
    parts = decode_cursor(cursor, 2)
    if parts is None:
        return None, None
    try:
        return datetime.fromisoformat(parts[0]), uuid.UUID(parts[1])
    except ValueError:
        raise Invalid(BAD_CURSOR) from None


def _page(items: list[dict[str, Any]], limit: int, *keys: str) -> dict[str, Any]:
    """A page from `limit + 1` rows read: `next` only when there is more."""
    if len(items) <= limit:
        return {"items": items, "next": None}
    items = items[:limit]
    return {"items": items, "next": encode_cursor(*(items[-1][k] for k in keys))}


def check_states(states: list[str] | None) -> tuple[str, ...] | None:
    """The state filter, validated: routing states only."""
    if not states:
        return None
    bad = sorted(set(states) - set(STATES))
    if bad:
        raise Invalid(f"query.state: unknown {', '.join(bad)}; one of {', '.join(STATES)}")
    return tuple(sorted(set(states)))


async def board(conn: asyncpg.Connection, f: Filters, abandoned: bool | None, cursor: str | None,
                limit: int) -> dict[str, Any]:
    """Every task with where it is, who holds it and what holds it up; oldest first."""
    at, last = _time_id_cursor(cursor)
    rows = await conn.fetch(Q["board_page"], f.project, f.lane, f.stage, f.family,
                            list(f.states) if f.states else None, abandoned, at, last, limit + 1)
    return _page([dict(r) for r in rows], limit, "created_at", "id")


async def feed(conn: asyncpg.Connection, f: Filters, type_: str | None, task_id: uuid.UUID | None,
               cursor: str | None, limit: int, max_bytes: int = pages.MAX_PAGE_BYTES) -> dict[str, Any]:
    """Every event, newest first, with its actor's family, lane and stage; a page holds at most `limit`
    events and stops early (with its `next`) past `max_bytes` of them."""
    parts = decode_cursor(cursor, 1)
    before = event_id(parts[0], "query.cursor") if parts is not None else None
    rows = await conn.fetch(Q["feed_page"], f.project, f.lane, f.stage, f.family, type_, task_id,
                            list(f.states) if f.states else None, before, limit + 1, max_bytes)
    items = [r["event"] for r in rows[:limit]]
    if not rows or rows[0]["n_read"] <= len(items):
        return {"items": items, "next": None}
    return {"items": items, "next": encode_cursor(items[-1]["id"])}


async def stuck(conn: asyncpg.Connection, f: Filters, kind: StuckKind | None, cursor: str | None,
                limit: int) -> dict[str, Any]:
    """Live holds with no progress for half a lease (silent_hold) or past a whole one (treadmill), and
    tasks blocked for a human (blocked); the oldest first."""
    since, last = _time_id_cursor(cursor)
    rows = await conn.fetch(Q["stuck_page"], f.project, f.lane, f.stage, f.family, kind, since, last,
                            limit + 1)
    return _page([dict(r) for r in rows], limit, "since", "id")


def _capable(bundle: set[str], families: list[asyncpg.Record]) -> list[str]:
    return [r["key"] for r in families if not r["disabled"] and bundle <= set(r["features"])]


def _banned(bundle: set[str], families: list[asyncpg.Record]) -> list[str]:
    """Enabled families provisioned for the bundle that an active denial (a ban) keeps from it."""
    return [r["key"] for r in families
            if not r["disabled"] and bundle <= set(r["provisioned"]) and not bundle <= set(r["features"])]


def _closest(bundle: set[str], families: list[asyncpg.Record]) -> dict[str, Any] | None:
    enabled = [r for r in families if not r["disabled"]]
    if not enabled:
        return None
    best = min(enabled, key=lambda r: (len(bundle - set(r["features"])), r["key"]))
    return {"family": best["key"], "missing": sorted(bundle - set(best["features"]))}


async def demand(conn: asyncpg.Connection, f: Filters, capable: bool | None, cursor: str | None,
                 limit: int) -> dict[str, Any]:
    """Pending work by the feature bundle it needs, and which enabled families could take it."""
    parts = decode_cursor(cursor, 3)
    families = await conn.fetch(Q["family_capabilities"])
    items: list[dict[str, Any]] = []
    rows = [((r["lane"], f"{r['stage_position']:09d}", ",".join(r["features"])), r)
            for r in await conn.fetch(Q["demand_rows"], f.project, f.lane, f.stage)]
    rows.sort(key=lambda kr: kr[0])
    for key, r in rows:
        if parts is not None and key <= tuple(parts):
            continue
        bundle = set(r["features"])
        able = _capable(bundle, families)
        if f.family is not None and f.family not in able:
            continue
        if capable is not None and bool(able) != capable:
            continue
        items.append({
            "project": r["project"], "lane": r["lane"], "stage": r["stage"], "features": list(r["features"]),
            "pending": r["ready"] + r["expired"], "ready": r["ready"], "expired": r["expired"],
            "capable": bool(able), "capable_families": able,
            "note": None if able else NO_CAPABLE_AGENT,
            "closest": None if able else _closest(bundle, families),
            "banned_families": [] if able else _banned(bundle, families),
            "_key": key,
        })
        if len(items) > limit:
            break
    keys = [it.pop("_key") for it in items]
    if len(items) <= limit:
        return {"items": items, "next": None}
    return {"items": items[:limit], "next": encode_cursor(*keys[limit - 1])}


async def agents(conn: asyncpg.Connection, f: Filters, cursor: str | None, limit: int) -> dict[str, Any]:
    """Agents seen: their family, what they hold now, when they last called."""
    parts = decode_cursor(cursor, 1)
    rows = await conn.fetch(Q["agents_page"], f.family, f.lane, f.project, parts[0] if parts else None,
                            limit + 1)
    return _page([dict(r) for r in rows], limit, "sub")


async def track_record(conn: asyncpg.Connection, f: Filters, cursor: str | None, limit: int
                       ) -> dict[str, Any]:
    """Families: provisioned features, active denials, work delivered and rejected. The counters are folded
    from the events first (beside_track_record's one fold, ADR 0019), so the page reads them caught up."""
    parts = decode_cursor(cursor, 1)
    by_family, by_role = await spend.beside_track_record(conn)
    rows = await conn.fetch(Q["track_record_page"], f.family, f.lane, f.project, parts[0] if parts else None,
                            limit + 1)
    items = []
    for r in rows:
        it = dict(r)
        it["reject_rate"] = _rate(it["rejected"], it["delivered"])
        it["roles"] = [_role_record(x) for x in it["roles"]]
        for x in it["roles"]:  # spend beside the record, never blended; nothing reported: null, never zero
            x["spend"] = by_role.get((it["key"], x["role"] or None))
        it["spend"] = by_family.get(it["key"])
        items.append(it)
    return _page(items, limit, "key")


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _role_record(x: dict[str, Any]) -> dict[str, Any]:
    """One role's rollup as the track record shows it: the shards' stage-time histograms merged into a median."""
    hist: dict[int, int] = {}
    for h in x.pop("hists") or []:
        for bucket, n in (h or {}).items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + int(n)
    return {**x, "reject_rate": _rate(x["rejected"], x["deliveries"]),
            "cross_family_review_share": _rate(x["reviewed_cross"], x["reviewed"]),
            "median_stage_seconds": median_of_buckets(hist)}


def median_of_buckets(hist: dict[int, int]) -> float | None:
    """The median of values counted in buckets floor(4·log2(1 + seconds)) (SQL stage_bucket), as the middle of
    its bucket (within ±9 %); None when nothing was counted."""
    total = sum(hist.values())
    if not total:
        return None
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen * 2 >= total:
            return round(2 ** ((bucket + 0.5) / 4) - 1, 1)
    return None  # unreachable: the loop reaches the total


def visible_lanes(p: Principal) -> list[str] | None:
    """The lanes whose events `p` may stream: None for every lane (a seat), else its lane features."""
    if p.oversees:
        return None
    lanes = sorted(f.split(":", 1)[1] for f in p.features if f.startswith("lane:"))
    if not lanes:
        raise NotEligible("the stream shows the events of lanes you take part in, and you hold no "
                          "lane:<key> feature (or a seat: seat:overseer or seat:monitor sees every lane)")
    return lanes


async def last_event_id(conn: asyncpg.Connection) -> int:
    """The newest event's id (0 when there is none)."""
    return int(await conn.fetchval(Q["events_max_id"]))


class Batch(list[tuple[int, dict[str, Any] | None]]):
    """Event ids (with the event, or None) read by events_after; `more`: rows were left out."""

    more: bool = False


async def events_after(conn: asyncpg.Connection, lanes: list[str] | None, after: int, project: str | None,
                       lane: str | None, limit: int, max_bytes: int = pages.MAX_PAGE_BYTES) -> Batch:
    """Event ids after `after`, oldest first, with the event if the caller may see it (else None): at most
    `limit` of them, and stopping early past `max_bytes` of events (`more` is then set)."""
    rows = await conn.fetch(Q["stream_after"], after, lanes, project, lane, limit, max_bytes)
    batch = Batch((r["id"], r["event"]) for r in rows)
    batch.more = bool(rows) and rows[0]["n_read"] > len(rows)
    return batch


class EventClock:
    """The newest event id, read once per `interval` for every open event stream of one process, and
    which of those streams' tokens stopped being good.

    A stream reads its own events (filtered to what its caller may see) only when the clock has
    moved past its cursor, so open streams that have nothing to send cost one indexed `max(id)` per
    interval per process, not a read each. The same tick probes the tokens of the open streams (one
    statement for all of them, by primary key): a revoked or expired token, or a disabled family,
    wakes its streams within an interval. Reading stops while no stream is open.
    """

    def __init__(self, pool: asyncpg.Pool, interval: float) -> None:
        self.pool = pool
        self.interval = interval
        self.latest = 0
        self.closed = False
        self._moved = asyncio.Event()
        self._read = asyncio.Event()
        self._users = 0
        self._has_users = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tokens: dict[str, int] = {}
        self._lapsed: set[str] = set()

    async def start(self) -> None:
        """Start reading (call once, from the app's lifespan)."""
        async with self.pool.acquire() as conn:
            self.latest = await last_event_id(conn)
        self._task = asyncio.create_task(self._run(), name="ainarres-event-clock")

    async def stop(self) -> None:
        """Stop reading; waiting streams wake and find nothing new."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.closed = True
        self._moved.set()

    @contextlib.contextmanager
    def watching(self, jti: str | None = None) -> Iterator[None]:
        """Hold the clock running while a stream is open; with `jti`, probe that token every tick."""
        self._users += 1
        self._has_users.set()
        if jti is not None:
            self._tokens[jti] = self._tokens.get(jti, 0) + 1
        try:
            yield
        finally:
            self._users -= 1
            if not self._users:
                self._has_users.clear()
            if jti is not None:
                self._tokens[jti] -= 1
                if not self._tokens[jti]:
                    del self._tokens[jti]
                    self._lapsed.discard(jti)

    def lapsed(self, jti: str) -> bool:
        """Whether the last probe found the token revoked, expired or gone, or its family disabled."""
        return jti in self._lapsed

    async def wait_past(self, cursor: int, jti: str | None = None) -> None:
        """Return once an event newer than `cursor` is committed, the token `jti` lapsed, or the clock
        stops; callers bound the wait with asyncio.timeout."""
        while self.latest <= cursor and not self.closed and not (jti is not None and jti in self._lapsed):
            await self._moved.wait()

    async def until_lapsed(self, jti: str) -> None:
        """Return once a probe finds the token `jti` lapsed (revoked, expired, its family disabled) or the
        clock stops; the caller holds `watching(jti)` meanwhile."""
        while jti not in self._lapsed and not self.closed:
            await self._moved.wait()

    async def next_read(self) -> None:
        """Return after the clock's next read (tests: observe that idle streams cost no reads)."""
        await self._read.wait()

    def _wake(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def _run(self) -> None:
        while True:
            await self._has_users.wait()
            try:
                async with self.pool.acquire() as conn:
                    latest = await last_event_id(conn)
                    watched = list(self._tokens)
                    lapsed = ({str(r["jti"]) for r in await conn.fetch(Q["stream_tokens_lapsed"], watched)}
                              if watched else set())
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("event clock: could not read the newest event id: %s", exc)
            else:
                fresh = lapsed - self._lapsed
                self._lapsed = lapsed & set(self._tokens)
                if latest != self.latest or fresh:
                    self.latest = latest
                    self._wake()
                read, self._read = self._read, asyncio.Event()
                read.set()
            await asyncio.sleep(self.interval)  # the polling period itself, not a synchronisation


class Sequencer:
    """Hands out committed events in id order without skipping one that commits late.

    Event ids come from a sequence, so a transaction can commit id 11 while id 10 is still in
    flight. Reading "after the last id sent" would then lose 10 for good. The sequencer releases
    only an unbroken run of ids; at a gap it waits, up to `gap_seconds`, for the missing id to
    commit, then gives up on it (a rolled-back transaction leaves a gap that never fills).
    """

    def __init__(self, after: int, gap_seconds: float) -> None:
        self.cursor = after
        self.gap_seconds = gap_seconds
        self._gap_seen: float | None = None
        self._gap_at = after

    def take(self, batch: list[tuple[int, dict[str, Any] | None]], now: float) -> list[dict[str, Any]]:
        """The events of `batch` that may go out now, in order; advances the cursor past them."""
        # A gap that has held the cursor in place for gap_seconds is given up on, together with any
        # other gap in the same batch (they were all visible while we waited).
        overdue = (self._gap_seen is not None and self._gap_at == self.cursor
                   and now - self._gap_seen >= self.gap_seconds)
        out: list[dict[str, Any]] = []
        for eid, event in batch:
            if eid != self.cursor + 1 and not overdue:
                if self._gap_seen is None or self._gap_at != self.cursor:
                    self._gap_seen, self._gap_at = now, self.cursor
                return out
            self.cursor = eid
            if event is not None:
                out.append(event)
        self._gap_seen = None
        return out

    @property
    def waiting(self) -> bool:
        """Whether a gap holds events back."""
        return self._gap_seen is not None


@dataclass
class Scrape:
    """What /metrics reads from the database at scrape time."""

    pending: list[tuple[str, str, int]]
    leases: list[tuple[str, int, int]]
    events: dict[str, int]
    reclaimed: int
    last_event_id: int


async def scrape(conn: asyncpg.Connection, since_event: int) -> Scrape:
    """Pending work, leases, and the events recorded since `since_event` (three grouped reads)."""
    pending = [(r["lane"], r["stage"], int(r["n"])) for r in await conn.fetch(Q["metrics_pending"])]
    leases = [(r["lane"], int(r["live"]), int(r["expired"])) for r in await conn.fetch(Q["metrics_leases"])]
    events: dict[str, int] = {}
    reclaimed = 0
    last = since_event
    for r in await conn.fetch(Q["metrics_events_since"], since_event):
        events[r["type"]] = int(r["n"])
        reclaimed += int(r["reclaimed"])
        last = max(last, int(r["last_id"]))
    return Scrape(pending, leases, events, reclaimed, last)
