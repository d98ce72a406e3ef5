"""JSON rendering that never fails on a value the database already holds.

orjson refuses integers outside 64 bits (and nesting deeper than 255). jsonb prints numbers without an
exponent, so a float such as 1e300 stored before the write-side check (api/schemas.py `_storable`) is
read back as a 301-digit integer. `dumps` renders with orjson and, only when orjson refuses, renders
such integers as the float they stand for (or, beyond a float's range, as their decimal string).
"""

from __future__ import annotations

import json
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson

OPTIONS = orjson.OPT_NON_STR_KEYS
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def dumps(content: Any) -> bytes:
    """`content` as JSON bytes, as orjson renders it; a value orjson refuses is widened, not a crash."""
    try:
        return orjson.dumps(content, option=OPTIONS)
    except orjson.JSONEncodeError:
        return _fallback(content)


def _fallback(content: Any) -> bytes:
    widened = _widen(content)
    try:
        return orjson.dumps(widened, option=OPTIONS)
    except orjson.JSONEncodeError:  # nested beyond orjson's limit: the standard library has none
        return json.dumps(widened, default=_plain, separators=(",", ":"), ensure_ascii=False).encode()


def wide_int(value: int) -> float | str:
    """An integer orjson cannot render, as the float it stands for, or as a string beyond a float's range."""
    try:
        return float(value)
    except OverflowError:
        return str(value)


def _widen(value: Any) -> Any:
    # Iterative copy (the content may nest deeper than the recursion limit).
    root: list[Any] = [None]
    pending: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while pending:
        v, parent, slot = pending.pop()
        if isinstance(v, bool) or not isinstance(v, (int, dict, list, tuple)):
            parent[slot] = v
        elif isinstance(v, int):
            parent[slot] = v if _I64_MIN <= v <= _U64_MAX else wide_int(v)
        elif isinstance(v, dict):
            out: dict[Any, Any] = {}
            parent[slot] = out
            for k, x in v.items():
                key = wide_int(k) if isinstance(k, int) and not isinstance(k, bool) and not (
                    _I64_MIN <= k <= _U64_MAX) else k
                out[key] = None
                pending.append((x, out, key))
        else:
            seq: list[Any] = [None] * len(v)
            parent[slot] = seq
            pending.extend((x, seq, i) for i, x in enumerate(v))
    return root[0]


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
