#!/usr/bin/env bash
# Benchmark: drain a backlog of N messages from `fly emulator`, side by side:
# `fly poll-echo` vs the platform's reference polling example (Python).
# Two runs: N messages over 10 chats on a quick emulator, then N messages over
# 100 chats with 50 ms of latency on every bot API call (a platform far away,
# where answering chats concurrently pays off). Reports updates/s and ratios.
# Not a test: run it by hand.
#
#   bash benches/poll_echo.sh [N]        (default N=1000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
REFERENCE=../shared/reference/hello_bot_polling.py
source benches/common.sh

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

# Seconds for fly poll-echo to drain the backlog: chats, latency_ms.
fly_run() {
    start_emulator "fly$1"; local url=$EMULATOR_URL
    fill_backlog "$url" "$1"; set_latency "$url" "$2"
    local t0 t1
    t0=$(now)
    FLY_BASE_URL=$url FLY_BOT_TOKEN=bench "$FLY" -q poll-echo --state "$WORK/state$1.db" --max-updates "$N" --poll-timeout 1
    t1=$(now)
    [ "$(sent_count "$url")" = "$N" ] || { echo "fly sent the wrong number of replies" >&2; exit 1; }
    # Run in $(…): this shell's PIDS never reach the cleanup, so stop it here.
    kill "$EMULATOR_PID"
    python3 -c "print($t1 - $t0)"
}

# Seconds for the reference example to drain the same backlog.
reference_run() {
    start_emulator "ref$1"; local url=$EMULATOR_URL
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

quick_fly=$(fly_run 10 0)
quick_ref=$(reference_run 10 0)
far_fly=$(fly_run 100 50)
far_ref=$(reference_run 100 50)

python3 - "$N" "$quick_fly" "$quick_ref" "$far_fly" "$far_ref" <<'PY'
import sys
n = int(sys.argv[1])
quick_fly, quick_ref, far_fly, far_ref = map(float, sys.argv[2:])
print(f"drain {n} updates                      wall s   updates/s")
print(f"10 chats, quick    fly poll-echo      {quick_fly:7.2f}   {n/quick_fly:9.0f}")
print(f"                   reference (python) {quick_ref:7.2f}   {n/quick_ref:9.0f}")
print(f"100 chats, 50 ms   fly poll-echo      {far_fly:7.2f}   {n/far_fly:9.0f}")
print(f"                   reference (python) {far_ref:7.2f}   {n/far_ref:9.0f}")
print(f"ratio fly/reference: quick {quick_ref/quick_fly:.1f}x (target >= 4x), 50 ms latency {far_ref/far_fly:.1f}x")
PY
