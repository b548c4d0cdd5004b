#!/usr/bin/env bash
# Benchmark: drain a backlog of N messages from `fly emulator`, side by side:
# `fly poll-echo` vs the platform's reference polling example (Python).
# Reports updates/s for both and the ratio. Not a test: run it by hand.
#
#   bash benches/poll_echo.sh [N]        (default N=1000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
REFERENCE=../shared/reference/hello_bot_polling.py
source benches/common.sh

fill_backlog() { # base_url
    python3 - "$1" "$N" <<'PY'
import sys, requests
base, n = sys.argv[1], int(sys.argv[2])
s = requests.Session()
for i in range(n):
    chat = {"type": "group" if i % 3 == 0 else "private", "id": f"c_{i % 10}"}
    s.post(base + "/_emulator/messages", json={"chat": chat, "msgType": "text", "data": {"content": f"message {i}"}}).raise_for_status()
PY
}

sent_count() { python3 -c "import sys,requests; print(len(requests.get(sys.argv[1]+'/_emulator/sent').json()['sent']))" "$1"; }
now() { date +%s.%N; }

# fly
start_emulator fly; URL=$EMULATOR_URL
fill_backlog "$URL"
t0=$(now)
FLY_BASE_URL=$URL FLY_BOT_TOKEN=bench "$FLY" -q poll-echo --state "$WORK/state.db" --max-updates "$N" --poll-timeout 1
t1=$(now)
[ "$(sent_count "$URL")" = "$N" ] || { echo "fly sent the wrong number of replies"; exit 1; }
fly_secs=$(python3 -c "print($t1 - $t0)")

# reference
start_emulator ref; URL=$EMULATOR_URL
fill_backlog "$URL"
t0=$(now)
FLY_BASE_URL=$URL FLY_BOT_TOKEN=bench python3 "$REFERENCE" >/dev/null 2>&1 &
REF=$!; PIDS+=($REF)
while [ "$(sent_count "$URL")" -lt "$N" ]; do sleep 0.05; done
t1=$(now)
kill $REF
ref_secs=$(python3 -c "print($t1 - $t0)")

python3 - "$N" "$fly_secs" "$ref_secs" <<'PY'
import sys
n, fly, ref = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
print(f"drain {n} updates      wall s   updates/s")
print(f"fly poll-echo        {fly:7.2f}   {n/fly:9.0f}")
print(f"reference (python)   {ref:7.2f}   {n/ref:9.0f}")
print(f"ratio fly/reference: {ref/fly:.1f}x (target >= 4x)")
PY
