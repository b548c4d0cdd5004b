#!/usr/bin/env bash
# Benchmark: drain a backlog of N messages from `fly emulator`, side by side:
# `fly poll-echo` vs the platform's reference polling example (Python).
# 1. The drain of N messages over 37 chats on a quick emulator, RUNS times
#    (default 10): each run's time, the median and the slowest; the target is
#    the slowest within 1.3x of the median (no run stalls on a fixed wait).
#    The reference drains the same backlog once, for the ratio to the median.
# 2. N messages over 100 chats with 50 ms of latency on every bot API call (a
#    platform far away, where answering chats concurrently pays off), once each.
# With BEFORE=path/to/another/fly, each drain of 1. runs that build too, in
# alternating turns, and its median and slowest are shown beside (before/after
# in one run of a shared machine). Not a test: run it by hand.
#
#   bash benches/poll_echo.sh [N]             (default N=1000, RUNS=10)
#   RUNS=10 BEFORE=/tmp/fly-main bash benches/poll_echo.sh
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
N=${1:-1000}
RUNS=${RUNS:-10}
REFERENCE=../shared/reference/hello_bot_polling.py
source benches/common.sh
# The release build cargo just made, wherever its target directory is.
FLY=$(realpath "${CARGO_TARGET_DIR:-target}/release/fly")
BEFORE=${BEFORE:+$(realpath "$BEFORE")}

fill_backlog() { # base_url chats
    python3 - "$1" "$N" "$2" <<'PY'
import sys, requests
base, n, chats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = requests.Session()
for i in range(n):
    chat = {"type": "group" if i % 3 == 0 else "private", "id": f"c_{i % chats}"}
    s.post(base + "/_emulator/messages", json={"chat": chat, "msgType": "text", "data": {"content": f"message {i}"}}).raise_for_status()
PY
}

set_latency() { # base_url ms
    curl -s -XPOST "$1/_emulator/faults" -d "{\"latency_ms\":$2}" >/dev/null
}

sent_count() { python3 -c "import sys,requests; print(len(requests.get(sys.argv[1]+'/_emulator/sent').json()['sent']))" "$1"; }
now() { date +%s.%N; }

# Seconds for fly poll-echo to drain the backlog: chats, latency_ms, [binary].
fly_run() {
    local bin=${3:-$FLY}
    start_emulator "fly$1.$BASHPID"; local url=$EMULATOR_URL
    fill_backlog "$url" "$1"; set_latency "$url" "$2"
    rm -f "$WORK/state$1.db"*
    local t0 t1
    t0=$(now)
    FLY_BASE_URL=$url FLY_BOT_TOKEN=bench "$bin" -q poll-echo --state "$WORK/state$1.db" --max-updates "$N" --poll-timeout 1
    t1=$(now)
    [ "$(sent_count "$url")" = "$N" ] || { echo "fly sent the wrong number of replies" >&2; exit 1; }
    # Run in $(…): this shell's PIDS never reach the cleanup, so stop it here.
    kill "$EMULATOR_PID"
    python3 -c "print($t1 - $t0)"
}

# Seconds for the reference example to drain the same backlog.
reference_run() {
    start_emulator "ref$1.$BASHPID"; local url=$EMULATOR_URL
    fill_backlog "$url" "$1"; set_latency "$url" "$2"
    local t0 t1
    t0=$(now)
    FLY_BASE_URL=$url FLY_BOT_TOKEN=bench python3 "$REFERENCE" >/dev/null 2>&1 &
    local ref=$!; PIDS+=($ref)
    while [ "$(sent_count "$url")" -lt "$N" ]; do sleep 0.05; done
    t1=$(now)
    kill $ref "$EMULATOR_PID"
    python3 -c "print($t1 - $t0)"
}

drains=()
befores=()
for run in $(seq "$RUNS"); do
    if [ -n "$BEFORE" ]; then befores+=("$(fly_run 37 0 "$BEFORE")"); fi
    drains+=("$(fly_run 37 0)")
    echo "drain $run/$RUNS: ${drains[-1]} s${BEFORE:+ (before: ${befores[-1]} s)}" >&2
done
drain_ref=$(reference_run 37 0)
far_fly=$(fly_run 100 50)
far_ref=$(reference_run 100 50)

python3 - "$N" "$drain_ref" "$far_fly" "$far_ref" "${drains[*]}" "${befores[*]:-}" <<'PY'
import statistics, sys
n = int(sys.argv[1])
drain_ref, far_fly, far_ref = map(float, sys.argv[2:5])
drains = [float(x) for x in sys.argv[5].split()]
befores = [float(x) for x in sys.argv[6].split()]
def line(label, runs):
    median, slowest = statistics.median(runs), max(runs)
    print(f"{label:<35}{median:7.3f}   {n/median:9.0f}   {slowest:7.3f}   {slowest/median:5.2f}")
    return median, slowest
print(f"drain {n} updates, {len(drains)} runs      median s  updates/s   slowest   slowest/median")
median, slowest = line("37 chats, quick   fly poll-echo", drains)
if befores:
    line("                  before (BEFORE=)", befores)
print(f"                  reference (python) {drain_ref:7.3f}   {n/drain_ref:9.0f}   (one run)")
print(f"100 chats, 50 ms  fly poll-echo      {far_fly:7.3f}   {n/far_fly:9.0f}   (one run)")
print(f"                  reference (python) {far_ref:7.3f}   {n/far_ref:9.0f}   (one run)")
ok = "met" if slowest <= 1.3 * median else "NOT met"
print(f"slowest/median {slowest/median:.2f} (target <= 1.3: {ok}); "
      f"fly/reference: quick {drain_ref/median:.1f}x (of the median), 50 ms latency {far_ref/far_fly:.1f}x")
PY
