"""`ainarres work` end to end: real runner processes, shell-script harnesses, a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.live_server import AINARRES, Live, serve
from tests.helpers import review_flow

LIMIT = 45  # seconds any one wait may take before the test fails

BUILD = review_flow("build", "write", lease=2, first_stage={"max_attempts": 5},
                    review_stage={"max_rework": 3})

# The developer: writes a program printing 1+2+…+n to a file, checks that it runs and prints a
# number, and says "advance". Payload mode "bad" plants an off-by-one on the first try (its own
# check cannot see it); mode "hang" makes the first attempt hang, so its runner can be killed.
DEV = r"""
set -eu
field() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["payload"].get(sys.argv[2], ""))' \
          "$AINARRES_TASK_JSON" "$1"; }
n=$(field n); mode=$(field mode)
[ "$(cat)" != "" ]  # the task also arrives on stdin
if [ "$mode" = hang ] && [ "$AINARRES_ATTEMPTS" = 0 ]; then
  echo $$ > "$WORK/$AINARRES_TASK_ID.hung"
  sleep 120
fi
k=$n
if [ "$mode" = bad ] && [ "$AINARRES_REWORK_COUNT" = 0 ]; then k=$((n + 1)); fi
prog="$WORK/$AINARRES_TASK_ID.sh"
cat > "$prog" <<EOF
i=0; s=0
while [ \$i -lt $k ]; do i=\$((i + 1)); s=\$((s + i)); done
echo \$s
EOF
out=$(sh "$prog")
case "$out" in ''|*[!0-9]*) echo '{"verb": "release", "reason": "my program prints no number"}'; exit 1;; esac
echo "wrote $prog" >&2
art="{\"type\": \"file\", \"path\": \"$prog\"}"
echo "{\"verb\": \"advance\", \"to\": \"review\", \"note\": \"prints $out\", \"artifacts\": [$art]}"
"""

# The reviewer: re-runs the program and checks its answer; a wrong one is rejected (exit 1).
REVIEW = r"""
set -eu
n=$("$PY" -c 'import json,sys; print(json.load(sys.stdin)["payload"]["n"])')
want=$((n * (n + 1) / 2))
got=$(sh "$WORK/$AINARRES_TASK_ID.sh" || true)
if [ "$got" = "$want" ]; then
  echo "{\"verb\": \"advance\", \"to\": \"done\", \"note\": \"validated: $got\"}"
else
  echo "{\"verb\": \"reject\", \"to\": \"write\", \"reason\": \"expected $want, got $got\"}"
  exit 1
fi
"""


class Runner:
    """One `ainarres work` process and the JSON lines it has printed."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, events: list[dict[str, Any]],
                 changed: asyncio.Condition) -> None:
        self.name, self.proc, self.changed = name, proc, changed
        self.events: list[dict[str, Any]] = []
        self._all = events
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            ev = json.loads(raw)
            ev["runner"] = self.name
            async with self.changed:
                self.events.append(ev)
                self._all.append(ev)
                self.changed.notify_all()


class Fleet:
    """Runners started for a test, their pooled events, and cleanup."""

    def __init__(self, live: Live, tmp: Path) -> None:
        self.live, self.tmp = live, tmp
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.runners: list[Runner] = []

    async def start(self, name: str, token: str, script: str, *args: str) -> Runner:
        path = self.tmp / f"{name}.sh"
        path.write_text(textwrap.dedent(script))
        # TMPDIR: a runner killed mid-task (mode "hang") cannot remove its task's scratch directory; it is left
        # in the test's own directory, not in /tmp.
        env = self.live.env(AINARRES_TOKEN=token, PY=sys.executable, WORK=str(self.tmp), TMPDIR=str(self.tmp),
                            AINARRES_STATE_DIR=str(self.tmp / "state"))
        err = open(self.tmp / f"{name}.stderr", "wb")  # noqa: ASYNC230 - a test; the runner owns it
        proc = await asyncio.create_subprocess_exec(
            *AINARRES, "work", "--poll", "1", "--grace", "2", *args, "--", "sh", str(path),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=err)
        err.close()
        r = Runner(name, proc, self.events, self.changed)
        self.runners.append(r)
        return r

    async def until(self, pred: Callable[[list[dict[str, Any]]], Any], what: str) -> Any:
        """Wait for the runners' events to satisfy `pred` (its truthy value is returned)."""
        async def wait() -> Any:
            async with self.changed:
                while not (got := pred(self.events)):
                    await self.changed.wait()
                return got

        try:
            return await asyncio.wait_for(wait(), LIMIT)
        except TimeoutError:
            logs = {p.name: p.read_text()[-3000:] for p in self.tmp.glob("*.stderr")}
            pytest.fail(f"timed out waiting for {what}; events: {self.events}; stderr: {logs}")

    async def stop(self, r: Runner) -> int:
        r.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(r.proc.wait(), LIMIT)
        await asyncio.wait_for(r.reader, LIMIT)
        return rc

    async def close(self) -> None:
        for r in self.runners:
            if r.proc.returncode is None:
                r.proc.kill()
                await r.proc.wait()
            r.reader.cancel()
        for f in self.tmp.glob("*.hung"):  # the command a SIGKILLed runner left behind
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(f.read_text()), signal.SIGKILL)


@pytest.fixture
async def fleet(dsn: str, tmp_path: Path) -> Any:
    with serve(dsn, tmp_path) as live:
        f = Fleet(live, tmp_path)
        try:
            yield f
        finally:
            await f.close()


def _events(live: Live, tid: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = live.admin("GET", f"/v1/tasks/{tid}/events", expect=200)["items"]
    return items


def _setup(live: Live, lane: str, workflow: dict[str, Any]) -> str:
    """The lane with families dev-<lane> and rev-<lane>; returns a token that may create tasks in it."""
    live.lane(lane, workflow, {f"dev-{lane}": [f"lane:{lane}", "role:dev"],
                               f"rev-{lane}": [f"lane:{lane}", "role:reviewer"]})
    return str(live.mint(f"dev-{lane}")["token"])


def _create(live: Live, token: str, lane: str, title: str, **fields: Any) -> str:
    r = live.http.post("/v1/tasks", json={"lane": lane, "title": title, **fields},
                       headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    return str(r.json()["task"]["id"])


async def test_two_runners_drain_a_workflow_with_rework_and_crash_recovery(fleet: Fleet) -> None:
    live = fleet.live
    lane = "build"
    creator = _setup(live, lane, BUILD)
    tasks = {mode or "good": _create(live, creator, lane, f"sum to {n}", payload={"n": n, "mode": mode})
             for n, mode in ((4, ""), (5, "bad"), (6, "hang"))}
    devs = [live.mint(f"dev-{lane}") for _ in range(2)]
    rev = live.mint(f"rev-{lane}")
    d1 = await fleet.start("dev1", devs[0]["token"], DEV)
    d2 = await fleet.start("dev2", devs[1]["token"], DEV)
    r = await fleet.start("reviewer", rev["token"], REVIEW)

    # Whichever developer starts the hanging task dies with SIGKILL, holding it.
    hung = await fleet.until(lambda evs: next((e for e in evs if e["event"] == "started"
                                               and e["task"] == tasks["hang"]), None), "the hanging task")
    victim, survivor = (d1, d2) if hung["runner"] == "dev1" else (d2, d1)
    victim.proc.send_signal(signal.SIGKILL)
    await victim.proc.wait()

    def all_done(evs: list[dict[str, Any]]) -> bool:
        return {e["task"] for e in evs if e["event"] == "finished" and e.get("state") == "done"} == \
            set(tasks.values())

    await fleet.until(all_done, "every task to reach done")
    assert await fleet.stop(survivor) == 0 and await fleet.stop(r) == 0
    assert survivor.events[-1]["event"] == "stopped" and r.events[-1]["event"] == "stopped"

    for mode, tid in tasks.items():
        task = live.admin("GET", f"/v1/tasks/{tid}", expect=200)
        assert task["state"] == "done", (mode, task)
        prog = fleet.tmp / f"{tid}.sh"
        n = task["payload"]["n"]
        proc = await asyncio.create_subprocess_exec("sh", str(prog), stdout=asyncio.subprocess.PIPE)
        assert (await proc.communicate())[0].decode().strip() == str(n * (n + 1) // 2)

    # The planted bad solution was rejected by the reviewer and the rework landed.
    bad = _events(live, tasks["bad"])
    rejects = [e for e in bad if e["type"] == "transition" and e["data"]["kind"] == "reject"]
    assert len(rejects) == 1 and rejects[0]["actor"] == rev["sub"]
    assert rejects[0]["data"]["reason"] == "expected 15, got 21"
    moves = [e["data"]["to"] for e in bad if e["type"] == "transition"]
    assert moves == ["review", "write", "review", "done"]
    assert live.admin("GET", f"/v1/tasks/{tasks['bad']}", expect=200)["rework_count"] == 1
    good = _events(live, tasks["good"])
    assert [e["data"].get("to") for e in good if e["type"] == "transition"] == ["review", "done"]
    adv = next(e for e in good if e["type"] == "transition")
    assert adv["data"]["artifacts"] == [{"type": "file", "path": str(fleet.tmp / f"{tasks['good']}.sh")}]

    # The killed runner's task was recovered by the other one once its lease had expired.
    hang = _events(live, tasks["hang"])
    claims = [e for e in hang if e["type"] == "claimed"]
    victim_sub = next(e["sub"] for e in fleet.events if e["runner"] == victim.name)
    assert claims[0]["actor"] == victim_sub
    assert claims[1]["actor"] == survivor.events[0]["sub"] and claims[1]["data"]["reclaimed"] is True
    assert claims[1]["data"]["previous_holder"] == victim_sub
    assert not [e for e in hang if e["type"] == "released"]


FLAKY = {
    "key": "flaky",
    "stages": [
        {"key": "write", "initial": True, "lease_seconds": 5, "max_attempts": 1,
         "instructions": "Write the program the payload asks for; advance to review when it runs."},
        {"key": "review", "lease_seconds": 2},
        {"key": "done", "terminal": True},
    ],
    "transitions": [
        {"from": "write", "to": "review", "kind": "advance", "required_features": ["role:dev"]},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
    ],
}

# One harness, told by the payload how to misbehave.
MODES = r"""
mode=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["payload"]["mode"])' \
       "$AINARRES_TASK_JSON")
case "$mode" in
  crash) echo "oops: segfault in the model" >&2; exit 3;;
  badline) echo '{"verb": "advance"}';;
  slow) sleep 60;;
  self) "$PY" -m ainarres_api agent progress --note "from inside" >/dev/null
        "$PY" -m ainarres_api agent advance --to review >/dev/null;;
  card) printf '%s' "$AINARRES_CARD" > "$WORK/card"; echo '{"verb": "block", "reason": "needs a human"}';;
esac
"""


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of a process group that still run (zombies aside: PID 1 here may never reap them)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(stat.parent.name))
    return alive


def _started(r: Runner, tid: str) -> dict[str, Any]:
    return next(e for e in r.events if e["event"] == "started" and e["task"] == tid)


def _release_reason(live: Live, tid: str) -> str:
    ev = [e for e in _events(live, tid) if e["type"] in ("blocked", "released")][-1]
    return str(ev["data"].get("release_reason") or ev["data"].get("reason"))


async def test_runner_releases_on_crash_bad_line_timeout_and_shutdown(fleet: Fleet) -> None:
    live = fleet.live
    lane = "flaky"
    creator = _setup(live, lane, FLAKY)
    ids = {mode: _create(live, creator, lane, mode, priority=prio, payload={"mode": mode})
           for prio, mode in enumerate(("card", "self", "badline", "crash"))}  # crash comes first
    dev = live.mint(f"dev-{lane}")
    w = await fleet.start("w", dev["token"], MODES, "--max-tasks", "4")
    assert await asyncio.wait_for(w.proc.wait(), LIMIT) == 0  # --max-tasks ends it
    await asyncio.wait_for(w.reader, LIMIT)
    assert w.events[-1]["event"] == "stopped" and w.events[-1]["done"] == 4

    crash = _release_reason(live, ids["crash"])
    assert "crashed (exit 3)" in crash and "oops: segfault" in crash
    assert "bad verb line" in _release_reason(live, ids["badline"])
    # The command finished its task itself through the agent CLI, from the runner's environment.
    events = _events(live, ids["self"])
    assert [e["type"] for e in events] == ["created", "claimed", "progress", "transition"], json.dumps(events)
    assert events[-1]["data"]["to"] == "review"
    finished = [e for e in w.events if e.get("task") == ids["self"] and e["event"] == "finished"]
    assert [e["by"] for e in finished] == ["command"], json.dumps(w.events)
    # The verb line works whatever it says: here, block. The card, or the stage key without one.
    card = live.admin("GET", f"/v1/tasks/{ids['card']}", expect=200)
    assert card["state"] == "blocked" and card["blocked_reason"] == "needs a human"
    seen = (fleet.tmp / "card").read_text()
    assert seen == "write" or "Write the program" in seen

    # A command over its time is stopped, with everything it started, and the task released.
    slow = _create(live, creator, lane, "slow", payload={"mode": "slow"})
    w2 = await fleet.start("w2", dev["token"], MODES, "--timeout", "1", "--max-tasks", "1")
    assert await asyncio.wait_for(w2.proc.wait(), LIMIT) == 0
    await asyncio.wait_for(w2.reader, LIMIT)
    assert "timed out" in _release_reason(live, slow)
    assert _alive_in_group(_started(w2, slow)["pid"]) == []

    # SIGTERM while a command runs: the command is stopped and the task released.
    late = _create(live, creator, lane, "late", payload={"mode": "slow"})
    w3 = await fleet.start("w3", dev["token"], MODES)
    await fleet.until(lambda evs: any(e["event"] == "started" and e["task"] == late for e in evs),
                      "the slow command to start")
    assert await fleet.stop(w3) == 0
    assert "shut down" in _release_reason(live, late)
    assert _alive_in_group(_started(w3, late)["pid"]) == []


SOLO = review_flow("solo", "write", lease=30, first_stage={"max_attempts": 5})

# Holds its task until killed (its process group is noted for the fleet's cleanup).
HOLD = r"""
echo $$ > "$WORK/$AINARRES_TASK_ID.hung"
sleep 60
"""


async def test_one_runner_per_token_and_only_what_it_took_is_released(fleet: Fleet) -> None:
    """Found by a review: a second runner with the same token released the first one's running task as "left over
    from an earlier run", and so did a runner started while the token held a task claimed with curl. One runner per
    token; at start a runner releases only what an earlier run of it noted (a crash's leftovers)."""
    live = fleet.live
    lane = "solo"
    creator = _setup(live, lane, SOLO)
    live.admin("PATCH", f"/v1/families/dev-{lane}", {"max_active": 2}, expect=200)  # the curl hold and the runner's
    dev = live.mint(f"dev-{lane}")
    by_hand = _create(live, creator, lane, "claimed with curl", priority=9)
    c = live.http.post("/v1/claims", json={"lane": lane}, headers={"Authorization": f"Bearer {dev['token']}"}).json()
    assert c["task"]["id"] == by_hand
    work = _create(live, creator, lane, "for the runner")

    a = await fleet.start("a", dev["token"], HOLD)
    await fleet.until(lambda evs: any(e["event"] == "started" and e["task"] == work for e in evs), "a's task")
    assert [e["task"] for e in a.events if e["event"] == "left_alone"] == [by_hand]
    b = await fleet.start("b", dev["token"], HOLD)
    assert await asyncio.wait_for(b.proc.wait(), LIMIT) == 2
    await asyncio.wait_for(b.reader, LIMIT)
    assert [e.get("code") for e in b.events] == ["runner_busy"] and "one runner per token" in b.events[0]["detail"]

    # `a` dies holding its task; started again, the runner releases that task (and works it again), not the other.
    a.proc.send_signal(signal.SIGKILL)
    await a.proc.wait()
    a2 = await fleet.start("a2", dev["token"], HOLD)
    await fleet.until(lambda evs: any(e["runner"] == "a2" and e["event"] == "started" for e in evs), "a2's task")
    assert [(e["task"], e["reason"]) for e in a2.events if e["event"] == "released"] == [
        (work, "left over from an earlier run of this runner")]
    assert await fleet.stop(a2) == 0
    held = live.admin("GET", f"/v1/tasks/{by_hand}", expect=200)
    assert held["state"] == "held" and held["holder"] == dev["sub"], held
    assert [e["type"] for e in _events(live, by_hand)] == ["created", "claimed"]

    # More slots than the family may hold at once: said at start, not left to be found out.
    c = await fleet.start("c", dev["token"], HOLD, "--concurrency", "3")
    warned = await fleet.until(lambda evs: next((e for e in evs if e["runner"] == "c" and e["event"] == "warning"),
                                                None), "c's warning")
    assert "max_active" in warned["detail"] and "1 slot(s) will wait" in warned["detail"]
    assert await fleet.stop(c) == 0

    # Stopped while idle (its claim in flight), a runner leaves alone what the token held when it started.
    auth = {"Authorization": f"Bearer {dev['token']}"}
    got = live.http.post("/v1/claims", json={"lane": lane}, headers=auth).json()
    assert got["task"]["id"] == work, got
    r = live.http.post(f"/v1/tasks/{work}/block", json={"lease": got["lease"]["id"], "reason": "parked"}, headers=auth)
    assert r.status_code == 200, r.text  # nothing claimable: the next runner waits in its claim
    d = await fleet.start("d", dev["token"], HOLD)
    await fleet.until(lambda evs: any(e["runner"] == "d" and e["event"] == "left_alone" for e in evs), "d's start")
    assert await fleet.stop(d) == 0
    assert [e["event"] for e in d.events if e["event"] == "released"] == []
    still = live.admin("GET", f"/v1/tasks/{by_hand}", expect=200)
    assert still["state"] == "held" and still["holder"] == dev["sub"], still

    # With --lane, a runner stopped with its claim in flight leaves alone what the token took in another lane
    # meanwhile: its cut-off claim could not have taken that (found by a review).
    live.lane("other", SOLO, {})
    live.admin("PATCH", f"/v1/families/dev-{lane}", {"features": [f"lane:{lane}", "role:dev", "lane:other"]},
               expect=200)
    e = await fleet.start("e", dev["token"], HOLD, "--lane", lane)
    await fleet.until(lambda evs: any(x["runner"] == "e" and x["event"] == "left_alone" for x in evs), "e's start")
    meanwhile = _create(live, creator, "other", "taken by hand meanwhile")
    got = live.http.post("/v1/claims", json={"lane": "other"}, headers=auth).json()
    assert got["task"]["id"] == meanwhile, got
    assert await fleet.stop(e) == 0
    assert [x for x in e.events if x["event"] == "released"] == [], e.events
    assert live.admin("GET", f"/v1/tasks/{meanwhile}", expect=200)["state"] == "held"


# A metered harness: says what it spent in an AINARRES_USAGE line (on stderr), as Claude Code's JSON
# result (the last stdout line, after the verb line), or not at all; then advances.
USAGE_SAID = {"model": "tiny-1", "input_tokens": 1500, "output_tokens": 200, "cost": 0.0123456789, "currency": "usd"}
CLAUDE_RESULT = {"type": "result", "subtype": "success", "is_error": False, "duration_ms": 3952, "result": "done",
                 "total_cost_usd": 0.10457895,
                 "usage": {"input_tokens": 2, "cache_creation_input_tokens": 7924, "cache_read_input_tokens": 13368,
                           "output_tokens": 9},
                 "modelUsage": {"claude-sonnet-4-5": {"inputTokens": 2}}}
METERED = r"""
set -eu
mode=$("$PY" -c 'import json,sys; print(json.load(sys.stdin)["payload"]["mode"])')
case "$mode" in
  line) echo 'AINARRES_USAGE SAID' >&2
        echo '{"verb": "advance", "to": "review", "note": "metered"}';;
  claude) echo '{"verb": "advance", "to": "review", "note": "metered"}'
          echo 'CLAUDE';;
  *) echo '{"verb": "advance", "to": "review", "note": "unmetered"}';;
esac
""".replace("SAID", json.dumps(USAGE_SAID)).replace("CLAUDE", json.dumps(CLAUDE_RESULT))


async def test_runner_records_what_each_run_cost(fleet: Fleet) -> None:
    live = fleet.live
    lane = "metered"
    creator = _setup(live, lane, review_flow("metered"))
    ids = {mode: _create(live, creator, lane, mode, priority=prio, payload={"mode": mode})
           for prio, mode in enumerate(("none", "claude", "line"))}  # line comes first
    dev = live.mint(f"dev-{lane}")
    w = await fleet.start("w", dev["token"], METERED, "--max-tasks", "3")
    assert await asyncio.wait_for(w.proc.wait(), LIMIT) == 0
    await asyncio.wait_for(w.reader, LIMIT)
    logged = {e["task"]: e for e in w.events if e["event"] == "usage"}
    assert set(logged) == set(ids.values()), json.dumps(w.events)
    spent = {}
    for mode, tid in ids.items():
        [row] = live.admin("GET", f"/v1/spend/tasks?task={tid}", expect=200)["items"]
        spent[mode] = row
        # Anchored to the runner's own advance.
        advance = [e for e in _events(live, tid) if e["type"] == "transition"][-1]
        assert logged[tid]["paid_for"] == advance["id"]
        assert row["reports"] == 1 and row["wall_seconds"] is not None and row["wall_seconds"] >= 0
    assert (spent["line"]["cost"], spent["line"]["currency"]) == ("0.012346", "USD")
    assert (spent["line"]["input_tokens"], spent["line"]["output_tokens"]) == (1500, 200)
    assert (spent["claude"]["cost"], spent["claude"]["currency"]) == ("0.104579", "USD")
    assert (spent["claude"]["input_tokens"], spent["claude"]["output_tokens"]) == (2 + 7924 + 13368, 9)
    assert logged[ids["claude"]]["model"] == "claude-sonnet-4-5" and logged[ids["line"]]["model"] == "tiny-1"
    # Nothing said: the wall time alone; the cost and tokens stay unknown.
    none = spent["none"]
    assert (none["cost"], none["currency"], none["input_tokens"], none["output_tokens"]) == (None, None, None, None)
    for tid in ids.values():  # the usage lines never hid the verb line
        assert live.admin("GET", f"/v1/tasks/{tid}", expect=200)["stage"] == "review"


ONE_STEP = {
    "key": "one-step",
    "stages": [{"key": "write", "initial": True, "lease_seconds": 30}, {"key": "done", "terminal": True}],
    "transitions": [{"from": "write", "to": "done", "kind": "advance", "required_features": ["role:dev"]}],
}


async def test_runner_takes_its_next_task_with_the_advance(fleet: Fleet) -> None:
    # One call per task: after the first claim, each advance claims the slot's next task (`next`), and the
    # last one asks for nothing (--max-tasks), so the runner stops holding nothing.
    live = fleet.live
    lane = "chain"
    creator = _setup(live, lane, ONE_STEP)
    ids = [_create(live, creator, lane, f"step {i}") for i in range(3)]
    dev = live.mint(f"dev-{lane}")
    r = await fleet.start("chain", dev["token"], 'echo \'{"verb": "advance", "to": "done"}\'\n', "--lane", lane,
                          "--max-tasks", "3")
    assert await asyncio.wait_for(r.proc.wait(), LIMIT) == 0
    await asyncio.wait_for(r.reader, LIMIT)
    claimed = [e for e in r.events if e["event"] == "claimed"]
    assert [e["task"] for e in claimed] == ids
    assert [e["via"] for e in claimed] == ["claim", "next", "next"]
    assert all(live.admin("GET", f"/v1/tasks/{t}", expect=200)["state"] == "done" for t in ids)
    assert not [e for e in r.events if e["event"] == "released"]
