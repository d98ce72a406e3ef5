"""Response bodies of the administration and oversight operations, as the services return them.

Each model names every field its service returns (read from services/admin.py, services/auth.py and the
SQL in db/sql/); FastAPI validates each answer against it, and /openapi.json describes it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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
