#!/usr/bin/env bash
# pgqueuer's own benchmark (tools/benchmark.py from its sdist), one job per fetch like an agent,
# against the benchmark PostgreSQL. Its code is downloaded into /tmp, never committed here.
#
#   bench/pgqueuer.sh <postgres-dsn> [seconds]
#
# Compare its jobs/s with bench.run's raw and HTTP claim+advance cycles/s from the same session.
set -euo pipefail
DSN=${1:?usage: bench/pgqueuer.sh <postgres-dsn> [seconds]}
SECS=${2:-15}
WORK=${AINARRES_BENCH_DIR:-/tmp/ainarres-bench}/pgqueuer
mkdir -p "$WORK"
cd "$WORK"
if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
  venv/bin/pip install -q pgqueuer uvloop
fi
if [ ! -f benchmark.py ]; then
  venv/bin/pip download -q --no-deps --no-binary :all: pgqueuer -d sdist
  tar -xzf sdist/pgqueuer-*.tar.gz
  cp pgqueuer-*/tools/benchmark.py benchmark.py
fi
export PGDSN="$DSN" DATABASE_URL="$DSN"
venv/bin/pgq install --pg-dsn "$DSN" 2>/dev/null || venv/bin/pgq upgrade --pg-dsn "$DSN" 2>/dev/null || true
venv/bin/python benchmark.py --help | head -40 >&2 || true
venv/bin/python benchmark.py -d apg -t "$SECS" \
  --dequeue 8 --dequeue-batch-size 1 --enqueue 4 --enqueue-batch-size 1
