"""Request bodies: bounded, strict about unknown fields, and named for the errors they produce."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ainarres_api.server.services.admin import MAX_CONTEXT_BYTES

FEATURE_PATTERN = r"^[a-z][a-z0-9_-]{0,31}:[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}$"


_FEATURE = re.compile(FEATURE_PATTERN)


def _feature(value: str) -> str:
    # Said in words: the pattern itself, as pydantic would print it, tells a newcomer nothing.
    if not _FEATURE.fullmatch(value):
        hint = (f" (e.g. role:{value})" if ":" not in value and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}", value)
                else " (e.g. role:reviewer)")
        raise PydanticCustomError(
            "feature", "a feature is kind:key{hint}: kind is lower-case letters, digits, - or _ (up to 32, "
            "starting with a letter), key is letters, digits, _ . + or - (up to 96)", {"hint": hint})
    return value


Feature = Annotated[str, Field(max_length=128, examples=["role:reviewer"], description="a registered kind:key feature",
                               json_schema_extra={"pattern": FEATURE_PATTERN}), AfterValidator(_feature)]
Features = Annotated[list[Feature], Field(max_length=64)]
Key = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,95}$", max_length=96)]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", max_length=64)]
Note = Annotated[str, Field(min_length=1, max_length=8000)]
# Bounded in services/admin.py, after the caller is known: over its bound is 413, like a task's payload.
Context = Annotated[dict[str, Any], Field(description=f"at most {MAX_CONTEXT_BYTES} bytes of JSON")]


MAX_JSON_DEPTH = 64


def _storable(value: Any) -> str | None:
    """Why a value cannot be stored as given (NUL, lone surrogate, NaN/Infinity, too deep), or None."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:  # iterative: a payload may be nested as deep as the JSON parser allows
        v, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            return f"JSON may nest at most {MAX_JSON_DEPTH} levels deep"
        if isinstance(v, str):
            if "\x00" in v or _UNSTORABLE.search(v):
                return "text may not contain NUL (\\u0000) or lone surrogate characters"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "numbers must be finite (no NaN or Infinity)"
        elif isinstance(v, dict):
            pending.extend((k, depth + 1) for k in v.keys())
            pending.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            pending.extend((x, depth + 1) for x in v)
    return None


# PostgreSQL text and jsonb cannot hold NUL, and UTF-8 cannot encode a lone surrogate.
_UNSTORABLE = re.compile("[\ud800-\udfff]")


class Body(BaseModel):
    """Every request body: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _no_unstorable_text(cls, value: Any) -> Any:
        why = _storable(value)
        if why:
            raise ValueError(why)
        return value


class Artifact(Body):
    """A reference to a work product that lives elsewhere."""

    type: Annotated[str, Field(min_length=1, max_length=40, examples=["pr", "commit", "file", "branch"])]
    uri: Annotated[str, Field(max_length=2048)] | None = None
    path: Annotated[str, Field(max_length=2048)] | None = None
    sha: Annotated[str, Field(max_length=128)] | None = None
    name: Annotated[str, Field(max_length=512)] | None = None
    hash: Annotated[str, Field(max_length=200)] | None = None

    @model_validator(mode="after")
    def _locates_something(self) -> Artifact:
        if not (self.uri or self.path or self.sha or self.name):
            raise ValueError("an artifact needs one of uri, path, sha or name")
        return self


Artifacts = Annotated[list[Artifact], Field(max_length=50)]


class TaskCreate(Body):
    lane: Key
    title: Annotated[str, Field(min_length=1, max_length=200)]
    payload: dict[str, Any] = Field(default_factory=dict)
    priority: Annotated[StrictInt, Field(ge=-1_000_000, le=1_000_000)] = 0
    required_features: Features = Field(default_factory=list)
    depends_on: Annotated[list[uuid.UUID], Field(max_length=100)] = Field(default_factory=list)
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class ClaimIn(Body):
    lane: Key | None = None
    wait_seconds: Annotated[float, Field(ge=0, le=60)] = 0


class LeaseIn(Body):
    lease: uuid.UUID


class ProgressIn(LeaseIn):
    note: Note
    artifacts: Artifacts = Field(default_factory=list)


class AdvanceIn(LeaseIn):
    to: Key
    note: Note | None = None
    artifacts: Artifacts = Field(default_factory=list)


class RejectIn(LeaseIn):
    to: Key
    reason: Note
    artifacts: Artifacts = Field(default_factory=list)


class ReleaseIn(LeaseIn):
    reason: Note | None = None


class BlockIn(LeaseIn):
    reason: Annotated[str, Field(min_length=1, max_length=2000)]


class UnblockIn(Body):
    note: Note | None = None


class FeatureIn(Body):
    name: Feature
    description: Annotated[str, Field(max_length=500)] = ""


class FamilyIn(Body):
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+@-]{0,99}$")]
    features: Annotated[list[Feature], Field(max_length=500)] = Field(default_factory=list)
    description: Annotated[str, Field(max_length=500)] = ""
    max_active: Annotated[StrictInt, Field(ge=1, le=1000)] = 1


class FamilyPatch(Body):
    features: Annotated[list[Feature], Field(max_length=500)] | None = None
    disabled: StrictBool | None = None
    max_active: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    description: Annotated[str, Field(max_length=500)] | None = None


class TokenIn(Body):
    family: Annotated[str, Field(min_length=1, max_length=100)]
    ttl_seconds: Annotated[StrictInt, Field(ge=60, le=365 * 86400)] | None = None
    scope: Annotated[list[Feature], Field(max_length=500)] | None = None
    sub: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")] | None = None


def _sane_instant(value: datetime | None) -> datetime | None:
    if value is not None:
        if value.tzinfo is None:  # a time without a zone is read as UTC
            value = value.replace(tzinfo=UTC)
        if not 2000 <= value.astimezone(UTC).year <= 9000:
            raise ValueError("must fall between the years 2000 and 9000")
    return value


class DenialIn(Body):
    feature: Feature
    reason: Annotated[str, Field(min_length=1, max_length=2000)]
    expires_at: Annotated[datetime | None, AfterValidator(_sane_instant)] = None


class StageIn(Body):
    key: Key
    initial: StrictBool = False
    terminal: StrictBool = False
    lease_seconds: Annotated[StrictInt, Field(ge=1, le=86400)] = 300
    max_attempts: Annotated[StrictInt, Field(ge=1, le=100)] = 3
    escalate_after: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    max_rework: Annotated[StrictInt, Field(ge=0, le=1000)] | None = None
    instructions: Annotated[str, Field(max_length=20_000)] = ""


class TransitionIn(Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Key = Field(alias="from")
    to: Key
    kind: Literal["advance", "reject"]
    required_features: Features = Field(default_factory=list)
    guard: Annotated[str, Field(min_length=1, max_length=1000,
                                examples=["$.payload.checks_passed == true"])] | None = None
    instructions: Annotated[str, Field(max_length=20_000)] = ""


class WorkflowIn(Body):
    key: Slug
    description: Annotated[str, Field(max_length=2000)] = ""
    max_rework: Annotated[StrictInt, Field(ge=0, le=1000)] | None = None
    stages: Annotated[list[StageIn], Field(min_length=1, max_length=50)]
    transitions: Annotated[list[TransitionIn], Field(max_length=200)] = Field(default_factory=list)


class ProjectIn(Body):
    slug: Slug
    context: Context = Field(default_factory=dict)


class LaneIn(Body):
    project: Slug
    key: Key
    workflow: Slug
    context: Context = Field(default_factory=dict)
