"""How `ainarres serve` runs the app: a uvicorn server that drains on SIGTERM, and, with `--workers N`, a
supervisor of N such processes on one socket (docs/operations.md "Several processes", ADR 0018)."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from multiprocessing.connection import wait as wait_for_processes
from types import FrameType
from typing import Any

import uvicorn

from ainarres_api.server.drain import Drain

log = logging.getLogger("ainarres.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain before its shutdown: on the first SIGTERM or SIGINT the app's `Drain` begins
    (readiness 503, new requests refused with a retryable 503, waiting claims answered, streams ended) while
    the listener stays open; once no request is in flight, or `drain_seconds` pass, uvicorn shuts down as
    usual (listener closed, connections closed, lifespan ended) and the process exits 0. A second signal
    forces the exit, as in uvicorn."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None
        self._signalled = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        settle_heap()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or self._loop is None:  # a second signal, or one before serving: uvicorn's way
            if self._loop is None and not self._signalled:
                self._signalled = True
                self.should_exit = True  # not re-raised afterwards: a clean exit
                return
            super().handle_exit(sig, frame)
            self.force_exit = True
            return
        self._signalled = True
        self._loop.call_soon_threadsafe(self._begin)

    def _begin(self) -> None:
        self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.drain.begin()
        if not await self.drain.settled(self.drain_seconds):
            log.warning("drain: %d request(s) still in flight after %gs; they are cut", self.drain.in_flight,
                        self.drain_seconds)
        # What is left (probes, a request that arrived meanwhile) gets the rest of the bound, at least a second.
        self.config.timeout_graceful_shutdown = max(1, round(self.drain_seconds - (loop.time() - began)))
        self.should_exit = True


# CPython collects its young generation after 700 net allocations of container objects; a verb allocates
# hundreds, nearly all freed by reference counting as it answers, so under load the collector ran every few
# requests and walked every in-flight request's objects each time. With the start-up heap frozen and the
# young generation collected every 20 000 allocations the service spent 2.45 ms of CPU per claim+advance
# cycle instead of 2.96 (means of six interleaved pairs of runs, 16 agents; docs/performance.md, 2026-12-04);
# either change alone gained less, and 5 000 or 100 000 did worse than 20 000. The cycles a request leaves
# (exceptions and their tracebacks, mostly) wait a little longer to be freed.
YOUNG_GENERATION_THRESHOLD = 20_000


def settle_heap() -> None:
    """Once the app has started: what start-up built (routes, models, the OpenAPI schema, the pool) lives as
    long as the process, so it is moved out of the cyclic collector's sight (gc.freeze), and the young
    generation is collected less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def serve_app(app: Any, config_kwargs: dict[str, Any], sockets: list[socket.socket], drain_seconds: float) -> bool:
    """Run `app` on `sockets` until SIGTERM/SIGINT has drained it; whether it started."""
    config = uvicorn.Config(app, timeout_graceful_shutdown=max(1, round(drain_seconds)), **config_kwargs)
    server = DrainingServer(config, app.state.drain, drain_seconds)
    server.run(sockets=sockets)
    return bool(server.started)


# -- several processes ------------------------------------------------------------------------------

# A worker's exit status when it must not serve the database and starting it again would not help: a newer (or
# another) build migrated it, or its tokens carry another signing key (rotated while this server ran): the
# supervisor stops every worker and says why in one line.
SCHEMA_REFUSED_EXIT = 4


def _worker(sock: socket.socket, dsn: str, since_event: int, index: int) -> None:
    """One worker process (spawned): the app on the inherited socket, counting events from `since_event`."""
    from ainarres_api.ops import runtime
    from ainarres_api.server import limits, logs
    from ainarres_api.server.app import create_app
    from ainarres_api.server.db.migrate import SchemaRefused
    from ainarres_api.server.settings import Settings

    settings = Settings()
    logs.configure(settings.log_level, sys.stderr)
    try:  # a worker started again after a newer build migrated the database, or the key was rotated, must not serve
        asyncio.run(runtime.check_schema(dsn, settings))
    except SchemaRefused as exc:
        log.error("%s", exc)
        sys.exit(SCHEMA_REFUSED_EXIT)
    except runtime.Unstartable as exc:
        if exc.code != "key_mismatch":  # the database out of reach: started again, as any worker that died
            raise
        log.error("%s", exc)
        sys.exit(SCHEMA_REFUSED_EXIT)
    app = create_app(settings, dsn=dsn, bootstrap=False)
    app.state.metrics.start(since_event)
    kwargs = dict(loop="uvloop", log_level=settings.log_level, access_log=False, log_config=None,
                  **limits.uvicorn_options(settings))
    started = serve_app(app, kwargs, [sock], settings.drain_seconds)
    sys.exit(0 if started else 3)


def supervise(sock: socket.socket, dsn: str, since_event: int, workers: int, metrics_dir: str | None) -> int:
    """Run `workers` worker processes on `sock` until SIGTERM or SIGINT, then drain them all; a worker that
    dies meanwhile is started again, unless it found the database migrated by a newer or another build (then
    every worker drains and SchemaRefused is raised). Exits 0 when every worker drained cleanly."""
    made_dir = None
    if metrics_dir is None:  # every worker writes its metrics here; any of them answers /metrics for all
        metrics_dir = made_dir = tempfile.mkdtemp(prefix="ainarres-metrics-")
    else:
        for entry in os.listdir(metrics_dir):  # a previous run's files would be summed in
            if entry.endswith(".db"):
                os.unlink(os.path.join(metrics_dir, entry))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    stopping = refused = False
    procs: dict[int, Any] = {}

    def start(index: int) -> None:
        p = ctx.Process(target=_worker, args=(sock, dsn, since_event, index), name=f"ainarres-worker-{index}")
        p.start()
        procs[index] = p

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        already = stopping
        stopping = True
        if signum == signal.SIGINT and not already:
            return  # a terminal's Ctrl-C reached every worker of the process group itself
        for p in procs.values():
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    rc = 0
    try:
        for i in range(workers):
            start(i)
        while procs:
            wait_for_processes([p.sentinel for p in procs.values()], timeout=1)
            for i, p in list(procs.items()):
                if p.is_alive():
                    continue
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(p.pid, metrics_dir)  # type: ignore[no-untyped-call]
                del procs[i]
                if stopping:
                    rc = rc or (p.exitcode or 0)
                elif p.exitcode == SCHEMA_REFUSED_EXIT:
                    # Starting it again would fail again, forever: every worker drains and the supervisor says why.
                    log.error("worker %d may not serve this database (a newer build's schema, or another signing "
                              "key); stopping every worker", i)
                    refused = True
                    on_signal(signal.SIGTERM, None)
                else:
                    log.warning("worker %d exited (%s); starting it again", i, p.exitcode)
                    start(i)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if made_dir is not None:
            shutil.rmtree(made_dir, ignore_errors=True)
    if refused:
        from ainarres_api.ops import runtime
        from ainarres_api.server.settings import Settings

        # Raises SchemaRefused or Unstartable (key_mismatch): the command's one line says which.
        asyncio.run(runtime.check_schema(dsn, Settings()))
        return 1
    return rc
