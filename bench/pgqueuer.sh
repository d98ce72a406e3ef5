#!/usr/bin/env bash
# pgqueuer's own benchmark (tools/benchmark.py from its sdist), one job per fetch like an agent,
# against the benchmark PostgreSQL. Its code is downloaded into /tmp, never committed here.
#
#   PGHOST=/tmp/ainarres-bench/pgdata PGUSER=postgres PGDATABASE=bench bench/pgqueuer.sh [seconds]
#
# (the tool reads the libpq environment variables; the values above are bench.run's embedded server)
# Compare its jobs/s with bench.run's raw and HTTP claim+advance cycles/s from the same session.
set -euo pipefail
SECS=${1:-15}
: "${PGHOST:?set PGHOST, PGUSER, PGDATABASE (libpq variables) to the benchmark database}"
WORK=${AINARRES_BENCH_DIR:-/tmp/ainarres-bench}/pgqueuer
mkdir -p "$WORK"
cd "$WORK"
if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
  venv/bin/pip install -q pgqueuer uvloop tqdm typer tabulate asyncpg
fi
if [ ! -f benchmark.py ]; then
  venv/bin/pip download -q --no-deps --no-binary :all: pgqueuer -d sdist
  tar -xzf sdist/pgqueuer-*.tar.gz
  cp pgqueuer-*/tools/benchmark.py benchmark.py
fi
venv/bin/pgq install >/dev/null 2>&1 || venv/bin/pgq upgrade >/dev/null 2>&1 || true
venv/bin/python benchmark.py -d apg -t "$SECS" \
  --dequeue 8 --dequeue-batch-size 1 --enqueue 4 --enqueue-batch-size 1
