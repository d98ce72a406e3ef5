"""`serve --workers` after a key rotation (docs/operations.md: "replicas still running with the old one keep
serving until they restart, and a restart with the old key is refused"), as a review probed it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.acceptance.live_server import run_ainarres
from tests.acceptance.test_replicas import Proc, _workers_of, database  # noqa: F401 (the fixture)

SECRET_B = "a-second-secret-of-at-least-32-bytes-987654321"


def test_a_worker_restarted_after_a_rotation_is_not_restarted_forever(database: str, tmp_path: Path) -> None:  # noqa: F811
    """A worker checks the key only in its lifespan (serving._worker calls check_schema(dsn) without settings):
    KeyMismatch there is uvicorn's "Application startup failed" with a traceback, exit 3, and the supervisor
    starts it again — every second, for ever, as long as the supervisor runs (a schema refusal, by contrast, has
    its own exit status and stops every worker)."""
    proc = Proc(database, tmp_path / "w", AINARRES_WORKERS="2", AINARRES_DRAIN_SECONDS="5")
    proc.start()
    try:
        assert proc.proc is not None
        workers = _workers_of(proc.proc.pid)
        assert len(workers) == 2, workers
        env = {**proc.env, "AINARRES_JWT_SECRET": SECRET_B}
        rotated = run_ainarres(["token", "--family", "admin", "--rotate-key"], env)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        os.kill(workers[0], signal.SIGKILL)  # a worker dies (OOM, a crash): the supervisor starts it again
        try:
            proc.wait(20)  # what a refused start should lead to: the supervisor stops, saying why
        except subprocess.TimeoutExpired:
            pass
        log = proc.log()
        restarts = log.count("starting it again")
        tracebacks = log.count("Traceback")
        assert proc.proc.poll() is not None and restarts <= 1, (
            f"the supervisor is still running after 20 s and started a refused worker {restarts} times "
            f"({tracebacks} tracebacks in its log):\n{log[-3000:]}")
    finally:
        proc.stop()
        time.sleep(0.1)
