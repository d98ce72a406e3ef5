"""Loads the named SQL statements of `db/sql/*.sql` once, at import."""

from __future__ import annotations

import re
from importlib import resources

_HEADER = re.compile(r"^-- name: (?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def _load() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in sorted(resources.files("ainarres_api.server.db").joinpath("sql").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text(encoding="utf-8")
        parts = _HEADER.split(text)
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"duplicate SQL statement name {name!r} in {entry.name}")
            found[name] = body.strip().rstrip(";")
    return found


Q: dict[str, str] = _load()
