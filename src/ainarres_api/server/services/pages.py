"""Pages bounded in bytes as well as rows: a read never answers more than its budget (plus one row)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

# The default byte budget of one page of events (settings.max_read_bytes overrides it).
MAX_PAGE_BYTES = 1_048_576

T = TypeVar("T")


def json_size(row: Any) -> int:
    """The bytes `row` takes as compact JSON (as a response renders it; never raises for stored data)."""
    try:
        return len(orjson.dumps(row, default=str, option=orjson.OPT_NON_STR_KEYS))
    except (orjson.JSONEncodeError, TypeError):  # an integer beyond 64 bits, nesting beyond orjson's limit
        return len(json.dumps(row, default=str, separators=(",", ":"), ensure_ascii=False).encode())


def bounded(rows: Sequence[T], max_bytes: int, size: Callable[[T], int] = json_size) -> tuple[list[T], bool]:
    """The longest prefix of `rows` whose sizes add up to at most `max_bytes` — always at least the first
    row, so that a reader paging with the last row's cursor moves on — and whether rows were left out.

    A caller that read `limit + 1` rows to know whether there is more passes `rows[:limit]` and sets its
    `next` cursor from the prefix's last row when rows were left out here or it read more than `limit`.
    """
    out: list[T] = []
    used = 0
    for row in rows:
        used += size(row)
        if out and used > max_bytes:
            return out, True
        out.append(row)
    return out, False
