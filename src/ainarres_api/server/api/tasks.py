"""The nine agent verbs, task reads and /v1/me."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Path, Query, Request, Response
from starlette.types import Receive

from ainarres_api.server.api.deps import Agent, AppState, Conn, FastJSONResponse, LentCaller, State, Token
from ainarres_api.server.api.schemas import (
    AdvanceIn,
    BlockIn,
    Body,
    ClaimIn,
    LeaseIn,
    ProgressIn,
    RejectIn,
    ReleaseIn,
    TaskCreate,
    UnblockIn,
)
from ainarres_api.server.services import claiming, tasks
from ainarres_api.server.services.auth import Principal, Signer
from ainarres_api.server.services.tasks import Limits

router = APIRouter(prefix="/v1", tags=["agent verbs"])

TaskId = Annotated[uuid.UUID, "the task's id"]


# Each verb's work after parsing, shared by the routes below (what /docs shows) and the dispatcher
# that serves the same verbs without FastAPI's per-request machinery (api/fastverbs.py).


async def create_task(conn: asyncpg.Connection, caller: Principal, body: TaskCreate, limits: Limits
                      ) -> tuple[dict[str, Any], int]:
    """Create a task; the envelope and its status (201 created, 200 an idempotent repeat)."""
    out, created = await tasks.create(conn, caller, body.model_dump(mode="json"), limits)
    return {"code": "created" if created else "existing", **out}, 201 if created else 200


async def claim_now(conn: asyncpg.Connection, caller: Principal, body: ClaimIn, limits: Limits) -> dict[str, Any]:
    """Claim without waiting."""
    return await tasks.claim(conn, caller, body.lane, limits)


async def claim_now_as(conn: asyncpg.Connection, signer: Signer, token: str, body: ClaimIn, limits: Limits
                       ) -> dict[str, Any]:
    """Claim without waiting, the caller read in the claim's own round trip."""
    return await tasks.claim_as(conn, signer, token, body.lane, limits)


async def transition_as(conn: asyncpg.Connection, signer: Signer, token: str, task_id: uuid.UUID, kind: str,
                        body: AdvanceIn | RejectIn) -> dict[str, Any]:
    """Advance or reject, the caller read in the transition's own round trip."""
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    text = body.note if isinstance(body, AdvanceIn) else body.reason
    return await tasks.transition_as(conn, signer, token, task_id, body.lease, kind, body.to, text, artifacts)


async def claim_waiting(body: ClaimIn, caller: Principal, token: str, st: AppState, receive: Receive
                        ) -> dict[str, Any]:
    """The long poll (holding no connection while it waits), racing the client's disconnect."""
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        return await claiming.claim_waiting(st.pool, st.signer, st.wake, st.limits, token, caller, body.lane,
                                            body.wait_seconds, gone)
    finally:
        gone.cancel()


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected (the request body has been read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def do_heartbeat(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: LeaseIn
                       ) -> dict[str, Any]:
    """Renew the lease."""
    return await tasks.heartbeat(conn, caller, task_id, body.lease)


async def do_progress(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: ProgressIn
                      ) -> dict[str, Any]:
    """Record progress (renews the lease)."""
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    return await tasks.progress(conn, caller, task_id, body.lease, body.note, artifacts)


async def do_advance(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: AdvanceIn
                     ) -> dict[str, Any]:
    """Move the held task forward."""
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    return await tasks.transition(conn, caller, task_id, body.lease, "advance", body.to, body.note, artifacts)


async def do_reject(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: RejectIn
                    ) -> dict[str, Any]:
    """Send the held task back for rework."""
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    return await tasks.transition(conn, caller, task_id, body.lease, "reject", body.to, body.reason, artifacts)


async def do_release(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: ReleaseIn
                     ) -> dict[str, Any]:
    """Give the held task back."""
    return await tasks.release(conn, caller, task_id, body.lease, body.reason)


async def do_block(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: BlockIn
                   ) -> dict[str, Any]:
    """Park the held task for a human."""
    return await tasks.block(conn, caller, task_id, body.lease, body.reason)


async def do_unblock(conn: asyncpg.Connection, caller: Principal, task_id: uuid.UUID, body: UnblockIn
                     ) -> dict[str, Any]:
    """Make a blocked task claimable again."""
    return await tasks.unblock(conn, caller, task_id, body.note)


HeldVerb = Callable[[asyncpg.Connection, Principal, uuid.UUID, Any], Awaitable[dict[str, Any]]]

# The verbs on one task (POST /v1/tasks/{task_id}/{verb}): the body each takes and its work.
HELD_VERBS: dict[str, tuple[type[Body], HeldVerb]] = {
    "heartbeat": (LeaseIn, do_heartbeat),
    "progress": (ProgressIn, do_progress),
    "advance": (AdvanceIn, do_advance),
    "reject": (RejectIn, do_reject),
    "release": (ReleaseIn, do_release),
    "block": (BlockIn, do_block),
    "unblock": (UnblockIn, do_unblock),
}


@router.post("/tasks", status_code=201, summary="create a task at its lane's initial stage", response_model=None)
async def create(body: TaskCreate, caller: Agent, conn: Conn, st: State) -> Response:
    out, status = await create_task(conn, caller, body, st.limits)
    return FastJSONResponse(out, status_code=status)


@router.post("/claims", summary="claim the best task you may do (optionally wait for one)", response_model=None)
async def claim(body: ClaimIn, lent: LentCaller, token: Token, st: State, request: Request) -> Response:
    # One pooled connection authenticates and claims; a long poll gives it back before waiting.
    if body.wait_seconds <= 0:
        return FastJSONResponse(await claim_now(lent.conn, lent.caller, body, st.limits))
    await lent.release()
    return FastJSONResponse(await claim_waiting(body, lent.caller, token, st, request.receive))


@router.post("/tasks/{task_id}/heartbeat", summary="keep your lease alive", response_model=None)
async def heartbeat(task_id: TaskId, body: LeaseIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_heartbeat(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/progress", summary="report progress (renews the lease)", response_model=None)
async def progress(task_id: TaskId, body: ProgressIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_progress(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/advance", summary="move a held task forward; releases the hold", response_model=None)
async def advance(task_id: TaskId, body: AdvanceIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_advance(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/reject", summary="send a held task back for rework; releases the hold",
             response_model=None)
async def reject(task_id: TaskId, body: RejectIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_reject(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/release", summary="give a held task back (attempts +1)", response_model=None)
async def release(task_id: TaskId, body: ReleaseIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_release(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/block", summary="park a held task for a human", response_model=None)
async def block(task_id: TaskId, body: BlockIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_block(conn, caller, task_id, body))


@router.post("/tasks/{task_id}/unblock", summary="make a blocked task claimable again", response_model=None)
async def unblock(task_id: TaskId, body: UnblockIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await do_unblock(conn, caller, task_id, body))


@router.get("/tasks/{task_id}", summary="read one task", response_model=None)
async def get_task(task_id: TaskId, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await tasks.get(conn, caller, task_id))


@router.get("/tasks/{task_id}/card", summary="the role card of the task's current stage")
async def task_card(task_id: TaskId, caller: Agent, conn: Conn) -> dict[str, Any]:
    return await tasks.card_of(conn, caller, task_id)


@router.get("/lanes/{key}/cards", summary="every stage's role card for the lane's workflow version")
async def lane_cards(key: Annotated[str, Path(max_length=96)], caller: Agent, conn: Conn) -> dict[str, Any]:
    return await tasks.lane_cards(conn, caller, key)


@router.get("/tasks/{task_id}/events", summary="a task's events, oldest first")
async def task_events(
    task_id: TaskId, caller: Agent, conn: Conn,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    items = await tasks.events(conn, caller, task_id, after, limit)
    return {"items": items, "next": items[-1]["id"] if len(items) == limit else None}


@router.get("/me", summary="who you are, what you may do now, what you hold")
async def me(caller: Agent, conn: Conn) -> dict[str, Any]:
    return await tasks.me(conn, caller)
