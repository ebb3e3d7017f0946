#!/usr/bin/env bash
# The DDS and subprocess tests (markers `ros` or `processes`) on a machine made slower on purpose: a busy
# loop pinned to one core for the whole run, so the tests share what is left (on 2 cores: one). Prints
# PASSED or FAILED and the time. Tests wait on events, so a slower machine makes them slower, never red.
# Usage: scripts/test_under_load.sh [PYTEST ARGS...]   (after `make setup`; e.g. -x, -k NAME)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
busy_core=$(( $(nproc) - 1 ))
taskset -c "$busy_core" "$PY" -c 'while True: pass' &
busy=$!
trap 'kill "$busy" 2>/dev/null' EXIT
echo "test_under_load: core $busy_core busy (pid $busy) for the whole run"
start=$(date +%s)
"$PY" -m pytest -m "ros or processes" "$@"
rc=$?
verdict=PASSED
[ "$rc" -eq 0 ] || verdict=FAILED
echo "test_under_load: $verdict (pytest exit $rc) in $(( $(date +%s) - start )) s, core $busy_core busy throughout"
exit "$rc"
