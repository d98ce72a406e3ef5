"""The agent verbs, each declared once.

A `Verb` holds everything about one verb: its path, its request body, its answer, the refusals it can
give, its words for a developer (/docs) and for a model (the MCP tool), and its work: one call into the
services. `router` (the documented FastAPI routes) and the MCP tools (api/mcp_server.py) are both
derived from `VERBS`; both verify the token with the same function (services.auth.identity, behind the
`deps.agent_verb` dependency and the MCP guard), read the caller as `run` says (services.auth.read, or the
statement of a verb that moves a task: `Verb.reads_caller`) and run the same `work`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Body as BodyParam
from fastapi import FastAPI, Path, Request, Response
from pydantic import BaseModel
from starlette.types import Receive

from ainarres_api.server.api import contract, envelopes, models, outage, problems
from ainarres_api.server.api.deps import AgentVerb, AppState, FastJSONResponse, Lent
from ainarres_api.server.api.schemas import (
    AdvanceIn,
    BlockIn,
    Body,
    ClaimIn,
    EventBody,
    LeaseIn,
    ProgressIn,
    RejectIn,
    ReleaseIn,
    TaskCreate,
    UnblockIn,
    UsageIn,
    check_event_bytes,
)
from ainarres_api.server.api.verb_route import VerbRoute
from ainarres_api.server.errors import (
    AinarresError,
    AlreadyHolding,
    Conflict,
    GuardFailed,
    IllegalTransition,
    LeaseLost,
    NotEligible,
    NotFound,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from ainarres_api.server.metrics import NEXT_CLAIM
from ainarres_api.server.services import auth, claiming, spend, tasks, wake
from ainarres_api.server.services.auth import Principal


@dataclass
class Call:
    """One call of a verb, whatever the entry point: the caller's token and connection, the shared state."""

    st: AppState
    lent: Lent
    gone: asyncio.Future[Any] | None = None  # completes when an HTTP client disconnects (long poll)
    next_claim: tuple[str, float] | None = None  # the code and seconds of the claim a move ran for `next`

    @property
    def conn(self) -> Any:
        """The caller's pooled connection."""
        return self.lent.conn

    @property
    def caller(self) -> Principal:
        """The caller, once read (`run` reads it before the work of a verb that does not read it itself)."""
        assert self.lent.caller is not None, "the caller was not read"
        return self.lent.caller

    @property
    def token(self) -> str:
        """The caller's bearer token."""
        return self.lent.token


Work = Callable[[Call, uuid.UUID | None, Any], Awaitable[tuple[dict[str, Any], int]]]


@dataclass(frozen=True)
class Verb:
    """One agent verb: the single declaration the HTTP route and the MCP tool are made from."""

    name: str
    path: str
    body: type[Body]
    answer: type[BaseModel]
    refusals: tuple[type[AinarresError], ...]
    summary: str
    description: str
    tool: str  # the MCP tool's name
    tool_title: str
    tool_text: str  # for a model that has never seen AINARRES
    work: Work
    example: dict[str, Any]
    answer_example: dict[str, Any]
    status: int = 200
    on_task: bool = False  # POST /v1/tasks/{task_id}/<verb>
    held: bool = False  # presents a lease (the MCP session may remember it)
    ends_hold: bool = False
    extra_statuses: dict[int, str] = field(default_factory=dict)
    # The work's statement reads the caller itself (services.tasks.claim, .transition: ADR 0027), in the round
    # trip that moves the task; `run` reads it first for every other verb.
    reads_caller: bool = False


async def run(verb: Verb, call: Call, task_id: uuid.UUID | None, body: Any) -> tuple[dict[str, Any], int]:
    """Run a verb for any entry point (the HTTP route, the MCP tool): the caller read from the database now
    (by its work's statement, for a verb that `reads_caller`), the checks every entry shares that need the
    settings, then its work. A refusal decided before the caller was read waits for that read: a bad token is
    refused first (SPEC §2), whatever else is wrong."""
    try:
        if not verb.reads_caller:
            await call.lent.principal()
        if isinstance(body, EventBody):
            check_event_bytes(body, call.st.settings.max_event_bytes)
        return await verb.work(call, task_id, body)
    except AinarresError as exc:
        # Not read yet (no statement read it before refusing: exc.caller), and not itself the refusal of the caller.
        if call.lent.caller is None and exc.caller is None and not isinstance(exc, Unauthenticated):
            await call.lent.principal()
        raise


def _artifacts(body: Any) -> list[dict[str, Any]]:
    return [a.model_dump(exclude_none=True) for a in body.artifacts]


async def _create(c: Call, _: uuid.UUID | None, body: TaskCreate) -> tuple[dict[str, Any], int]:
    out, created = await tasks.create(c.conn, c.caller, body.model_dump(mode="json"), c.st.limits)
    return {"code": "created" if created else "existing", **out}, 201 if created else 200


async def _claim(c: Call, _: uuid.UUID | None, body: ClaimIn, after: int | None = None) -> tuple[dict[str, Any], int]:
    """A claim; `after`, the event of the move whose `next` it is (tasks.claim: `next_of`)."""
    if body.wait_seconds <= 0:
        out, c.lent.caller = await tasks.claim(c.conn, c.lent.who, body.lane, c.st.limits, after=after)
        if out["code"] == "empty":  # refused if it can never match; else what may come
            out = await tasks.prospects(c.conn, c.caller, body.lane)
        return out, 200
    # A long poll reads the caller now, again after a move (its features decide what it watches), then holds no
    # connection while it waits.
    c.lent.caller = await auth.read(c.conn, c.lent.who)
    await c.lent.release()
    st, sub = c.st, c.caller.sub
    cap = st.settings.max_long_polls_per_agent
    if st.long_polls.get(sub, 0) >= cap:
        raise RateLimited(f"you already have {cap} waiting claims open here (AINARRES_MAX_LONG_POLLS_PER_AGENT); "
                          "wait for one to answer before opening another", retry_after=1)
    st.long_polls[sub] = st.long_polls.get(sub, 0) + 1
    try:
        return await claiming.claim_waiting(st.pool, st.signer, st.wake, st.limits, c.token, c.caller, body.lane,
                                            body.wait_seconds, c.gone, st.events, after), 200
    finally:
        if (left := st.long_polls[sub] - 1) > 0:
            st.long_polls[sub] = left
        else:
            del st.long_polls[sub]


async def _heartbeat(c: Call, task_id: uuid.UUID | None, body: LeaseIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await tasks.heartbeat(c.conn, c.caller, task_id, body.lease), 200


async def _progress(c: Call, task_id: uuid.UUID | None, body: ProgressIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await tasks.progress(c.conn, c.caller, task_id, body.lease, body.note, _artifacts(body)), 200


async def _then_claim(c: Call, want: ClaimIn | None, out: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A transition's answer, with the claim its body asked for (`next`) run after the transition committed: that
    claim's answer, or the problem document of its refusal (the move stands either way, hence 200).

    The claim reads the caller's features again, in its own statement: the move may have changed them — a
    reject strikes the producer of the work, which may be the caller's own family, and at the threshold bans
    it from the role — and the claim must not take work the move just denied it.

    The claim names the move (its event): a claim for that move made already — the move is a retry whose first
    answer was lost — is answered again while the caller still holds its task (`replay: true`), never a second
    one (tasks.claim)."""
    if want is None:
        return out, 200
    move = out["event"]["id"] if out.get("event") else None
    if want.wait_seconds > 0:
        wake.flush(c.st.wake)  # the move committed: wake others now, not when this long poll answers
    started = time.perf_counter()
    try:
        nxt, _ = await _claim(c, None, want, after=move)
    except AinarresError as exc:
        nxt = problems.refused(exc, "/v1/claims")
    except Exception as exc:
        # The move has committed: a claim the database failed (a lock time-out, a collision, an outage) is this
        # claim's refusal inside the 200 — a 503 for the request would say that nothing was changed.
        known = outage.refusal_of(exc, "/v1/claims")
        if known is None:
            raise
        nxt = problems.refused(Unavailable(
            "the next claim could not be made now (a row it needs stayed locked, it collided with a concurrent "
            "change, or the database could not be reached); the move stands. Claim again (POST /v1/claims) after "
            "Retry-After seconds", retry_after=known.extra.get("retry_after", 1)), "/v1/claims")
    if not nxt.get("replay"):  # a claim answered again was counted when it was made
        c.next_claim = (str(nxt["code"]), time.perf_counter() - started)
    return {**out, "next": nxt}, 200


async def _move(c: Call, task_id: uuid.UUID | None, body: AdvanceIn | RejectIn, kind: str, text: str | None
                ) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    out, c.lent.caller = await tasks.transition(c.conn, c.lent.who, task_id, body.lease, kind, body.to, text,
                                                _artifacts(body))
    return await _then_claim(c, body.next, out)


async def _advance(c: Call, task_id: uuid.UUID | None, body: AdvanceIn) -> tuple[dict[str, Any], int]:
    return await _move(c, task_id, body, "advance", body.note)


async def _reject(c: Call, task_id: uuid.UUID | None, body: RejectIn) -> tuple[dict[str, Any], int]:
    return await _move(c, task_id, body, "reject", body.reason)


async def _release(c: Call, task_id: uuid.UUID | None, body: ReleaseIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await tasks.release(c.conn, c.caller, task_id, body.lease, body.reason), 200


async def _block(c: Call, task_id: uuid.UUID | None, body: BlockIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await tasks.block(c.conn, c.caller, task_id, body.lease, body.reason), 200


async def _unblock(c: Call, task_id: uuid.UUID | None, body: UnblockIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await tasks.unblock(c.conn, c.caller, task_id, body.note), 200


async def _usage(c: Call, task_id: uuid.UUID | None, body: UsageIn) -> tuple[dict[str, Any], int]:
    assert task_id is not None
    return await spend.record(c.conn, c.caller, task_id, body.model_dump()), 200


_TASK = {"id": "0b6a7c1e-3f2d-4c1a-9e8b-2d4f6a8c0e12", "project": "demo", "lane": "backend", "stage": "review",
         "state": "ready", "title": "Add a /health endpoint", "payload": {"issue": 42}, "priority": 0,
         "required_features": [], "depends_on": [], "attempts": 0, "rework_count": 0, "blocked": False,
         "blocked_reason": None, "holder": None, "lease_expires_at": None,
         "created_at": "2026-12-03T10:00:00+00:00", "updated_at": "2026-12-03T10:05:00+00:00"}
_HELD = {**_TASK, "stage": "todo", "state": "held", "holder": "opencode+qwen3.5f1c2a",
         "lease_expires_at": "2026-12-03T10:15:00+00:00"}
_LEASE = {"id": "7d1f0c2a-5b3e-4a6d-8c9f-0e1d2c3b4a59", "expires_at": "2026-12-03T10:15:00+00:00"}
_EVENT = {"id": 1041, "task_id": _TASK["id"], "type": "transition", "actor": "opencode+qwen3.5f1c2a",
          "family": "opencode+qwen3", "data": {"kind": "advance", "from": "todo", "to": "review",
                                               "note": "handler and tests", "lease": _LEASE["id"],
                                               "artifacts": [{"type": "branch", "name": "feat/health"}],
                                               "role": "role:dev", "stage_seconds": 300.0},
          "created_at": "2026-12-03T10:05:00+00:00"}
_CARD = {"workflow": "dev-review", "workflow_version": 1, "stage": "todo", "initial": True, "terminal": False,
         "instructions": "Implement it on a branch; advance to review with the branch as an artifact.",
         "lease_seconds": 600, "max_attempts": 3, "escalate_after": None, "max_rework": None,
         "transitions": [{"kind": "advance", "to": "review", "required_features": ["role:dev"], "guard": None,
                          "instructions": ""}],
         "when_stuck": tasks.WHEN_STUCK}
_LEASED = {"lease": _LEASE["id"]}
_CLAIMED = {"code": "claimed", "task": _HELD, "lease": _LEASE, "card": _CARD,
            "event": {**_EVENT, "type": "claimed", "data": {"lease": _LEASE["id"], "lease_expires_at":
                                                             _LEASE["expires_at"], "attempts": 0, "stage": "todo"}},
            "context": {"project": {"slug": "demo", "context": {"repo": "git@example.com:demo/app.git"}},
                        "lane": {"key": "backend", "context": {"rules": "small commits, tests first"}}}}

# The claim an advance's `next` made: another task, a lease of its own, a claimed event naming the move.
_NEXT_TASK = {**_HELD, "id": "5e0c7a9d-1b2f-4c3e-8d4a-6f7b8c9d0e1f", "title": "Add a /ready endpoint",
              "payload": {"issue": 43}, "lease_expires_at": "2026-12-03T10:15:01+00:00"}
_NEXT_LEASE = {"id": "c3a9e6d2-8f1b-4e7a-9d2c-5b6a7e8f9012", "expires_at": "2026-12-03T10:15:01+00:00"}
_NEXT_EVENT: dict[str, Any] = {**_EVENT, "id": 1042, "type": "claimed", "task_id": _NEXT_TASK["id"],
                               "data": {"lease": _NEXT_LEASE["id"], "lease_expires_at": _NEXT_LEASE["expires_at"],
                                        "attempts": 0, "stage": "todo", "next_of": _EVENT["id"]},
                               "created_at": "2026-12-03T10:05:01+00:00"}
_NEXT_CLAIMED = {**_CLAIMED, "task": _NEXT_TASK, "lease": _NEXT_LEASE, "event": _NEXT_EVENT}

_HELD_REFUSALS = (NotFound, LeaseLost)

VERBS: tuple[Verb, ...] = (
    Verb(
        name="create", path="/v1/tasks", body=TaskCreate, answer=envelopes.Created, status=201,
        refusals=(NotEligible, NotFound, Conflict),
        summary="create a task at its lane's initial stage",
        description=(
            "Creates a task in `lane`, at the first stage of the lane's workflow. Needs the lane's feature and "
            "the role that takes the workflow's first step. Answers `201 created`; the same `idempotency_key` "
            "with the same content answers `200 existing` with the task made the first time (a different "
            "content: `409 conflict`). `depends_on` tasks must finish before this one becomes claimable."),
        tool="create_task", tool_title="Create a task",
        tool_text="""\
Create a new task in a lane, at the first stage of the lane's workflow: to split work into pieces
or to hand work to others. Needs the lane's feature and the role that takes the workflow's first
step. Put what the worker needs in `payload` (references, not large content). When you retry, pass
the same `idempotency_key`: the same key with the same content returns the existing task (code
"existing") instead of a duplicate.
Refusals: not_eligible (you may not create in this lane), not_found (no such lane), conflict (the
key was used for different content: use a new key), invalid, payload_too_large.""",
        work=_create,
        example={"lane": "backend", "title": "Add a /health endpoint", "payload": {"issue": 42},
                 "idempotency_key": "issue-42"},
        answer_example={"code": "created", "task": {**_TASK, "stage": "todo"},
                        "event": {**_EVENT, "type": "created", "data": {"lane": "backend", "stage": "todo"}}},
        extra_statuses={200: "An idempotent repeat: the task the same `idempotency_key` made (code `existing`)."},
    ),
    Verb(
        name="claim", reads_caller=True, path="/v1/claims", body=ClaimIn, answer=envelopes.Claimed,
        refusals=(AlreadyHolding, NotEligible, RateLimited),
        summary="claim the best task you may do (optionally wait for one)",
        description=(
            "Takes the best task the caller may do now (priority, then age) and holds it under a lease: "
            "`claimed` with the task, the `lease` to present with every verb on it, the stage's role `card` "
            "the `claimed` event, and the project's and lane's `context` (where the work lives). `empty` when "
            "there is nothing, with `pending` (work you may not take yet: held by others, waiting on dependencies, "
            "blocked) and a `hint` on whether waiting can help; with `wait_seconds` (up to 60) the call waits for "
            "work to appear (a long poll, holding no database connection). A claim that can never match (a lane "
            "unknown or not held, every way out of the lane's stages needing a feature the caller lacks or is "
            "denied) is refused with `403 not_eligible` naming the cause, at once. A hold whose lease ran out is "
            "recovered by the claim that meets it (attempts +1; escalated or blocked when due)."),
        tool="claim", tool_title="Take the next task",
        tool_text="""\
Take the best task you may do now and hold it. Returns code "claimed" with `task`, `lease` (your
proof of holding; this session remembers it) and `card` (what to do at this stage: `instructions`,
and `transitions`, the legal ways out) and `context` (where the work lives: the project's and lane's
context, e.g. the repository). Returns code "empty" when nothing is available: not an error; its
`pending` counts work you may not take yet and `hint` says whether waiting helps; pass wait_seconds
(up to 60) to wait for work, or try again later. You hold at most as many tasks as your family
allows, usually one.
Refusals: already_holding (you already hold a task: the refusal carries it and its lease, now
remembered; finish it with advance, reject, release or block, then claim again), not_eligible (no
claim of yours can ever match here: the detail names what is missing; stop and tell your operator).""",
        work=_claim,
        example={"lane": "backend", "wait_seconds": 30},
        answer_example=_CLAIMED,
    ),
    Verb(
        name="heartbeat", path="/v1/tasks/{task_id}/heartbeat", body=LeaseIn, answer=envelopes.Renewed,
        refusals=_HELD_REFUSALS, on_task=True, held=True,
        summary="keep your lease alive",
        description="Pushes the lease out by the stage's `lease_seconds`, recording nothing else.",
        tool="heartbeat", tool_title="Keep my hold alive",
        tool_text="""\
Keep your hold on a task alive without reporting anything. A hold expires after the card's
lease_seconds; call this (or progress) well before that while you work.
Refusals: lease_lost (you no longer hold the task: stop working on it and claim again), not_found.""",
        work=_heartbeat, example=_LEASED, answer_example={"code": "ok", "lease": _LEASE, "task": _HELD},
    ),
    Verb(
        name="progress", path="/v1/tasks/{task_id}/progress", body=ProgressIn, answer=envelopes.Progressed,
        refusals=_HELD_REFUSALS, on_task=True, held=True,
        summary="report progress (renews the lease)",
        description="Records a note and artifacts (references to work products) on the held task, and renews "
                    "the lease.",
        tool="progress", tool_title="Report progress",
        tool_text="""\
Record what you have done so far on the task you hold: a short note, and artifacts (references to
work products: a branch, commit, file path or URL). Renews your hold. Call it at milestones and
every few minutes; reviewers and humans read these notes.
Refusals: lease_lost (stop; claim again), not_found, invalid, payload_too_large.""",
        work=_progress,
        example={**_LEASED, "note": "handler written, tests next",
                 "artifacts": [{"type": "file", "path": "app/health.py"}]},
        answer_example={"code": "ok", "task": _HELD, "lease": _LEASE,
                        "event": {**_EVENT, "type": "progress", "data": {"note": "handler written, tests next"}}},
    ),
    Verb(
        name="advance", reads_caller=True, path="/v1/tasks/{task_id}/advance", body=AdvanceIn, answer=envelopes.MovedOn,
        refusals=(*_HELD_REFUSALS, NotEligible, IllegalTransition, GuardFailed), on_task=True, held=True,
        ends_hold=True,
        summary="move a held task forward; releases the hold",
        description=(
            "Moves the held task to stage `to` by an `advance` transition of its workflow whose features the "
            "caller holds (the most specific first). None from this stage to `to`: `409 illegal_transition` "
            "(the detail lists the legal targets); one exists but the caller lacks its features: `403 "
            "not_eligible`; its guard is false: `409 guard_failed`. Finishing a task makes the tasks waiting "
            "on it claimable. With `next` (what POST /v1/claims takes) the caller's next claim runs once the move "
            "has committed, and its answer is `next` in this one: one call per task for a worker loop. A "
            "refused move claims nothing; a refused next claim leaves the move standing (`next` is then the "
            "claim's problem document, status 200). Sent again after it was applied (its answer was lost), the "
            "call is answered as a replay (`replay: true`, the same event), and so is its `next`: the task the "
            "first call claimed, same lease, while you still hold it."),
        tool="advance", tool_title="Finish my stage",
        tool_text="""\
Finish your stage: move the task you hold forward to stage `to` (a transition of kind advance on
its card), with a note and artifacts saying what you did. Your hold ends.
Refusals: illegal_transition (no advance from this stage to `to`; the detail lists the legal
targets), not_eligible (you lack the features that way out needs: pick another target, or
release), guard_failed (a condition on the task, the card's guard, is false: sending it again changes
nothing, take another transition on the card or block for a human; if the detail says the guard did
not finish in time, try again later), lease_lost (stop; claim again).
Pass next={"lane": ...} (or next={}) to claim your next task in the same call: the answer's `next`
is that claim (this session then remembers its lease), `empty`, or the claim's refusal. With `next`,
name the task you move (task_id): the same call again without one is refused, as it could mean
either task.""",
        work=_advance,
        example={**_LEASED, "to": "review", "note": "done", "artifacts": [{"type": "branch", "name": "feat/health"}],
                 "next": {"lane": "backend"}},
        answer_example={"code": "ok", "task": _TASK, "event": _EVENT, "next": _NEXT_CLAIMED},
    ),
    Verb(
        name="reject", reads_caller=True, path="/v1/tasks/{task_id}/reject", body=RejectIn, answer=envelopes.MovedOn,
        refusals=(*_HELD_REFUSALS, NotEligible, IllegalTransition, GuardFailed), on_task=True, held=True,
        ends_hold=True,
        summary="send a held task back for rework; releases the hold",
        description=(
            "Sends the held task to stage `to` by a `reject` transition, with the `reason` (what to fix); its "
            "rework count goes up. A reject past the stage's `max_rework` blocks the task for a human instead "
            "(code `blocked`). Refusals as for advance, and `next` as for advance."),
        tool="reject", tool_title="Send back for rework",
        tool_text="""\
Send the task you hold back to an earlier stage `to` for rework (a transition of kind reject on its
card), with the reason: what exactly must be fixed. Usually a reviewer's verb. Your hold ends. If
the stage's rework cap is reached, the task is blocked for a human instead (code "blocked").
Refusals: illegal_transition (the detail lists the legal targets), not_eligible, guard_failed,
lease_lost (stop; claim again). `next` claims your next task in the same call, as for advance.""",
        work=_reject,
        example={**_LEASED, "to": "todo", "reason": "no test for the 503 case"},
        answer_example={"code": "ok", "task": {**_TASK, "stage": "todo", "rework_count": 1},
                        "event": {**_EVENT, "data": {"kind": "reject", "from": "review", "to": "todo",
                                                     "reason": "no test for the 503 case", "artifacts": [],
                                                     "lease": _LEASE["id"], "role": "role:reviewer"}}},
    ),
    Verb(
        name="release", path="/v1/tasks/{task_id}/release", body=ReleaseIn, answer=envelopes.Moved,
        refusals=_HELD_REFUSALS, on_task=True, held=True, ends_hold=True,
        summary="give a held task back (attempts +1)",
        description=(
            "Gives the held task back to its queue. Counts as a failed attempt: at the stage's "
            "`escalate_after` the task is escalated to the next tier, at its `max_attempts` it is blocked for "
            "a human (code `blocked`)."),
        tool="release", tool_title="Give the task back",
        tool_text="""\
Give the task you hold back unfinished so that someone else (perhaps a stronger agent) can take it:
when you cannot do it. Counts as a failed attempt; repeated attempts escalate the task or block it
for a human (code "blocked"). Your hold ends.
Refusals: lease_lost, not_found.""",
        work=_release,
        example={**_LEASED, "reason": "context window full"},
        answer_example={"code": "ok", "task": {**_TASK, "stage": "todo", "attempts": 1},
                        "event": {**_EVENT, "type": "released",
                                  "data": {"reason": "context window full", "attempts": 1, "lease": _LEASE["id"],
                                           "escalated": False}}},
    ),
    Verb(
        name="block", path="/v1/tasks/{task_id}/block", body=BlockIn, answer=envelopes.Moved,
        refusals=_HELD_REFUSALS, on_task=True, held=True, ends_hold=True,
        summary="park a held task for a human",
        description="Parks the held task for a human with the `reason`: not claimable until unblocked.",
        tool="block", tool_title="Park for a human",
        tool_text="""\
Park the task you hold for a human: when work cannot go on without a decision, access or
information you cannot get. Say exactly what is needed in `reason`. Your hold ends; the task stays
out of the queue until someone unblocks it.
Refusals: lease_lost, not_found, invalid.""",
        work=_block,
        example={**_LEASED, "reason": "needs credentials for the staging database"},
        answer_example={"code": "ok", "task": {**_TASK, "state": "blocked", "blocked": True,
                                               "blocked_reason": "needs credentials for the staging database"},
                        "event": {**_EVENT, "type": "blocked",
                                  "data": {"reason": "needs credentials for the staging database",
                                           "lease": _LEASE["id"], "stage": "todo"}}},
    ),
    Verb(
        name="unblock", path="/v1/tasks/{task_id}/unblock", body=UnblockIn, answer=envelopes.Moved,
        refusals=(NotFound, NotEligible, Conflict), on_task=True,
        summary="make a blocked task claimable again",
        description=(
            "Puts a blocked task back in its queue. Unblocked by `seat:overseer` (a human's decision), its "
            "attempts and the stage's rework count start over; by an agent, they are kept. "
            "Needs `seat:overseer`, or the lane's feature and the features of a way out of the task's stage. "
            "A block the substrate made (max attempts, the rework cap) only `seat:overseer` may lift "
            "(`403 not_eligible`: a human must lift it), with a `note` saying what was decided, which goes on the "
            "governance trail as the decision's reason (`422 invalid` on `note` without one, or past 2000 "
            "characters). A task that is not blocked: `409 conflict`."),
        tool="unblock", tool_title="Unblock a task",
        tool_text="""\
Make a blocked task claimable again once what blocked it is resolved (its attempts and rework
count start over only when a human with seat:overseer unblocks it). No hold needed; needs
seat:overseer, or the features to work the task's stage. A block the substrate made (max
attempts, rework cap) only a human with seat:overseer may lift, with a note saying what was
decided (it goes on the governance trail): do not retry.
Refusals: not_eligible, conflict (the task is not blocked), not_found, invalid (a note is needed).""",
        work=_unblock,
        example={"note": "credentials added to the vault"},
        answer_example={"code": "ok", "task": {**_TASK, "stage": "todo"},
                        "event": {**_EVENT, "type": "unblocked",
                                  "data": {"note": "credentials added to the vault", "previous_attempts": 1,
                                           "counts_reset": False}}},
    ),
    Verb(
        name="usage", path="/v1/tasks/{task_id}/usage", body=UsageIn, answer=models.UsageRecorded,
        refusals=(NotFound, NotEligible, Conflict), on_task=True,
        summary="record what work on a task cost (model, tokens, cost, wall time)",
        description=(
            "Records a usage report on a task the caller holds or held (an overseer, `seat:overseer`, may record "
            "on any task, on behalf of a `family`): model, input and output tokens, `cost` with its ISO 4217 "
            "`currency`, wall time. Anchor it to the event it paid for with `event` (the id of your transition, "
            "as its answer gave it); without one it is attributed to the stage of your last claim of the task. "
            "Leave out what you do not know: an unknown amount stays null, never zero. A retry is safe: the same "
            "`idempotency_key` and report (or, without a key, a report equal to your last one on this task) "
            "answers the first record with `replay: true`; the same key with a different report: `409 "
            "conflict`. Never held the task: `403 not_eligible`; an `event` not of this task (or not yours): "
            "`422 invalid`."),
        tool="record_usage", tool_title="Record what my work cost",
        tool_text="""\
Record what your work on a task cost, after you advance, reject, release or block it (or while you
hold it): the model, input_tokens and output_tokens, cost with its currency (e.g. "0.042" and
"USD"), wall_seconds. Pass `event` (the id of the event your transition answered) to tie it to
that step. Leave out anything you do not know; never guess a zero. Retrying with the same
idempotency_key is safe.
Refusals: not_eligible (you never held this task), not_found, conflict (the key was used for a
different report), invalid (a bad value, cost without currency, or an event not of this task).""",
        work=_usage,
        example={"model": "claude-sonnet-4-5", "input_tokens": 18234, "output_tokens": 2210, "cost": "0.0878",
                 "currency": "USD", "wall_seconds": 94.2, "event": 1041, "idempotency_key": "run-7f3a"},
        answer_example={"code": "ok", "usage": {
            "id": 7, "task_id": _TASK["id"], "event_id": 1041, "lane": "backend", "family": "opencode+qwen3",
            "agent": "opencode+qwen3.5f1c2a", "role": "role:dev", "model": "claude-sonnet-4-5", "input_tokens": 18234,
            "output_tokens": 2210, "cost": "0.0878", "currency": "USD", "wall_seconds": 94.2,
            "recorded_by": "opencode+qwen3.5f1c2a", "idempotency_key": "run-7f3a",
            "created_at": "2026-12-03T10:06:00+00:00"}},
    ),
)

BY_NAME = {v.name: v for v in VERBS}

TaskId = Annotated[uuid.UUID, Path(description="the task's id")]


def waits(body: Body) -> bool:
    """Whether a verb's body asks for a waiting claim (its own, or the `next` one after a transition)."""
    want = body if isinstance(body, ClaimIn) else getattr(body, "next", None)
    return want is not None and want.wait_seconds > 0


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected (the request body has been read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _endpoint(verb: Verb) -> Callable[..., Awaitable[Response]]:
    """The FastAPI endpoint of a verb: the body and the caller solved by FastAPI, then the verb's work."""

    async def endpoint(request: Request, lent: AgentVerb, body: Any, task_id: uuid.UUID | None = None) -> Response:
        gone: asyncio.Future[Any] | None = None
        if waits(body):
            gone = asyncio.ensure_future(_disconnected(request.receive))
        call = Call(request.app.state.ainarres, lent, gone)
        try:
            out, status = await run(verb, call, task_id, body)
        finally:
            if gone is not None:
                gone.cancel()
        if call.next_claim is not None:  # counted as a claim by the metrics (server/metrics.py: NEXT_CLAIM)
            request.scope[NEXT_CLAIM] = call.next_claim
        return FastJSONResponse(out, status_code=status)

    params = [
        inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        inspect.Parameter("lent", inspect.Parameter.KEYWORD_ONLY, annotation=AgentVerb),
        inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
            verb.body, BodyParam(openapi_examples={verb.name: {"summary": verb.summary, "value": verb.example}})]),
    ]
    if verb.on_task:
        params.insert(1, inspect.Parameter("task_id", inspect.Parameter.KEYWORD_ONLY, annotation=TaskId))
    endpoint.__signature__ = inspect.Signature(params, return_annotation=Response)  # type: ignore[attr-defined]
    endpoint.__name__ = verb.name
    return endpoint


def _responses(verb: Verb) -> dict[int | str, Any]:
    answer = {"model": verb.answer, "description": verb.answer.__doc__ or "",
              "content": {"application/json": {"example": verb.answer_example}}}
    out: dict[int | str, Any] = {verb.status: answer}
    for status, desc in verb.extra_statuses.items():
        out[status] = {"model": verb.answer, "description": desc}
    out.update(contract.refusals(*contract.AUTHENTICATED, *contract.WITH_BODY, *verb.refusals))
    return out


def add_routes(app: FastAPI) -> None:
    """The documented routes of the verbs, made from VERBS, on the app's own router (an included router costs
    FastAPI a matching pass of its own on every request), ahead of every route already there (FastAPI's docs,
    the probes): a request is matched against the routes in order, and these are the hot path."""
    for verb in VERBS:
        app.router.add_api_route(
            verb.path, _endpoint(verb), methods=["POST"], status_code=verb.status, response_model=None,
            summary=verb.summary, description=verb.description, operation_id=verb.name,
            responses=_responses(verb), tags=["agent verbs"], route_class_override=VerbRoute,
        )
    routes = app.router.routes
    routes[:] = [r for r in routes if isinstance(r, VerbRoute)] + [r for r in routes if not isinstance(r, VerbRoute)]
