"""Spend and flow views (seat:overseer, seat:monitor or seat:admin): spend per family, role, lane and task,
beside deliveries; anomalies; throughput and lead time per lane over time (the board's charts).

Every view reads rollups, never the events table (services/spend.py); an unknown amount is null.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query

from ainarres_api.server.api.contract import AUTHENTICATED, refusals
from ainarres_api.server.api.deps import Conn, require
from ainarres_api.server.api.models import FlowSeries, Page, SpendAnomalies, SpendRow, TaskSpend
from ainarres_api.server.api.schemas import Instant
from ainarres_api.server.errors import Invalid, NotEligible
from ainarres_api.server.services import spend
from ainarres_api.server.services.auth import Principal

router = APIRouter(prefix="/v1", tags=["oversight"], responses=refusals(*AUTHENTICATED, NotEligible, Invalid))

Watcher = Annotated[Principal, Depends(require("seat:overseer", "seat:monitor", "seat:admin"))]
Key = Annotated[str | None, Query(max_length=200)]


@router.get("/spend", response_model=Page[SpendRow],
            summary="spend per family, role, lane or (family, role), beside deliveries; unknown spend is null",
            description=(
                "One row per group and currency (`currency` null: reports that gave no cost). `group`: `family`, "
                "`role` (the role:* feature of the way out of the stage the work was for), `lane`, or "
                "`family_role`. `deliveries` is what the group delivered: advances performed (family, role) or "
                "tasks finished (lane); `cost_per_delivery` = cost / deliveries. Spend is never blended into "
                "the delivery counts. A group that delivered and reported no usage reads null, not zero. "
                "Reads rollups only; `next` is always null."))
async def spend_groups(_: Watcher, conn: Conn,
                       group: Literal["family", "role", "lane", "family_role"] = "family") -> dict[str, Any]:
    return await spend.groups(conn, group)


@router.get("/spend/tasks", response_model=Page[TaskSpend],
            summary="spend per task (and family and currency), the most recently reported first",
            description="Filters: task, lane, family (the one that paid). `delivered`: the task is done.")
async def spend_tasks(_: Watcher, conn: Conn, task: uuid.UUID | None = None, lane: Key = None, family: Key = None,
                      cursor: Annotated[str | None, Query(max_length=1000)] = None,
                      limit: Annotated[int, Query(ge=1, le=500)] = 100) -> dict[str, Any]:
    return await spend.tasks(conn, task, lane, family, cursor, limit)


@router.get("/spend/anomalies", response_model=SpendAnomalies,
            summary="anomalies: overspending against the role's norm, costly tasks against the family's norm, "
                    "spinning holds, repeated releases",
            description=(
                "`overspending`: a family whose cost per delivery in a role exceeds `multiple` times the median "
                "of the other families in that role and currency. `costly_tasks`: tasks on which a family spent "
                "more than `multiple` times its own cost per delivery. `spinning`: live holds older than "
                "`spin_leases` of their stage's leases, or with `spin_progress` progress reports, and no "
                "transition. `repeated_releases`: unfinished tasks given back `releases` times or more. "
                "Flags, never denials."))
async def spend_anomalies(
    _: Watcher, conn: Conn,
    multiple: Annotated[float, Query(ge=1.0, le=1000.0)] = spend.OVERSPEND_MULTIPLE,
    spin_leases: Annotated[float, Query(ge=1.0, le=1000.0)] = spend.SPIN_LEASES,
    spin_progress: Annotated[int, Query(ge=1, le=100_000)] = spend.SPIN_PROGRESS,
    releases: Annotated[int, Query(ge=2, le=100_000)] = spend.REPEATED_RELEASES,
) -> dict[str, Any]:
    return await spend.anomalies(conn, multiple, spin_leases, spin_progress, releases)


@router.get("/flow", response_model=FlowSeries,
            summary="throughput and lead time per lane over time (hourly or daily buckets, UTC)",
            description=(
                "Per lane and bucket: tasks finished (reached a terminal stage), their mean and longest lead "
                "time (creation to finish; null when none finished), advances, rejects and releases. From "
                "`since` (default: 48 hours ago for `hour`, 30 days for `day`). Reads the hourly rollup."))
async def flow(_: Watcher, conn: Conn, bucket: Literal["hour", "day"] = "hour", since: Instant | None = None,
               lane: Key = None) -> dict[str, Any]:
    return await spend.flow(conn, bucket, since, lane)
