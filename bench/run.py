"""AINARRES benchmarks (not tests): run them all, or some, and print the figures.

    .venv/bin/python -m bench.run                       # everything, short durations
    .venv/bin/python -m bench.run --only cycle,backlog  # a subset
    .venv/bin/python -m bench.run --only sustained --sustained-seconds 300

Scenarios: cycle (claim+advance over HTTP vs the same service functions over asyncpg at 1/4/16/64
agents; and the one-call loop, where each advance claims the next task with `next`), cpu (CPU per cycle
of PostgreSQL, the service and the load generator, HTTP and raw),
replicas (the 16-agent cycle through two API processes, beside one and raw),
backlog (claim latency at 10k vs 1M backlog, 99 % of it needing a feature the agent lacks and
ranking first), sustained (throughput decay under churn), pickup (long-poll vs polling every 1 s
with 10 and 1,000 idle agents), create (32 writers, with and without waiters), pgqueuer (its own
tools/benchmark.py via bench/pgqueuer.sh), race (pgqueuer and the 16-agent worker loops interleaved over
rounds, the median ratio), pgbouncer (the cycle and pickup through PgBouncer), scale (the
cycle through --processes API processes with CPU per cycle per component; bench/scale.py).
Results are printed and written to $AINARRES_BENCH_DIR/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import harness
from bench.load import WARMUP_SECONDS, run_in_process


def _out(name: str, row: dict[str, Any], results: dict[str, Any]) -> None:
    results.setdefault(name, []).append(row)
    print(json.dumps({"bench": name, **row}), flush=True)


async def _template(base: str, token: str, lane: str, **fields: Any) -> str:
    async with httpx.AsyncClient(base_url=base, timeout=60) as c:
        r = await c.post(
            "/v1/tasks",
            json={"lane": lane, "title": "template", **fields},
            headers={"Authorization": f"Bearer {token}"},
        )
        r.raise_for_status()
        return str(r.json()["task"]["id"])


async def _checkpoint(dsn: str, *, everything: bool = False) -> None:
    """Before a timed run: the tasks table vacuumed and analysed (`everything`: every table, so that no
    autovacuum owed for an earlier run's churn, of events too, falls into the next), then a checkpoint."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE" if everything else "VACUUM ANALYZE tasks")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def _cycle_lane(dsn: str, svc: harness.Service, args: argparse.Namespace, *, keep: bool) -> str:
    """The cycle scenarios' lane with a backlog of --cycle-backlog ready tasks (`keep`: reuse one already
    there, as the scenarios after `cycle` do)."""
    lane = "cyc"
    if keep and asyncio.run(_ready_count(dsn, lane)):
        return lane
    asyncio.run(harness.reset_lane(dsn, lane))
    maker = asyncio.run(harness.mint(dsn, "w_cyc", 1))[0]
    tid = asyncio.run(_template(svc.base, maker, lane))
    asyncio.run(harness.seed(dsn, tid, args.cycle_backlog - 1, 0))
    return lane


def bench_cycle(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    lane = _cycle_lane(dsn, svc, args, keep=False)
    for n in args.agents:
        tokens = asyncio.run(harness.mint(dsn, "w_cyc", n))
        asyncio.run(_checkpoint(dsn))
        http = run_in_process(
            "cycle_http", base=svc.base, tokens=tokens, lane=lane, seconds=args.seconds
        ).result()
        asyncio.run(_checkpoint(dsn))
        raw = run_in_process(
            "cycle_raw", dsn=dsn, tokens=tokens, lane=lane, seconds=args.seconds, secret=harness.SECRET
        ).result()
        # The worker loop with one call per task: each advance asks for the next claim (`next`).
        asyncio.run(_checkpoint(dsn))
        http1 = run_in_process(
            "cycle_http", base=svc.base, tokens=tokens, lane=lane, seconds=args.seconds, chained=True
        ).result()
        asyncio.run(_checkpoint(dsn))
        raw1 = run_in_process(
            "cycle_raw", dsn=dsn, tokens=tokens, lane=lane, seconds=args.seconds, secret=harness.SECRET,
            chained=True,
        ).result()
        h_rate, r_rate = http["cycles"] / http["elapsed"], raw["cycles"] / raw["elapsed"]
        h1_rate, r1_rate = http1["cycles"] / http1["elapsed"], raw1["cycles"] / raw1["elapsed"]
        _out(
            "cycle",
            {
                "agents": n,
                "backlog": args.cycle_backlog,
                "http_next_cycles_per_s": round(h1_rate, 1),
                "raw_next_cycles_per_s": round(r1_rate, 1),
                "http_next_over_raw_next": round(h1_rate / r1_rate, 2) if r1_rate else None,
                "http_next": harness.summary(http1["cycle_lat"]),
                "http_cycles_per_s": round(h_rate, 1),
                "http": harness.summary(http["cycle_lat"]),
                "raw_cycles_per_s": round(r_rate, 1),
                "raw": harness.summary(raw["cycle_lat"]),
                "http_over_raw": round(h_rate / r_rate, 2) if r_rate else None,
                "http_empty_claims": http["empties"],
                "raw_empty_claims": raw["empties"],
            },
            results,
        )


def bench_backlog(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    lane = "big"
    rows: dict[int, dict[str, Any]] = {}
    for size in args.backlogs:
        asyncio.run(harness.reset_lane(dsn, lane))
        maker = asyncio.run(harness.mint(dsn, "w_big", 1))[0]
        # 99 % need capability:gpu, which no agent here has, and outrank everything else.
        gpu = asyncio.run(_template(svc.base, maker, lane, required_features=["capability:gpu"], priority=10))
        mine = asyncio.run(_template(svc.base, maker, lane))
        t0 = time.perf_counter()
        asyncio.run(harness.seed(dsn, gpu, size * 99 // 100 - 1, 10))
        asyncio.run(harness.seed(dsn, mine, size // 100 - 1, 0))
        seeded = time.perf_counter() - t0
        asyncio.run(_checkpoint(dsn))
        tokens = asyncio.run(harness.mint(dsn, "w_big", args.backlog_agents))
        r = run_in_process(
            "cycle_http", base=svc.base, tokens=tokens, lane=lane, seconds=args.seconds
        ).result()
        rows[size] = harness.summary(r["claim_lat"])
        _out(
            "backlog",
            {
                "backlog": size,
                "claimable_share": 0.01,
                "agents": args.backlog_agents,
                "claims": r["cycles"],
                "claim": rows[size],
                "cycle": harness.summary(r["cycle_lat"]),
                "cycles_per_s": round(r["cycles"] / r["elapsed"], 1),
                "seed_seconds": round(seeded, 1),
                "empty_claims": r["empties"],
            },
            results,
        )
    if len(rows) >= 2:
        small, large = min(rows), max(rows)
        _out(
            "backlog_ratio",
            {
                "large": large,
                "small": small,
                "p50_large_over_small": round(rows[large]["p50_ms"] / rows[small]["p50_ms"], 2),
                "p99_large_over_small": round(rows[large]["p99_ms"] / rows[small]["p99_ms"], 2),
            },
            results,
        )
    asyncio.run(harness.reset_lane(dsn, lane))


def bench_sustained(
    dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]
) -> None:
    lane = "cyc"
    asyncio.run(harness.reset_lane(dsn, lane))
    maker = asyncio.run(harness.mint(dsn, "w_cyc", 1))[0]
    tid = asyncio.run(_template(svc.base, maker, lane))
    asyncio.run(harness.seed(dsn, tid, args.sustained_backlog - 1, 0))
    asyncio.run(_checkpoint(dsn))
    tokens = asyncio.run(harness.mint(dsn, "w_cyc", args.sustained_agents))
    secs = args.sustained_seconds
    r = run_in_process(
        "cycle_http", base=svc.base, tokens=tokens, lane=lane, seconds=secs, window=10.0
    ).result()
    w = r["windows"]
    span = max(1, min(6, len(w) // 5))  # a minute of 10 s windows, or a fifth of a shorter run
    first, last = sum(w[:span]) / (span * 10), sum(w[-span:]) / (span * 10)
    _out(
        "sustained",
        {
            "seconds": secs,
            "agents": args.sustained_agents,
            "backlog": args.sustained_backlog,
            "cycles_per_s": round(r["cycles"] / r["elapsed"], 1),
            "first_span_per_s": round(first, 1),
            "last_span_per_s": round(last, 1),
            "span_seconds": span * 10,
            "last_over_first": round(last / first, 2) if first else None,
            "per_10s": w,
            "cycle": harness.summary(r["cycle_lat"]),
        },
        results,
    )


def bench_pickup(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    lane = "lp"
    maker = asyncio.run(harness.mint(dsn, "w_lp", 1))[0]
    for n in args.waiters:
        tokens = asyncio.run(harness.mint(dsn, "w_lp", n))
        for mode in ("wait", "poll"):
            asyncio.run(harness.reset_lane(dsn, lane))
            r = run_in_process(
                "pickup",
                base=svc.base,
                waiter_tokens=tokens,
                maker_token=maker,
                lane=lane,
                tasks_n=args.pickup_tasks,
                mean_gap=0.1,
                mode=mode,
                dsn=dsn,
            ).result()
            _out(
                "pickup",
                {
                    "idle_agents": n,
                    "mode": "long-poll" if mode == "wait" else "poll every 1 s",
                    "tasks": len(r["lat"]),
                    "pickup": harness.summary(r["lat"]),
                    "db_connections_while_idle": r["conns_while_idle"],
                    "idle_claim_requests_per_s": round(r["idle_claim_calls_per_s"], 1),
                },
                results,
            )


def bench_create(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """32 writers: alone; with long-poll waiters that never claim what they create (waiting on
    another lane: what the creates pay is the waiters' presence, the figure the target is about; a
    lone process sends no NOTIFY since ADR 0028); and, for reference, with waiters taking every task
    (each create then also costs the service a claim and an advance)."""
    lane = "mk"
    writers = asyncio.run(harness.mint(dsn, "w_mk", 32))
    others = asyncio.run(harness.mint(dsn, "w_lp", max(args.create_waiters)))
    takers = asyncio.run(harness.mint(dsn, "w_mk", 100))
    cases: list[tuple[str, list[str] | None, str | None]] = [("no waiters", None, None)]
    for n in args.create_waiters:
        cases.append((f"{n} long-poll waiters on another lane", others[:n], "lp"))
    cases.append(("100 long-poll waiters taking the tasks", takers, None))
    rows: dict[str, float] = {}
    for label, ws, wlane in cases:
        asyncio.run(harness.reset_lane(dsn, lane))
        asyncio.run(harness.reset_lane(dsn, "lp"))
        asyncio.run(_checkpoint(dsn))
        r = run_in_process(
            "create_rate",
            base=svc.base,
            tokens=writers,
            lane=lane,
            seconds=args.seconds,
            waiter_tokens=ws,
            waiter_lane=wlane,
        ).result()
        rows[label] = r["created"] / r["elapsed"]
        _out(
            "create",
            {
                "writers": 32,
                "with": label,
                "creates_per_s": round(rows[label], 1),
                "taken_per_s": round(r["taken"] / r["elapsed"], 1),
                "create": harness.summary(r["lat"]),
            },
            results,
        )
    base = rows["no waiters"]
    if base:
        _out(
            "create_ratio",
            {label: round(v / base, 2) for label, v in rows.items() if label != "no waiters"},
            results,
        )


def _pgqueuer(dsn: str, seconds: float) -> float | None:
    """pgqueuer's own tools/benchmark.py, one job per fetch, on the same server (bench/pgqueuer.sh): jobs/s.
    After the same settling as the loops it is compared with, every table vacuumed (the loops before it leave
    autovacuum work behind, which would otherwise run during pgqueuer's run)."""
    asyncio.run(_checkpoint(dsn, everything=True))
    env = {
        **os.environ,
        "PGHOST": str((harness.ROOT / "pgdata").resolve()),
        "PGUSER": "postgres",
        "PGDATABASE": "bench",
    }
    out = subprocess.run(
        ["bash", str(Path(__file__).with_name("pgqueuer.sh")), str(int(seconds))],
        env=env,
        capture_output=True,
        text=True,
    )
    m = re.search(r"\|\s*Rate\s*\|\s*([\d.]+)", out.stdout)
    print(out.stdout[-3000:], out.stderr[-1500:] if out.returncode else "", flush=True)
    return float(m.group(1)) if m and out.returncode == 0 else None


_PGQUEUER_SETTINGS = "--dequeue 8 --dequeue-batch-size 1 --enqueue 4 --enqueue-batch-size 1"


def bench_pgqueuer(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """pgqueuer's own tools/benchmark.py, one job per fetch, on the same server (bench/pgqueuer.sh)."""
    _out("pgqueuer", {"settings": _PGQUEUER_SETTINGS, "jobs_per_s": _pgqueuer(dsn, args.seconds)}, results)


def bench_race(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """pgqueuer against the worker loops, interleaved: --race-rounds rounds of pgqueuer one job per fetch, the
    two-call loop (claim, then advance) and the one-call loop (advance with `next`) at --race-agents agents,
    the order rotated each round so that a drift of the machine falls on each in turn. On a VM whose figures move
    by a third between runs, one pgqueuer run against one loop run decides little; the median of the rounds'
    ratios, each measured minutes apart at most, is the comparison."""
    lane = _cycle_lane(dsn, svc, args, keep=True)
    tokens = asyncio.run(harness.mint(dsn, "w_cyc", args.race_agents))

    def loop(chained: bool) -> float:
        asyncio.run(_checkpoint(dsn, everything=True))
        r = run_in_process("cycle_http", base=svc.base, tokens=tokens, lane=lane, seconds=args.seconds,
                           chained=chained).result()
        return float(r["cycles"] / r["elapsed"])

    runs: dict[str, Callable[[], float | None]] = {
        "pgqueuer": lambda: _pgqueuer(dsn, args.seconds),
        "two_calls": lambda: loop(False),
        "one_call": lambda: loop(True),
    }
    names = list(runs)
    rounds: list[dict[str, float | None]] = []
    for k in range(args.race_rounds):
        order = names[k % len(names):] + names[:k % len(names)]
        got = {name: runs[name]() for name in order}
        rounds.append({name: None if (v := got[name]) is None else round(v, 1) for name in names})
        print(json.dumps({"race_round": k + 1, "order": order, **rounds[-1]}), flush=True)

    def median_ratio(name: str) -> float | None:
        ratios = [ours / theirs for r in rounds if (ours := r[name]) and (theirs := r["pgqueuer"])]
        return round(statistics.median(ratios), 2) if ratios else None

    _out("race", {"agents": args.race_agents, "rounds": rounds, "pgqueuer_settings": _PGQUEUER_SETTINGS,
                  "one_call_over_pgqueuer_median": median_ratio("one_call"),
                  "two_calls_over_pgqueuer_median": median_ratio("two_calls")}, results)


def _start_pgbouncer(port: int, pool_size: int) -> subprocess.Popen[bytes]:
    """PgBouncer (Debian package) in transaction mode on 127.0.0.1:port, in front of the embedded
    server's socket. It runs as the embedded server's own OS user, the only one that may open that
    socket (the data directory is 0700); PgBouncer refuses to run as root."""
    pgdata = (harness.ROOT / "pgdata").resolve()
    owner = pgdata.owner()
    work = Path(f"/tmp/ainarres-pgbouncer-{port}")
    work.mkdir(exist_ok=True)
    (work / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"bench = host={pgdata} dbname=bench user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {work / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\nmax_client_conn = 2000\n"
        f"logfile = {work / 'pgbouncer.log'}\npidfile = {work / 'pgbouncer.pid'}\n"
    )
    (work / "users.txt").write_text('"postgres" ""\n')
    subprocess.run(["chown", "-R", owner, str(work)], check=True)
    proc = subprocess.Popen(
        ["runuser", "-u", owner, "--", "pgbouncer", "-q", str(work / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"pgbouncer did not start; see {work / 'pgbouncer.log'}")


def bench_pgbouncer(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """A second service behind a real PgBouncer in transaction mode (AINARRES_PGBOUNCER=true, LISTEN
    straight to PostgreSQL): the cycle at 16 agents and long-poll pickup, beside the direct service."""
    port = harness.free_port()
    bouncer = _start_pgbouncer(port, args.pool_max)
    pooled = f"postgresql://postgres@127.0.0.1:{port}/bench"
    via = harness.start_service(
        pooled,
        pool_max=args.pool_max,
        extra_env={"AINARRES_PGBOUNCER": "true", "AINARRES_LISTEN_DATABASE_URL": dsn},
    )
    try:
        lane = "cyc"
        asyncio.run(harness.reset_lane(dsn, lane))
        maker = asyncio.run(harness.mint(dsn, "w_cyc", 1))[0]
        tid = asyncio.run(_template(via.base, maker, lane))
        asyncio.run(harness.seed(dsn, tid, args.cycle_backlog - 1, 0))
        tokens = asyncio.run(harness.mint(dsn, "w_cyc", 16))
        for name, service in (("pgbouncer", via), ("direct", svc)):
            asyncio.run(_checkpoint(dsn))
            r = run_in_process(
                "cycle_http", base=service.base, tokens=tokens, lane=lane, seconds=args.seconds
            ).result()
            _out(
                "pgbouncer_cycle",
                {
                    "via": name,
                    "agents": 16,
                    "http_cycles_per_s": round(r["cycles"] / r["elapsed"], 1),
                    "http": harness.summary(r["cycle_lat"]),
                },
                results,
            )
        lp_tokens = asyncio.run(harness.mint(dsn, "w_lp", 10))
        lp_maker = asyncio.run(harness.mint(dsn, "w_lp", 1))[0]
        asyncio.run(harness.reset_lane(dsn, "lp"))
        r = run_in_process(
            "pickup",
            base=via.base,
            waiter_tokens=lp_tokens,
            maker_token=lp_maker,
            lane="lp",
            tasks_n=min(args.pickup_tasks, 60),
            mean_gap=0.1,
            mode="wait",
            dsn=dsn,
        ).result()
        _out(
            "pgbouncer_pickup",
            {
                "via": "pgbouncer",
                "idle_agents": 10,
                "tasks": len(r["lat"]),
                "pickup": harness.summary(r["lat"]),
                "db_connections_while_idle": r["conns_while_idle"],
            },
            results,
        )
    finally:
        via.stop()
        bouncer.terminate()
        bouncer.wait(10)


def bench_replicas(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The 16-agent cycle through two API processes on the same database (one per core here, agents
    spread round-robin as a load balancer would), beside one process and the raw cycle, same run."""
    lane = _cycle_lane(dsn, svc, args, keep=True)
    tokens = asyncio.run(harness.mint(dsn, "w_cyc", 16))
    second = harness.start_service(dsn, pool_max=args.pool_max)
    try:
        rates: dict[str, float] = {}
        for name, fn, kw in (
            ("http_2_processes", "cycle_http", {"base": svc.base, "more_bases": (second.base,)}),
            ("http_1_process", "cycle_http", {"base": svc.base}),
            ("raw", "cycle_raw", {"dsn": dsn, "secret": harness.SECRET}),
        ):
            asyncio.run(_checkpoint(dsn))
            r = run_in_process(fn, tokens=tokens, lane=lane, seconds=args.seconds, **kw).result()
            rates[name] = r["cycles"] / r["elapsed"]
            _out("replicas", {"path": name, "agents": 16, "cycles_per_s": round(rates[name], 1),
                              "cycle": harness.summary(r["cycle_lat"]), "empty_claims": r["empties"]}, results)
        _out("replicas_ratio", {"http_2_processes_over_raw": round(rates["http_2_processes"] / rates["raw"], 2),
                                "http_1_process_over_raw": round(rates["http_1_process"] / rates["raw"], 2)},
             results)
    finally:
        second.stop()


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (Linux /proc); gone processes count 0."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _pids(match: str) -> list[int]:
    """Processes whose command line starts with `match`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").startswith(match):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _waited(pids: list[int]) -> float:
    """Seconds these processes' threads have spent runnable but not running, so far (Linux schedstat: the
    run queue, which on a VM includes waking an idle virtual CPU); gone processes count 0."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def _idle() -> tuple[float, float]:
    """(all, idle) CPU jiffies of the machine so far."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(sum(vals)), float(vals[3])


def bench_cpu(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Where the CPU goes per claim+advance cycle at 16 agents: PostgreSQL's backends, the service,
    the load generator, over the middle of an HTTP run and of a raw run (the cycle scenario's setup), for the
    two-call loop and the one-call loop (`_next`: an advance with `next`)."""
    lane = _cycle_lane(dsn, svc, args, keep=True)
    tokens = asyncio.run(harness.mint(dsn, "w_cyc", 16))
    runs = {
        "http": ("cycle_http", {"base": svc.base}),
        "raw": ("cycle_raw", {"dsn": dsn, "secret": harness.SECRET}),
        "http_next": ("cycle_http", {"base": svc.base, "chained": True}),
        "raw_next": ("cycle_raw", {"dsn": dsn, "secret": harness.SECRET, "chained": True}),
    }
    for name, (fn, kw) in runs.items():
        asyncio.run(_checkpoint(dsn))
        before = set(_pids(sys.executable))
        fut = run_in_process(fn, tokens=tokens, lane=lane, seconds=args.seconds, **kw)
        time.sleep(WARMUP_SECONDS + min(2.0, args.seconds / 5))  # past the warm-up and the start of counting
        load = [p for p in _pids(sys.executable) if p not in before]
        pg = _pids("postgres")
        pg0, sv0, ld0, (all0, idle0), t0 = (_cpu_seconds(pg), _cpu_seconds([svc.proc.pid]), _cpu_seconds(load),
                                             _idle(), time.monotonic())
        wpg0, wsv0 = _waited(pg), _waited([svc.proc.pid])
        time.sleep(args.seconds * 0.6)
        pg1, sv1, ld1, (all1, idle1), t1 = (_cpu_seconds(pg), _cpu_seconds([svc.proc.pid]), _cpu_seconds(load),
                                             _idle(), time.monotonic())
        wpg1, wsv1 = _waited(pg), _waited([svc.proc.pid])
        r = fut.result()
        rate = r["cycles"] / r["elapsed"]
        n = rate * (t1 - t0)
        _out("cpu", {"path": name, "agents": 16, "cycles_per_s": round(rate, 1),
                     "cpu_ms_per_cycle": {"postgres": round(1000 * (pg1 - pg0) / n, 2),
                                          "service": round(1000 * (sv1 - sv0) / n, 2),
                                          "load_generator": round(1000 * (ld1 - ld0) / n, 2)},
                     "machine_idle": round((idle1 - idle0) / (all1 - all0), 2),
                     # Seconds per second spent runnable but not running: the service's event loop is one
                     # thread, so with `service` CPU it says how much of the time it had work.
                     "run_queue": {"postgres": round((wpg1 - wpg0) / (t1 - t0), 2),
                                   "service": round((wsv1 - wsv0) / (t1 - t0), 2)}}, results)


async def _ready_count(dsn: str, lane: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM tasks t JOIN lanes l ON l.id = t.lane_id WHERE l.key = $1 AND t.state = 'ready'",
            lane)
        return n
    finally:
        await conn.close()


def bench_scale(dsn: str, svc: harness.Service, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """bench/scale.py: the cycle through 1, 2 and 4 API processes, CPU per cycle per component."""
    from bench import scale

    scale.measure(dsn, svc, processes=args.processes, agents=args.scale_agents, seconds=args.seconds,
                  cycle_backlog=args.cycle_backlog, pool_max=args.pool_max, load_processes=1, results=results)


BENCHES = {
    "cycle": bench_cycle,
    "cpu": bench_cpu,
    "replicas": bench_replicas,
    "backlog": bench_backlog,
    "sustained": bench_sustained,
    "pickup": bench_pickup,
    "create": bench_create,
    "pgqueuer": bench_pgqueuer,
    "race": bench_race,
    "pgbouncer": bench_pgbouncer,
    "scale": bench_scale,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated: " + ", ".join(BENCHES))
    p.add_argument("--seconds", type=float, default=15, help="length of each timed run")
    p.add_argument("--agents", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--cycle-backlog", type=int, default=10_000)
    p.add_argument("--backlogs", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 1_000_000])
    p.add_argument("--backlog-agents", type=int, default=4)
    p.add_argument("--sustained-seconds", type=float, default=300)
    p.add_argument("--sustained-agents", type=int, default=16)
    p.add_argument("--sustained-backlog", type=int, default=100_000)
    p.add_argument("--waiters", type=lambda s: [int(x) for x in s.split(",")], default=[10, 1000])
    p.add_argument("--pickup-tasks", type=int, default=150)
    p.add_argument("--create-waiters", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000])
    p.add_argument("--pool-max", type=int, default=20, help="the service's AINARRES_POOL_MAX_SIZE")
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--scale-agents", type=int, default=32)
    p.add_argument("--race-rounds", type=int, default=3)
    p.add_argument("--race-agents", type=int, default=16)
    args = p.parse_args()

    dsn, server = harness.start_postgres()
    svc = harness.start_service(dsn, pool_max=args.pool_max)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "args": vars(args),
    }
    try:
        asyncio.run(harness.world(dsn, svc.base))
        for name in args.only.split(","):
            BENCHES[name](dsn, svc, args, results)
    finally:
        svc.stop()
        (harness.ROOT / "results.json").write_text(json.dumps(results, indent=1, default=str))
    del server


if __name__ == "__main__":
    main()
