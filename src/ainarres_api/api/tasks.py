"""The nine agent verbs, task reads and /v1/me."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from ainarres_api.api.deps import Agent, Conn, FastJSONResponse, LentCaller, State, Token
from ainarres_api.api.schemas import (
    AdvanceIn,
    BlockIn,
    ClaimIn,
    LeaseIn,
    ProgressIn,
    RejectIn,
    ReleaseIn,
    TaskCreate,
    UnblockIn,
)
from ainarres_api.services import claiming, tasks

router = APIRouter(prefix="/v1", tags=["agent verbs"])

TaskId = Annotated[uuid.UUID, "the task's id"]


@router.post("/tasks", status_code=201, summary="create a task at its lane's initial stage", response_model=None)
async def create(body: TaskCreate, caller: Agent, conn: Conn, st: State) -> Response:
    out, created = await tasks.create(conn, caller, body.model_dump(mode="json"), st.limits)
    return FastJSONResponse({"code": "created" if created else "existing", **out}, status_code=201 if created else 200)


@router.post("/claims", summary="claim the best task you may do (optionally wait for one)", response_model=None)
async def claim(body: ClaimIn, lent: LentCaller, token: Token, st: State, request: Request) -> Response:
    # One pooled connection authenticates and claims; a long poll gives it back before waiting.
    if body.wait_seconds <= 0:
        return FastJSONResponse(await tasks.claim(lent.conn, lent.caller, body.lane, st.limits))
    await lent.release()
    return FastJSONResponse(await _claim_waiting(body, lent.caller, token, st, request))


async def _claim_waiting(body: ClaimIn, caller: Any, token: str, st: Any, request: Request) -> dict[str, Any]:
    """The long poll, racing the client's disconnect."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        return await claiming.claim_waiting(st.pool, st.signer, st.wake, st.limits, token, caller, body.lane,
                                            body.wait_seconds, gone)
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/tasks/{task_id}/heartbeat", summary="keep your lease alive", response_model=None)
async def heartbeat(task_id: TaskId, body: LeaseIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await tasks.heartbeat(conn, caller, task_id, body.lease))


@router.post("/tasks/{task_id}/progress", summary="report progress (renews the lease)", response_model=None)
async def progress(task_id: TaskId, body: ProgressIn, caller: Agent, conn: Conn) -> Response:
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    return FastJSONResponse(await tasks.progress(conn, caller, task_id, body.lease, body.note, artifacts))


@router.post("/tasks/{task_id}/advance", summary="move a held task forward; releases the hold", response_model=None)
async def advance(task_id: TaskId, body: AdvanceIn, caller: Agent, conn: Conn) -> Response:
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    out = await tasks.transition(conn, caller, task_id, body.lease, "advance", body.to, body.note, artifacts)
    return FastJSONResponse(out)


@router.post("/tasks/{task_id}/reject", summary="send a held task back for rework; releases the hold",
             response_model=None)
async def reject(task_id: TaskId, body: RejectIn, caller: Agent, conn: Conn) -> Response:
    artifacts = [a.model_dump(exclude_none=True) for a in body.artifacts]
    out = await tasks.transition(conn, caller, task_id, body.lease, "reject", body.to, body.reason, artifacts)
    return FastJSONResponse(out)


@router.post("/tasks/{task_id}/release", summary="give a held task back (attempts +1)", response_model=None)
async def release(task_id: TaskId, body: ReleaseIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await tasks.release(conn, caller, task_id, body.lease, body.reason))


@router.post("/tasks/{task_id}/block", summary="park a held task for a human", response_model=None)
async def block(task_id: TaskId, body: BlockIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await tasks.block(conn, caller, task_id, body.lease, body.reason))


@router.post("/tasks/{task_id}/unblock", summary="make a blocked task claimable again", response_model=None)
async def unblock(task_id: TaskId, body: UnblockIn, caller: Agent, conn: Conn) -> Response:
    return FastJSONResponse(await tasks.unblock(conn, caller, task_id, body.note))


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
