#!/usr/bin/env bash
# Runs the test suite N times in a row (default 20) while `stress --cpu 2`
# keeps both cores busy, and stops at the first failure: a flake hunt. Extra
# arguments go to `cargo test` (e.g. `-- --include-ignored`).
#   scripts/stress_tests.sh [N] [cargo test arguments…]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shift || true
command -v stress >/dev/null || { echo "stress_tests.sh: needs stress (apt-get install stress)" >&2; exit 2; }
cargo test --no-run --quiet "$@" 2>/dev/null || cargo test --no-run "$@"
stress --cpu 2 >/dev/null 2>&1 &
load=$!
trap 'kill $load 2>/dev/null || true' EXIT
log=$(mktemp)
for run in $(seq "$runs"); do
    started=$(date +%s)
    if cargo test --quiet "$@" >"$log" 2>&1; then
        passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{sum += $1} END {print sum}')
        echo "run $run: ok, $passed passed in $(( $(date +%s) - started )) s"
    else
        echo "run $run: FAILED after $(( $(date +%s) - started )) s" >&2
        grep -E "panicked|FAILED|failures:" -A12 "$log" >&2 | head -60
        exit 1
    fi
done
echo "$runs runs in a row green under stress --cpu 2"
