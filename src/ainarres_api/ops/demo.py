"""`ainarres demo`: the service on its embedded database, its board, and a small simulated swarm.

A director writes one feature's tasks (with dependencies) into a fresh lane; cheap workers take
them, a reviewer sends some back, one worker dies holding a task (its lease runs out and the next
claim takes the task back), the cheap tier gives up on a hard task until it is escalated to the
capable tier, and a rework cap parks one task for a human. Every simulated agent is an ordinary
client of the public HTTP API (ainarres_api.agent.client); only the first admin token is minted the way
`ainarres token` mints it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ainarres_api.agent.client import AsyncClient, Refused
from ainarres_api.ops.runtime import listen_arguments

if TYPE_CHECKING:
    from ainarres_api.server.settings import Settings

PROJECT = "demo"
WORKFLOW = "demo-feature"
BASE_LEASE = 20.0  # seconds at speed 1: how long the dead worker's task stays abandoned

# The feature: (key, title, priority, depends on, effort in seconds at speed 1, behaviour).
#   hard:    the cheap tier gives up on it (release) until it is escalated to tier:2;
#   rejects: how many times the reviewer sends it back (past the rework cap it is blocked).
FEATURE: list[tuple[str, str, int, list[str], float, dict[str, Any]]] = [
    ("schema", "Design the cart schema", 5, [], 6, {}),
    ("payments", "Payment provider adapter", 4, [], 7, {"rejects": 1}),
    ("tax", "Tax rules engine", 4, [], 8, {"hard": True}),
    ("api", "Cart API endpoints", 3, ["schema"], 7, {}),
    ("inventory", "Inventory reservation", 3, ["schema"], 6, {}),
    ("coupons", "Legacy coupon migration", 2, [], 5, {"rejects": 9}),
    ("page", "Checkout page", 2, ["api", "payments"], 7, {}),
    ("emails", "Order confirmation emails", 1, ["page"], 5, {}),
    ("e2e", "End-to-end checkout test", 1, ["page", "inventory", "tax"], 6, {}),
]


def _workflow(lease: int) -> dict[str, Any]:
    return {
        "key": WORKFLOW,
        "description": "build → review → done; the reviewer may send work back once",
        "stages": [
            {"key": "build", "initial": True, "lease_seconds": lease, "max_attempts": 5, "escalate_after": 2,
             "instructions": "Build the task; advance to review with a branch and a commit."},
            {"key": "review", "lease_seconds": lease, "max_attempts": 5, "max_rework": 1,
             "instructions": "Review the work: advance to done, or reject to build with a reason."},
            {"key": "done", "terminal": True},
        ],
        "transitions": [
            {"from": "build", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
            {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
            {"from": "review", "to": "build", "kind": "reject", "required_features": ["role:reviewer"]},
        ],
    }


@dataclass
class Swarm:
    """The demo's shared state: where to call, how fast, and when to stop."""

    url: str
    lane: str
    speed: float
    tokens: dict[str, str]
    say: Any
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ids: dict[str, str] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    effort: dict[str, float] = field(default_factory=dict)
    lease: int = 20
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    chores: str = ""  # the governance story's lane (provision_governance)

    async def pause(self, seconds: float) -> None:
        """Wait `seconds` of demo time (scaled by the speed), or less if the demo ends."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), seconds / self.speed)

    def start(self, name: str, coro: Any) -> asyncio.Task[None]:
        """Run one simulated agent; a crash is told, not swallowed (the overseer then times out)."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)

        def told(t: asyncio.Task[None]) -> None:
            if not t.cancelled() and t.exception() is not None:
                self.say(f"{name}: crashed: {type(t.exception()).__name__}: {t.exception()}")

        task.add_done_callback(told)
        self.workers.append(task)
        return task

    def client(self, who: str) -> AsyncClient:
        return AsyncClient(self.url, self.tokens[who], retries=3, backoff=0.2, timeout=30)


async def director(sw: Swarm) -> None:
    """Writes the feature's tasks, dependencies included, a few seconds apart."""
    async with sw.client("director") as c:
        for key, title, prio, deps, effort, behaviour in FEATURE:
            out = await c.create(sw.lane, title, priority=prio, depends_on=[sw.ids[d] for d in deps],
                                 payload={"feature": "checkout", "part": key, **behaviour},
                                 idempotency_key=f"{sw.lane}-{key}")
            tid = out["task"]["id"]
            sw.ids[key], sw.titles[tid], sw.effort[tid] = tid, title, effort
            sw.say(f"director: created “{title}”" + (f" after {', '.join(deps)}" if deps else ""))
            await sw.pause(1.5)


async def worker(sw: Swarm, name: str, capable: bool) -> None:
    """Claims build work and does it; the cheap tier gives up on hard tasks."""
    async with sw.client(name) as c:
        while not sw.done.is_set():
            got = await c.claim(sw.lane, wait_seconds=max(0.5, 3 / sw.speed))
            if got["code"] != "claimed" or not got["task"]:
                continue
            try:
                await _build(sw, c, name, capable, got)
            except Refused as exc:  # e.g. lease_lost after a stall: the task goes on without us
                sw.say(f"{name}: lost “{got['task']['title']}”: {exc.code}")


async def _build(sw: Swarm, c: AsyncClient, name: str, capable: bool, got: Any) -> None:
    """One claimed build task, done (or, for the cheap tier on a hard one, given back)."""
    task = got["task"]
    title = task["title"]
    async with c.held(got) as h:
        if got.get("recovered") or task["attempts"]:
            sw.say(f"{name}: took back “{title}” (attempt {task['attempts'] + 1})")
        else:
            sw.say(f"{name}: claimed “{title}”")
        effort = sw.effort.get(task["id"], 5) * random.uniform(0.8, 1.2)
        if task["payload"].get("hard") and not capable:
            await sw.pause(effort / 2)
            await h.progress("tried three approaches to the tax tables; none passes the fixtures")
            await sw.pause(effort / 3)
            out = await h.release("beyond this model: the rounding rules need a stronger tier")
            await report_usage(sw, c, name, task["id"], out, effort)
            sw.say(f"{name}: gave “{title}” back (too hard)")
            return
        await sw.pause(effort / 2)
        await h.progress(f"halfway: {task['payload'].get('part', 'work')} drafted",
                         [{"type": "branch", "name": f"feature/{task['payload'].get('part', 'x')}"}])
        await sw.pause(effort / 2)
        sha = f"{random.getrandbits(40):010x}"
        out = await h.advance("review", note="ready for review",
                              artifacts=[{"type": "commit", "sha": sha},
                                         {"type": "pr", "uri": f"https://git.example/acme/shop/pull/"
                                                               f"{random.randint(100, 999)}"}])
        await report_usage(sw, c, name, task["id"], out, effort)
        sw.say(f"{name}: sent “{title}” to review")


async def reviewer(sw: Swarm, name: str) -> None:
    """Reviews: sends back what the task's script says to, passes the rest."""
    async with sw.client(name) as c:
        while not sw.done.is_set():
            got = await c.claim(sw.lane, wait_seconds=max(0.5, 3 / sw.speed))
            if got["code"] != "claimed" or not got["task"]:
                continue
            try:
                await _review(sw, c, name, got)
            except Refused as exc:
                sw.say(f"{name}: lost “{got['task']['title']}”: {exc.code}")


async def _review(sw: Swarm, c: AsyncClient, name: str, got: Any) -> None:
    """One claimed review: reject what the task's script says to, approve the rest."""
    task = got["task"]
    async with c.held(got) as h:
        sw.say(f"{name}: reviewing “{task['title']}”")
        await sw.pause(2.5)
        if task["rework_count"] < int(task["payload"].get("rejects", 0)):
            out = await h.reject("build", "the edge cases are untested: add tests for empty carts")
            await report_usage(sw, c, name, task["id"], out, 2.5)
            if out["task"]["blocked"]:
                sw.say(f"{name}: rejected “{task['title']}” again: past its rework cap, "
                       "parked for a human")
            else:
                sw.say(f"{name}: sent “{task['title']}” back for rework")
        else:
            out = await h.advance("done", note="reviewed: tests pass, code is clear")
            await report_usage(sw, c, name, task["id"], out, 2.5)
            sw.say(f"{name}: approved “{task['title']}”")


# What each simulated agent's model costs: (model, USD per million input tokens, per million output tokens).
# The dying worker never reports: its spend stays unknown.
MODELS = {"cheap": ("small-coder", 0.25, 1.25), "capable": ("big-coder", 3.0, 15.0),
          "reviewer": ("careful-reviewer", 1.0, 5.0)}


async def report_usage(sw: Swarm, c: AsyncClient, name: str, task_id: str, out: Any, effort: float) -> None:
    """Record what a step cost (the usage verb), anchored to the event the step recorded, as a runner would
    (`ainarres work` reads it from its harness): the spend views and the board's charts have data."""
    model, per_in, per_out = MODELS[name.split("-")[0]]
    tokens_in = int(effort * random.uniform(2500, 4000))
    tokens_out = int(effort * random.uniform(300, 600))
    cost = (tokens_in * per_in + tokens_out * per_out) / 1_000_000
    event = (out or {}).get("event") or {}
    with contextlib.suppress(Refused):
        await c.usage(task_id, model=model, input_tokens=tokens_in, output_tokens=tokens_out,
                      cost=f"{cost:.6f}", currency="USD", wall_seconds=round(effort / sw.speed, 3),
                      event=event.get("id"))


async def dying_worker(sw: Swarm, name: str) -> None:
    """Claims a task, reports once, then dies without a word: no release, no heartbeat."""
    async with sw.client(name) as c:
        got = await c.claim(sw.lane, wait_seconds=30)
        task, lease = got["task"], got["lease"]
        if got["code"] != "claimed" or not task or not lease:
            return
        await sw.pause(1)
        await c.progress(task["id"], lease["id"], "started; downloading the fixtures…")
        sw.say(f"{name}: claimed “{task['title']}” … and died (its lease runs out in "
               f"{sw.lease}s; the next claim takes the task back)")


async def overseer(sw: Swarm, deadline: float) -> dict[str, Any]:
    """Watches the board through the oversight API; starts the capable tier when demand needs it and
    ends the swarm when every task is done or blocked for a human."""
    capable: asyncio.Task[None] | None = None
    async with sw.client("overseer") as c:
        while True:
            with contextlib.suppress(TimeoutError):  # real time: the watch costs the same at any speed
                await asyncio.wait_for(sw.done.wait(), 1.0)
            rows = (await c.oversee("board", lane=sw.lane, limit=500))["items"]
            if capable is None:
                demand = (await c.oversee("demand", lane=sw.lane, limit=500))["items"]
                if any("tier:2" in d["features"] and d["pending"] for d in demand):
                    sw.say("overseer: demand shows tier:2 work nobody running can take: starting a capable agent")
                    capable = sw.start("capable-1", worker(sw, "capable-1", capable=True))
            settled = len(rows) == len(FEATURE) and all(r["state"] in ("done", "blocked") for r in rows)
            if settled or time.monotonic() > deadline:
                return {"settled": settled, "tasks": rows}


async def provision(url: str, admin_token: str, speed: float, duration: float, say: Any) -> Swarm:
    """A fresh demo lane, its families and one token per simulated agent, all through the HTTP API."""
    lease = max(3, round(BASE_LEASE / speed))
    async with AsyncClient(url, admin_token, retries=3, backoff=0.2) as adm:
        for f in ("role:dev", "role:reviewer", "tier:2"):
            with contextlib.suppress(Refused):
                await adm.create_feature(f)
        with contextlib.suppress(Refused):
            await adm.create_project(PROJECT, {"repo": "https://git.example/acme/shop"})
        taken = {ln["key"] for ln in (await adm.get("/v1/lanes", project=PROJECT, limit=500))["items"]}
        lane = next(k for k in (f"checkout-{n}" if n > 1 else "checkout" for n in range(1, 10_000))
                    if k not in taken)
        await adm.create_workflow(_workflow(lease))
        await adm.create_lane(PROJECT, lane, WORKFLOW)
        families = {"demo-director": [f"lane:{lane}", "role:dev"],
                    "demo-cheap": [f"lane:{lane}", "role:dev"],
                    "demo-capable": [f"lane:{lane}", "role:dev", "tier:2"],
                    "demo-reviewer": [f"lane:{lane}", "role:reviewer"],
                    "demo-overseer": ["seat:overseer"]}
        for key, feats in families.items():
            try:
                await adm.create_family(key, feats, description="ainarres demo")
            except Refused as exc:
                if exc.code != "conflict":
                    raise
                await adm.update_family(key, features=feats, disabled=False)
        who = {"director": "demo-director", "cheap-1": "demo-cheap", "cheap-2": "demo-cheap",
               "cheap-3": "demo-cheap", "capable-1": "demo-capable", "reviewer-1": "demo-reviewer",
               "overseer": "demo-overseer"}
        chores = await provision_governance(url, admin_token, adm, lane, lease, families["demo-reviewer"])
        who |= {"sloppy-1": "demo-sloppy", "reviewer-2": "demo-reviewer"}
        ttl = int(max(3600, duration * 3))
        tokens = {name: (await adm.mint_token(fam, ttl_seconds=ttl))["token"] for name, fam in who.items()}
    sw = Swarm(url, lane, speed, tokens, say, lease=lease)
    sw.chores = chores
    return sw


# -- governance (ADR 0015): a family that keeps producing rejected work is banned by the substrate itself, and
# the overseer's Needs-you inbox gets a recommendation. It plays in a lane of its own (project demo-lab), so
# the checkout story above is untouched.
LAB = "demo-lab"
CHORES = "demo-chore"


async def provision_governance(url: str, admin_token: str, adm: AsyncClient, lane: str, lease: int,
                               reviewer_features: list[str]) -> str:
    """The chores lane, its workflow and thresholds, the sloppy family; returns the lane's key."""
    import httpx

    chores = f"{lane}-chores"
    wf = _workflow(lease)
    wf = {**wf, "key": CHORES, "description": "chores: build → review → done, no rework cap",
          "stages": [{k: v for k, v in st.items() if k != "max_rework"} for st in wf["stages"]]}
    await adm.create_workflow(wf)
    with contextlib.suppress(Refused):
        await adm.create_project(LAB, {})
    await adm.create_lane(LAB, chores, CHORES)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as h:
        # Thresholds are data: the checkout workflow's rejects are part of its story and ban nobody; on chores,
        # two rejected deliveries ban the producer and one ban is enough for a recommendation.
        for key, policy in ((WORKFLOW, {"strike_threshold": 100}),
                            (CHORES, {"strike_threshold": 2, "recommend_after_bans": 1})):
            r = await h.put(f"/v1/governance/policies/workflow/{key}", json=policy)
            r.raise_for_status()
        # Run again on the same data (within the hour a reflexive ban lasts), the story starts over: the sloppy
        # family's ban lifted, its strikes reset (both by the lift) and the last run's recommendation dismissed.
        again = "the demo starts over"
        r = await h.post("/v1/governance/lifts", json={"family": "demo-sloppy", "feature": "role:dev", "reason": again})
        if r.status_code != 404:  # 404: nothing to lift (a first run)
            r.raise_for_status()
        r = await h.get("/v1/governance")
        r.raise_for_status()
        for rec in r.json()["recommendations"]:
            if rec["family"] == "demo-sloppy" and rec["status"] == "open":
                d = await h.post(f"/v1/governance/recommendations/{rec['id']}/dismiss", json={"reason": again})
                d.raise_for_status()
    for key, feats in (("demo-sloppy", [f"lane:{chores}", "role:dev"]),
                       ("demo-reviewer", [*reviewer_features, f"lane:{chores}"])):
        try:
            await adm.create_family(key, feats, description="ainarres demo")
        except Refused as exc:
            if exc.code != "conflict":
                raise
            await adm.update_family(key, features=feats, disabled=False)
    return chores


async def governance_story(sw: Swarm) -> None:
    """A sloppy family's work is rejected until the substrate bans it; the overseer sees the recommendation."""
    async with sw.client("sloppy-1") as sloppy, sw.client("reviewer-2") as rev, sw.client("overseer") as ovs:
        for n in (1, 2, 3):
            await sloppy.create(sw.chores, f"Chore {n}: tidy the fixtures", idempotency_key=f"{sw.chores}-{n}")
        for _ in range(6):
            try:
                got = await sloppy.claim(sw.chores)
            except Refused as exc:  # its role was taken away: the claim no longer sees that work
                sw.say(f"sloppy-1: refused work: {exc.code}")
                break
            if got["code"] != "claimed" or not got["task"]:
                break
            async with sloppy.held(got) as h:
                await h.advance("review", note="done (no tests)")
            sw.say(f"sloppy-1: sent “{got['task']['title']}” to review")
            await sw.pause(1)
            got = await rev.claim(sw.chores)
            if got["code"] != "claimed" or not got["task"]:
                continue
            async with rev.held(got) as h:
                await h.reject("build", "no tests, and the fixtures are broken")
            sw.say(f"reviewer-2: rejected sloppy-1's “{got['task']['title']}”")
        status = await ovs.get("/v1/governance")
        for b in status["bans"]:
            if b["family"] == "demo-sloppy" and b["governance"] == "reflexive":
                sw.say(f"governance: demo-sloppy banned from {b['feature']} by the substrate itself until "
                       f"{b['expires_at']} ({b['reason']})")
        for r in status["recommendations"]:
            if r["family"] == "demo-sloppy":
                sw.say(f"overseer: Needs you — recommendation: {r['reason']}")


async def run_swarm(sw: Swarm, duration: float) -> dict[str, Any]:
    """Run the swarm until every task is done or blocked (or `duration` runs out); the end state."""
    sw.say(f"lane {sw.lane}: build → review → done, leases of {sw.lease}s; the swarm starts")
    deadline = time.monotonic() + duration
    sw.start("director", director(sw))
    await sw.pause(0.5)
    # The doomed worker claims first, so its crash happens early where a newcomer can watch it.
    await asyncio.wait([sw.start("cheap-3", dying_worker(sw, "cheap-3"))])
    sw.start("cheap-1", worker(sw, "cheap-1", capable=False))
    sw.start("cheap-2", worker(sw, "cheap-2", capable=False))
    sw.start("reviewer-1", reviewer(sw, "reviewer-1"))
    sw.start("sloppy-1", governance_story(sw))
    try:
        end = await overseer(sw, deadline)
    finally:
        sw.done.set()
        for t in sw.workers:
            t.cancel()
        await asyncio.gather(*sw.workers, return_exceptions=True)
    return end


def _serve_in_thread(app: Any, sock: socket.socket, host: str, port: int) -> tuple[Any, threading.Event]:
    """uvicorn serving `app` on a thread of its own; returns the server and an event set once it has stopped (waited
    on instead of the thread: a join interrupted by the signal's SystemExit leaves the thread marked stopped in
    Python 3.11, and the join after it would return at once, the embedded PostgreSQL then stopped under a live
    pool)."""
    import uvicorn

    from ainarres_api.ops.serving import DrainingServer

    # As `serve` stops: the drain first, which ends the event stream of a board left open in a browser.
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           log_config=None, lifespan="on"), app.state.drain, drain_seconds=5)
    stopped = threading.Event()

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            stopped.set()

    threading.Thread(target=run, name="ainarres-demo-server", daemon=True).start()
    while not server.started:
        if stopped.is_set():
            raise SystemExit(f"AINARRES demo: the server could not start on {host}:{port}")
        time.sleep(0.05)
    return server, stopped


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo: serve, print the board's URL and a token, run the swarm, report."""
    from ainarres_api.ops.runtime import PortBusy, bind, check_schema, database, exit_on_signal, mint
    from ainarres_api.server.app import create_app

    # As in `serve`: a signal ends through SystemExit, so the server stops and the embedded
    # PostgreSQL is shut down by its atexit hook instead of being left behind.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, exit_on_signal)

    if args.data_dir:
        settings.data_dir = Path(args.data_dir)
    elif "AINARRES_DATA_DIR" not in os.environ:
        settings.data_dir = Path(".ainarres-demo")
    # The swarm's own lines tell the story; per-request logs would bury them.
    for name in ("httpx", "ainarres.access"):
        logging.getLogger(name).setLevel(logging.WARNING)
    host = args.host or settings.host
    port = args.port or settings.port
    # Before anything else: on a busy port, fail having started nothing and printed no token.
    try:
        sock = bind(host, port)
    except PortBusy as exc:
        print(f"AINARRES demo: {exc}", file=sys.stderr, flush=True)
        return 1
    dsn, pg = database(settings)
    asyncio.run(check_schema(dsn, settings))  # as `serve`: a newer build's database, another key, refused

    def say(line: str) -> None:
        print(f"  {time.strftime('%H:%M:%S')}  {line}", flush=True)

    app = create_app(settings, dsn=dsn)
    server, stopped = _serve_in_thread(app, sock, host, port)
    url = f"http://{host}:{port}"
    try:
        admin = asyncio.run(mint(dsn, settings, argparse.Namespace(family="admin", ttl=3600, scope=None,
                                                                    sub=None)))

        async def go() -> dict[str, Any]:
            sw = await provision(url, admin["token"], args.speed, args.duration, say)
            # The token goes to this terminal only: the board keeps it in the browser tab's session.
            print(f"\nAINARRES demo: watch the board at {url}/board/{PROJECT}\n"
                  f"AINARRES demo: sign in with this overseer token:\n{sw.tokens['overseer']}\n", flush=True)
            end = await run_swarm(sw, args.duration)
            end["lane"] = sw.lane
            return end

        end = asyncio.run(go())
        rows = end["tasks"]
        done = [r for r in rows if r["state"] == "done"]
        blocked = [r for r in rows if r["state"] == "blocked"]
        print(f"AINARRES demo: finished lane {end['lane']}: {len(done)} done, {len(blocked)} blocked for a human"
              + ("" if end["settled"] else f", {len(rows) - len(done) - len(blocked)} unfinished (time ran out)"),
              flush=True)
        for r in blocked:
            print(f"  blocked: “{r['title']}”: {r['blocked_reason']}", flush=True)
        if args.exit:
            return 0 if end["settled"] else 1
        print(f"AINARRES demo: the board stays up at {url}/board/{PROJECT}; Ctrl-C to stop", flush=True)
        while not stopped.wait(0.5):
            pass
        return 0 if end["settled"] else 1
    finally:
        if not stopped.is_set():  # (stopped by itself, its loop is closed: nothing to tell it)
            with contextlib.suppress(RuntimeError):  # it stopped by itself between the check and the call
                server.handle_exit(signal.SIGTERM, None)  # drained, then stopped (at once if it never served)
            stopped.wait(15)
        del pg


def add_parser(sub: Any) -> None:
    """The `demo` subcommand's arguments."""
    d = sub.add_parser("demo", help="serve the board and run a small simulated swarm a newcomer can watch",
                       description="Serve the API and its board on an embedded PostgreSQL of its own (in "
                       "./.ainarres-demo unless AINARRES_DATA_DIR or --data-dir says otherwise), print the board's "
                       "URL and an overseer token, and run a small simulated swarm through the public API. The "
                       "board stays up afterwards until Ctrl-C (or --exit).")
    listen_arguments(d)
    d.add_argument("--data-dir", metavar="PATH",
                   help="where the embedded PostgreSQL lives (default: AINARRES_DATA_DIR, else ./.ainarres-demo)")
    d.add_argument("--speed", type=float, default=1.0,
                   help="how many times faster than real time the agents work (default 1: the swarm takes about "
                        "a minute)")
    d.add_argument("--duration", type=float, default=300.0,
                   help="stop the swarm after this many seconds even if work is left (default 300)")
    d.add_argument("--exit", action="store_true", help="exit when the swarm ends instead of keeping the board up")
    d.set_defaults(func=main)
