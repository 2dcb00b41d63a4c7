#!/usr/bin/env bash
# Schemathesis against a live server: a fresh data dir, a loopback port, a user and an admin
# token, then `st run` on /api/openapi.json once per token. Fails on any failure of its
# default checks: a 5xx, a response the document does not describe, a schema-valid request
# refused. Checks that the document says what the server really does, which the Rust tests
# cannot: they read the same types the document is made from.
#
# Usage: tests/schemathesis/run.sh [path/to/atelier]   (default: target/debug/atelier)
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned: its checks and flags change between releases.
SCHEMATHESIS_VERSION=4.32.5
# Bounds that keep both runs within a few minutes on two cores.
MAX_EXAMPLES=30
MAX_TIME_S=75
REQUEST_TIMEOUT_S=5
READY_WAIT_S=30

atelier=${1:-target/debug/atelier}
venv="$PWD/target/schemathesis-venv"
if [ "$("$venv/bin/st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
  echo "schemathesis: installing schemathesis==$SCHEMATHESIS_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

data_dir=$(mktemp -d)
# Schemathesis keeps state in its working dir (.schemathesis/): one out of the tree.
st_dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
export ATELIER_DATA_DIR="$data_dir" ATELIER_LISTEN="127.0.0.1:$port"
# The API document is under test, not the worker user: as root on a machine without an
# atelier-worker account, jobs may run as root.
export ATELIER_ALLOW_ROOT_WORKERS=true
ATELIER_SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
export ATELIER_SECRET

RUST_LOG=warn "$atelier" serve >"$data_dir/server.log" 2>&1 &
server_pid=$!
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$data_dir" "$st_dir"
}
trap stop_server EXIT

for _ in $(seq "$((READY_WAIT_S * 10))"); do
  if python3 -c "import urllib.request, sys; urllib.request.urlopen('$base/healthz', timeout=1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis: the server did not start:" >&2
    cat "$data_dir/server.log" >&2
    exit 1
  fi
  sleep 0.1
done

user_token=$("$atelier" token --user schemathesis-user)
admin_token=$("$atelier" token --user schemathesis-admin --admin)

# The streams are left out: two of them never end (they are tested in tests/e2e/sse.rs).
# Strings are ASCII: the server bounds user ids and idempotency keys in UTF-8 bytes, which
# JSON Schema cannot say (its maxLength counts characters); in ASCII the two are the same.
run() {
  local who=$1 token=$2
  echo "schemathesis: as the $who"
  (cd "$st_dir" && "$venv/bin/st" run "$base/api/openapi.json" \
    --header "Authorization: Bearer $token" \
    --exclude-path-regex '/stream$' \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME_S" \
    --request-timeout "$REQUEST_TIMEOUT_S" \
    --workers 1 \
    --seed 1 \
    --generation-database none \
    --generation-codec ascii \
    --no-color)
}
status=0
run user "$user_token" || status=1
run admin "$admin_token" || status=1
if [ "$status" != 0 ]; then
  echo "schemathesis: failures above; the server's log:" >&2
  tail -n 50 "$data_dir/server.log" >&2
fi
exit "$status"
