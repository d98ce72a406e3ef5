"""What the agent verbs and task reads answer: named schemas for /openapi.json.

The verbs render their answers directly (orjson) rather than through these models; the models are
the published contract, and the schemathesis tier checks every answer against them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ainarres_api.server.api.contract import Problem


class Task(BaseModel):
    """A task as every caller reads it."""

    id: uuid.UUID
    project: str = Field(description="the project's slug")
    lane: str = Field(description="the lane's key")
    stage: str = Field(description="the workflow stage it is in")
    state: Literal["waiting", "ready", "held", "blocked", "done"] = Field(
        description="waiting (on dependencies), ready (claimable), held, blocked (for a human), done")
    title: str
    payload: dict[str, Any] = Field(description="what the worker needs: references, not content")
    priority: int = Field(description="higher is claimed first")
    required_features: list[str] = Field(description="features a claimer needs besides the lane's")
    depends_on: list[uuid.UUID] = Field(description="tasks that must finish before this one is claimable")
    attempts: int = Field(description="failed holds in the current stage (releases, expired leases)")
    rework_count: int = Field(description="how many times it was rejected, all stages together")
    blocked: bool
    blocked_reason: str | None
    holder: str | None = Field(description="the holding agent's sub, or null")
    lease_expires_at: datetime | None = Field(description="when the current hold expires, or null")
    created_at: datetime
    updated_at: datetime


class Event(BaseModel):
    """One entry of a task's append-only history."""

    id: int = Field(description="increasing; resume a listing or a stream after it")
    task_id: uuid.UUID
    type: Literal["created", "claimed", "progress", "transition", "released", "blocked", "unblocked",
                  "escalated"]
    actor: str | None = Field(description="the agent's sub (null: the substrate itself)")
    family: str | None
    data: dict[str, Any] = Field(description="what happened: note, reason, artifacts, from/to, lease, …")
    created_at: datetime


class Lease(BaseModel):
    """Proof of holding a task: present its id with every verb on the task."""

    id: uuid.UUID
    expires_at: datetime | None = Field(description="renew it with heartbeat or progress before then")


class CardTransition(BaseModel):
    """One way out of a stage."""

    kind: Literal["advance", "reject"]
    to: str = Field(description="the target stage's key: pass it as `to`")
    required_features: list[str] = Field(description="features needed to take this way out")
    guard: str | None = Field(description="a JSONPath predicate over the task that must hold, or null")
    instructions: str = Field(description="when to take it and what to leave behind")


class Card(BaseModel):
    """The role card of a stage: what its holder must do and the ways out."""

    workflow: str
    workflow_version: int
    stage: str
    initial: bool
    terminal: bool
    instructions: str = Field(description="what to do at this stage (Markdown)")
    lease_seconds: int = Field(description="how long a hold lasts without heartbeat or progress")
    max_attempts: int
    escalate_after: int | None
    max_rework: int | None
    transitions: list[CardTransition]
    when_stuck: str = Field(description="what to do when the instructions cannot be followed")


class WhereWorkLives(BaseModel):
    """The project's and the lane's context: where the work's truth lives (repository, rules)."""

    project: dict[str, Any] = Field(description="{slug, context}")
    lane: dict[str, Any] = Field(description="{key, context}")


class TaskCard(Card):
    """The role card of a task's current stage, with where its work lives."""

    task_id: uuid.UUID
    context: WhereWorkLives


class LaneCards(BaseModel):
    """Every stage's card of the workflow version a lane is bound to, in workflow order."""

    lane: str
    workflow: str | None
    workflow_version: int | None
    cards: list[Card]
    context: WhereWorkLives


class Created(BaseModel):
    """The answer to create."""

    code: Literal["created", "existing"] = Field(description="existing: an idempotent repeat (status 200)")
    task: Task
    event: Event | None = Field(description="the `created` event (null for an idempotent repeat)")


class Pending(BaseModel):
    """Work in the routes the caller may claim from that it may not take yet (each count capped at 1000)."""

    held: int = Field(description="held by other agents (comes back if they release it or their lease runs out)")
    waiting: int = Field(description="waiting for the tasks it depends on to finish")
    blocked: int = Field(description="blocked for a human")


class Claimed(BaseModel):
    """The answer to claim: a task you now hold, or `empty`."""

    code: Literal["claimed", "empty"]
    task: Task | None
    lease: Lease | None
    card: Card | None = Field(default=None, description="the stage's role card (claimed only)")
    event: Event | None = Field(default=None, description="the `claimed` event (claimed only)")
    context: WhereWorkLives | None = Field(default=None, description="where the work lives (claimed only)")
    pending: Pending | None = Field(default=None, description="empty only: work you may not take yet")
    hint: str | None = Field(default=None, description="empty only: whether waiting can help")


class Renewed(BaseModel):
    """The answer to heartbeat."""

    code: Literal["ok"]
    lease: Lease
    task: Task


class Progressed(BaseModel):
    """The answer to progress."""

    code: Literal["ok"]
    task: Task
    event: Event
    lease: Lease


class Moved(BaseModel):
    """The answer to advance, reject, release, block and unblock: the task as it is now and the event."""

    code: Literal["ok", "blocked"] = Field(
        description="blocked: a reject past the stage's rework cap, or a release at its max attempts, "
                    "blocked the task for a human instead")
    task: Task
    event: Event


class MovedOn(Moved):
    """The answer to advance and reject: as Moved, with the answer of the claim the call asked for (`next`)."""

    next: Claimed | Problem | None = Field(
        default=None, description="only when the call asked for it (`next`): the next claim's answer, or the "
                                  "problem document of its refusal (the move itself stands)")


class Held(BaseModel):
    """A task the caller holds, with its lease."""

    task: Task
    lease: Lease


class Me(BaseModel):
    """Who the caller is, what it may do now, what it holds."""

    sub: str
    family: str
    features: list[str] = Field(description="effective now: the family's, narrowed by the token, minus denials")
    scope: list[str] | None = Field(description="the token's narrowing scope, or null")
    max_active: int = Field(description="how many tasks it may hold at once")
    lanes: list[str] = Field(description="lanes its features name")
    held: list[Held]


class EventPage(BaseModel):
    """A page of a task's events, oldest first."""

    items: list[Event]
    next: int | None = Field(description="pass as `after` for the next page; null at the end")
