"""A real `ainarres serve` in a subprocess, for tests that drive the CLI and the runner as processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ainarres_api.ops import embedded

AINARRES = [sys.executable, "-m", "ainarres_api"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AINARRES_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AINARRES_")}
    env.update(extra)
    return env


def clone_database(pg_server: Any, template: str) -> str:
    """A fresh database cloned from the migrated template (as the `dsn` fixture makes them)."""
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def make() -> None:
        conn = await asyncpg.connect(embedded.admin_uri(pg_server))
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        finally:
            await conn.close()

    asyncio.run(make())
    return embedded.database_uri(pg_server, name)


@dataclass
class Live:
    """A running service: its URL, the environment its processes share, and an admin HTTP client."""

    url: str
    server_env: dict[str, str]
    admin_token: str
    http: httpx.Client
    proc: subprocess.Popen[bytes]
    made: set[str] = field(default_factory=set)

    def env(self, **extra: str) -> dict[str, str]:
        """An environment for an agent process: the URL and nothing else of AINARRES's."""
        return clean_env(AINARRES_URL=self.url, **extra)

    def admin(self, method: str, path: str, body: Any = None, expect: int | None = None) -> Any:
        auth = {"Authorization": f"Bearer {self.admin_token}"}
        r = self.http.request(method, path, json=body, headers=auth)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path} → {r.status_code} {r.text}"
        return r.json() if r.content else None

    def mint(self, family: str, **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = self.admin("POST", "/v1/tokens", {"family": family, **kw}, 201)
        return out

    def lane(self, key: str, workflow: dict[str, Any], families: dict[str, list[str]]) -> None:
        """A project, a lane `key` over `workflow`, and families whose features may name `{lane}`."""
        for f in {f for feats in families.values() for f in feats if not f.startswith("lane:")}:
            if f not in self.made:
                self.admin("POST", "/v1/features", {"name": f})
                self.made.add(f)
        if workflow["key"] not in self.made:
            self.admin("POST", "/v1/workflows", workflow, 201)
            self.made.add(workflow["key"])
        if "project" not in self.made:
            self.admin("POST", "/v1/projects", {"slug": "acme"}, 201)
            self.made.add("project")
        self.admin("POST", "/v1/lanes", {"project": "acme", "key": key, "workflow": workflow["key"]}, 201)
        for fam, feats in families.items():
            self.admin("POST", "/v1/families", {"key": fam, "features": feats}, 201)


def run_ainarres(args: list[str], env: dict[str, str], timeout: float = 60
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AINARRES, *args], env=env, capture_output=True, text=True, timeout=timeout)


def until_ready(url: str, proc: subprocess.Popen[bytes], log: Path, within: float = 60) -> None:
    """Wait until a child process answers 200 at `url` (it dying, or `within` seconds passing, fails)."""
    deadline = time.monotonic() + within
    with httpx.Client(timeout=5) as http:
        while True:  # readiness of a child process: nothing to wait on but its answer
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} did not become ready: {log.read_text(errors='replace')}"
            time.sleep(0.05)


@contextmanager
def serve(dsn: str, data_dir: Path) -> Iterator[Live]:
    """Start `ainarres serve` on a free port against `dsn`; stop it afterwards."""
    from tests.conftest import TEST_SECRET

    port = free_port()
    env = clean_env(AINARRES_DATABASE_URL=dsn, AINARRES_JWT_SECRET=TEST_SECRET,
                    AINARRES_DATA_DIR=str(data_dir),
                    AINARRES_POOL_MIN_SIZE="1", AINARRES_POOL_MAX_SIZE="8", AINARRES_LOG_LEVEL="warning")
    log = open(data_dir / "server.log", "wb")  # closed below
    proc = subprocess.Popen([*AINARRES, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=30)
    try:
        until_ready(f"{url}/healthz", proc, data_dir / "server.log")
        minted = run_ainarres(["token", "--family", "admin"], env)
        assert minted.returncode == 0, minted.stdout + minted.stderr
        token = json.loads(minted.stdout.strip().splitlines()[-1])["token"]
        yield Live(url, env, token, http, proc)
    finally:
        http.close()
        stop_process(proc)
        log.close()


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright (never a browser Playwright downloads), closed afterwards."""
    from playwright import sync_api as playwright_sync

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed (scripts/test installs Debian's package)")
    with playwright_sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--headless", "--no-sandbox", "--disable-gpu",
                                     "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()
