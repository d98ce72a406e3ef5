"""Shared plumbing for the benchmarks: a PostgreSQL, the service as a user starts it, a world, agents.

Not a test: nothing here asserts. Data lives under /tmp. The service runs in its own process
(`python -m ainarres_api serve`, uvicorn + uvloop) on 127.0.0.1; load generators run in other
processes and speak real HTTP to it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from pydantic import SecretStr

from ainarres_api.ops import embedded
from ainarres_api.server.services import auth
from ainarres_api.server.services.auth import Signer
from ainarres_api.server.settings import Settings

SECRET = "bench-secret-" + "x" * 40
ROOT = Path(os.environ.get("AINARRES_BENCH_DIR", "/tmp/ainarres-bench"))

# A workflow whose tasks never finish: a → b → a …, so a claim+advance cycle keeps the backlog constant.
LOOP = {
    "key": "loop",
    "stages": [
        {"key": "a", "initial": True, "lease_seconds": 300},
        {"key": "b", "lease_seconds": 300},
        {"key": "done", "terminal": True},
    ],
    "transitions": [
        {"from": "a", "to": "b", "kind": "advance", "required_features": ["role:worker"]},
        {"from": "b", "to": "a", "kind": "advance", "required_features": ["role:worker"]},
        {"from": "b", "to": "done", "kind": "advance", "required_features": ["role:worker"]},
    ],
}
# todo → review by workers; review belongs to a role nobody in the benchmarks has.
HANDOFF = {
    "key": "handoff",
    "stages": [{"key": "todo", "initial": True}, {"key": "review"}, {"key": "done", "terminal": True}],
    "transitions": [
        {"from": "todo", "to": "review", "kind": "advance", "required_features": ["role:worker"]},
        {"from": "review", "to": "done", "kind": "advance", "required_features": ["role:reviewer"]},
    ],
}
LANES = {"cyc": "loop", "big": "loop", "lp": "handoff", "mk": "handoff"}


def settings() -> Settings:
    return Settings(jwt_secret=SecretStr(SECRET))


def start_postgres() -> tuple[str, Any]:
    """The embedded PostgreSQL (server settings from ainarres_api.ops.embedded), data under ROOT."""
    ROOT.mkdir(parents=True, exist_ok=True)
    server = embedded.start(ROOT)
    dsn = asyncio.run(embedded.ensure_database(server, "bench"))
    return dsn, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    base: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_service(dsn: str, *, pool_max: int = 20, extra_env: dict[str, str] | None = None) -> Service:
    """`ainarres serve` in a subprocess, as an operator would start it; returns once /healthz answers."""
    port = free_port()
    env = {
        **os.environ,
        "AINARRES_DATABASE_URL": dsn,
        "AINARRES_JWT_SECRET": SECRET,
        "AINARRES_POOL_MAX_SIZE": str(pool_max),
        "AINARRES_LOG_LEVEL": "warning",
        # A load generator is one client hammering the API: the per-agent rate limit would measure itself.
        # BENCH_RATE_LIMIT_PER_SECOND=200 runs with the service's default, to measure what the limit costs.
        "AINARRES_RATE_LIMIT_PER_SECOND": os.environ.get("BENCH_RATE_LIMIT_PER_SECOND", "0"),
        **(extra_env or {}),
    }
    log = open(ROOT / f"service-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ainarres_api", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return Service(proc, base)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited; see {log.name}")
        time.sleep(0.2)
    raise RuntimeError("the service did not become healthy")


async def mint(dsn: str, family: str, n: int) -> list[str]:
    """n new agents of a family (tokens minted straight in the database, as `ainarres token` does)."""
    signer = Signer(settings())
    conn = await asyncpg.connect(dsn)
    try:
        return [(await auth.mint(conn, signer, family=family, ttl_seconds=86400))["token"] for _ in range(n)]
    finally:
        await conn.close()


async def world(dsn: str, base: str) -> None:
    """Features, workflows, lanes and one worker family per lane (idempotent)."""
    admin = (await mint(dsn, "admin", 1))[0]
    h = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=base, headers=h, timeout=60) as c:
        for f in ("role:worker", "role:reviewer", "capability:gpu"):
            await c.post("/v1/features", json={"name": f})
        have = {w["key"] for w in (await c.get("/v1/workflows")).json().get("items", [])}
        for wf in (LOOP, HANDOFF):
            if wf["key"] not in have:
                r = await c.post("/v1/workflows", json=wf)
                r.raise_for_status()
        await c.post("/v1/projects", json={"slug": "bench"})
        for lane, wf_key in LANES.items():
            await c.post("/v1/lanes", json={"project": "bench", "key": lane, "workflow": wf_key})
            await c.post(
                "/v1/families", json={"key": f"w_{lane}", "features": [f"lane:{lane}", "role:worker"]}
            )


async def reset_lane(dsn: str, lane: str) -> None:
    """Take every task of a lane out of play (terminal), so each run starts from a known backlog."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "UPDATE tasks t SET state = 'done', route_id = NULL, holder = NULL, lease_id = NULL, "
            "lease_expires_at = NULL, held_since = NULL, blocked_reason = NULL "
            "FROM lanes l WHERE l.id = t.lane_id AND l.key = $1 AND t.state <> 'done'",
            lane,
        )
        await conn.execute("VACUUM ANALYZE tasks")
    finally:
        await conn.close()


async def seed(dsn: str, template_id: str, n: int, priority: int) -> None:
    """n more ready tasks exactly like a template task (same lane, stage, route, required features)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO tasks (lane_id, stage_id, route_id, state, title, priority, required_features, "
            "created_by, available_at) "
            "SELECT lane_id, stage_id, route_id, 'ready', 'seeded', $3, required_features, created_by, "
            "       now() - make_interval(secs => g::float8 / 1000) "
            "  FROM tasks, generate_series(1, $2) g WHERE id = $1::uuid",
            template_id,
            n,
            priority,
        )
    finally:
        await conn.close()


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(lat_s: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(lat_s, 50) * 1000, 2),
        "p99_ms": round(pct(lat_s, 99) * 1000, 2),
        "mean_ms": round(statistics.fmean(lat_s) * 1000, 2) if lat_s else float("nan"),
    }


async def connections(dsn: str) -> dict[str, int]:
    """Backends connected to the benchmark database: all of them, and those running a statement."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS total, count(*) FILTER (WHERE state = 'active') AS active "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return {"total": row["total"], "active": row["active"]}
    finally:
        await conn.close()
