"""Task reads and /v1/me (the verbs themselves are declared in api/verbs.py)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from ainarres_api.server.api import contract, envelopes
from ainarres_api.server.api.deps import Agent, FastJSONResponse
from ainarres_api.server.api.schemas import empty_is
from ainarres_api.server.api.verbs import TaskId
from ainarres_api.server.errors import Invalid, NotEligible, NotFound
from ainarres_api.server.services import pages, tasks

router = APIRouter(prefix="/v1", tags=["agent reads"])


def _answers(model: type[Any], *refused: Any) -> dict[int | str, Any]:
    return {200: {"model": model, "description": model.__doc__ or ""},
            **contract.refusals(*contract.AUTHENTICATED, *refused)}


@router.get("/tasks/{task_id}", summary="read one task", response_model=None, operation_id="get_task",
            description="The task as it is now, if the caller may see its lane (its feature, or a seat).",
            responses=_answers(envelopes.Task, NotFound, Invalid))
async def get_task(task_id: TaskId, lent: Agent) -> Response:
    return FastJSONResponse(await tasks.get(lent.conn, await lent.principal(), task_id))


@router.get("/tasks/{task_id}/card", summary="the role card of the task's current stage", response_model=None,
            operation_id="get_task_card",
            description="What the holder of the task's current stage must do, and the ways out of it.",
            responses=_answers(envelopes.TaskCard, NotFound, Invalid))
async def task_card(task_id: TaskId, lent: Agent) -> Response:
    return FastJSONResponse(await tasks.card_of(lent.conn, await lent.principal(), task_id))


@router.get("/lanes/{key}/cards", summary="every stage's role card for the lane's workflow", response_model=None,
            operation_id="get_lane_cards",
            description="The cards of every stage of the workflow version the lane is bound to, in order. Needs "
                        "the lane's feature (or a seat).",
            responses=_answers(envelopes.LaneCards, NotEligible, NotFound, Invalid))
async def lane_cards(key: Annotated[str, Path(max_length=96, description="the lane's key")], lent: Agent) -> Response:
    return FastJSONResponse(await tasks.lane_cards(lent.conn, await lent.principal(), key))


@router.get("/tasks/{task_id}/events", summary="a task's events, oldest first", response_model=None,
            operation_id="list_task_events",
            description="Pages of the task's append-only history, bounded in rows (`limit`) and in bytes "
                        "(AINARRES_MAX_READ_BYTES); continue with `after=<next>`.",
            responses=_answers(envelopes.EventPage, NotFound, Invalid))
async def task_events(
    task_id: TaskId, lent: Agent, request: Request,
    after: Annotated[int, empty_is(0), Query(ge=0, le=2**63 - 1, description="the last event id you have")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many events")] = 200,
) -> Response:
    rows = await tasks.events(lent.conn, await lent.principal(), task_id, after, limit)
    # Bounded in bytes as well as rows: a page stops early, with its cursor, once it passes the budget.
    items, cut = pages.bounded(rows, request.app.state.ainarres.settings.max_read_bytes)
    return FastJSONResponse({"items": items, "next": items[-1]["id"] if cut or len(rows) == limit else None})


@router.get("/me", summary="who you are, what you may do now, what you hold", response_model=None,
            operation_id="me",
            description="The caller's sub and family, its effective features now, its lanes and its holds.",
            responses=_answers(envelopes.Me))
async def me(lent: Agent) -> Response:
    return FastJSONResponse(await tasks.me(lent.conn, await lent.principal()))
