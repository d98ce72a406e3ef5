"""A small seeded world on a live `ainarres serve`, for the tests that check /openapi.json against the
service over real HTTP (tests/acceptance/test_schemathesis.py, test_generated_client.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.acceptance.live_server import Live, clone_database, serve
from tests.helpers import DEV_WORKFLOW

LANE = "fuzz"
PROJECT = "acme"
DEV, REVIEWER = "fuzz-dev", "fuzz-rev"


@dataclass
class ContractWorld:
    """A lane `fuzz` over DEV_WORKFLOW with tasks in every state, and the tokens that made them.

    `agent` is the dev agent the tests act as (lane:fuzz, role:dev); it holds `tasks["held"]` under
    `lease`. `tasks` also has a ready, a review, a blocked and a done task.
    """

    live: Live
    agent: dict[str, Any]
    other: dict[str, Any]
    reviewer: dict[str, Any]
    tasks: dict[str, str]
    lease: str

    @property
    def url(self) -> str:
        return self.live.url

    def bearer(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def call(self, token: str, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        r = self.live.http.request(method, path, json=body, headers=self.bearer(token))
        assert r.status_code == expect, f"{method} {path} → {r.status_code} {r.text}"
        return r.json() if r.content else None


def seed(live: Live) -> ContractWorld:
    """The lane, two families, three agents, a denial, and tasks ready / held / in review / blocked / done."""
    live.lane(LANE, DEV_WORKFLOW, {DEV: [f"lane:{LANE}", "role:dev"], REVIEWER: [f"lane:{LANE}", "role:reviewer"]})
    live.admin("POST", "/v1/features", {"name": "tier:2"}, 201)
    live.admin("POST", f"/v1/families/{REVIEWER}/denials", {"feature": "tier:2", "reason": "seeded denial"}, 201)
    agent, other, reviewer = live.mint(DEV), live.mint(DEV), live.mint(REVIEWER)
    w = ContractWorld(live, agent, other, reviewer, {}, "")
    # Claims take the highest priority first, so each claim below takes the task named beside it.
    for name, prio in (("done", 50), ("review", 40), ("blocked", 30), ("held", 20), ("ready", 10)):
        out = w.call(other["token"], "POST", "/v1/tasks", {"lane": LANE, "title": f"seeded {name}", "priority": prio,
                                                           "payload": {"seeded": name}}, 201)
        w.tasks[name] = out["task"]["id"]

    def claim(tok: dict[str, Any], expect_task: str) -> str:
        out = w.call(tok["token"], "POST", "/v1/claims", {"lane": LANE})
        assert out["task"]["id"] == w.tasks[expect_task], out
        lease: str = out["lease"]["id"]
        return lease

    lease = claim(other, "done")
    w.call(other["token"], "POST", f"/v1/tasks/{w.tasks['done']}/advance", {"lease": lease, "to": "review"})
    lease = claim(reviewer, "done")
    w.call(reviewer["token"], "POST", f"/v1/tasks/{w.tasks['done']}/advance", {"lease": lease, "to": "done"})
    # What that work cost (the spend views then answer real rows): one report with a cost, one without.
    w.call(other["token"], "POST", f"/v1/tasks/{w.tasks['done']}/usage",
           {"model": "seeded", "input_tokens": 100, "cost": "0.25", "currency": "USD"})
    w.call(reviewer["token"], "POST", f"/v1/tasks/{w.tasks['done']}/usage", {"output_tokens": 10})
    lease = claim(other, "review")
    w.call(other["token"], "POST", f"/v1/tasks/{w.tasks['review']}/advance", {"lease": lease, "to": "review"})
    lease = claim(other, "blocked")
    w.call(other["token"], "POST", f"/v1/tasks/{w.tasks['blocked']}/block", {"lease": lease, "reason": "seeded"})
    w.lease = claim(agent, "held")
    return w


@contextmanager
def contract_world(pg_server: Any, template_db: str, data_dir: Path) -> Iterator[ContractWorld]:
    """A live service on a fresh database, seeded."""
    with serve(clone_database(pg_server, template_db), data_dir) as live:
        yield seed(live)
