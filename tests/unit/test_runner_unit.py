"""`ainarres work`'s start, before any call to the service: one runner per token and state directory, and a state
directory it cannot write refused in words (not a traceback)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ainarres_api.agent.client import AsyncClient
from ainarres_api.agent.worker import Runner


def _runner(state: Path) -> Runner:
    return Runner(AsyncClient("http://127.0.0.1:9", "not-a-jwt"), ["true"], lane=None, concurrency=1, timeout=1,
                  poll=0, grace=0, max_tasks=None, workdir=None, url="http://127.0.0.1:9", token="not-a-jwt",
                  state=state)


def _said(capsys: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_second_runner_on_the_same_token_and_state_directory_refuses_to_start(tmp_path: Path, capsys: Any) -> None:
    first = _runner(tmp_path)
    held = first._take_lock()
    assert held is not None
    try:
        assert asyncio.run(_runner(tmp_path).run()) == 2
        said = _said(capsys)
        assert [s.get("code") for s in said] == ["runner_busy"], said
        assert "one runner per token" in said[0]["detail"]
    finally:
        os.close(held)


def test_a_state_directory_it_cannot_write_is_refused_in_words(tmp_path: Path, capsys: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert asyncio.run(_runner(blocker / "state").run()) == 2
    said = _said(capsys)
    assert [s.get("code") for s in said] == ["state_dir"], said
    assert "AINARRES_STATE_DIR" in said[0]["detail"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: Any) -> None:
    async def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("the runner called the service before it had its lock")

    monkeypatch.setattr(AsyncClient, "me", refuse)
