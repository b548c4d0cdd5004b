#!/usr/bin/env bash
# Benchmark: `fly serve-webhook` under sustained load (issue 30). What a short
# run on a fresh state hides: checkpoints, merges, pruning, tables and
# memory that grow with the updates seen. Every request is a new signed
# callback_query (its own update_id and random nonce, pre-signed as in
# benches/serve_webhook.sh's distinct mode), under wrk, in back-to-back
# windows of WINDOW_SECS, each over a fresh set of bodies; after each
# window: its updates/s and p99, the server's RSS (VmRSS) and the size of
# its state. Beside it, the short run: one window on a fresh state.
#
#   sqlite  one replica on its SQLite file, wrk 2 threads 32 connections;
#           state = the file and its write-ahead log (db + db-wal)
#   redis   three replicas on one redis-server (as benches/redis.sh): three
#           wrk (1 thread, 11 connections each), each on its own third of
#           the bodies; updates/s is their sum, p99 the worst, RSS the
#           largest replica's; state = redis-server's used_memory
#
# Targets (2 cores). sqlite: every window's p99 <= 5 ms, the slowest
# window's rate within 15% of the fastest's, RSS after the first window
# within 10% of it. redis: no window's p99 above 3x the first's.
# Not a test: run it by hand, on a quiet machine.
#
#   bash benches/sustained.sh [WINDOWS] [STATE]   (12 windows; sqlite or redis)
#   WINDOW_SECS=N  seconds a window (default 5)
#   PER_WINDOW=N   distinct bodies signed up front per window (default 80000
#                  per second of a window: more than fly takes, so none is
#                  sent twice; a window that runs out says so)
set -euo pipefail
cd "$(dirname "$0")/.."
WINDOWS=${1:-12}
STATE=${2:-sqlite}
WINDOW_SECS=${WINDOW_SECS:-5}
PER_WINDOW=${PER_WINDOW:-$((WINDOW_SECS * 80000))}
case $STATE in
sqlite | redis) ;;
*)
    echo "sustained.sh: unknown state '$STATE' (sqlite or redis)" >&2
    exit 2
    ;;
esac
# Every body is signed before the first window: the last must still be
# inside the platform's 300 s replay window when it is sent (a window
# takes about a second more than WINDOW_SECS: wrk reading its bodies).
if [ $(((WINDOWS + 1) * (WINDOW_SECS + 2))) -gt 220 ]; then
    echo "sustained.sh: $WINDOWS windows of ${WINDOW_SECS}s outlast the 300 s replay window of the bodies signed up front; fewer or shorter" >&2
    exit 2
fi
needed=(wrk python3)
[ "$STATE" = redis ] && needed+=(redis-server redis-cli)
for tool in "${needed[@]}"; do
    if ! command -v "$tool" >/dev/null; then
        package=$tool
        [ "${tool#redis-}" != "$tool" ] && package=redis-server
        echo "sustained.sh: $tool is needed and not installed (Debian package: $package)" >&2
        exit 1
    fi
done
source benches/common.sh
export FLY_BOT_TOKEN=bench-token FLY_WEBHOOK_SECRET=bench-secret
start_emulator
export FLY_BASE_URL=$EMULATOR_URL

# Window n's bodies: update ids of their own, signed two files at a time.
signing_started=$(date +%s)
signers=()
for n in $(seq 0 $((WINDOWS - 1))); do
    make_bodies callback_query "$WORK/w$n.ndjson" "$PER_WINDOW" $((n * PER_WINDOW)) &
    signers+=($!)
    if [ ${#signers[@]} = 2 ]; then
        wait "${signers[@]}"
        signers=()
    fi
    write_distinct_lua "$WORK/w$n.lua" "$WORK/w$n.ndjson"
done
[ ${#signers[@]} = 0 ] || wait "${signers[@]}"
signed_in=$(($(date +%s) - signing_started))
echo "sustained.sh: $((WINDOWS * PER_WINDOW)) bodies signed in ${signed_in}s" >&2
if [ $((signed_in + (WINDOWS + 1) * (WINDOW_SECS + 2))) -gt 280 ]; then
    echo "sustained.sh: signing took ${signed_in}s: the last bodies would be sent past the 300 s replay window; fewer windows or PER_WINDOW" >&2
    exit 1
fi

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
file_kib() { # the state file and its log
    local total=0 part
    for part in "$1" "$1-wal"; do
        [ -e "$part" ] && total=$((total + $(stat -c %s "$part")))
    done
    echo $((total / 1024))
}

REPLICA_PIDS=()
REPLICA_URLS=()
start_replica() { # state label
    "$FLY" -q serve-webhook --bind 127.0.0.1 --port 0 --state "$1" >"$WORK/$2.url" &
    PIDS+=($!)
    REPLICA_PIDS+=($!)
    REPLICA_URLS+=("$(wait_for_line "$WORK/$2.url")")
}
stop_replicas() {
    for pid in "${REPLICA_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    REPLICA_PIDS=()
    REPLICA_URLS=()
}

if [ "$STATE" = redis ]; then
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
fi

# A fresh state, and the replicas on it.
start_state() { # label
    if [ "$STATE" = sqlite ]; then
        STATE_AT=$WORK/$1.db
        start_replica "$STATE_AT" "$1"
    else
        redis-cli -p "$REDIS_PORT" flushall >/dev/null
        STATE_AT=redis://127.0.0.1:$REDIS_PORT
        for n in 0 1 2; do start_replica "$STATE_AT" "$1$n"; done
    fi
}

state_kib() {
    if [ "$STATE" = sqlite ]; then
        file_kib "$STATE_AT"
    else
        redis-cli -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print int($2 / 1024)}'
    fi
}

# One window over window n's bodies: prints "requests updates/s p99
# non-2xx repeats RSS state" (RSS in KiB, the largest replica's).
run_window() { # n label
    local wrk_pids=() reports=() k
    if [ "$STATE" = sqlite ]; then
        wrk -t2 -c32 -d"${WINDOW_SECS}s" --latency -s "$WORK/w$1.lua" "${REPLICA_URLS[0]}" -- 2 \
            >"$WORK/$2.wrk" &
        wrk_pids+=($!)
        reports+=("$WORK/$2.wrk")
    else
        for k in 0 1 2; do
            wrk -t1 -c11 -d"${WINDOW_SECS}s" --latency -s "$WORK/w$1.lua" "${REPLICA_URLS[$k]}" -- 1 "$k" 3 \
                >"$WORK/$2.$k.wrk" &
            wrk_pids+=($!)
            reports+=("$WORK/$2.$k.wrk")
        done
    fi
    PIDS+=("${wrk_pids[@]}")
    wait "${wrk_pids[@]}"
    local rss=0 pid
    for pid in "${REPLICA_PIDS[@]}"; do
        local own
        own=$(rss_kib "$pid")
        [ "$own" -gt "$rss" ] && rss=$own
    done
    local report
    for report in "${reports[@]}"; do wrk_figures "$report" "$2"; done |
        awk -v rss="$rss" -v state="$(state_kib)" '
            { requests += $1; rps += $2; if ($4 > p99) p99 = $4; bad += $5; wrapped += $6 }
            END { print requests, rps, p99, bad, wrapped, rss, state }'
}

rows=()
# The short run: one window on a fresh state.
start_state short
read -r requests rps p99 bad wrapped rss state < <(run_window 0 short)
rows+=("short $requests $rps $p99 $bad $wrapped $rss $state")
stop_replicas

start_state sustained
for n in $(seq 0 $((WINDOWS - 1))); do
    read -r requests rps p99 bad wrapped rss state < <(run_window "$n" "window$n")
    rows+=("$((n + 1)) $requests $rps $p99 $bad $wrapped $rss $state")
    echo "window $((n + 1)): $rps updates/s, p99 $p99 ms, RSS $((rss / 1024)) MiB" >&2
    if [ "$requests" = 0 ]; then
        echo "sustained.sh: window $((n + 1)): no answer from the server" >&2
        cat "$WORK"/window"$n"*.wrk >&2
        exit 1
    fi
done
stop_replicas
stored=-
if [ "$STATE" = sqlite ]; then
    stored=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from handled_updates").fetchone()[0])' "$STATE_AT")
else
    stored=$(redis-cli -p "$REDIS_PORT" eval "return #redis.call('keys', ARGV[1])" 0 '*:handled:*')
fi

python3 - "$STATE" "$WINDOW_SECS" "$stored" "${rows[@]}" <<'PY'
import sys
state, window_secs, stored, rows = sys.argv[1], sys.argv[2], sys.argv[3], [r.split() for r in sys.argv[4:]]
setup = {"sqlite": "1 replica on its SQLite file, wrk 2 threads 32 connections",
         "redis": "3 replicas on one Redis, 3 wrk of 1 thread 11 connections"}[state]
state_name = {"sqlite": "db + wal", "redis": "redis used"}[state]
print(f"serve-webhook, distinct updates, {setup}, {window_secs} s windows")
print(f"{'window':<7} {'updates':>9} {'updates/s':>10} {'p99':>9} {'non-2xx':>8} {'RSS':>9} {state_name:>11}")
for label, requests, rps, p99, bad, wrapped, rss, size in rows:
    print(f"{label:<7} {int(requests):>9} {float(rps):10.0f} {float(p99):6.2f} ms {int(bad):>8} "
          f"{int(rss) / 1024:5.1f} MiB {int(size) / 1024:7.1f} MiB")
short, windows = rows[0], rows[1:]
if any(int(r[5]) for r in rows):
    print("warning: a window ran out of distinct bodies (repeats were sent); raise PER_WINDOW")
total = sum(int(r[1]) for r in windows)
rates = [float(r[2]) for r in windows]
p99s = [float(r[3]) for r in windows]
rss = [int(r[6]) for r in windows]
print(f"sustained: {total} updates in {len(windows)} windows ({stored} stored), "
      f"{sum(rates) / len(rates):.0f} updates/s on average; short run {float(short[2]):.0f}/s, "
      f"p99 {float(short[3]):.2f} ms")
verdict = lambda ok: "ok" if ok else "MISSED"
if state == "sqlite":
    print(f"worst window p99: {max(p99s):.2f} ms (target <= 5 ms: {verdict(max(p99s) <= 5)})")
    print(f"slowest/fastest window: {min(rates) / max(rates):.3f} (target >= 0.85: "
          f"{verdict(min(rates) >= 0.85 * max(rates))})")
    if len(rss) > 1:
        growth = max(rss[1:]) / rss[0]
        print(f"largest RSS after window 1 / RSS at window 1: {growth:.3f} (target <= 1.10: "
              f"{verdict(growth <= 1.10)})")
else:
    print(f"worst window p99 / first window's: {max(p99s) / p99s[0]:.2f} (target <= 3: "
          f"{verdict(max(p99s) <= 3 * p99s[0])})")
    if len(rss) > 1:
        print(f"largest replica RSS after window 1 / at window 1: {max(rss[1:]) / rss[0]:.3f}")
PY
