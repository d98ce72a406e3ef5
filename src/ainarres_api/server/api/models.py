"""Response bodies of the administration and oversight operations, as the services return them.

Each model names every field its service returns (read from services/admin.py, services/auth.py and the
SQL in db/sql/); FastAPI validates each answer against it, and /openapi.json describes it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ainarres_api.server.api.envelopes import Answer

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a list; pass `next` back (`?after=` or `?cursor=`, as the operation says) for the
    following one (null: no more)."""

    items: list[T]
    next: str | None


class Feature(BaseModel):
    """A registered feature."""

    name: str = Field(description="`kind:key`", examples=["role:reviewer"])
    kind: str = Field(description="the part before the colon", examples=["role"])
    description: str
    created_at: datetime


class Denial(BaseModel):
    """A family's denial of a feature; `active` is false once `expires_at` has passed."""

    feature: str
    reason: str
    expires_at: datetime | None = Field(description="null: until lifted")
    created_by: str | None = Field(description="the sub that made it")
    created_at: datetime
    active: bool


class FamilyDenial(Denial):
    """A denial, with the family it belongs to."""

    family: str


class DenialMade(BaseModel):
    """The denial just made (it takes effect on the family's agents' next call)."""

    family: str
    feature: str
    reason: str
    expires_at: datetime | None = Field(description="null: until lifted")
    created_by: str | None = Field(description="the sub that made it")
    created_at: datetime


class Denials(BaseModel):
    """Every denial of a family, active and expired, by feature."""

    items: list[Denial]


class Family(BaseModel):
    """A family: its provisioned features and every denial it has (active or expired)."""

    key: str
    description: str
    max_active: int = Field(description="how many tasks one of its agents may hold at once")
    disabled: bool = Field(description="a disabled family's tokens are refused (401)")
    created_at: datetime
    updated_at: datetime
    features: list[str] = Field(description="provisioned features, sorted")
    denials: list[Denial]


class TokenMinted(BaseModel):
    """A new token; its text is shown here once and never stored."""

    token: str = Field(description="the signed JWT: send it as `Authorization: Bearer <token>`")
    sub: str = Field(description="the agent it names (made up unless the request named one)")
    jti: uuid.UUID = Field(description="its id: DELETE /v1/tokens/{jti} revokes it")
    family: str
    scope: list[str] | None = Field(description="the features it narrows its family's to (null: no narrowing)")
    expires_at: datetime


class TokenRecord(BaseModel):
    """An issued token's record (never its text)."""

    jti: uuid.UUID
    family: str
    sub: str
    scope: list[str] | None
    issued_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


class Stage(BaseModel):
    """A stage of a workflow version, in the workflow's order."""

    key: str
    initial: bool
    terminal: bool
    lease_seconds: int
    max_attempts: int
    escalate_after: int | None = Field(description="attempts after which the task requires the next tier:N")
    max_rework: int | None = Field(description="rejects out of this stage a task may take (null: the "
                                               "workflow's max_rework)")
    instructions: str


class Transition(BaseModel):
    """A legal move between two stages of a workflow version."""

    model_config = ConfigDict(populate_by_name=True)

    from_: str = Field(alias="from")
    to: str
    kind: Literal["advance", "reject"]
    required_features: list[str]
    guard: str | None = Field(description="the SQL/JSON path predicate, as PostgreSQL normalises it")
    instructions: str


class Workflow(BaseModel):
    """One version of a workflow, with its stages and transitions."""

    key: str
    version: int
    description: str
    max_rework: int | None
    created_at: datetime
    stages: list[Stage]
    transitions: list[Transition]


class Project(BaseModel):
    """A project: a body of work and where its truth lives."""

    id: uuid.UUID
    slug: str
    context: dict[str, Any]
    created_at: datetime


class Lane(BaseModel):
    """A lane of a project, bound to one workflow version."""

    key: str
    project: str = Field(description="the project's slug")
    workflow: str = Field(description="the workflow's key")
    workflow_version: int
    context: dict[str, Any]
    created_at: datetime
    feature: str = Field(description="`lane:<key>`: what taking part in the lane needs")


class Health(BaseModel):
    """Liveness: the service answers and its database does."""

    status: Literal["ok"]
    version: str


# -- governance (ADR 0015) ------------------------------------------------------------------------------


class Policy(BaseModel):
    """Governance thresholds of one scope. Null fields inherit: feature → workflow → system."""

    scope: Literal["system", "workflow", "feature"]
    key: str = Field(description="`*` for system; a workflow key; a role:/capability: feature")
    strike_threshold: int | None = Field(description="rejects of a family's work in a role that ban it")
    ban_base_seconds: int | None = Field(description="the first reflexive ban's length; each next one doubles")
    ban_cap_seconds: int | None = Field(description="no reflexive ban lasts longer")
    recommend_after_bans: int | None = Field(description="reflexive bans after which a permanent ban is recommended")
    recommend_after_flags: int | None = Field(description="open auditor flags after which one is recommended")
    updated_by: str | None
    updated_at: datetime


class Strike(BaseModel):
    """Strikes of a family in a role (rejects of work it produced) and its reflexive bans so far."""

    family: str
    feature: str = Field(description="the role (role:<x>) the rejected work was produced in")
    strikes: int = Field(description="since the last ban (or lift)")
    threshold: int = Field(description="the threshold in force at the last strike")
    bans: int = Field(description="reflexive bans so far")
    last_strike_at: datetime
    last_ban_at: datetime | None
    banned: bool = Field(description="a denial of the feature is in force now")
    banned_until: datetime | None = Field(description="when it ends; null with banned: until a human lifts it")
    ban_kind: Literal["reflexive", "permanent"] | None = Field(description="null: an ordinary denial")


class Ban(BaseModel):
    """An active denial; `governance` says who made it: reflexive (the substrate, expiring), permanent (a
    human on the trail), null (an ordinary denial)."""

    family: str
    feature: str
    reason: str
    expires_at: datetime | None = Field(description="null: until lifted")
    created_by: str | None
    created_at: datetime
    governance: Literal["reflexive", "permanent"] | None


class Recommendation(BaseModel):
    """The substrate recommends a permanent ban; a human accepts (the ban) or dismisses it."""

    id: int
    family: str
    feature: str | None = Field(description="null: about the family as a whole (from operational flags)")
    reason: str
    status: Literal["open", "accepted", "dismissed"]
    created_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    decision_note: str | None


class Flag(BaseModel):
    """An auditor's flag. It never denies anything; it feeds recommendations and the board."""

    id: int
    kind: Literal["quality", "spinning", "overspending", "health", "integrity"]
    family: str
    feature: str | None
    task_id: uuid.UUID | None
    note: str
    raised_by: str
    raised_at: datetime
    dismissed_by: str | None
    dismissed_at: datetime | None
    dismiss_note: str | None
    recommendation: int | None = Field(default=None, description="the recommendation this flag made, if any")


class TrailEntry(BaseModel):
    """One governance act, by a human (its sub) or by the substrate (`substrate`). Append-only."""

    id: int
    at: datetime
    actor: str
    actor_family: str | None
    action: Literal["reflexive_ban", "recommend", "permanent_ban", "lift", "unblock", "flag", "dismiss_flag",
                    "accept_recommendation", "dismiss_recommendation", "policy", "deny", "disable", "enable"]
    family: str | None
    feature: str | None
    task_id: uuid.UUID | None
    reason: str
    data: dict[str, Any]


class GovernanceStatus(BaseModel):
    """What the governance panel and the Needs-you inbox show."""

    policies: list[Policy]
    strikes: list[Strike]
    bans: list[Ban] = Field(description="every active denial")
    recommendations: list[Recommendation] = Field(description="open ones, newest first")
    flags: list[Flag] = Field(description="open ones, newest first")
    trail: list[TrailEntry] = Field(description="the newest entries, newest first (GET /v1/governance/trail pages)")

# Usage and spend (migration 0014; services/spend.py). Amounts of money are exact decimal text; any
# amount nobody reported is null (unknown), never zero.


class UsageRecord(BaseModel):
    """One usage report as recorded."""

    id: int
    task_id: uuid.UUID
    event_id: int | None = Field(description="the event (usually a transition) it paid for, if anchored")
    lane: str
    family: str = Field(description="the family that paid")
    agent: str | None = Field(description="the agent (sub) that paid, when known")
    role: str | None = Field(description="the role:* feature of the way out of the stage the work was for")
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    cost: str | None = Field(description="a decimal amount in `currency`, as text; null: unknown")
    currency: str | None = Field(description="ISO 4217; null when the cost is unknown")
    wall_seconds: float | None
    recorded_by: str = Field(description="the sub that recorded it (the agent, or an overseer)")
    idempotency_key: str | None
    created_at: datetime


class UsageRecorded(Answer):
    """A usage report recorded (`replay`: this very report had been recorded already; nothing was written)."""

    code: Literal["ok"]
    usage: UsageRecord
    replay: Literal[True] | None = Field(default=None, description="present (true) when this very report had been "
                                                                   "recorded already: its first record again")


class SpendRow(BaseModel):
    """Spend of one group in one currency, beside its deliveries (never blended into them). The group's
    key fields are set, the others null. A group with deliveries and no usage has one row with every spend
    field null: unknown, never zero."""

    family: str | None
    role: str | None = Field(description="the role:* feature of the work; null in a role group: work at a stage "
                                         "whose ways out need no role")
    lane: str | None
    currency: str | None = Field(description="null: the reports that gave no cost")
    reports: int = Field(description="usage reports in this row")
    cost: str | None = Field(description="the sum of the reported costs (decimal text); null: unknown")
    input_tokens: int | None = Field(description="null: no report gave it")
    output_tokens: int | None
    token_reports: int = Field(description="reports that gave tokens")
    wall_seconds: float | None
    last_at: datetime | None = Field(description="the latest report")
    deliveries: int = Field(description="family/role groups: advances performed; lane groups: tasks finished")
    releases: int = Field(description="tasks given back (release) by the group, or in the lane")
    cost_per_delivery: str | None = Field(description="cost / deliveries; null when either is unknown or zero")


class SpendFigure(BaseModel):
    """Spend in one currency beside a track record (never blended into it)."""

    currency: str | None = Field(description="null: the reports that gave no cost")
    reports: int
    cost: str | None = Field(description="decimal text; null: unknown")
    input_tokens: int | None
    output_tokens: int | None
    wall_seconds: float | None
    deliveries: int
    cost_per_delivery: str | None = Field(description="cost / deliveries; null when either is unknown or zero")


class TaskSpend(BaseModel):
    """What one family spent on one task in one currency."""

    task_id: uuid.UUID
    title: str
    lane: str
    stage: str
    state: str
    delivered: bool = Field(description="the task is done")
    family: str
    currency: str | None
    reports: int
    cost: str | None
    input_tokens: int | None
    output_tokens: int | None
    wall_seconds: float | None
    first_at: datetime
    last_at: datetime


class Overspending(BaseModel):
    """A family whose cost per delivery in a role is far above the role's norm (the median of its peers)."""

    family: str
    role: str | None
    currency: str
    cost: str
    deliveries: int
    cost_per_delivery: str
    role_norm: str = Field(description="the median cost per delivery of the other families in the role")
    peers: int
    ratio: float | None = Field(description="cost_per_delivery / role_norm")


class CostlyTask(BaseModel):
    """A task on which a family spent far more than its own cost per delivery."""

    task_id: uuid.UUID
    title: str
    lane: str
    stage: str
    state: str
    family: str
    currency: str
    cost: str
    family_cost_per_delivery: str
    ratio: float | None
    delivered: bool


class SpinningHold(BaseModel):
    """A live hold going round without a transition: held for many leases, or with many progress reports."""

    task_id: uuid.UUID
    title: str
    lane: str
    stage: str
    holder: str
    family: str | None
    held_since: datetime
    held_for_seconds: float
    lease_seconds: int
    leases_spanned: float = Field(description="held_for_seconds / lease_seconds")
    progress_reports: int = Field(description="progress events in this hold")
    progress_at: datetime | None


class RepeatedRelease(BaseModel):
    """An unfinished task given back again and again."""

    task_id: uuid.UUID
    title: str
    lane: str
    stage: str
    state: str
    releases: int = Field(description="release events, all stages")
    attempts: int = Field(description="failed holds in the current stage")
    last_release_at: datetime | None
    released_by: list[str] = Field(description="families that gave it back")


class Thresholds(BaseModel):
    """The thresholds the anomalies were judged with."""

    multiple: float
    spin_leases: float
    spin_progress: int
    releases: int


class SpendAnomalies(BaseModel):
    """Spend and flow anomalies for an auditor: each list at most 100 rows."""

    thresholds: Thresholds
    overspending: list[Overspending]
    costly_tasks: list[CostlyTask]
    spinning: list[SpinningHold]
    repeated_releases: list[RepeatedRelease]


class FlowPoint(BaseModel):
    """One lane's flow in one bucket."""

    lane: str
    bucket: datetime = Field(description="the bucket's start (UTC)")
    finished: int = Field(description="tasks that reached a terminal stage (throughput)")
    lead_time_avg_seconds: float | None = Field(description="mean creation-to-finish time; null: none finished")
    lead_time_max_seconds: float | None
    advances: int
    rejects: int
    releases: int


class FlowSeries(BaseModel):
    """Throughput and lead time per lane over time."""

    bucket: Literal["hour", "day"]
    since: datetime
    items: list[FlowPoint]
