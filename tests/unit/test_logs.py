"""JSON log lines carry text for a log reader, never a terminal's colour codes."""

from __future__ import annotations

import io
import json
import logging

from ainarres_api.server import logs


def test_uvicorn_color_message_and_ansi_escapes_stay_out_of_json_lines() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # Other tests' in-process servers leave levels on these loggers (uvicorn's log_level="warning").
    named = [logging.getLogger(n) for n in ("uvicorn.error", "ainarres")]
    levels = [lg.level for lg in named]
    try:
        logs.configure("info", out)
        for lg in named:
            lg.setLevel(logging.NOTSET)
        # What uvicorn logs at start: the message, and a coloured copy of it for terminals.
        logging.getLogger("uvicorn.error").info(
            "Started server process [%d]", 42,
            extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"})
        logging.getLogger("ainarres").warning("\x1b[31mred\x1b[0m text", extra={"lane": "backend"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for lg, lv in zip(named, levels, strict=True):
            lg.setLevel(lv)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [ln["msg"] for ln in lines] == ["Started server process [42]", "red text"]
    assert all("color_message" not in ln for ln in lines), lines
    assert "\x1b" not in out.getvalue() and "\\u001b" not in out.getvalue()
    assert lines[1]["lane"] == "backend"
