"""What the agent verbs and task reads answer: named schemas for /openapi.json.

The verbs render their answers directly (orjson) rather than through these models; the models are
the published contract, and the schemathesis tier checks every answer against them.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


def _without_defaults(schema: dict[str, Any]) -> None:
    """An answer's optional fields as the service sends them: left out, never null.

    A field with a `None` default is one the service leaves out when it does not apply (it never sends it
    as null): it is not in `required`, and its schema loses `default: null` (which tells a generator such
    as openapi-typescript to make the field required) and its `null` branch."""
    required = set(schema.get("required", ()))
    props = schema.get("properties", {})
    for name, prop in list(props.items()):
        if name in required or "default" not in prop or prop.pop("default") is not None:
            continue
        branches = [b for b in prop.pop("anyOf", ()) if b != {"type": "null"}]
        if len(branches) == 1:
            (only,) = branches
            props[name] = {**prop, **({"allOf": [only]} if "$ref" in only else only)}
        elif branches:
            prop["anyOf"] = branches


class Answer(BaseModel):
    """An answer's schema: what the service sends, with no request-side defaults."""

    model_config = ConfigDict(json_schema_extra=_without_defaults)


class Task(Answer):
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
    abandoned: Literal[True] | None = Field(default=None, description=(
        "present (true) on a read of one task held past its lease: nobody holds it in effect — the holder's "
        "next call is refused `lease_lost`, and the next claim that meets it takes it back (lazy recovery)"))


class Event(BaseModel):
    """One entry of a task's append-only history."""

    id: int = Field(description="increasing; resume a listing or a stream after it")
    task_id: uuid.UUID
    type: Literal["created", "claimed", "progress", "transition", "released", "blocked", "unblocked",
                  "escalated", "ready"]
    actor: str | None = Field(description="the agent's sub (null: the substrate itself)")
    family: str | None
    data: dict[str, Any] = Field(description=(
        "what happened, by `type`: created {lane, stage, state, priority, required_features, depends_on}; claimed "
        "{stage, lease, lease_expires_at, attempts; reclaimed, previous_holder, previous_lease when it took over "
        "an expired hold; next_of, the id of the move's event when an advance's or reject's `next` made it}; "
        "progress {note, artifacts, lease, stage}; transition {kind, from, to, note (advance) or "
        "reason (reject), artifacts, lease; role, the role:* the move took; stage_seconds, an advance's time in "
        "the stage it left}; released {reason, attempts, lease, escalated; counted: false when the service gave "
        "back a claim whose client had left}; blocked {reason, lease, stage (an agent's block), or the "
        "substrate's reason and counts}; unblocked {note, previous_attempts, counts_reset}; escalated "
        "{from_tier, to_tier, attempts}; ready {after: the task whose "
        "finishing made it claimable} (a task that waited on others). Keys may be added; none is "
        "removed"))
    created_at: datetime


class Lease(BaseModel):
    """Proof of holding a task: present its id with every verb on the task."""

    id: uuid.UUID
    expires_at: datetime | None = Field(description="renew it with heartbeat or progress before then")


class FieldError(BaseModel):
    """One field a 422 refuses, and why."""

    field: str = Field(description="the field, dotted (`artifacts.0.type`), or `body`")
    detail: str = Field(description="what is wrong with it")


def _problem_schema(schema: dict[str, Any]) -> None:
    _without_defaults(schema)
    schema["additionalProperties"] = True


class Problem(BaseModel):
    """An RFC 9457 problem document: every refusal the service gives has this shape."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_problem_schema)

    type: str = Field(description="`urn:ainarres:problem:<code>`", examples=["urn:ainarres:problem:lease_lost"])
    title: str = Field(description="a short human title of the code")
    status: int = Field(description="the HTTP status, repeated")
    code: str = Field(description="the stable machine code: branch on this, never on the detail")
    detail: str = Field(description="what happened and what to do next")
    instance: str | None = Field(default=None, description="the request's path")
    task: Task | None = Field(default=None, description="the task as it is now, where it helps")
    lease: Lease | None = Field(default=None, description="`already_holding`: the lease of the task you hold")
    retry_after: int | None = Field(default=None, description="`rate_limited`, `unavailable`: seconds to wait "
                                                              "before retrying (as the `Retry-After` header says)")
    errors: list[FieldError] | None = Field(default=None, description="for `invalid`: each field refused")


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


class ContextOfProject(BaseModel):
    """A project's slug and context."""

    slug: str
    context: dict[str, Any] = Field(description="where the project's truth lives (repository, rules): free-form, "
                                                "as an admin set it")


class ContextOfLane(BaseModel):
    """A lane's key and context."""

    key: str
    context: dict[str, Any] = Field(description="the lane's own context (free-form, as an admin set it)")


class WhereWorkLives(BaseModel):
    """The project's and the lane's context: where the work's truth lives (repository, rules)."""

    project: ContextOfProject
    lane: ContextOfLane


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


class CreatedNew(Answer):
    """create made the task (status 201)."""

    code: Literal["created"]
    task: Task
    event: Event = Field(description="the `created` event")


class CreatedExisting(Answer):
    """An idempotent repeat of create: the task the same `idempotency_key` made (status 200); nothing was made."""

    code: Literal["existing"]
    task: Task
    event: None = Field(description="null: no event, nothing was made")


class Created(RootModel[Annotated[CreatedNew | CreatedExisting, Field(discriminator="code")]]):
    """The answer to create: `created` (201), or `existing` for an idempotent repeat (200)."""


class Pending(BaseModel):
    """Work in the routes the caller may claim from that it may not take yet (each count capped at 1000)."""

    held: int = Field(description="held by other agents (comes back if they release it or their lease runs out)")
    waiting: int = Field(description="waiting for the tasks it depends on to finish")
    blocked: int = Field(description="blocked for a human")


class ClaimedTask(Answer):
    """A claim took a task: you hold it under `lease` until you move it, give it back, or the lease runs out."""

    code: Literal["claimed"]
    task: Task
    lease: Lease = Field(description="present its id with every verb on the task")
    card: Card = Field(description="the stage's role card: what to do, and the ways out")
    event: Event = Field(description="the `claimed` event")
    context: WhereWorkLives = Field(description="where the work lives")
    replay: Literal[True] | None = Field(default=None, description="only in the `next` of a move answered as a "
                                                                   "replay: present (true) when this is the claim the "
                                                                   "move's first call made, answered again (you still "
                                                                   "hold it under this lease)")


class ClaimEmpty(Answer):
    """A claim found nothing you may take now (not an error)."""

    code: Literal["empty"]
    task: None = Field(description="null")
    lease: None = Field(description="null")
    pending: Pending | None = Field(default=None, description="work you may not take yet, and `hint`, whether "
                                                              "waiting can help (a long poll's time running out "
                                                              "included)")
    hint: str | None = Field(default=None, description="whether waiting can help")


class Claimed(RootModel[Annotated[ClaimedTask | ClaimEmpty, Field(discriminator="code")]]):
    """The answer to claim: `claimed`, a task you now hold, or `empty`."""


# The codes a move's `next` claim can be refused with: the claim verb's refusals, `unauthenticated` when the
# caller's features are read again after a reject and its token no longer holds, and `unavailable` when the
# database failed the claim after the move committed (test_docs checks the set).
ClaimRefusalCode = Literal["already_holding", "not_eligible", "rate_limited", "unauthenticated", "unavailable"]


class ClaimRefusal(Problem):
    """The problem document of a refused claim."""

    code: ClaimRefusalCode = Field(description="the stable machine code: branch on this, never on the detail")


class NextClaim(RootModel[Annotated[ClaimedTask | ClaimEmpty | ClaimRefusal, Field(discriminator="code")]]):
    """What a move's `next` claim answered: `claimed`, `empty`, or the problem document of its refusal (by `code`)."""


class Renewed(Answer):
    """The answer to heartbeat."""

    code: Literal["ok"]
    lease: Lease
    task: Task


class Progressed(Answer):
    """The answer to progress."""

    code: Literal["ok"]
    task: Task
    event: Event
    lease: Lease
    replay: Literal[True] | None = Field(default=None, description="present (true) when this very progress had been "
                                                                   "recorded already (no second event); `lease` "
                                                                   "then has `expires_at` null if the hold under "
                                                                   "it has ended since")


class Moved(Answer):
    """The answer to advance, reject, release, block and unblock: the task as it is now and the event."""

    code: Literal["ok", "blocked"] = Field(
        description="blocked: a reject past the stage's rework cap, or a release at its max attempts, "
                    "blocked the task for a human instead")
    task: Task
    event: Event
    replay: Literal[True] | None = Field(default=None, description="present (true) when this very call had been "
                                                                   "applied already (its first answer was lost): "
                                                                   "its outcome again")


class MovedOn(Moved):
    """The answer to advance and reject: as Moved, with the answer of the claim the call asked for (`next`)."""

    next: NextClaim | None = Field(
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
