#!/usr/bin/env bash
# Benchmark: `fly serve-webhook` vs the platform's reference webhook server
# (Python), same signed callback_query body (both verify it and answer without
# a reply), under wrk at 32 connections. Reports requests/s and p99 latency
# side by side. Not a test: run it by hand.
#
#   bash benches/serve_webhook.sh [DURATION_SECS]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
REFERENCE=../shared/reference/hello_bot_webhook_server.py
if ! command -v wrk >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
source benches/common.sh
export FLY_BOT_TOKEN=bench-token FLY_WEBHOOK_SECRET=bench-secret

# Replies (none for callback_query) would go to a local emulator.
start_emulator
export FLY_BASE_URL=$EMULATOR_URL

echo '{"update_id":7,"type":"callback_query","callback_query":{"id":"cb_1","data":"approve","from":{"id":"u_1"}}}' \
    | "$FLY" sign --bot-id bot_bench >"$WORK/body.json"
"$FLY" verify-sig "$WORK/body.json" >/dev/null
cat >"$WORK/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open("$WORK/body.json", "rb")
wrk.body = file:read("*a")
file:close()
LUA

run_wrk() { # url label
    wrk -t2 -c32 -d"${DURATION}s" --latency -s "$WORK/post.lua" "$1" >"$WORK/$2.wrk"
    local rps p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' "$WORK/$2.wrk")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/$2.wrk")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$WORK/$2.wrk")
    echo "$2 $rps $p99 ${non2xx:-0}"
}

"$FLY" -q serve-webhook --bind 127.0.0.1 --port 0 --state "$WORK/state.db" >"$WORK/fly.url" & PIDS+=($!)
FLY_URL=$(wait_for_line "$WORK/fly.url")
fly_line=$(run_wrk "$FLY_URL" fly)

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
FLY_WEBHOOK_PORT=$PORT python3 "$REFERENCE" >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.05; done
ref_line=$(run_wrk "http://127.0.0.1:$PORT/webhook" reference)

python3 - "$fly_line" "$ref_line" <<'PY'
import sys
def ms(text):
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    for unit in ("us", "ms", "s"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float("nan")
rows = [line.split() for line in sys.argv[1:]]
print("serve-webhook, 32 connections   requests/s   p99 latency   non-2xx")
for label, rps, p99, bad in rows:
    print(f"{label:<31} {float(rps):10.0f}   {ms(p99):8.2f} ms   {bad}")
(_, fly_rps, fly_p99, _), (_, ref_rps, ref_p99, _) = rows
print(f"ratio fly/reference: {float(fly_rps)/float(ref_rps):.1f}x requests/s (target >= 10x), "
      f"fly p99 {ms(fly_p99):.2f} ms (target <= 5 ms)")
PY
