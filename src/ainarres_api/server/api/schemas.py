"""Request bodies: bounded, strict about unknown fields, and named for the errors they produce."""

from __future__ import annotations

import math
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ainarres_api.server.errors import PayloadTooLarge
from ainarres_api.server.services.admin import MAX_CONTEXT_BYTES
from ainarres_api.server.services.auth import TOKEN_TTL_MAX, TOKEN_TTL_MIN
from ainarres_api.server.services.digest import integral
from ainarres_api.server.services.tasks import TRAIL_REASON_MAX

# JSON Schema's `integer` (OpenAPI 3.1) admits `3600.0` and `1e2`, and many JSON encoders write numbers so;
# strings and booleans stay refused, and so does a float past 2⁵³ (write big ids as integers).
# On an integer field of a request, after its bounds (`Annotated[StrictInt, Field(ge=…), WHOLE]`; before them,
# pydantic would publish the bounds as `ge`/`le` instead of `minimum`/`maximum`): a JSON number with no fractional
# part, never a string or a boolean.
WHOLE = BeforeValidator(integral)

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
# Numbers must come back as they went in. orjson (the response renderer) refuses integers outside
# 64 bits, and jsonb prints a float without an exponent (1e300 is read back as a 301-digit integer),
# so a float of magnitude 2^63 or more, or an integer outside the signed 64-bit range, is refused.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_FLOAT_MAX = 2.0**63


def _storable(value: Any) -> str | None:
    """Why a value cannot be stored and read back as given (NUL, lone surrogate, a number that does not
    round-trip, too deep), or None."""
    pending: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 0, ())]
    while pending:  # iterative: a payload may be nested as deep as the JSON parser allows
        v, depth, at = pending.pop()
        if depth > MAX_JSON_DEPTH:
            return f"JSON may nest at most {MAX_JSON_DEPTH} levels deep"
        if isinstance(v, str):
            if "\x00" in v or _UNSTORABLE.search(v):
                return "text may not contain NUL (\\u0000) or lone surrogate characters" + _where(at)
        elif isinstance(v, bool):
            pass
        elif isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                return ("integers must fit in 64 bits (-9223372036854775808 to 9223372036854775807); send "
                        "larger numbers as strings" + _where(at))
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "numbers must be finite (no NaN or Infinity)" + _where(at)
            if abs(v) >= _FLOAT_MAX:
                return ("numbers must lie between -9.2e18 and 9.2e18 (larger ones cannot be read back "
                        "exactly); send them as strings" + _where(at))
        elif isinstance(v, dict):
            pending.extend((k, depth + 1, at) for k in v.keys())
            pending.extend((x, depth + 1, (*at, k)) for k, x in v.items())
        elif isinstance(v, list):
            pending.extend((x, depth + 1, (*at, i)) for i, x in enumerate(v))
    return None


def _where(at: tuple[Any, ...]) -> str:
    return f" (at {'.'.join(str(p) for p in at)})" if at else ""


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

    # What `_locates_something` requires, told to a client generator (a validator does not show in the schema).
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [
        {"required": [k], "properties": {k: {"type": "string", "minLength": 1}}}
        for k in ("uri", "path", "sha", "name")]})

    type: Annotated[str, Field(min_length=1, max_length=40, examples=["pr", "commit", "file", "branch"])] = Field(
        description="what it is: pr, commit, branch, file, url, …")
    uri: Annotated[str, Field(max_length=2048)] | None = Field(default=None, description="where it is (a URL)")
    path: Annotated[str, Field(max_length=2048)] | None = Field(default=None, description="a file path")
    sha: Annotated[str, Field(max_length=128)] | None = Field(default=None, description="a commit id")
    name: Annotated[str, Field(max_length=512)] | None = Field(default=None, description="a branch or other name")
    repo: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, description="the repository a branch, commit or path belongs to (a clone URL); omitted, "
                                  "it is the project's (the claim's `context`)")
    hash: Annotated[str, Field(max_length=200)] | None = Field(default=None, description="a content hash")

    @model_validator(mode="after")
    def _locates_something(self) -> Artifact:
        if not (self.uri or self.path or self.sha or self.name):
            raise ValueError("an artifact needs one of uri, path, sha or name")
        return self


Artifacts = Annotated[list[Artifact], Field(max_length=50)]
_ARTIFACTS = ("references to work products, each {type, uri|path|sha|name, hash?}, e.g. "
              '{"type": "commit", "sha": "4f2a…"} or {"type": "file", "path": "src/app.py"}')


class TaskCreate(Body):
    """A new task, at the first stage of its lane's workflow."""

    lane: Key = Field(description="the lane's key (GET /v1/me lists yours)")
    title: Annotated[str, Field(min_length=1, max_length=200)] = Field(
        description="a short imperative title, at most 200 characters")
    payload: dict[str, Any] = Field(default_factory=dict, description=(
        "what the worker needs: a JSON object of references (goal, repo, paths, checks), not content"))
    priority: Annotated[StrictInt, Field(ge=-1_000_000, le=1_000_000), WHOLE] = Field(
        default=0, description="higher is claimed first")
    required_features: Features = Field(default_factory=list, description=(
        'registered features a claimer must hold besides the lane\'s, e.g. ["area:backend"]'))
    depends_on: Annotated[list[uuid.UUID], Field(max_length=100)] = Field(
        default_factory=list, description="ids of tasks that must finish before this one can be claimed")
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="a key of your choosing that makes retries safe: the same key and content "
                                  "answer the task made the first time")


class ClaimIn(Body):
    """What to claim from, and how long to wait for work."""

    lane: Key | None = Field(default=None, description="claim only from this lane (default: any of yours)")
    wait_seconds: Annotated[float, Field(ge=0, le=60, strict=True, allow_inf_nan=False)] = Field(
        default=0, description="if nothing is available, wait up to this many seconds (0-60) for work; give the "
                               "HTTP client a longer read timeout")


class LeaseIn(Body):
    """The lease of the hold the verb acts under."""

    lease: uuid.UUID = Field(description="the lease id the claim returned")


def event_bytes(text: str | None, artifacts: list[Artifact]) -> int:
    """What an event's note (or reason) and artifacts weigh as stored: UTF-8 text plus compact JSON."""
    size = len(text.encode("utf-8", "surrogatepass")) if text else 0
    if artifacts:
        size += len(orjson.dumps([a.model_dump(exclude_none=True) for a in artifacts]))
    return size


def check_event_bytes(body: BaseModel, max_bytes: int) -> None:
    """Refuse (413 payload_too_large, naming the fields) a verb body whose note or reason and artifacts
    together exceed `max_bytes` (settings.max_event_bytes; api/verbs.py `run` calls it for every entry)."""
    field = "note" if "note" in type(body).model_fields else "reason"
    text = getattr(body, field, None)
    artifacts: list[Artifact] = getattr(body, "artifacts", None) or []
    size = event_bytes(text, artifacts)
    if size > max_bytes:
        named = f"{field} and artifacts together" if artifacts else field
        detail = (f"{named}: {size} bytes; one event holds at most {max_bytes}. Keep work products "
                  "elsewhere and send short notes and references (artifacts)")
        raise PayloadTooLarge(detail, errors=[{"field": field if not artifacts else f"{field}+artifacts",
                                               "detail": detail}])


class EventBody(LeaseIn):
    """A verb body that becomes an event: bounded in bytes as a whole (note/reason + artifacts) by
    `check_event_bytes`, which every entry point runs with AINARRES_MAX_EVENT_BYTES (api/verbs.py `run`)."""


class ProgressIn(EventBody):
    """A progress report on a held task."""

    note: Note = Field(description="what you did or found, in a few sentences")
    artifacts: Artifacts = Field(default_factory=list, description=_ARTIFACTS)


_NEXT = ("then claim your next task in the same call, once this one has moved: what POST /v1/claims takes "
         "(`lane`, `wait_seconds`); the answer's `next` is that claim's answer, or the problem document of its "
         "refusal (the move stands either way). With `wait_seconds` the answer comes when that claim does: give "
         "the HTTP client a longer read timeout (a move sent again is answered as a replay, never applied twice, and "
         "its `next` is the claim the first call made, marked `replay`). "
         "Omit it to claim separately")


class AdvanceIn(EventBody):
    """Move a held task forward."""

    to: Key = Field(description="the target stage's key, from the card's transitions")
    note: Note | None = Field(default=None, description="what you did, for the next stage")
    artifacts: Artifacts = Field(default_factory=list, description=_ARTIFACTS)
    next: ClaimIn | None = Field(default=None, description=_NEXT)


class RejectIn(EventBody):
    """Send a held task back for rework."""

    to: Key = Field(description="the target stage's key, from the card's transitions")
    reason: Note = Field(description="what must be fixed, specific enough to act on")
    artifacts: Artifacts = Field(default_factory=list, description=_ARTIFACTS)
    next: ClaimIn | None = Field(default=None, description=_NEXT)


class ReleaseIn(EventBody):
    """Give a held task back."""

    reason: Note | None = Field(default=None, description="why you are giving it back")


class BlockIn(EventBody):
    """Park a held task for a human."""

    reason: Note = Field(description="what a human must decide or provide")  # as a reject's or a release's


class UnblockIn(Body):
    """Make a blocked task claimable again."""

    note: Note | None = Field(default=None, description="what was resolved")


class FeatureIn(Body):
    name: Feature
    description: Annotated[str, Field(max_length=500)] = ""


class FamilyIn(Body):
    key: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+@-]{0,99}$")]
    features: Annotated[list[Feature], Field(max_length=500)] = Field(default_factory=list)
    description: Annotated[str, Field(max_length=500)] = ""
    max_active: Annotated[StrictInt, Field(ge=1, le=1000), WHOLE] = 1


class FamilyPatch(Body):
    features: Annotated[list[Feature], Field(max_length=500)] | None = None
    disabled: StrictBool | None = None
    max_active: Annotated[StrictInt, Field(ge=1, le=1000), WHOLE] | None = None
    description: Annotated[str, Field(max_length=500)] | None = None


class TokenIn(Body):
    family: Annotated[str, Field(min_length=1, max_length=100)]
    ttl_seconds: Annotated[StrictInt, Field(ge=TOKEN_TTL_MIN, le=TOKEN_TTL_MAX), WHOLE] | None = None
    scope: Annotated[list[Feature], Field(max_length=500)] | None = None
    sub: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")] | None = None


_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})")
_GIVE_INSTANT = "give the time as RFC 3339 with its offset, e.g. 2026-12-01T00:00:00Z"


def empty_is(default: Any) -> BeforeValidator:
    """A query parameter given empty (`?after=`) is taken as left out, on every listing alike: a generic
    paginator may start with it."""
    return BeforeValidator(lambda value: default if value == "" else value)


def _rfc3339(value: Any) -> Any:
    """Only RFC 3339 text: a number (seconds? milliseconds?), a time without its offset, `+0100` or a time
    without seconds are refused, not guessed at (pydantic would read each of them some way)."""
    if isinstance(value, str) and value[-6:-5] == " ":  # `+01:00` in a query string not encoded: `+` read as a space
        value = f"{value[:-6]}+{value[-5:]}"
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise PydanticCustomError("instant", _GIVE_INSTANT)
    return value


def _instant(value: datetime) -> datetime:
    # Bounded before the shift to UTC (which then cannot leave years 1 to 9999) and after it (the bound is UTC's).
    if not 2000 <= value.year <= 9000 or not 2000 <= (value := value.astimezone(UTC)).year <= 9000:
        raise PydanticCustomError("instant_range", "must fall between the years 2000 and 9000 (UTC)")
    return value  # answered as UTC, whichever offset it came with


# An instant a request names (a denial's end, the flow's `since`): RFC 3339 with its offset, as OpenAPI's
# `date-time` says; anything else is refused rather than guessed (which zone? which unit?).
Instant = Annotated[datetime, BeforeValidator(_rfc3339), AfterValidator(_instant)]


def _said(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "say why in words: only spaces is no reason")
    return value


# The reason of an act on the governance trail (a denial, a ban, a lift, a human's unblock, a decision): within the
# trail's bound, and not blank — the trail's worth is in its reasons.
Reason = Annotated[str, Field(min_length=1, max_length=TRAIL_REASON_MAX, json_schema_extra={"pattern": r"\S"}),
                   AfterValidator(_said)]


class DenialIn(Body):
    feature: Feature
    reason: Reason
    expires_at: Instant | None = None


class StageIn(Body):
    key: Key
    initial: StrictBool = False
    terminal: StrictBool = False
    lease_seconds: Annotated[StrictInt, Field(ge=1, le=86400), WHOLE] = 300
    max_attempts: Annotated[StrictInt, Field(ge=1, le=100), WHOLE] = 3
    escalate_after: Annotated[StrictInt, Field(ge=1, le=100), WHOLE] | None = None
    max_rework: Annotated[StrictInt, Field(ge=0, le=1000), WHOLE] | None = None
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
    max_rework: Annotated[StrictInt, Field(ge=0, le=1000), WHOLE] | None = None
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


Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", min_length=3, max_length=3, examples=["USD", "EUR"])]
Tokens = Annotated[StrictInt, Field(ge=0, le=1_000_000_000_000), WHOLE]


class UsageIn(Body):
    """What a piece of work cost: any of model, tokens, cost (with its currency) and wall time. Leave out what
    you do not know: an unknown amount stays unknown (null), never zero."""

    # What `_cost_has_currency` requires, told to a client generator.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"dependentRequired": {
        "cost": ["currency"], "currency": ["cost"]}})

    model: Annotated[str, Field(min_length=1, max_length=200, examples=["claude-sonnet-4-5"])] | None = Field(
        default=None, description="the model that did the work")
    input_tokens: Tokens | None = Field(default=None, description="tokens read (prompt, context)")
    output_tokens: Tokens | None = Field(default=None, description="tokens written")
    cost: Annotated[Decimal, Field(ge=0, le=1_000_000_000, max_digits=16, decimal_places=6)] | None = Field(
        default=None, description="what it cost, a decimal amount (at most 6 decimal places) in `currency`; "
                                  "send it as a string to keep it exact", examples=["0.0421"])
    currency: Currency | None = Field(default=None, description="ISO 4217 code of `cost` (needed with it)")
    wall_seconds: Annotated[float, Field(ge=0, le=2_592_000, strict=True, allow_inf_nan=False)] | None = Field(
        default=None, description="wall-clock time the work took, in seconds")
    event: Annotated[StrictInt, Field(ge=1, le=2**63 - 1), WHOLE] | None = Field(
        default=None, description="the id of the event (usually your transition) this usage paid for; omitted, "
                                  "the usage is anchored to the task and to the stage of your last claim of it")
    family: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+@-]{0,99}$")] | None = Field(
        default=None, description="seat:overseer only: the family on whose behalf this is recorded (default: "
                                  "the anchor event's family)")
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="makes retries safe: the same key and report answer the first record (without "
                                  "a key, a report equal to your last one on this task is taken as its retry)")

    @model_validator(mode="after")
    def _cost_has_currency(self) -> UsageIn:
        if (self.cost is None) != (self.currency is None):
            raise ValueError("cost and currency go together: send both (e.g. \"cost\": \"0.042\", "
                             "\"currency\": \"USD\"), or neither if the cost is unknown")
        return self
