#!/usr/bin/env bash
# The Python SDK's tests and the shop pipeline's end to end (pytest, pinned, from PyPI, in a
# venv under target/ with the SDK installed from sdk/python as a user would): the SDK's unit
# tests, then a real `atelier serve` running the example's stage commands.
#
# Usage: tests/python/run.sh [path/to/atelier]   (default: target/debug/atelier; its
# atelier-worker beside it)
set -euo pipefail
cd "$(dirname "$0")/../.."

# Pinned: its output and plugins change between releases.
PYTEST_VERSION=9.2.0
# A bound on the whole run (it takes well under a minute).
RUN_TIMEOUT_S=300

export ATELIER_BIN="$(realpath "${1:-target/debug/atelier}")"
venv="$PWD/target/python-venv"
if [ "$("$venv/bin/python" -m pytest --version 2>/dev/null)" != "pytest $PYTEST_VERSION" ]; then
  echo "python: installing pytest==$PYTEST_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "pytest==$PYTEST_VERSION"
fi
# The SDK as it is in the tree, every run.
"$venv/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./sdk/python

timeout "$RUN_TIMEOUT_S" "$venv/bin/python" -m pytest -p no:cacheprovider -q sdk/python/tests examples/shop-pipeline/tests
