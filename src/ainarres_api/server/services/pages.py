"""Pages bounded in bytes as well as rows: a read never answers more than its budget (plus one row)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import orjson

from ainarres_api.server.errors import Invalid

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


def encode_cursor(*parts: Any) -> str:
    """An opaque page cursor for the keyset `parts`."""
    raw = json.dumps([p.isoformat() if isinstance(p, datetime) else str(p) for p in parts],
                     separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


BAD_CURSOR = "query.cursor: pass back the `next` value of the previous page unchanged"
# Text PostgreSQL cannot take (NUL) or UTF-8 cannot encode (a lone surrogate).
_UNSENDABLE = re.compile("[\x00\ud800-\udfff]")


def decode_cursor(cursor: str | None, n: int) -> list[str] | None:
    """The `n` keyset parts of a cursor made by encode_cursor (None: no cursor); Invalid for anything else."""
    if not cursor:
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        parts = None
    if (not isinstance(parts, list) or len(parts) != n
            or not all(isinstance(p, str) and not _UNSENDABLE.search(p) for p in parts)):
        raise Invalid(BAD_CURSOR)
    return parts
