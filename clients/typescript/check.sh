#!/usr/bin/env bash
# The TypeScript client against the API as the server describes it now: installs the pinned
# openapi-typescript and typescript (package-lock.json, `npm ci`) under target/ts-client,
# fetches /api/openapi.json from a live server, generates target/ts-client/api.d.ts from it
# and type-checks src/ (tsc --noEmit). The generated types are never committed, so a change
# to the API that breaks the client fails here.
#
# Usage: clients/typescript/check.sh [path/to/atelier]   (default: target/debug/atelier)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

READY_WAIT_S=30
atelier=${1:-target/debug/atelier}
out="$root/target/ts-client"
mkdir -p "$out"

# npm ci again only when the lock changed (it removes node_modules first).
if ! cmp -s "$here/package-lock.json" "$out/package-lock.json" || [ ! -x "$out/node_modules/.bin/tsc" ]; then
  echo "ts-client: installing the pinned tools into $out"
  cp "$here/package.json" "$here/package-lock.json" "$out/"
  (cd "$out" && npm ci --no-audit --no-fund --loglevel=error)
fi

data_dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
ATELIER_DATA_DIR="$data_dir" ATELIER_LISTEN="127.0.0.1:$port" ATELIER_ALLOW_ROOT_WORKERS=true \
  ATELIER_SECRET=ts-client-check-secret-of-at-least-32-bytes RUST_LOG=warn \
  "$atelier" serve >"$data_dir/server.log" 2>&1 &
server_pid=$!
stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  rm -rf "$data_dir"
}
trap stop_server EXIT

# The document is public: no token needed.
fetched=
for _ in $(seq "$((READY_WAIT_S * 10))"); do
  if python3 -c "import urllib.request, sys; sys.stdout.buffer.write(urllib.request.urlopen('$base/api/openapi.json', timeout=1).read())" \
    >"$out/openapi.json" 2>/dev/null; then
    fetched=1
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
if [ -z "$fetched" ]; then
  echo "ts-client: could not fetch the OpenAPI document; the server's log:" >&2
  cat "$data_dir/server.log" >&2
  exit 1
fi

# A field with a default (`scheduled_for`) stays optional in a request body: the server fills
# it in, the client need not send it.
"$out/node_modules/.bin/openapi-typescript" "$out/openapi.json" -o "$out/api.d.ts" --silent \
  --default-non-nullable false
"$out/node_modules/.bin/tsc" --noEmit -p "$here/tsconfig.json"
echo "ts-client: src/ type-checks against the live API document"
