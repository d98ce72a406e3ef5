"""What makes two requests the same request, for idempotent retries (a create's or a usage report's key)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def integral(value: Any) -> Any:
    """A JSON number without a fraction as the integer it is (`3600.0`, `1e2`); anything else as it is, and so a
    float past 2⁵³, which no longer says which integer it was."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:  # beyond, a float is not exact
        return int(value)
    return value


def _numbers_as_numbers(value: Any) -> Any:
    """JSON compares numbers by value: `1.0` and `1` (and `1e0`) are one number, as PostgreSQL's jsonb holds them,
    so an encoder that writes integers as floats sends the same request."""
    if isinstance(value, float):
        return integral(value)
    if isinstance(value, dict):
        return {k: _numbers_as_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_numbers_as_numbers(v) for v in value]
    return value


def request_digest(content: dict[str, Any]) -> str:
    """A digest of a request's content, equal for equal content whatever the order of keys."""
    canonical = json.dumps(_numbers_as_numbers(content), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
