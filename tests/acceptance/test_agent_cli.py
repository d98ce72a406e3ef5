"""`ainarres agent …` as real processes against a real `ainarres serve`: one JSON line, exit 0/1/2."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.live_server import AINARRES, Live, clone_database, serve
from tests.helpers import DEV_WORKFLOW


@pytest.fixture(scope="module")
def live(pg_server: Any, template_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One server for the module, on its own database; each test works in its own lane."""
    with serve(clone_database(pg_server, template_db), tmp_path_factory.mktemp("server")) as s:
        yield s


class Agent:
    """One agent process identity: a token and a state directory."""

    def __init__(self, live: Live, token: str, sub: str, state: Path) -> None:
        self.live, self.token, self.sub, self.state = live, token, sub, state

    def run(self, *args: str, env: dict[str, str] | None = None, token: bool = True,
            timeout: float = 40) -> tuple[int, dict[str, Any]]:
        """Run `ainarres agent ARGS` and return (exit status, its one JSON line)."""
        e = env if env is not None else self.live.env(AINARRES_STATE_DIR=str(self.state))
        if token and "AINARRES_TOKEN" not in e:
            e = {**e, "AINARRES_TOKEN": self.token}
        p = subprocess.run([*AINARRES, "agent", *args], env=e, capture_output=True, text=True,
                           timeout=timeout)
        return p.returncode, one_line(p.stdout, p.stderr)

    def remembered(self) -> dict[str, dict[str, Any]]:
        d = self.state / self.sub
        return {f.stem: json.loads(f.read_text()) for f in d.glob("*.json")} if d.is_dir() else {}


def one_line(stdout: str, stderr: str = "") -> dict[str, Any]:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {stdout!r} (stderr {stderr[-2000:]!r})"
    out: dict[str, Any] = json.loads(lines[0])
    return out


class World:
    def __init__(self, live: Live, tmp: Path) -> None:
        self.live = live
        self.tmp = tmp
        self.lane = f"l{uuid.uuid4().hex[:8]}"
        live.lane(self.lane, DEV_WORKFLOW, {
            f"dev-{self.lane}": [f"lane:{self.lane}", "role:dev"],
            f"rev-{self.lane}": [f"lane:{self.lane}", "role:reviewer"],
        })

    def agent(self, role: str = "dev") -> Agent:
        tok = self.live.mint(f"{role}-{self.lane}")
        return Agent(self.live, tok["token"], tok["sub"], self.tmp / f"state-{tok['sub']}")


@pytest.fixture
def world(live: Live, tmp_path: Path) -> World:
    return World(live, tmp_path)


def test_create_claim_progress_heartbeat_advance_with_remembered_lease(world: World) -> None:
    dev = world.agent()
    rc, out = dev.run("create", "--lane", world.lane, "--title", "write it", "--payload", '{"n": 3}',
                      "--idempotency-key", "k1")
    assert rc == 0 and out["code"] == "created" and out["task"]["payload"] == {"n": 3}
    tid = out["task"]["id"]
    rc, again = dev.run("create", "--lane", world.lane, "--title", "write it", "--payload", '{"n": 3}',
                        "--idempotency-key", "k1")
    assert rc == 0 and again["code"] == "existing" and again["task"]["id"] == tid

    rc, c = dev.run("claim", "--lane", world.lane)
    assert rc == 0 and c["code"] == "claimed" and c["task"]["id"] == tid
    assert dev.remembered()[tid]["lease"] == c["lease"]["id"]

    # No task id and no lease on the command line: both come from the memory.
    rc, pr = dev.run("progress", "--note", "halfway", "--artifact", "file:src/x.py",
                     "--artifact", '{"type": "branch", "name": "feat/x"}')
    assert rc == 0 and pr["code"] == "ok" and pr["event"]["type"] == "progress"
    assert pr["event"]["data"]["artifacts"] == [{"type": "file", "path": "src/x.py"},
                                                {"type": "branch", "name": "feat/x"}]
    rc, hb = dev.run("heartbeat", tid)
    assert rc == 0 and hb["code"] == "ok" and hb["lease"]["id"] == c["lease"]["id"]
    assert dev.remembered()[tid]["expires_at"] == hb["lease"]["expires_at"]

    rc, shown = dev.run("show", tid, "--events")
    assert rc == 0 and shown["task"]["holder"] == dev.sub and shown["remembered_lease"] == c["lease"]["id"]
    assert [e["type"] for e in shown["events"]] == ["created", "claimed", "progress"]
    assert shown["context"]["project"]["slug"] and shown["card"]["stage"] == shown["task"]["stage"]
    assert "block" in shown["card"]["when_stuck"]
    rc, me = dev.run("me")
    assert rc == 0 and me["sub"] == dev.sub and [h["task"]["id"] for h in me["held"]] == [tid]
    assert me["remembered"] == [tid]

    rc, adv = dev.run("advance", "--to", "review", "--note", "done")
    assert rc == 0 and adv["task"]["stage"] == "review" and adv["task"]["holder"] is None
    assert dev.remembered() == {}  # the hold is over, so is the memory

    rc, usage = dev.run("advance", "--to", "review")
    assert rc == 2 and usage["code"] == "usage" and "claim" in usage["detail"]
    rc, lost = dev.run("advance", tid, "--lease", c["lease"]["id"], "--to", "done")
    assert rc == 1 and lost["code"] == "lease_lost" and lost["detail"]


def test_explicit_lease_wins_over_the_remembered_one(world: World) -> None:
    dev = world.agent()
    rc, out = dev.run("create", "--lane", world.lane, "--title", "t")
    tid = out["task"]["id"]
    rc, c = dev.run("claim")
    assert rc == 0 and c["task"]["id"] == tid
    rc, lost = dev.run("progress", tid, "--lease", str(uuid.uuid4()), "--note", "n")
    assert rc == 1 and lost["code"] == "lease_lost" and lost["task"]["id"] == tid
    # A wrong explicit lease leaves the remembered one alone.
    assert dev.remembered()[tid]["lease"] == c["lease"]["id"]
    rc, ok = dev.run("progress", "--note", "still mine")
    assert rc == 0 and ok["code"] == "ok"

    # A second agent never sees the first one's memory, even sharing the state directory.
    other = world.agent()
    other.state = dev.state
    rc, none = other.run("release", tid)
    assert rc == 2 and none["code"] == "usage"


def test_reject_release_block_unblock_and_refusals(world: World) -> None:
    dev, rev = world.agent(), world.agent("rev")
    rc, out = dev.run("create", "--lane", world.lane, "--title", "t")
    tid = out["task"]["id"]
    dev.run("claim")
    rc, illegal = dev.run("advance", "--to", "done")
    assert rc == 1 and illegal["code"] == "illegal_transition" and "review" in illegal["detail"]
    assert tid in dev.remembered()  # a refusal changes nothing, memory included
    rc, _ = dev.run("advance", "--to", "review")
    assert rc == 0

    rc, c = rev.run("claim", "--lane", world.lane)
    assert rc == 0 and c["task"]["id"] == tid
    rc, again = rev.run("claim")
    assert rc == 1 and again["code"] == "already_holding"
    rc, rj = rev.run("reject", "--to", "todo", "--reason", "tests fail")
    assert rc == 0 and rj["task"]["stage"] == "todo" and rj["task"]["rework_count"] == 1

    dev.run("claim")
    rc, rel = dev.run("release", "--reason", "need a break")
    assert rc == 0 and rel["task"]["attempts"] == 1 and dev.remembered() == {}

    dev.run("claim")
    rc, blk = dev.run("block", "--reason", "needs a human")
    assert rc == 0 and blk["task"]["state"] == "blocked" and blk["task"]["blocked_reason"] == "needs a human"
    rc, empty = dev.run("claim")
    assert rc == 0 and empty["code"] == "empty" and empty["task"] is None
    rc, ub = dev.run("unblock", tid, "--note", "fixed the env")
    assert rc == 0 and ub["task"]["state"] == "ready"
    rc, twice = dev.run("unblock", tid)
    assert rc == 1 and twice["code"] == "conflict"
    rc, nf = dev.run("show", str(uuid.uuid4()))
    assert rc == 1 and nf["code"] == "not_found"


def test_claim_waits_for_work(world: World) -> None:
    dev = world.agent()
    rc, empty = dev.run("claim", "--lane", world.lane, "--wait", "0.3")
    assert rc == 0 and empty["code"] == "empty"
    env = world.live.env(AINARRES_STATE_DIR=str(dev.state), AINARRES_TOKEN=dev.token)
    waiting = subprocess.Popen([*AINARRES, "agent", "claim", "--lane", world.lane, "--wait", "30"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rc, out = world.agent().run("create", "--lane", world.lane, "--title", "arrives later")
        assert rc == 0
        stdout, stderr = waiting.communicate(timeout=40)
    finally:
        waiting.kill()
    got = one_line(stdout, stderr)
    assert waiting.returncode == 0 and got["code"] == "claimed" and got["task"]["id"] == out["task"]["id"]
    assert dev.remembered()[out["task"]["id"]]["lease"] == got["lease"]["id"]


def first_beat(agent: Agent, tid: str, before: str) -> None:
    """Wait (bounded) until a background watch has beaten once: it renews the remembered lease's expiry
    (`before`: the remembered expiry when the watch was started)."""
    deadline = time.monotonic() + 40
    while agent.remembered().get(tid, {}).get("expires_at") in (before, None):
        assert time.monotonic() < deadline, "the watch never beat"
        time.sleep(0.05)


def test_heartbeat_watch_is_bounded_and_ends_cleanly_when_the_agent_moves_the_task_on(world: World) -> None:
    dev = world.agent()
    dev.run("create", "--lane", world.lane, "--title", "t")
    rc, c = dev.run("claim")
    tid = c["task"]["id"]
    rc, w = dev.run("heartbeat", "--watch", "--interval", "0.2", "--max", "0.9")
    assert rc == 0 and w["code"] == "ok" and w["stopped"] == "bound" and w["beats"] >= 2
    assert w["lease"]["id"] == c["lease"]["id"]

    # As the README runs it: a watch in the background on the remembered hold, then the same agent
    # advances the task. The hold ended the normal way: exit 0, a clear `ended` line, not a failure.
    env = world.live.env(AINARRES_STATE_DIR=str(dev.state), AINARRES_TOKEN=dev.token)
    before = dev.remembered()[tid]["expires_at"]
    watcher = subprocess.Popen([*AINARRES, "agent", "heartbeat", "--watch", "--interval", "60", "--max", "1800"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_beat(dev, c["task"]["id"], before)
        rc, adv = dev.run("advance", "--to", "review", "--artifact", "branch:feat/x")
        assert rc == 0 and adv["task"]["stage"] == "review"
        stdout, stderr = watcher.communicate(timeout=40)
    finally:
        watcher.kill()
    out = one_line(stdout, stderr)
    assert watcher.returncode == 0, out
    assert out["code"] == "ended" and out["watched"] is True, out
    assert out["event"]["type"] == "transition" and out["event"]["actor"] == dev.sub, out
    assert "advanced the task to review" in out["detail"], out
    assert dev.remembered() == {}

    # The same for a release by this agent, with an explicit task and lease.
    rc, c = dev.run("claim", "--lane", world.lane)
    assert rc == 0 and c["code"] == "empty"
    rc, _ = dev.run("create", "--lane", world.lane, "--title", "u")
    rc, c = dev.run("claim")
    tid = c["task"]["id"]
    before = dev.remembered()[tid]["expires_at"]
    watcher = subprocess.Popen([*AINARRES, "agent", "heartbeat", tid, "--lease", c["lease"]["id"], "--watch",
                                "--interval", "0.2", "--max", "120"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        first_beat(dev, c["task"]["id"], before)
        rc, _ = dev.run("release", "--reason", "handing over")
        assert rc == 0
        stdout, stderr = watcher.communicate(timeout=40)
    finally:
        watcher.kill()
    out = one_line(stdout, stderr)
    assert watcher.returncode == 0 and out["code"] == "ended" and out["event"]["type"] == "released", out
    assert "released the task" in out["detail"], out


def test_heartbeat_watch_still_fails_when_someone_else_takes_the_task(world: World) -> None:
    import asyncio

    import asyncpg

    dev, other = world.agent(), world.agent()
    dev.run("create", "--lane", world.lane, "--title", "t")
    rc, c = dev.run("claim")
    tid = c["task"]["id"]
    env = world.live.env(AINARRES_STATE_DIR=str(dev.state), AINARRES_TOKEN=dev.token)
    before = dev.remembered()[tid]["expires_at"]
    watcher = subprocess.Popen([*AINARRES, "agent", "heartbeat", "--watch", "--interval", "0.5", "--max", "120"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_beat(dev, c["task"]["id"], before)

        async def expire() -> None:  # as if the lease had run out: the next claim recovers the task
            conn = await asyncpg.connect(world.live.server_env["AINARRES_DATABASE_URL"])
            try:
                await conn.execute("UPDATE tasks SET lease_expires_at = now() - interval '1 second' "
                                   "WHERE id = $1", uuid.UUID(tid))
            finally:
                await conn.close()

        asyncio.run(expire())
        rc, taken = other.run("claim", "--lane", world.lane)
        assert rc == 0 and taken["task"]["id"] == tid, taken
        stdout, stderr = watcher.communicate(timeout=40)
    finally:
        watcher.kill()
    out = one_line(stdout, stderr)
    assert watcher.returncode == 1 and out["code"] == "lease_lost" and out["watched"] is True, out
    assert dev.remembered() == {}

    rc, stale = dev.run("heartbeat", tid, "--lease", c["lease"]["id"], "--watch", "--max", "5")
    assert rc == 1 and stale["code"] == "lease_lost" and stale["beats"] == 0


def test_token_precedence(world: World, tmp_path: Path) -> None:
    dev = world.agent()
    bad = "not-a-token"
    good_file = tmp_path / "good.token"
    good_file.write_text(dev.token + "\n")
    bad_file = tmp_path / "bad.token"
    bad_file.write_text(bad)
    env = world.live.env(AINARRES_STATE_DIR=str(dev.state))

    def me(*args: str, **extra: str) -> tuple[int, dict[str, Any]]:
        return dev.run("me", *args, env={**env, **extra}, token=False)

    rc, out = me("--token", dev.token, AINARRES_TOKEN=bad)
    assert rc == 0 and out["sub"] == dev.sub  # an argument beats the environment
    rc, out = me("--token", bad, AINARRES_TOKEN=dev.token)
    assert rc == 1 and out["code"] == "unauthenticated"  # ... even when the argument is wrong
    rc, out = me("--token-file", str(good_file), AINARRES_TOKEN=bad)
    assert rc == 0 and out["sub"] == dev.sub  # a file named on the command line is an argument too
    rc, out = me(AINARRES_TOKEN=dev.token, AINARRES_TOKEN_FILE=str(bad_file))
    assert rc == 0 and out["sub"] == dev.sub  # the token beats a token file
    rc, out = me(AINARRES_TOKEN_FILE=str(good_file))
    assert rc == 0 and out["sub"] == dev.sub

    # A named file that cannot be read is an error, never a reason to use another token.
    rc, out = me("--token-file", str(tmp_path / "missing"), AINARRES_TOKEN=dev.token)
    assert rc == 2 and out["code"] == "usage" and "missing" in out["detail"]
    rc, out = me(AINARRES_TOKEN_FILE=str(tmp_path))  # a directory
    assert rc == 2 and out["code"] == "usage"
    # (the remaining rules — empty file, no token, both arguments — are unit-tested in test_client.py)


def test_usage_and_transport_errors_are_exit_2(world: World) -> None:
    dev = world.agent()
    rc, out = dev.run("advance", str(uuid.uuid4()), "--lease", str(uuid.uuid4()))  # no --to
    assert rc == 2 and out["code"] == "usage" and "--to" in out["detail"]
    rc, out = dev.run("create", "--lane", world.lane, "--title", "t", "--payload", "{not json")
    assert rc == 2 and out["code"] == "usage" and "--payload" in out["detail"]
    rc, out = dev.run("me", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert rc == 2 and out["code"] == "unreachable"
    rc, out = dev.run("create", "--lane", "no-such-lane", "--title", "t")
    assert rc == 1 and out["code"] == "not_eligible"
