"""Scale-out: the claim→advance cycle through 1, 2 and 4 API processes on one database.

    .venv/bin/python -m bench.scale                                  # 1, 2, 4 processes, 32 agents, 15 s each
    .venv/bin/python -m bench.scale --processes 1,2,4,8 --agents 64 --load-processes 2
    .venv/bin/python -m bench.run --only scale                       # the same, inside the bench suite

Each API process is a separate `ainarres serve` on its own port (as compose's replicas, or `serve
--workers`, run them); the agents are spread over the processes round-robin, as Caddy's balancing does.
For every process count it prints cycles/s and where the CPU went per cycle: each API process, all of
PostgreSQL's processes, the load generator, and how idle the machine stayed. CPU per cycle is the figure
that transfers to another machine: cores needed for R cycles/s ≈ R × (CPU seconds per cycle) per
component, as long as that component is not waiting on another. On a machine with fewer cores than
API processes + PostgreSQL + load generator the processes share cores and the rate stops growing: the
CPU figures are what to read there (docs/scaling.md).

Benchmarks and the test suite must not share the cores: run this with nothing else running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from typing import Any

from bench import harness
from bench import run as suite
from bench.load import WARMUP_SECONDS, run_in_process


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n) if items[i::n]]


def measure(dsn: str, first: harness.Service, *, processes: list[int], agents: int, seconds: float,
            cycle_backlog: int, pool_max: int, load_processes: int, results: dict[str, Any]) -> None:
    """The cycle at each process count in `processes` (the first service is reused; more are started)."""
    lane = suite._cycle_lane(dsn, first, argparse.Namespace(cycle_backlog=cycle_backlog), keep=True)
    tokens = asyncio.run(harness.mint(dsn, "w_cyc", agents))
    services = [first]
    try:
        for n in processes:
            while len(services) < n:
                services.append(harness.start_service(dsn, pool_max=pool_max))
            active = services[:n]
            bases = [s.base for s in active]
            asyncio.run(suite._checkpoint(dsn))
            before = set(suite._pids(sys.executable))
            # Each load process spreads its agents over every API process, starting at a different one.
            futures = [
                run_in_process("cycle_http", base=bases[k % n], more_bases=tuple(bases[(k + 1) % n:] + bases[:k % n]),
                               tokens=group, lane=lane, seconds=seconds)
                for k, group in enumerate(_chunks(tokens, load_processes))
            ]
            time.sleep(WARMUP_SECONDS + min(2.0, seconds / 5))  # past the warm-up and the start of counting
            load = [p for p in suite._pids(sys.executable) if p not in before]
            pg = suite._pids("postgres")
            api0 = [suite._cpu_seconds([s.proc.pid]) for s in active]
            pg0, ld0, (all0, idle0), t0 = (suite._cpu_seconds(pg), suite._cpu_seconds(load), suite._idle(),
                                           time.monotonic())
            time.sleep(seconds * 0.6)
            api1 = [suite._cpu_seconds([s.proc.pid]) for s in active]
            pg1, ld1, (all1, idle1), t1 = (suite._cpu_seconds(pg), suite._cpu_seconds(load), suite._idle(),
                                           time.monotonic())
            runs = [f.result() for f in futures]
            rate = sum(r["cycles"] for r in runs) / max(r["elapsed"] for r in runs)
            cycles = rate * (t1 - t0)  # cycles completed inside the CPU window, at the run's mean rate
            per_api = [round(1000 * (b - a) / cycles, 3) for a, b in zip(api0, api1, strict=True)]
            api_total = sum(b - a for a, b in zip(api0, api1, strict=True))
            suite._out("scale", {
                "api_processes": n,
                "agents": agents,
                "load_processes": len(runs),
                "cycles_per_s": round(rate, 1),
                "cycle": harness.summary([x for r in runs for x in r["cycle_lat"]]),
                "empty_claims": sum(r["empties"] for r in runs),
                "cpu_ms_per_cycle": {
                    "api_each": per_api,
                    "api_total": round(1000 * api_total / cycles, 3),
                    "postgres": round(1000 * (pg1 - pg0) / cycles, 3),
                    "load_generator": round(1000 * (ld1 - ld0) / cycles, 3),
                },
                # Cores busy during the window, per component (CPU seconds per second).
                "cores_busy": {
                    "api_total": round(api_total / (t1 - t0), 2),
                    "postgres": round((pg1 - pg0) / (t1 - t0), 2),
                    "load_generator": round((ld1 - ld0) / (t1 - t0), 2),
                },
                "machine_idle": round((idle1 - idle0) / (all1 - all0), 2),
            }, results)
    finally:
        for s in services[1:]:
            s.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
                   help="API process counts to measure, in order (default 1,2,4)")
    p.add_argument("--agents", type=int, default=32, help="concurrent agents (claim, advance, repeat)")
    p.add_argument("--load-processes", type=int, default=1,
                   help="load generator processes (raise it where one saturates its core)")
    p.add_argument("--seconds", type=float, default=15, help="length of each timed run")
    p.add_argument("--cycle-backlog", type=int, default=10_000)
    p.add_argument("--pool-max", type=int, default=20, help="AINARRES_POOL_MAX_SIZE of each process")
    args = p.parse_args()

    dsn, server = harness.start_postgres()
    first = harness.start_service(dsn, pool_max=args.pool_max)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args),
    }
    try:
        asyncio.run(harness.world(dsn, first.base))
        measure(dsn, first, processes=args.processes, agents=args.agents, seconds=args.seconds,
                cycle_backlog=args.cycle_backlog, pool_max=args.pool_max, load_processes=args.load_processes,
                results=results)
    finally:
        first.stop()
        (harness.ROOT / "scale.json").write_text(json.dumps(results, indent=1, default=str))
    del server


if __name__ == "__main__":
    main()
