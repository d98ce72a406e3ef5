"""Governance (ADR 0015): the governance status and trail; thresholds (seat:admin); permanent bans, lifts,
unblocking what the substrate blocked, deciding recommendations (seat:overseer); auditor flags
(role:auditor). The strikes and reflexive bans are the substrate's, written with each reject."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import Field, StrictInt

from ainarres_api.server.api import models
from ainarres_api.server.api.contract import AUTHENTICATED, refusals
from ainarres_api.server.api.deps import Admin, Conn, require
from ainarres_api.server.api.envelopes import Moved
from ainarres_api.server.api.schemas import WHOLE, Body, Reason, empty_is
from ainarres_api.server.errors import Conflict, Invalid, NotEligible, NotFound
from ainarres_api.server.services import governance
from ainarres_api.server.services.auth import Principal

router = APIRouter(prefix="/v1/governance", tags=["governance"])

Reader = Annotated[Principal, Depends(require("seat:overseer", "seat:monitor", "seat:admin", "role:auditor"))]
Overseer = Annotated[Principal, Depends(require("seat:overseer"))]
Auditor = Annotated[Principal, Depends(require("role:auditor"))]

Key = Annotated[str, Field(min_length=1, max_length=200)]
Id = Annotated[int, Path(ge=1, le=2**63 - 1)]

_READ = refusals(*AUTHENTICATED, NotEligible, Invalid)
_ACT = refusals(*AUTHENTICATED, NotEligible, NotFound, Conflict, Invalid)
_OVERSEER = "Needs seat:overseer (a human's seat: the substrate only recommends)."


class PolicyIn(Body):
    """Thresholds of one scope; a field left out or null inherits (feature → workflow → system)."""

    strike_threshold: Annotated[StrictInt, Field(ge=1, le=1000), WHOLE] | None = None
    ban_base_seconds: Annotated[StrictInt, Field(ge=60, le=31_536_000), WHOLE] | None = None
    ban_cap_seconds: Annotated[StrictInt, Field(ge=60, le=31_536_000), WHOLE] | None = None
    recommend_after_bans: Annotated[StrictInt, Field(ge=1, le=1000), WHOLE] | None = None
    recommend_after_flags: Annotated[StrictInt, Field(ge=1, le=1000), WHOLE] | None = None


class BanIn(Body):
    """A permanent ban (or its lift): the family, the feature and why."""

    family: Key
    feature: Key
    reason: Reason


class UnblockNoteIn(Body):
    """A human's unblock: the task and a note saying what was decided."""

    task_id: uuid.UUID
    note: Reason


class FlagIn(Body):
    """An auditor's flag: `quality` on a task's work (task_id, the family, optionally its capability or role),
    or an operational flag on a family (spinning, overspending, health, integrity)."""

    kind: Literal["quality", "spinning", "overspending", "health", "integrity"]
    family: Key
    feature: Key | None = Field(default=None, description="quality only: the capability or role judged")
    task_id: uuid.UUID | None = Field(default=None, description="quality: the task whose work is judged")
    note: Reason


class DecisionIn(Body):
    """A human's decision and why."""

    reason: Reason


class AcceptIn(Body):
    """Accept a recommendation: its permanent ban. `feature` names what to ban when the recommendation is
    about the family as a whole."""

    reason: Reason
    feature: Key | None = None


@router.get("", response_model=models.GovernanceStatus,
            summary="governance: policies, strikes, active bans, open recommendations and flags, the newest trail",
            description="Readable with seat:overseer, seat:monitor, seat:admin or role:auditor.", responses=_READ)
async def governance_status(_: Reader, conn: Conn) -> dict[str, Any]:
    return await governance.status(conn)


@router.get("/trail", response_model=models.Page[models.TrailEntry],
            summary="the governance trail, newest first (append-only)",
            description="Every governance act, by a human or by the substrate. Pass `next` back as `before`.",
            responses=_READ)
async def governance_trail(_: Reader, conn: Conn,
                           before: Annotated[Annotated[int, Field(ge=1, le=2**63 - 1)] | None, empty_is(None),
                                             Query()] = None,
                           limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    return await governance.trail(conn, before, limit)


@router.put("/policies/{scope}/{key}", response_model=models.Policy,
            summary="set the governance thresholds of a scope (seat:admin)",
            description="scope `system` (key `*`, every field required), `workflow` (a workflow key) or `feature` "
                        "(a registered role:/capability: feature). Null fields inherit.", responses=_ACT)
async def set_policy(scope: Literal["system", "workflow", "feature"], key: Annotated[str, Path(max_length=200)],
                     body: PolicyIn, caller: Admin, conn: Conn) -> dict[str, Any]:
    return await governance.set_policy(conn, caller, scope, key, body.model_dump())


@router.post("/bans", response_model=models.TrailEntry, status_code=201,
             summary="ban a family from a feature permanently (seat:overseer), on the trail",
             description=f"{_OVERSEER} Replaces any expiring denial of the feature; lasts until lifted. Not a "
                         "seat:* feature nor the caller's own family (an admin may). 409: banned already.",
             responses=_ACT)
async def ban_permanently(body: BanIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.ban(conn, caller, body.family, body.feature, body.reason)


@router.post("/lifts", response_model=models.TrailEntry,
             summary="lift a family's ban of a feature, temporary or permanent (seat:overseer), on the trail",
             description=f"{_OVERSEER} The family's strikes in that role start over. A denial an admin made "
                         "(POST /v1/families/{key}/denials by a caller with seat:admin) is an administrative "
                         "decision that only seat:admin lifts, here or with DELETE (403 not_eligible to an overseer "
                         "without it). 404: nothing to lift.",
             responses=_ACT)
async def lift_ban(body: BanIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.lift(conn, caller, body.family, body.feature, body.reason)


@router.post("/unblock", response_model=Moved, response_model_exclude_unset=True,  # `replay` left out, not null
             summary="unblock a task with a note (seat:overseer), blocks the substrate made included",
             description=f"{_OVERSEER} The unblock verb's rules, with the note on the trail.", responses=_ACT)
async def unblock_for_human(body: UnblockNoteIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.unblock(conn, caller, body.task_id, body.note)


@router.post("/flags", response_model=models.Flag, status_code=201,
             summary="raise an auditor flag (role:auditor); flags never deny",
             description="quality: anchored to a task (task_id) and a family, optionally its capability/role. "
                         "spinning, overspending, health, integrity: a family. Enough open flags on the same "
                         "family (and feature) make a recommendation for a human.", responses=_ACT)
async def raise_flag(body: FlagIn, caller: Auditor, conn: Conn) -> dict[str, Any]:
    return await governance.raise_flag(conn, caller, body.kind, body.family, body.feature, body.task_id, body.note)


@router.post("/flags/{flag_id}/dismiss", response_model=models.Flag,
             summary="dismiss a flag (seat:overseer)",
             description=f"{_OVERSEER} Not a flag about the caller's own family (an admin may). 409: dismissed "
                         "already.",
             responses=_ACT)
async def dismiss_flag(flag_id: Id, body: DecisionIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.dismiss_flag(conn, caller, flag_id, body.reason)


_DECIDE = ("Not a recommendation about the caller's own family (an admin may). One decision per recommendation: "
           "409 once it is accepted or dismissed, also when two decisions are sent at once.")


@router.post("/recommendations/{rec_id}/accept", response_model=models.Recommendation,
             summary="accept a recommendation: the permanent ban it recommends (seat:overseer)",
             description=f"{_OVERSEER} {_DECIDE}", responses=_ACT)
async def accept_recommendation(rec_id: Id, body: AcceptIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.accept(conn, caller, rec_id, body.reason, body.feature)


@router.post("/recommendations/{rec_id}/dismiss", response_model=models.Recommendation,
             summary="dismiss a recommendation: nothing is banned (seat:overseer)",
             description=f"{_OVERSEER} {_DECIDE}", responses=_ACT)
async def dismiss_recommendation(rec_id: Id, body: DecisionIn, caller: Overseer, conn: Conn) -> dict[str, Any]:
    return await governance.dismiss(conn, caller, rec_id, body.reason)
