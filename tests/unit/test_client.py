"""Pure logic of the client, the agent CLI and the runner: retries, refusals, tokens, verb lines."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ainarres_api.agent.cli import Leases, UsageError, parse_artifact, resolve_token, resolve_url, token_sub
from ainarres_api.agent.client import AsyncClient, Client, Refused, Unreachable, beat_interval
from ainarres_api.agent.worker import card_text, verb_line


class Script:
    """A transport answering from a list: an exception to raise, or (status, body)."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body = step
        return httpx.Response(status, json=body)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.seen]


def sync(script: Script, retries: int = 3) -> Client:
    return Client("http://x", "tok", retries=retries, backoff=0.001,
                  http=httpx.Client(base_url="http://x", transport=httpx.MockTransport(script)))


TASK = {"id": "t1", "stage": "todo"}
LEASE = {"id": "l1", "expires_at": "2030-01-01T00:00:00+00:00"}


def test_create_reuses_one_idempotency_key_across_retries() -> None:
    s = Script(httpx.ReadTimeout("lost"), (503, {"code": "internal"}),
               (201, {"code": "created", "task": TASK}))
    out = sync(s).create("dev", "t")
    assert out["code"] == "created"
    keys = {b["idempotency_key"] for b in s.bodies()}
    assert len(s.seen) == 3 and len(keys) == 1
    s2 = Script((201, {"code": "created", "task": TASK}))
    sync(s2).create("dev", "t")
    assert s2.bodies()[0]["idempotency_key"] not in keys  # a new logical call, a new key
    s3 = Script((200, {"code": "existing", "task": TASK}))
    sync(s3).create("dev", "t", idempotency_key="mine")
    assert s3.bodies()[0]["idempotency_key"] == "mine"


def test_a_verb_that_may_have_been_applied_is_not_retried() -> None:
    s = Script(httpx.ReadTimeout("lost"), (200, {"code": "ok"}))
    with pytest.raises(Unreachable):
        sync(s).advance("t1", "l1", "review")
    assert len(s.seen) == 1
    # ...but one that never left is.
    s = Script(httpx.ConnectError("refused"), (200, {"code": "ok", "task": TASK}))
    assert sync(s).advance("t1", "l1", "review")["code"] == "ok" and len(s.seen) == 2


def test_claim_next_asks_for_the_next_claim_in_the_same_call() -> None:
    nxt = {"code": "claimed", "task": TASK, "lease": LEASE}
    s = Script((200, {"code": "ok", "task": TASK, "next": nxt}), (200, {"code": "ok", "task": TASK}),
               (200, {"code": "ok", "task": TASK}))
    c = sync(s)
    assert c.advance("t1", "l1", "review", claim_next="dev")["next"] == nxt
    c.reject("t1", "l1", "todo", "fix it", claim_next=True)
    c.advance("t1", "l1", "review")
    assert [b.get("next") for b in s.bodies()] == [{"lane": "dev"}, {}, None]


def test_refusals_are_typed() -> None:
    s = Script((409, {"code": "lease_lost", "detail": "claim again", "task": TASK, "status": 409}))
    with pytest.raises(Refused) as e:
        sync(s).progress("t1", "l1", "n")
    got = (e.value.code, e.value.status, e.value.detail, e.value.task)
    assert got == ("lease_lost", 409, "claim again", TASK)
    s = Script((502, "<html>bad gateway</html>"))
    with pytest.raises(Refused) as e:
        sync(s, retries=0).me()
    assert e.value.code == "internal" and e.value.status == 502


def test_a_retried_claim_recognises_its_own_hold() -> None:
    held = {"code": "already_holding", "detail": "finish one", "task": TASK, "lease": LEASE}
    s = Script(httpx.ReadError("reset"), (409, held))
    out = sync(s).claim("dev")
    assert out == {"code": "claimed", "task": TASK, "lease": LEASE, "event": None, "recovered": True}
    s = Script((409, held))  # not a retry: the refusal stands
    with pytest.raises(Refused):
        sync(s).claim("dev")


def test_claim_wait_is_bounded_per_request() -> None:
    s = Script((200, {"code": "empty", "task": None, "lease": None}))
    assert sync(s).claim(wait_seconds=0)["code"] == "empty"
    assert "wait_seconds" not in s.bodies()[0]
    s = Script((200, {"code": "claimed", "task": TASK, "lease": LEASE}))
    sync(s).claim(wait_seconds=600)
    assert s.bodies()[0]["wait_seconds"] == 60.0


async def test_held_releases_on_an_exception() -> None:
    s = Script((200, {"code": "ok", "task": TASK}))
    http = httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(s))
    c = AsyncClient("http://x", "tok", http=http)
    with pytest.raises(RuntimeError):
        async with c.held({"task": TASK, "lease": LEASE}, every=60):
            raise RuntimeError("the model fell over")
    assert s.seen[0].url.path == "/v1/tasks/t1/release"
    assert "the model fell over" in s.bodies()[0]["reason"] and s.bodies()[0]["lease"] == "l1"


def _jwt(claims: dict[str, Any]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{part}.sig"


def test_token_precedence(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text(" from-file \n")
    assert resolve_token("arg", None, {"AINARRES_TOKEN": "env"}) == "arg"
    assert resolve_token(None, str(f), {"AINARRES_TOKEN": "env"}) == "from-file"
    assert resolve_token(None, None, {"AINARRES_TOKEN": "env", "AINARRES_TOKEN_FILE": str(f)}) == "env"
    assert resolve_token(None, None, {"AINARRES_TOKEN_FILE": str(f)}) == "from-file"
    for arg, path, env in ((None, str(tmp_path / "nope"), {"AINARRES_TOKEN": "env"}),
                           (None, None, {"AINARRES_TOKEN_FILE": str(tmp_path / "nope")}),
                           (None, str(tmp_path), {}), ("a", str(f), {}), (None, None, {})):
        with pytest.raises(UsageError):
            resolve_token(arg, path, env)
    assert resolve_url(None, {}) == "http://127.0.0.1:8080"
    assert resolve_url("http://a", {"AINARRES_URL": "http://b"}) == "http://a"


def test_lease_memory_is_per_agent(tmp_path: Path) -> None:
    assert token_sub(_jwt({"sub": "agent-7"})) == "agent-7"
    assert token_sub("opaque").startswith("token-")
    a, b = Leases(tmp_path, "a"), Leases(tmp_path, "b/../../etc")
    a.remember(TASK, LEASE)
    assert a.get("t1") == {"task_id": "t1", "lease": "l1", "expires_at": LEASE["expires_at"], "lane": None,
                           "stage": "todo"}
    assert b.tasks() == [] and b.dir.parent == tmp_path
    a.renew("t1", {"id": "other", "expires_at": "x"})  # a different lease is not ours to record
    assert a.get("t1")["lease"] == "l1"  # type: ignore[index]
    a.forget("t1")
    assert a.tasks() == []


def test_artifact_shorthand() -> None:
    assert parse_artifact("file:src/x.py") == {"type": "file", "path": "src/x.py"}
    assert parse_artifact("pr:https://h/p/1") == {"type": "pr", "uri": "https://h/p/1"}
    assert parse_artifact("commit:abc") == {"type": "commit", "sha": "abc"}
    assert parse_artifact('{"type": "x", "name": "y"}') == {"type": "x", "name": "y"}
    with pytest.raises(UsageError):
        parse_artifact("nocolon")


def test_verb_line_and_card() -> None:
    assert verb_line('log\n{"verb": "advance", "to": "review"}\n\n') == {"verb": "advance", "to": "review"}
    assert verb_line('{"verb": "advance", "to": "review"}\nlast words') is None
    assert verb_line('{"note": "no verb"}') is None and verb_line("") is None
    assert card_text({"task": {"stage": "todo"}}) == "todo"
    assert card_text({"task": {"stage": "todo"}, "card": {"instructions": "# Do it"}}) == "# Do it"
    assert card_text({"task": {"stage": "todo"}, "card": "## Review"}) == "## Review"


def test_beat_interval() -> None:
    soon = {"expires_at": (datetime.now(UTC) + timedelta(seconds=30)).isoformat()}
    assert 9 < beat_interval(soon) <= 10
    assert beat_interval({"expires_at": "2000-01-01T00:00:00Z"}) == 0.2
    assert beat_interval(soon, 1.5) == 1.5
