#!/usr/bin/env bash
# Commissions/s of 1, 2 and 3 nodes on one PostgreSQL database, and the database's CPU per
# commission (BENCHMARKS.md, "Several nodes").
#
#   tests/bench-cluster.sh BIN [RUNS] [bench.py e2e args...]
#
# Starts a PostgreSQL server of its own (initdb in a temp dir, as the postgres user when run as
# root), then for each run and each node count (1 2 3, interleaved) a fresh database, that many
# `BIN serve` nodes (their own data dirs, free ports), and the black-box harness
# (/work/shared/bench/bench.py e2e) against the first node: every node's scheduler runs jobs,
# the API is the first node's. Prints one line per run: nodes, commissions/s, pickup p50/p99,
# end-to-end p99, PostgreSQL CPU ms per commission. Stops everything it started by pid.
# Defaults: 3 runs of --n 600 --concurrency 20. NODE_COUNTS="1 2 3" by default.
# MODE=fanout runs `bench.py fanout` instead (its args, e.g. --clients 100), against the first
# node while the others run the jobs too: with 2 nodes about half the events cross nodes
# (append on one, SSE on the other), and the line gives live delivery p50/p99.
set -euo pipefail
MODE="${MODE:-e2e}"
BIN="${1:?usage: bench-cluster.sh BIN [RUNS] [bench args]}"
RUNS="${2:-3}"
shift 2 || shift $#
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--n 600 --concurrency 20)
BENCH_DIR="${BENCH_DIR:-/work/shared/bench}"
PY="${PY:-/tmp/bench-venv/bin/python}"
[ -x "$PY" ] || "$BENCH_DIR/setup.sh"
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
ROOT="$(mktemp -d /tmp/bench-cluster.XXXXXX)"
PIDS=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  as_pg "$PGBIN/pg_ctl" -D "$ROOT/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$ROOT"
}
trap cleanup EXIT
free_port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "node on :$1 did not come up" >&2
  return 1
}
# User + system CPU ticks of every process of the PostgreSQL server (its postmaster's tree).
pg_ticks() {
  local total=0
  for p in $(pgrep -u postgres -f "postgres" || true); do
    [ -r "/proc/$p/stat" ] || continue
    total=$((total + $(awk '{print $14+$15}' "/proc/$p/stat")))
  done
  echo "$total"
}

mkdir -p "$ROOT/pg" && chmod 777 "$ROOT"
[ "$(id -u)" = 0 ] && chown postgres "$ROOT/pg"
PGPORT="$(free_port)"
as_pg "$PGBIN/initdb" -D "$ROOT/pg" -U postgres -A trust >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$ROOT/pg" -o "-p $PGPORT -k $ROOT -c listen_addresses=127.0.0.1" -l "$ROOT/pg.log" start >/dev/null
SECRET="bench-cluster-secret-0123456789abcdef"
HZ="$(getconf CLK_TCK)"
N="$(printf '%s\n' "${BENCH_ARGS[@]}" | awk 'prev=="--n"{print} {prev=$0}')"
N="${N:-600}"

for run in $(seq "$RUNS"); do
  for nodes in ${NODE_COUNTS:-1 2 3}; do
    db="b${run}n${nodes}"
    as_pg "$PGBIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U postgres "$db"
    url="postgres://postgres@127.0.0.1:$PGPORT/$db"
    PIDS=()
    first=""
    for i in $(seq "$nodes"); do
      port="$(free_port)"
      ATELIER_DATABASE_URL="$url" ATELIER_DATA_DIR="$ROOT/$db-$i" ATELIER_LISTEN="127.0.0.1:$port" \
        ATELIER_SECRET="$SECRET" ATELIER_NODE_ID="node-$i" ATELIER_USER_RATE=0 ATELIER_ALLOW_ROOT_WORKERS=true \
        ATELIER_WORKER_USER="$(id -u)" RUST_LOG=error "$BIN" serve >"$ROOT/$db-$i.out" 2>&1 &
      PIDS+=($!)
      wait_ready "$port"
      [ -z "$first" ] && first="$port"
    done
    token="$(ATELIER_SECRET="$SECRET" ATELIER_DATA_DIR="$ROOT/$db-1" "$BIN" token --user bench --admin 2>/dev/null | tail -1)"
    before="$(pg_ticks)"
    line="$("$PY" "$BENCH_DIR/bench.py" "$MODE" --url "http://127.0.0.1:$first" --token "$token" --json-only "${BENCH_ARGS[@]}" | tail -1)"
    after="$(pg_ticks)"
    for p in "${PIDS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
    PIDS=()
    "$PY" -c '
import json, sys
r = json.loads(sys.argv[1]); nodes, ticks, hz, n = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if r["mode"] == "fanout":
    print("nodes=%d streams=%d live_delivery_p50_ms=%s live_delivery_p99_ms=%s events=%d dup=%d out_of_order=%d missing=%d" % (
        nodes, r["clients"], r["live_delivery_ms"]["p50"], r["live_delivery_ms"]["p99"], r["events_total"],
        r["dup_ids"], r["out_of_order"], r["streams_missing_stages"]))
    sys.exit(0)
problems = r["failed_or_missing"] + r["dup_ids"] + r["out_of_order"] + r["seq_mismatch"] + r["streams_missing_stages"]
print("nodes=%d completed_per_s=%s pickup_p50_ms=%s pickup_p99_ms=%s complete_p99_ms=%s delivery_lag_p99_ms=%s pg_cpu_ms_per_commission=%.2f problems=%d" % (
    nodes, r["completed_per_s"], r["pickup_ms"]["p50"], r["pickup_ms"]["p99"], r["complete_ms"]["p99"],
    r["delivery_lag_ms"]["p99"], ticks * 1000.0 / hz / n, problems))
' "$line" "$nodes" "$((after - before))" "$HZ" "$N"
  done
done
