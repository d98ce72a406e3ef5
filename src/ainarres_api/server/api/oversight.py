"""Oversight (seat:overseer, seat:monitor or seat:admin): board, feed, stuck, demand, agents, track
record; the live event stream (any caller, within its lanes); and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ainarres_api.server.api import outage
from ainarres_api.server.api.contract import AUTHENTICATED, refusals
from ainarres_api.server.api.deps import Caller, Conn, State, require
from ainarres_api.server.api.models import Page, SpendFigure
from ainarres_api.server.api.schemas import empty_is
from ainarres_api.server.errors import AinarresError, Invalid, NotEligible
from ainarres_api.server.metrics import Metrics, waiters_of
from ainarres_api.server.services import auth, oversight
from ainarres_api.server.services.auth import Principal
from ainarres_api.server.services.oversight import Filters

# Every operation here takes a token (401) and a seat, or for the stream a lane (403); any query may be
# refused as invalid (a filter value, a cursor not passed back unchanged, a NUL character).
router = APIRouter(prefix="/v1", tags=["oversight"], responses=refusals(*AUTHENTICATED, NotEligible, Invalid))
ops = APIRouter(tags=["operations"])

Watcher = Annotated[Principal, Depends(require("seat:overseer", "seat:monitor", "seat:admin"))]
Limit = Annotated[int, Query(ge=1, le=500, description="page size")]
Cursor = Annotated[str | None, Query(max_length=1000, description="the `next` of the previous page")]
Key = Annotated[str | None, Query(max_length=200)]
States = Annotated[list[str] | None, Query(
    description="routing state(s): waiting, ready, held, blocked, done; repeat the parameter or separate "
                "with commas")]

# The process's event clock reads the newest event id this often while any stream is open (streams
# read their own events only when it moved); a stream held at a gap of uncommitted ids re-reads this
# often. A stream re-reads the caller's features this often, and reads at most this many events per
# database round trip.
POLL_SECONDS = 0.5
REAUTH_SECONDS = 30.0
STREAM_BATCH = 200
# How long the stream waits for an event id that was taken but not committed yet (see Sequencer).
GAP_SECONDS = 2.0

class BoardTask(BaseModel):
    """A task as the board shows it (no payload: GET /v1/tasks/{id} has it)."""

    id: uuid.UUID
    project: str
    lane: str
    stage: str
    stage_terminal: bool
    state: Literal["waiting", "ready", "held", "blocked", "done"]
    title: str
    priority: int
    required_features: list[str]
    depends_on: list[uuid.UUID]
    attempts: int
    rework_count: int
    blocked: bool
    blocked_reason: str | None
    holder: str | None = Field(description="the holding agent's sub while held (abandoned holds included)")
    holder_family: str | None
    lease_expires_at: datetime | None
    held_since: datetime | None
    progress_at: datetime | None = Field(description="last progress report in this hold")
    abandoned: bool = Field(description="held, lease run out, not yet reclaimed by a claim")
    unmet_dependencies: list[uuid.UUID] = Field(description="depends_on tasks not done yet")
    stage_entered_at: datetime
    age_in_stage_seconds: float
    created_at: datetime
    updated_at: datetime


class FeedEvent(BaseModel):
    """An event with where it happened: `family` is the actor's; `stage` the stage it happened in."""

    id: int
    task_id: uuid.UUID
    type: str
    actor: str | None
    family: str | None
    data: dict[str, Any]
    created_at: datetime
    project: str
    lane: str
    stage: str | None
    task_title: str


class StuckHold(BaseModel):
    """Work going nowhere: a live hold (`kind` silent_hold or treadmill, the worse of the two) or a task
    blocked for a human (`kind` blocked: the hold fields are null, `blocked_*` say why, since when and
    by whom)."""

    id: uuid.UUID
    title: str
    project: str
    lane: str
    stage: str
    holder: str | None = Field(description="the holding agent's sub; null when blocked")
    holder_family: str | None
    held_since: datetime | None
    progress_at: datetime | None
    lease_expires_at: datetime | None
    lease_seconds: int
    attempts: int
    held_for_seconds: float | None
    silent_for_seconds: float | None = Field(description="since the last progress, or since the claim")
    extended_by_seconds: float | None = Field(description="how far heartbeats pushed the lease past what "
                                                          "the claim or last progress granted")
    kind: Literal["silent_hold", "treadmill", "blocked"]
    blocked_reason: str | None = Field(description="why it is blocked (kind blocked)")
    blocked_since: datetime | None = Field(description="when it was blocked (kind blocked)")
    blocked_by_family: str | None = Field(description="the family whose call blocked it (kind blocked)")
    blocked_by: Literal["agent", "substrate"] | None = Field(
        description="kind blocked: who parked it — an agent's block, or the substrate (max attempts, rework cap)")
    human_must_lift: bool = Field(description="the substrate blocked it: only seat:overseer may unblock it")
    since: datetime = Field(description="held_since, or blocked_since: the list's order")


class Closest(BaseModel):
    """The enabled family nearest to a bundle nobody can take, and what it lacks."""

    family: str
    missing: list[str]


class DemandRow(BaseModel):
    """Pending work in one lane and stage needing one feature bundle."""

    project: str
    lane: str
    stage: str
    features: list[str] = Field(description="the bundle: lane ∪ task's required ∪ one transition's features")
    pending: int = Field(description="ready + expired")
    ready: int
    expired: int = Field(description="holds whose lease ran out: the next eligible claim takes them")
    capable: bool
    capable_families: list[str] = Field(description="enabled families whose features minus active denials "
                                                    "include the bundle")
    note: str | None = Field(description='"no capable agent" when no enabled family can take it')
    closest: Closest | None
    banned_families: list[str] = Field(description="when nobody can take it: enabled families provisioned for the "
                                                   "bundle that a ban (an active denial) keeps from it")


class AgentHold(BaseModel):
    """A task an agent holds (`abandoned`: its lease ran out)."""

    task_id: uuid.UUID
    title: str
    project: str
    lane: str
    stage: str
    held_since: datetime
    lease_expires_at: datetime
    abandoned: bool


class AgentRow(BaseModel):
    """An agent (a token's sub) seen by the service."""

    sub: str
    family: str
    family_disabled: bool
    first_seen_at: datetime
    last_seen_at: datetime = Field(description="its last authenticated call (to within 30 seconds)")
    holds: list[AgentHold]


class ActiveDenial(BaseModel):
    """An active denial; `governance`: made by the substrate (reflexive, expiring) or a human's permanent ban."""

    feature: str
    reason: str
    expires_at: datetime | None
    created_by: str | None
    created_at: datetime
    governance: Literal["reflexive", "permanent"] | None = None


SPEND_BESIDE = ("what it reported spending, one row per currency (`ainarres agent usage`); "
                "null: nothing reported: unknown, never zero")


class RoleRecord(BaseModel):
    """A family's track record in one role (the role:* feature its moves exercised; null: moves needing none)."""

    role: str | None
    deliveries: int = Field(description="advances it performed in this role")
    rejected: int = Field(description="rejects (or rework-cap blocks) of work it produced in this role")
    rejects_made: int = Field(description="rejects it performed in this role")
    reject_rate: float | None = Field(description="rejected / deliveries")
    reviewed: int = Field(description="verdicts (advance or reject) on work it produced in this role")
    reviewed_cross: int = Field(description="of those, made by another family")
    cross_family_review_share: float | None = Field(description="reviewed_cross / reviewed")
    median_stage_seconds: float | None = Field(description="median time its deliveries' tasks spent in the "
                                                           "stage before it advanced them (to within ±9 %)")
    strikes: int = Field(description="strikes since its last ban in this role (governance)")
    bans: int = Field(description="reflexive bans so far in this role")
    spend: list[SpendFigure] | None = Field(description=SPEND_BESIDE)


class FamilyRecord(BaseModel):
    """A family's provisioning and track record."""

    key: str
    description: str
    disabled: bool
    max_active: int
    features: list[str] = Field(description="provisioned features")
    denials: list[ActiveDenial] = Field(description="active denials")
    agents: int = Field(description="agents (subs) of this family seen")
    holding: int = Field(description="live holds now")
    delivered: int = Field(description="advance transitions it performed")
    rejected: int = Field(description="rejects of its deliveries: a reject out of stage S is charged to the "
                                      "family whose advance brought the task into S")
    rejects_made: int = Field(description="reject transitions it performed")
    reject_rate: float | None = Field(description="rejected / delivered")
    roles: list[RoleRecord] = Field(description="the same per role, with review share, stage time and strikes")
    spend: list[SpendFigure] | None = Field(description=SPEND_BESIDE)


def _states(state: list[str] | None) -> tuple[str, ...] | None:
    flat = [s.strip() for v in state or [] for s in v.split(",") if s.strip()]
    return oversight.check_states(flat)


@router.get("/board", response_model=Page[BoardTask],
            summary="board: every task with lane, stage, holder, lease, attempts, rework, blockers, "
                    "age in stage, abandoned",
            description="Oldest first. Filters: project, lane, stage, family (the holder's), state, "
                        "abandoned. An abandoned task is held with a lease that ran out; the next eligible "
                        "claim reclaims it.")
async def board(_: Watcher, conn: Conn, project: Key = None, lane: Key = None, stage: Key = None,
                family: Key = None, state: States = None, abandoned: bool | None = None,
                cursor: Cursor = None, limit: Limit = 100) -> dict[str, Any]:
    f = Filters(project, lane, stage, family, _states(state))
    return await oversight.board(conn, f, abandoned, cursor, limit)


@router.get("/feed", response_model=Page[FeedEvent],
            summary="feed: every event, newest first, with actor family, lane and stage",
            description="Filters: project, lane, stage (where the event happened), family (the actor's), "
                        "type, task, state (the task's now).")
async def feed(_: Watcher, conn: Conn, st: State, project: Key = None, lane: Key = None, stage: Key = None,
               family: Key = None, state: States = None, type: Key = None, task: uuid.UUID | None = None,
               cursor: Cursor = None, limit: Limit = 100) -> dict[str, Any]:
    f = Filters(project, lane, stage, family, _states(state))
    return await oversight.feed(conn, f, type, task, cursor, limit, st.settings.max_read_bytes)


@router.get("/stuck", response_model=Page[StuckHold],
            summary="stuck: live holds silent for over half a lease (silent_hold) or kept alive past a "
                    "whole lease by heartbeats alone (treadmill), and tasks blocked for a human (blocked)",
            description="Oldest first (by `since`). Filters: project, lane, stage, family (the holder's, or "
                        "the blocker's), kind.")
async def stuck(_: Watcher, conn: Conn, project: Key = None, lane: Key = None, stage: Key = None,
                family: Key = None, kind: Literal["silent_hold", "treadmill", "blocked"] | None = None,
                cursor: Cursor = None, limit: Limit = 100) -> dict[str, Any]:
    return await oversight.stuck(conn, Filters(project, lane, stage, family), kind, cursor, limit)


@router.get("/demand", response_model=Page[DemandRow],
            summary="demand: pending work by the feature bundle it needs, and whether any enabled family "
                    "can take it (\"no capable agent\" otherwise)",
            description="Pending = ready + expired holds. A task open to several bundles counts under each. "
                        "Filters: project, lane, stage, family (bundles it can take), capable.")
async def demand(_: Watcher, conn: Conn, project: Key = None, lane: Key = None, stage: Key = None,
                 family: Key = None, capable: bool | None = None, cursor: Cursor = None,
                 limit: Limit = 100) -> dict[str, Any]:
    return await oversight.demand(conn, Filters(project, lane, stage, family), capable, cursor, limit)


@router.get("/agents", response_model=Page[AgentRow],
            summary="agents: instances seen, their family, current holds, last call",
            description="By sub. Filters: family, lane / project (its family is provisioned that lane / a "
                        "lane of that project).")
async def list_agents(_: Watcher, conn: Conn, project: Key = None, lane: Key = None, family: Key = None,
                      cursor: Cursor = None, limit: Limit = 100) -> dict[str, Any]:
    return await oversight.agents(conn, Filters(project, lane, None, family), cursor, limit)


@router.get("/track-record", response_model=Page[FamilyRecord],
            summary="families: provisioned features, active denials, tasks delivered / rejected, per role",
            description="By key. delivered = advances the family performed; rejected = rejects (or "
                        "rework-cap blocks) of work it delivered, charged to the family whose advance "
                        "brought the task into the rejecting stage; rejects_made = rejects it performed. `roles` has "
                        "the same per role with the cross-family review share, the median stage time and the "
                        "strikes; `spend` is null until usage is recorded. Read from rollups, after folding in "
                        "the moves made since the last read (never a scan of events). "
                        "Filters: family, lane / project (provisioned that lane / a lane of that project).")
async def track_record(_: Watcher, conn: Conn, project: Key = None, lane: Key = None, family: Key = None,
                       cursor: Cursor = None, limit: Limit = 100) -> dict[str, Any]:
    return await oversight.track_record(conn, Filters(project, lane, None, family), cursor, limit)


def _resume_point(after: int | None, last_event_id: str | None) -> int | None:
    if last_event_id is not None and last_event_id.strip():
        return oversight.event_id(last_event_id.strip(), "header.Last-Event-ID")
    return after


def _frame(event: dict[str, Any]) -> str:
    return f"id: {event['id']}\ndata: {json.dumps(event, separators=(',', ':'), default=str)}\n\n"


@router.get("/events/stream", response_class=StreamingResponse,
            summary="live events as Server-Sent Events (id: = event id); resume with Last-Event-ID or "
                    "?after=",
            description="Each `data:` is a feed event (the `FeedEvent` schema, as GET /v1/feed lists them) plus "
                        "`task` (a `Task`: the task as it is now). Without "
                        "Last-Event-ID or `after`, the stream starts with the events recorded from now on; "
                        "`after=0` replays everything. Comments (`: …`) open the stream and keep it alive. "
                        "Seats see every lane, other callers the lanes they hold lane:<key> for. `limit` "
                        "closes the stream after that many events. If the caller's token stops being valid, "
                        "an `event: error` frame ends it.",
            responses={200: {"description": "A Server-Sent Events stream: `id: <event id>` and `data: <JSON>` "
                                             "frames, `: …` comments, and a final `event: error` frame if the "
                                             "token stops being valid.",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
async def stream_events(request: Request, caller: Caller, st: State,
                        after: Annotated[Annotated[int, Field(ge=0, le=oversight.EVENT_ID_MAX)] | None, empty_is(None),
                                         Query()] = None,
                        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)] = None,
                        project: Key = None, lane: Key = None,
                        limit: Annotated[int | None, Query(ge=1, le=100_000)] = None,
                        keepalive: Annotated[float, Query(ge=0.1, le=300)] = 15.0) -> StreamingResponse:
    lanes = oversight.visible_lanes(caller)
    start = _resume_point(after, last_event_id)
    async with st.pool.acquire() as conn:
        if start is None:
            start = await oversight.last_event_id(conn)
        # The first read before the answer starts: what the database refuses in the filters (a NUL) is a 422
        # here, where a refusal can still be an answer, not a stream cut after its 200.
        first: oversight.Batch | None = await oversight.events_after(
            conn, lanes, start, project, lane, STREAM_BATCH, st.settings.max_read_bytes)
    token = (request.headers.get("authorization") or "").partition(" ")[2].strip()
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)

    async def frames() -> AsyncIterator[str]:
        nonlocal lanes, first
        seq, sent = oversight.Sequencer(start, GAP_SECONDS), 0
        beat = checked = time.monotonic()
        clock = st.events
        if metrics:
            metrics.streams.inc()
        try:
            yield f": ainarres event stream after {start}\nretry: 2000\n\n"
            with clock.watching(caller.jti):
                while True:
                    if first is not None:
                        batch, first = first, None
                    else:
                        async with st.pool.acquire() as conn:
                            batch = await oversight.events_after(conn, lanes, seq.cursor, project, lane,
                                                                 STREAM_BATCH, st.settings.max_read_bytes)
                    for ev in seq.take(batch, time.monotonic()):
                        yield _frame(ev)
                        sent += 1
                        if limit is not None and sent >= limit:
                            return
                    if (len(batch) == STREAM_BATCH or batch.more) and not seq.waiting and not clock.lapsed(caller.jti):
                        continue
                    now = time.monotonic()
                    if now - checked >= REAUTH_SECONDS or clock.lapsed(caller.jti):
                        checked = now
                        try:
                            async with st.pool.acquire() as conn:
                                lanes = oversight.visible_lanes(await auth.authenticate(conn, st.signer, token))
                        except AinarresError as exc:
                            body = {"code": exc.code, "detail": exc.detail}
                            yield f"event: error\ndata: {json.dumps(body)}\n\n"
                            return
                    if now - beat >= keepalive:
                        beat = now
                        yield ": keep-alive\n\n"
                    # Until the next keep-alive or re-read of the caller at the latest: at a gap of
                    # uncommitted ids, re-read soon; otherwise wait for the process's event clock to move
                    # past what this stream has seen (no read of its own while nothing happens).
                    due = min(keepalive - (now - beat), REAUTH_SECONDS - (now - checked))
                    if seq.waiting or clock.closed:
                        await asyncio.sleep(min(POLL_SECONDS, max(due, 0.0)))
                    else:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(max(due, 0.0)):
                                await clock.wait_past(seq.cursor, caller.jti)
        finally:
            if metrics:
                metrics.streams.dec()

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@ops.get("/metrics", response_class=Response, summary="Prometheus metrics (text format; no token: expose it "
                                                      "only where your scraper runs)",
         description="The Prometheus text exposition format: agent verb calls and latency by verb and result "
                     "code, claims by outcome, events recorded by type, reclaimed leases, escalations, blocks, "
                     "pending work and live / expired leases by lane, waiting claims, open event streams, and "
                     "the connection pool. Takes no token. With the database out of reach it still answers, "
                     "with `ainarres_database_up 0` and the process's own figures (the queue's left out), so "
                     "that an outage does not read as a dead process.",
         responses={200: {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request, st: State) -> Response:
    metrics: Metrics = request.app.state.metrics
    waiters = waiters_of(getattr(st, "wake", None))
    async with metrics.lock:
        try:
            async with asyncio.timeout(outage.RETRY_AFTER_SECONDS):  # a scrape is not kept waiting for a pool
                async with st.pool.acquire() as conn:
                    if metrics.since_event is None:
                        metrics.start(await oversight.last_event_id(conn))
                    since = metrics.since_event
                    assert since is not None
                    scrape = await oversight.scrape(conn, since)
        except TimeoutError:  # no connection came (a busy pool) or the read ran long: the database is not down
            metrics.unreadable(st.pool, waiters, down=False)
        except Exception as exc:
            if outage.noted(exc, "/metrics") is None:
                raise
            metrics.unreadable(st.pool, waiters)
        else:
            metrics.apply(scrape, st.pool, waiters)
    return Response(metrics.render(), media_type=metrics.content_type)
