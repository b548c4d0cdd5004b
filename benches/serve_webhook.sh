#!/usr/bin/env bash
# Benchmark: `fly serve-webhook` vs the platform's reference webhook server
# (Python), side by side on the same signed callback_query bodies (both verify
# them and answer without a reply), under wrk at 32 connections. Two modes:
#
#   duplicate  every request repeats one signed update (fly answers DUPLICATE
#              from its handled ids after the first)
#   distinct   every request is a new update: pre-signed bodies, each with its
#              own update_id and nonce, cycled through by a wrk Lua script, so
#              fly verifies, records the nonce, handles and marks every one
#
# Reports requests/s, p99 latency, non-2xx answers and peak RSS (VmHWM).
# Not a test: run it by hand.
#
#   bash benches/serve_webhook.sh [DURATION_SECS] [MODE]   (10; both, duplicate or distinct)
#   BODIES=N  distinct bodies to sign up front (default 60000 per second)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
MODE=${2:-both}
REFERENCE=../shared/reference/hello_bot_webhook_server.py
# Distinct bodies signed up front: more than fly can take in DURATION seconds,
# so no body is sent twice (the Lua script counts wraps and the run says so).
BODIES=${BODIES:-$((DURATION * 60000))}
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
cat >"$WORK/duplicate.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open("$WORK/body.json", "rb")
wrk.body = file:read("*a")
file:close()
LUA

write_distinct_lua "$WORK/distinct.lua" "$WORK/bodies.ndjson"

run_wrk() { # url label script
    wrk -t2 -c32 -d"${DURATION}s" --latency -s "$3" "$1" -- 2 >"$WORK/$2.wrk"
    local rps p99 non2xx
    read -r _ rps _ p99 non2xx _ < <(wrk_figures "$WORK/$2.wrk" "$2")
    echo "$2 $rps $p99 $non2xx"
}

peak_rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; } # KiB

start_fly() { # state
    "$FLY" -q serve-webhook --bind 127.0.0.1 --port 0 --state "$1" >"$WORK/fly.url" &
    FLY_PID=$!
    PIDS+=("$FLY_PID")
    FLY_URL=$(wait_for_line "$WORK/fly.url")
}

start_reference() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    FLY_WEBHOOK_PORT=$port python3 "$REFERENCE" >/dev/null 2>&1 &
    REF_PID=$!
    PIDS+=("$REF_PID")
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
    REF_URL="http://127.0.0.1:$port/webhook"
}

# SHOW_WRK=1: wrk's own reports too (the reference server's "Socket errors:
# read" are its HTTP/1.0 connections closing after each answer).
show_raw() { [ -n "${SHOW_WRK:-}" ] && cat "$WORK"/*.wrk >&2 || true; }
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

rows=()
if [ "$MODE" = both ] || [ "$MODE" = duplicate ]; then
    start_fly "$WORK/dup.db"
    line=$(run_wrk "$FLY_URL" fly-duplicate "$WORK/duplicate.lua")
    rows+=("duplicate $line $(peak_rss "$FLY_PID")")
    stop "$FLY_PID"
    start_reference
    line=$(run_wrk "$REF_URL" reference-duplicate "$WORK/duplicate.lua")
    rows+=("duplicate $line $(peak_rss "$REF_PID")")
    stop "$REF_PID"
fi
if [ "$MODE" = both ] || [ "$MODE" = distinct ]; then
    make_bodies callback_query "$WORK/bodies.ndjson" "$BODIES"
    start_fly "$WORK/distinct.db"
    line=$(run_wrk "$FLY_URL" fly-distinct "$WORK/distinct.lua")
    rows+=("distinct $line $(peak_rss "$FLY_PID")")
    stop "$FLY_PID"
    # Every request was a new update: each one is a row (none was a duplicate).
    handled=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from handled_updates").fetchone()[0])' "$WORK/distinct.db")
    echo "fly-distinct: $handled updates handled and stored" >&2
    start_reference
    line=$(run_wrk "$REF_URL" reference-distinct "$WORK/distinct.lua")
    rows+=("distinct $line $(peak_rss "$REF_PID")")
    stop "$REF_PID"
fi

show_raw
python3 - "${rows[@]}" <<'PY'
import sys
rows = [line.split() for line in sys.argv[1:]]
print("serve-webhook, wrk 2 threads, 32 connections")
print(f"{'mode':<10} {'server':<22} {'requests/s':>10}   {'p99':>9}   {'non-2xx':>7}   {'peak RSS':>9}")
for mode, label, rps, p99, bad, rss in rows:
    print(f"{mode:<10} {label:<22} {float(rps):10.0f}   {float(p99):6.2f} ms   {bad:>7}   {int(rss)/1024:6.1f} MiB")
by = {(row[0], row[1].split("-")[0]): row for row in rows}
for mode, target_ratio in (("duplicate", 10), ("distinct", 15)):
    if (mode, "fly") in by and (mode, "reference") in by:
        fly, ref = by[(mode, "fly")], by[(mode, "reference")]
        print(f"{mode}: fly/reference {float(fly[2]) / float(ref[2]):.1f}x requests/s "
              f"(target >= {target_ratio}x), fly p99 {float(fly[3]):.2f} ms (target <= 5 ms)")
PY
