"""What `ainarres serve` sets up in the process around the app: the cyclic collector's settings once the app
has started (ops/serving.settle_heap), and FastAPI's native OpenTelemetry, on only when the process is
configured for OpenTelemetry (server/app.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ainarres_api.server.app import create_app
from ainarres_api.server.settings import Settings


def test_settling_the_heap_freezes_what_start_up_built_and_collects_the_young_generation_less_often() -> None:
    # In a child process: the collector's settings are the interpreter's, and the test run's must not change.
    code = ("import gc\n"
            "from ainarres_api.ops import serving\n"
            "before = gc.get_threshold()\n"
            "serving.settle_heap()\n"
            "after = gc.get_threshold()\n"
            "assert gc.get_freeze_count() > 0, gc.get_freeze_count()\n"
            "assert after == (serving.YOUNG_GENERATION_THRESHOLD, *before[1:]), (before, after)\n"
            "assert after[0] > before[0], (before, after)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_fastapi_telemetry_is_off_unless_the_process_is_configured_for_opentelemetry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    quiet = create_app(Settings(), dsn="postgresql://unused/db")
    assert quiet._telemetry["tracing"] is False and quiet._telemetry["metrics"] is False  # type: ignore[attr-defined]
    assert quiet._telemetry["logs"] is False  # type: ignore[attr-defined]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ainarres")
    traced = create_app(Settings(), dsn="postgresql://unused/db")
    assert traced._telemetry["tracing"] is True and traced._telemetry["metrics"] is True  # type: ignore[attr-defined]
