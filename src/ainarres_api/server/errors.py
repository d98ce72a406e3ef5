"""One error tree: every refusal the service can give, with its HTTP status and stable code."""

from __future__ import annotations

import re
from typing import Any, ClassVar


class AinarresError(Exception):
    """A refusal rendered as problem+json; `code` is stable, `detail` says what to do next."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, *, task: dict[str, Any] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.task = task
        self.extra = extra
        # The caller (services.auth.Principal) the refused call's own statement read, when it read one: the
        # caller was judged, and admitted, before this refusal (api/verbs.py `run`).
        self.caller: Any = None


class Unauthenticated(AinarresError):
    """Missing, malformed, expired, revoked or wrongly signed token, or a disabled family."""

    status = 401
    code = "unauthenticated"
    title = "Unauthenticated"


class NotEligible(AinarresError):
    """The caller lacks a feature the call needs; the detail names it."""

    status = 403
    code = "not_eligible"
    title = "Not eligible"


class NotFound(AinarresError):
    """No such thing, or not visible to this caller."""

    status = 404
    code = "not_found"
    title = "Not found"


class LeaseLost(AinarresError):
    """The presented lease is stale, foreign or expired."""

    status = 409
    code = "lease_lost"
    title = "Lease lost"


class AlreadyHolding(AinarresError):
    """The agent already holds as many tasks as its family allows."""

    status = 409
    code = "already_holding"
    title = "Already holding"


class IllegalTransition(AinarresError):
    """No transition of that kind leads from the current stage to the target."""

    status = 409
    code = "illegal_transition"
    title = "Illegal transition"


class GuardFailed(AinarresError):
    """The transition's guard is false for this task."""

    status = 409
    code = "guard_failed"
    title = "Guard failed"


class Conflict(AinarresError):
    """The request clashes with the current state (a duplicate, a reused key)."""

    status = 409
    code = "conflict"
    title = "Conflict"


class PayloadTooLarge(AinarresError):
    """The body or one of its bounded fields is too large."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class Invalid(AinarresError):
    """The request is malformed; the detail names the field."""

    status = 422
    code = "invalid"
    title = "Invalid request"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.extra["errors"] = errors if errors is not None else _named(detail)


# The field a refusal's detail names first, as every detail of this service does ("since: give a time zone").
_FIELD = re.compile(r"([A-Za-z_][\w.\[\]-]*): (.+)", re.DOTALL)


def _named(detail: str) -> list[dict[str, Any]]:
    """`errors[]` of a 422 from its detail: the field it names, or none when no one field is at fault (a value
    out of the database's range somewhere in the request); the docs promise `errors[]` on every `invalid`."""
    m = _FIELD.fullmatch(detail)
    return [{"field": m[1], "detail": m[2]}] if m else []


class RateLimited(AinarresError):
    """The caller sent more requests than its limit allows; retry after `retry_after` seconds."""

    status = 429
    code = "rate_limited"
    title = "Too many requests"


class Unavailable(AinarresError):
    """The database is unreachable, or a row lock did not come in time; retry after `retry_after` seconds."""

    status = 503
    code = "unavailable"
    title = "Unavailable"
