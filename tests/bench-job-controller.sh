#!/usr/bin/env bash
# End-to-end throughput and pickup latency of the job controller (BENCHMARKS.md, "Job controller").
#
#   tests/bench-job-controller.sh atelier BIN [RUNS] [bench.py e2e args...]
#   tests/bench-job-controller.sh bullmq  -   [RUNS] [bench.py e2e args...]
#
# Each run starts a fresh server (fresh data dir, free port), runs the black-box harness
# (/work/shared/bench/bench.py e2e, from where it lives) under `flock /tmp/atelier-bench.lock`
# so it never overlaps another benchmark, prints one summary line, and stops that server by pid.
# The server's settings come from the environment (MAX_CONCURRENT_JOBS, USE_JOB_CONTROLLER,
# ATELIER_BALLAST_MB, which needs a server built with `--features test-faults`, ...).
# Defaults: 3 runs of --n 600 --concurrency 20. DATA_ROOT=DIR keeps the data dirs there for
# the caller to delete after a series (see the comment at the end).
# PIN=1 gives the system under test (with everything it starts) CPU 1 and the harness CPU 0,
# so neither takes the other's core: it measures what the system does on one core, where an
# unpinned run also measures how the scheduler happens to place the single-threaded harness.
set -euo pipefail
KIND="${1:?usage: bench-job-controller.sh atelier|bullmq BIN [RUNS] [bench args]}"
BIN="${2:?}"
RUNS="${3:-3}"
shift 3 || shift $#
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--n 600 --concurrency 20)
BENCH_DIR="${BENCH_DIR:-/work/shared/bench}"
SYSTEM_CPU=()
HARNESS_CPU=()
if [ "${PIN:-0}" = 1 ]; then
  SYSTEM_CPU=(taskset -c 1)
  HARNESS_CPU=(taskset -c 0)
fi
PY="${PY:-/tmp/bench-venv/bin/python}"
[ -x "$PY" ] || "$BENCH_DIR/setup.sh"

free_port() { "$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

wait_ready() {
  for _ in $(seq 200); do
    curl -fsS "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "server on :$1 did not come up" >&2
  return 1
}

# The machine is shared: wait (bounded) until nobody compiles, so a run measures us, not rustc.
wait_quiet() {
  for _ in $(seq "${QUIET_WAIT_S:-300}"); do
    pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null || pgrep -x ld >/dev/null || return 0
    sleep 1
  done
  echo "(still noisy: compilers running)" >&2
}

busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }

# Runs the harness as a child and writes the child's CPU seconds (user+sys) to a file.
HARNESS_WRAPPER='import resource, subprocess, sys
r = subprocess.run(sys.argv[2:])
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%.3f" % (u.ru_utime + u.ru_stime))
sys.exit(r.returncode)'

summary() {
  "$PY" -c "$(cat <<'PYEOF'
import json, sys
d = json.loads(sys.stdin.read().strip().splitlines()[-1])
g = lambda k, q: d[k][q]
srv = d.get("server") or {}
import os
n = max(1, d["n"])
machine_ms = float(os.environ.get("MACHINE_CPU_S") or 0) * 1000 / n
harness_ms = float(os.environ.get("HARNESS_CPU_S") or 0) * 1000 / n
print("ok=%s/%s per_s=%s pickup_p50=%s pickup_p99=%s complete_p50=%s srv_pickup_p50=%s srv_pickup_p99=%s "
      "dups=%s ooo=%s missing=%s max_rss_kb=%s cpu_ms_per=%.2f children_cpu_ms_per=%.2f "
      "harness_ms_per=%.2f rest_of_machine_ms_per=%.2f" % (
          d["completed"], d["n"], d["completed_per_s"], g("pickup_ms", "p50"), g("pickup_ms", "p99"),
          g("complete_ms", "p50"), g("server_pickup_ms", "p50"), g("server_pickup_ms", "p99"),
          d["dup_ids"], d["out_of_order"], d["streams_missing_stages"], srv.get("max_rss_kb"),
          srv.get("cpu_ms", 0) / n, srv.get("children_cpu_ms", 0) / n, harness_ms, machine_ms - harness_ms))
PYEOF
)"
}

DATA_DIRS=()
for run in $(seq "$RUNS"); do
  PORT="$(free_port)"
  if [ "$KIND" = atelier ]; then
    DATA="$(mktemp -d "${DATA_ROOT:-/tmp}/atelier-jc-bench.XXXXXX")"
    # As root without an atelier-worker account, jobs run as root (the figures predate the worker user).
    ATELIER_ALLOW_ROOT_WORKERS="${ATELIER_ALLOW_ROOT_WORKERS:-true}" \
    ATELIER_SECRET=bench-secret-of-at-least-thirty-two-bytes ATELIER_DATA_DIR="$DATA" ATELIER_LISTEN="127.0.0.1:$PORT" RUST_LOG="${RUST_LOG:-warn}" \
      "${SYSTEM_CPU[@]}" "$BIN" serve >"$DATA.log" 2>&1 &
    PID=$!
    TOKEN="$(ATELIER_SECRET=bench-secret-of-at-least-thirty-two-bytes "$BIN" token --user bench --admin)"
  else
    PIDFILE="$(mktemp)"
    PIDFILE="$PIDFILE" "${SYSTEM_CPU[@]}" /work/shared/peers/bullmq/run.sh "$PORT" 2>/dev/null &
    PID=$!
    TOKEN=x
  fi
  wait_ready "$PORT"
  SERVER_PID="$PID"
  [ "$KIND" = bullmq ] && SERVER_PID="$(cat "$PIDFILE")"
  wait_quiet
  # The whole machine's busy CPU over the run (user, nice, system, irq, softirq; not steal)
  # and the harness's own CPU (its rusage as a child of a small wrapper): their difference is
  # what the system under test (with everything it starts) and any other tenant used.
  HARNESS_CPU_FILE="$(mktemp)"
  BUSY0="$(busy_ticks)"
  OUT="$(flock /tmp/atelier-bench.lock "${HARNESS_CPU[@]}" "$PY" -c "$HARNESS_WRAPPER" "$HARNESS_CPU_FILE" \
    "$PY" "$BENCH_DIR/bench.py" e2e --url "http://127.0.0.1:$PORT" \
    --token "$TOKEN" --pid "$SERVER_PID" "${BENCH_ARGS[@]}")"
  BUSY1="$(busy_ticks)"
  export MACHINE_CPU_S HARNESS_CPU_S
  MACHINE_CPU_S="$(awk -v a="$BUSY0" -v b="$BUSY1" -v hz="$(getconf CLK_TCK)" 'BEGIN{print (b-a)/hz}')"
  HARNESS_CPU_S="$(cat "$HARNESS_CPU_FILE")"
  rm -f "$HARNESS_CPU_FILE"
  echo "$KIND run $run: $(echo "$OUT" | summary)"
  if [ "$KIND" = atelier ]; then
    # The controller's own view: free slot -> worker running, and the spawn alone (histograms).
    curl -fsS -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PORT/metrics" | "$PY" -c "$(cat <<'PYEOF'
import sys
h = {}
for line in sys.stdin:
    for name in ("atelier_job_pickup_seconds", "atelier_job_spawn_seconds"):
        if line.startswith(name + "_bucket{"):
            le = line.split('le="')[1].split('"')[0]
            h.setdefault(name, []).append((float("inf") if le == "+Inf" else float(le), int(float(line.split()[-1]))))
out = []
for name, b in sorted(h.items()):
    total = b[-1][1]
    q = lambda p: next(("<=%gms" % (le * 1000) for le, c in b if c >= p * total), "?")
    out.append("%s n=%d p50%s p99%s" % (name.replace("atelier_job_", "").replace("_seconds", ""), total, q(0.5), q(0.99)))
print("  controller histograms: " + "; ".join(out))
PYEOF
)" || true
  fi
  [ -n "${KEEP_JSON:-}" ] && echo "$OUT" | tail -1 >>"$KEEP_JSON"
  kill -TERM "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  # Data dirs go at the end: deleting thousands of inodes right before the next run makes
  # ext4's inode allocator (recently_deleted) slower than any steady state would be.
  if [ "$KIND" = atelier ]; then DATA_DIRS+=("$DATA" "$DATA.log"); else rm -f "$PIDFILE"; fi
done
# With DATA_ROOT set, the caller deletes them after a whole series of calls.
[ -z "${DATA_ROOT:-}" ] && [ ${#DATA_DIRS[@]} -gt 0 ] && rm -rf "${DATA_DIRS[@]}"
true
