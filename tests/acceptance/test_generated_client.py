"""A client generated from the live service's /openapi.json drives a task's whole life: if the document lies
(an answer or a refusal it does not describe), the generated client cannot.

The fixture provisions a lane and mints an agent token per role (admin set-up through the existing helpers);
everything after that goes through the generated client alone (openapi-python-client, generated offline into
tmp_path): create, claim, progress, advance to review (its `next` claim typed `ClaimEmpty`), claim as a
reviewer, reject back, claim again, a stale lease refused with 409 `lease_lost` (read as the documented problem
model), advance (its `next` claim refused, typed `ClaimRefusal`), read the task.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.acceptance.live_server import Live, clone_database, serve
from tests.helpers import DEV_WORKFLOW

LANE = "gen"
DEV, REVIEWER = "gen-dev", "gen-rev"


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with serve(clone_database(pg_server, template_db), tmp_path_factory.mktemp("server")) as s:
        s.lane(LANE, DEV_WORKFLOW, {DEV: [f"lane:{LANE}", "role:dev"], REVIEWER: [f"lane:{LANE}", "role:reviewer"]})
        yield s


class Generated:
    """The generated package: its client classes, and its operations found by method and path."""

    def __init__(self, package: ModuleType, root: Path) -> None:
        self.package = package
        self.client = importlib.import_module(f"{package.__name__}.client")
        self.types = importlib.import_module(f"{package.__name__}.types")
        self._ops: dict[tuple[str, str], ModuleType] = {}
        for source in (root / "api").rglob("*.py"):
            text = source.read_text()
            for method in ("get", "post", "patch", "delete"):
                if f'"method": "{method}"' in text:
                    url = text.split('"url": ', 1)[1].split('"', 2)[1]
                    rel = source.relative_to(root.parent).with_suffix("")
                    self._ops[(method.upper(), url)] = importlib.import_module(".".join(rel.parts))

    def op(self, method: str, path: str) -> ModuleType:
        """The generated module of `METHOD path` (its names follow operationIds, which may change)."""
        assert (method, path) in self._ops, f"no generated operation for {method} {path}; has {sorted(self._ops)}"
        return self._ops[(method, path)]

    def agent(self, url: str, token: str) -> Any:
        return self.client.AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True,
                                               timeout=30.0)


def generate(live: Live, tmp_path: Path) -> Generated:
    """Fetch /openapi.json from the live service, generate a client from it (offline), import it."""
    doc = tmp_path / "openapi.json"
    doc.write_text(json.dumps(live.http.get("/openapi.json").raise_for_status().json()))
    name = f"ainarres_client_{uuid.uuid4().hex[:8]}"
    config = tmp_path / "generator.json"
    config.write_text(json.dumps({"post_hooks": [], "package_name_override": name}))
    out = tmp_path / "gen" / name
    cli = Path(sys.executable).parent / "openapi-python-client"
    done = subprocess.run([str(cli), "generate", "--path", str(doc), "--output-path", str(out), "--meta", "none",
                           "--config", str(config), "--fail-on-warning"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(out.parent))
    try:
        return Generated(importlib.import_module(name), out)
    finally:
        sys.path.remove(str(out.parent))


def body_of(module: ModuleType, fields: dict[str, Any]) -> Any:
    """The operation's request body, built by the generated model it declares."""
    model = inspect.signature(module.sync_detailed).parameters["body"].annotation
    return model.from_dict(fields)


def plain(parsed: Any) -> Any:
    """A parsed answer as plain JSON (a generated model, or what an untyped answer parsed to)."""
    return parsed.to_dict() if hasattr(parsed, "to_dict") else parsed


class Agent:
    """One agent acting only through the generated client."""

    def __init__(self, gen: Generated, url: str, token: str) -> None:
        self.gen = gen
        self.client = gen.agent(url, token)

    def call(self, method: str, path: str, *, expect: int, body: dict[str, Any] | None = None,
             **params: Any) -> Any:
        """Call `METHOD path` (the document's path template; `params` fill it) and return the parsed answer."""
        module = self.gen.op(method, path)
        kwargs: dict[str, Any] = dict(params)
        if body is not None:
            kwargs["body"] = body_of(module, body)
        resp = module.sync_detailed(client=self.client, **kwargs)
        assert resp.status_code == expect, f"{method} {path} → {resp.status_code} {resp.content!r}"
        return resp.parsed

    def verb(self, task_id: str, verb: str, expect: int = 200, **body: Any) -> Any:
        return self.call("POST", f"/v1/tasks/{{task_id}}/{verb}", expect=expect, body=body, task_id=uuid.UUID(task_id))


def test_a_generated_client_drives_a_task_through_review_and_rework(live: Live, tmp_path: Path) -> None:
    gen = generate(live, tmp_path)
    dev = Agent(gen, live.url, live.mint(DEV)["token"])
    reviewer = Agent(gen, live.url, live.mint(REVIEWER)["token"])

    created = plain(dev.call("POST", "/v1/tasks", expect=201,
                             body={"lane": LANE, "title": "generated", "payload": {"n": 1}}))
    assert created["code"] == "created"
    task = created["task"]["id"]
    assert created["task"]["stage"] == "todo" and created["task"]["payload"] == {"n": 1}

    claimed = plain(dev.call("POST", "/v1/claims", expect=200, body={"lane": LANE}))
    assert claimed["code"] == "claimed" and claimed["task"]["id"] == task
    first = claimed["lease"]["id"]

    progressed = plain(dev.verb(task, "progress", lease=first, note="half way",
                                artifacts=[{"type": "branch", "name": "gen-1"}]))
    assert progressed["task"]["holder"] is not None
    # With `next`, the answer's next claim (`next_` in Python) is typed by its `code` (a discriminated union).
    moved = dev.verb(task, "advance", lease=first, to="review", note="ready for review", next={"lane": LANE})
    assert type(moved.next_).__name__ == "ClaimEmpty" and moved.next_.code == "empty", moved.next_
    advanced = plain(moved)
    assert advanced["task"]["stage"] == "review" and advanced["task"]["holder"] is None

    review = plain(reviewer.call("POST", "/v1/claims", expect=200, body={"lane": LANE}))
    assert review["code"] == "claimed" and review["task"]["id"] == task
    rejected = plain(reviewer.verb(task, "reject", lease=review["lease"]["id"], to="todo", reason="needs tests"))
    assert rejected["task"]["stage"] == "todo" and rejected["task"]["rework_count"] == 1

    again = plain(dev.call("POST", "/v1/claims", expect=200, body={"lane": LANE}))
    assert again["code"] == "claimed" and again["task"]["id"] == task
    assert again["lease"]["id"] != first

    # The first hold's lease is dead: the refusal is a documented problem, parsed by the generated client.
    stale = dev.verb(task, "advance", expect=409, lease=first, to="review")
    assert not isinstance(stale, dict) and hasattr(stale, "to_dict"), f"a 409 the document does not model: {stale!r}"
    assert stale.code == "lease_lost"
    assert stale.to_dict()["status"] == 409

    # A refused next claim is the claim's problem document, typed as such; the move stands.
    finished = dev.verb(task, "advance", lease=again["lease"]["id"], to="review", note="with tests",
                        next={"lane": "elsewhere"})
    assert type(finished.next_).__name__ == "ClaimRefusal" and finished.next_.code == "not_eligible", finished.next_
    done = plain(finished)
    assert done["task"]["stage"] == "review"

    read = plain(dev.call("GET", "/v1/tasks/{task_id}", expect=200, task_id=uuid.UUID(task)))
    assert read["stage"] == "review" and read["rework_count"] == 1 and read["holder"] is None
