"""Load generators. Each runs in its own process (see `run_in_process`) so its CPU is not the service's.

HTTP generators use httpx over keep-alive connections; the raw generator calls the very service
functions the HTTP handlers call (identical SQL, authentication included) over asyncpg with no HTTP.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import random
import time
import uuid
from typing import Any

import httpx

NEXT = {"a": "b", "b": "a"}


def run_in_process(fn_name: str, **kwargs: Any) -> concurrent.futures.Future[Any]:
    """Run one of this module's async generators in a fresh process; returns a future of its result."""
    ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    fut = ex.submit(_entry, fn_name, kwargs)
    ex.shutdown(wait=False)
    return fut


def _entry(fn_name: str, kwargs: dict[str, Any]) -> Any:
    import uvloop

    return uvloop.run(globals()[fn_name](**kwargs))


class _Reply:
    __slots__ = ("content", "status_code")

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return _loads(self.content)


class LiteClient:
    """A minimal HTTP/1.1 keep-alive client (POST with a JSON body, Content-Length or chunked replies).

    The load generator shares the machine's cores with the service and PostgreSQL; httpx spends
    about 1.5–2 ms of CPU per request, which on 2 cores is CPU taken from the service under test.
    This client spends a fraction of that, so the figures measure the service rather than the
    client. Real HTTP all the same: a TCP connection per concurrent agent, kept alive.
    `BENCH_HTTP_CLIENT=httpx` uses httpx instead.
    """

    def __init__(self, base: str) -> None:
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._host_hdr = f"Host: {self.host}:{self.port}\r\n".encode()

    async def __aenter__(self) -> LiteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _, w in self._idle:
            w.close()
        self._idle.clear()

    async def post(self, path: str, json: Any = None, headers: dict[str, str] | None = None) -> _Reply:
        body = _dumps(json if json is not None else {})
        head = [b"POST ", path.encode(), b" HTTP/1.1\r\n", self._host_hdr,
                b"Content-Type: application/json\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        for k, v in (headers or {}).items():
            head += [k.encode(), b": ", v.encode(), b"\r\n"]
        head += [b"\r\n", body]
        request = b"".join(head)
        while True:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            r, w = conn
            try:
                w.write(request)
                first = await r.readuntil(b"\r\n\r\n")
                break
            except (asyncio.IncompleteReadError, ConnectionError):
                w.close()
                if not reused:  # a fresh connection failed: a real error
                    raise
                # the server closed this idle keep-alive connection meanwhile: send it again on another
        try:
            status_line, _, rest = first.partition(b"\r\n")
            status = int(status_line.split(b" ", 2)[1])
            length, chunked, close = None, False, False
            for line in rest.split(b"\r\n"):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                parts = []
                while True:
                    size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                    data = await r.readexactly(size + 2)
                    if size == 0:
                        break
                    parts.append(data[:-2])
                content = b"".join(parts)
            else:
                content = await r.readexactly(length or 0)
        except BaseException:
            w.close()
            raise
        if close:
            w.close()
        else:
            self._idle.append(conn)
        return _Reply(status, content)


try:
    import orjson

    _loads: Any = orjson.loads
    _dumps: Any = orjson.dumps
except ImportError:  # pragma: no cover - orjson is in the venv; stdlib json works too
    import json as _json

    _loads = _json.loads

    def _dumps(v: Any) -> bytes:
        return _json.dumps(v).encode()


def _client(base: str, n: int) -> Any:
    if os.environ.get("BENCH_HTTP_CLIENT", "lite") == "lite":
        return LiteClient(base)
    return httpx.AsyncClient(
        base_url=base,
        timeout=120,
        limits=httpx.Limits(max_connections=n + 16, max_keepalive_connections=n + 16),
    )


def _windows(stamps: list[float], start: float, width: float, seconds: float) -> list[int]:
    out = [0] * max(1, int(seconds // width))
    for s in stamps:
        i = int((s - start) // width)
        if 0 <= i < len(out):
            out[i] += 1
    return out


# Seconds each cycle generator runs before it starts counting: every pooled connection (the service's, the raw
# generator's) has then planned its statements (PostgreSQL plans a prepared statement six times on a new
# connection, ~5-8 ms each for the verbs', before it settles on a plan), so the figures are the steady state a
# running service is in, not its first seconds.
WARMUP_SECONDS = 3.0


async def cycle_http(
    base: str, tokens: list[str], lane: str, seconds: float, window: float = 10.0,
    more_bases: tuple[str, ...] = (), warmup: float = WARMUP_SECONDS, chained: bool = False,
) -> dict[str, Any]:
    """Each agent: claim, then advance what it got; for `seconds`, after `warmup` seconds not counted. Latencies
    per cycle and per claim.

    `chained`: the worker loop with one call per task, as the runner does it: each advance asks for the next
    claim (`next`), so a cycle is one request (its claim latency is the cycle's).

    With `more_bases` (other API processes on the same database) the agents are spread over all of
    them round-robin, as a load balancer would."""
    cycles: list[float] = []
    claims: list[float] = []
    stamps: list[float] = []
    empties = 0
    bases = (base, *more_bases)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_client(b, len(tokens))) for b in bases]
        start = time.perf_counter() + warmup
        stop = start + seconds

        async def chain(i: int, token: str) -> None:
            nonlocal empties
            c = clients[i % len(clients)]
            h = {"Authorization": f"Bearer {token}"}
            r: dict[str, Any] = {}
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if r.get("code") != "claimed":
                    r = (await c.post("/v1/claims", json={"lane": lane}, headers=h)).json()
                    empties += t0 >= start and r.get("code") != "claimed"
                    continue
                task = r["task"]
                a = await c.post(f"/v1/tasks/{task['id']}/advance", headers=h,
                                 json={"lease": r["lease"]["id"], "to": NEXT[task["stage"]], "next": {"lane": lane}})
                t1 = time.perf_counter()
                r = (a.json().get("next") or {}) if a.status_code == 200 else {}
                if a.status_code == 200 and t0 >= start:
                    cycles.append(t1 - t0)
                    claims.append(t1 - t0)
                    stamps.append(t1)
            if r.get("code") == "claimed":  # give back what the last `next` took, as a worker stopping does
                await c.post(f"/v1/tasks/{r['task']['id']}/release", headers=h, json={"lease": r["lease"]["id"]})

        async def agent(i: int, token: str) -> None:
            nonlocal empties
            c = clients[i % len(clients)]
            h = {"Authorization": f"Bearer {token}"}
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = (await c.post("/v1/claims", json={"lane": lane}, headers=h)).json()
                t1 = time.perf_counter()
                if r.get("code") != "claimed":
                    empties += t0 >= start
                    continue
                task = r["task"]
                a = await c.post(
                    f"/v1/tasks/{task['id']}/advance",
                    headers=h,
                    json={"lease": r["lease"]["id"], "to": NEXT[task["stage"]]},
                )
                t2 = time.perf_counter()
                if a.status_code == 200 and t0 >= start:
                    cycles.append(t2 - t0)
                    claims.append(t1 - t0)
                    stamps.append(t2)

        await asyncio.gather(*((chain if chained else agent)(i, t) for i, t in enumerate(tokens)))
        elapsed = time.perf_counter() - start
    return {
        "cycles": len(cycles),
        "elapsed": elapsed,
        "cycle_lat": cycles,
        "claim_lat": claims,
        "empties": empties,
        "windows": _windows(stamps, start, window, seconds),
    }


async def cycle_raw(dsn: str, tokens: list[str], lane: str, seconds: float, secret: str,
                    warmup: float = WARMUP_SECONDS, chained: bool = False) -> dict[str, Any]:
    """The same cycle through the service functions the HTTP handlers call, over asyncpg, one held
    connection per agent: no HTTP, no parsing, no routing. Counted after `warmup` seconds, as cycle_http
    (`chained`: as its chained loop, one authentication for the advance and the next claim)."""
    from pydantic import SecretStr

    from ainarres_api.server.db.pool import create_pool
    from ainarres_api.server.services import tasks
    from ainarres_api.server.services.auth import Signer, authenticate, identity
    from ainarres_api.server.services.tasks import Limits
    from ainarres_api.server.settings import Settings

    signer = Signer(Settings(jwt_secret=SecretStr(secret)))
    limits = Limits()
    pool = await create_pool(dsn, min_size=len(tokens), max_size=len(tokens))
    cycles: list[float] = []
    claims: list[float] = []
    empties = 0
    start = time.perf_counter() + warmup
    stop = start + seconds

    async def chain(token: str) -> None:
        nonlocal empties
        async with pool.acquire() as conn:
            r: dict[str, Any] = {}
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if r.get("code") != "claimed":
                    r, _ = await tasks.claim(conn, identity(signer, token), lane, limits)
                    empties += t0 >= start and r["code"] != "claimed"
                    continue
                task = r["task"]
                # What the advance route runs for a body with `next`: the token verified, the transition (which
                # reads the caller), the claim (which reads it again: ADR 0027).
                who = identity(signer, token)
                await tasks.transition(conn, who, uuid.UUID(task["id"]), uuid.UUID(r["lease"]["id"]), "advance",
                                       NEXT[task["stage"]], None, [])
                r, _ = await tasks.claim(conn, who, lane, limits)
                t1 = time.perf_counter()
                if t0 >= start:
                    cycles.append(t1 - t0)
                    claims.append(t1 - t0)
            if r.get("code") == "claimed":  # give back what the last claim took, as a worker stopping does
                await tasks.release(conn, await authenticate(conn, signer, token), uuid.UUID(r["task"]["id"]),
                                    uuid.UUID(r["lease"]["id"]), None)

    async def agent(token: str) -> None:
        nonlocal empties
        async with pool.acquire() as conn:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                # What these verbs' routes run (api/verbs.py): the token verified by the dependency, then the
                # verb's service call, whose statement reads the caller (ADR 0027).
                r, _ = await tasks.claim(conn, identity(signer, token), lane, limits)
                t1 = time.perf_counter()
                if r["code"] != "claimed":
                    empties += t0 >= start
                    continue
                task = r["task"]
                await tasks.transition(
                    conn,
                    identity(signer, token),
                    uuid.UUID(task["id"]),
                    uuid.UUID(r["lease"]["id"]),
                    "advance",
                    NEXT[task["stage"]],
                    None,
                    [],
                )
                t2 = time.perf_counter()
                if t0 >= start:
                    cycles.append(t2 - t0)
                    claims.append(t1 - t0)

    try:
        await asyncio.gather(*((chain if chained else agent)(t) for t in tokens))
    finally:
        await pool.close()
    return {
        "cycles": len(cycles),
        "elapsed": time.perf_counter() - start,
        "cycle_lat": cycles,
        "claim_lat": claims,
        "empties": empties,
    }


async def pickup(
    base: str,
    waiter_tokens: list[str],
    maker_token: str,
    lane: str,
    tasks_n: int,
    mean_gap: float,
    mode: str,
    dsn: str,
) -> dict[str, Any]:
    """Idle agents waiting for work (long-poll, or polling every 1 s); a producer creates tasks with
    exponential gaps. Latency runs from sending the create to an agent's claim returning the task."""
    sent: dict[str, float] = {}
    lat: list[float] = []
    claim_calls = 0
    done = asyncio.Event()
    conns_while_idle: dict[str, int] = {}
    async with _client(base, len(waiter_tokens) + 1) as c:

        async def agent(token: str) -> None:
            nonlocal claim_calls
            h = {"Authorization": f"Bearer {token}"}
            if mode == "poll":
                await asyncio.sleep(random.random())  # spread the pollers over the second
            while not done.is_set():
                body: dict[str, Any] = {"lane": lane}
                if mode == "wait":
                    body["wait_seconds"] = 30
                claim_calls += 1
                r = (await c.post("/v1/claims", json=body, headers=h)).json()
                now = time.perf_counter()
                if r.get("code") == "claimed":
                    tid = r["task"]["id"]
                    while tid not in sent:  # noqa: ASYNC110 - the create's response may not be read yet
                        await asyncio.sleep(0.001)
                    lat.append(now - sent[tid])
                    await c.post(
                        f"/v1/tasks/{tid}/advance",
                        headers=h,
                        json={"lease": r["lease"]["id"], "to": "review"},
                    )
                    if len(lat) >= tasks_n:
                        done.set()
                elif mode == "poll":
                    await asyncio.sleep(1.0)

        agents = [asyncio.create_task(agent(t)) for t in waiter_tokens]
        await asyncio.sleep(3 if len(waiter_tokens) < 100 else 10)  # let every agent settle into waiting
        from bench.harness import connections

        conns_while_idle = await connections(dsn)
        calls_before, t_idle = claim_calls, time.perf_counter()
        await asyncio.sleep(2)
        idle_claims_per_s = (claim_calls - calls_before) / (time.perf_counter() - t_idle)
        h = {"Authorization": f"Bearer {maker_token}"}
        for i in range(tasks_n):
            await asyncio.sleep(random.expovariate(1 / mean_gap))
            t0 = time.perf_counter()
            r = await c.post("/v1/tasks", json={"lane": lane, "title": f"p{i}"}, headers=h)
            sent[r.json()["task"]["id"]] = t0
        try:
            await asyncio.wait_for(done.wait(), 60)
        except TimeoutError:
            pass
        for a in agents:
            a.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
    return {"lat": lat, "conns_while_idle": conns_while_idle, "idle_claim_calls_per_s": idle_claims_per_s}


async def create_rate(
    base: str,
    tokens: list[str],
    lane: str,
    seconds: float,
    waiter_tokens: list[str] | None = None,
    waiter_lane: str | None = None,
) -> dict[str, Any]:
    """`tokens` writers create tasks as fast as they can, with optional long-poll waiters: on
    `waiter_lane` (default: the writers' lane, where they take what is created), waiting 30 s per
    claim. Waiters on another lane never claim what the writers create: their presence (the LISTEN
    connection, the wake hub, the sweeps) and the coalesced NOTIFY are all that the creates pay."""
    wlane = waiter_lane or lane
    settle = 3.0 if waiter_tokens else 0.0
    made = 0
    taken = 0
    lat: list[float] = []
    async with _client(base, len(tokens) + len(waiter_tokens or [])) as c:
        stop = time.perf_counter() + seconds + settle

        async def writer(token: str) -> None:
            nonlocal made
            h = {"Authorization": f"Bearer {token}"}
            await asyncio.sleep(settle)  # let the waiters settle into waiting first
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await c.post("/v1/tasks", json={"lane": lane, "title": "w"}, headers=h)
                if r.status_code == 201:
                    made += 1
                    lat.append(time.perf_counter() - t0)

        async def waiter(token: str) -> None:
            nonlocal taken
            h = {"Authorization": f"Bearer {token}"}
            while time.perf_counter() < stop:
                wait = min(30.0, stop - time.perf_counter())
                if wait <= 0.5:
                    break
                r = (await c.post("/v1/claims", json={"lane": wlane, "wait_seconds": wait}, headers=h)).json()
                if r.get("code") == "claimed":
                    taken += 1
                    await c.post(
                        f"/v1/tasks/{r['task']['id']}/advance",
                        headers=h,
                        json={"lease": r["lease"]["id"], "to": "review"},
                    )

        start = time.perf_counter()
        await asyncio.gather(*(writer(t) for t in tokens), *(waiter(t) for t in waiter_tokens or []))
        elapsed = time.perf_counter() - start - settle
    return {"created": made, "taken": taken, "elapsed": elapsed, "lat": lat}
