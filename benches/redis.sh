#!/usr/bin/env bash
# Benchmark: distinct webhook updates per second through three
# `fly serve-webhook` replicas sharing one Redis (SPEC 4b), against one
# replica on its SQLite file, in the same run on the same machine.
#
# Every request is a new signed callback_query (its own update_id and random
# nonce, pre-signed, as in benches/serve_webhook.sh's distinct mode): each
# replica verifies it, admits it in one Redis script (handled? nonce? claim),
# handles it (no reply for a callback_query) and marks it handled.
#
#   sqlite  wrk -t2 -c32 against the one replica
#   redis   three wrk (-t1 -c11 each, 33 connections in all), one per replica,
#           each on its own third of the bodies: the load balancer's share.
#           requests/s is their sum, p99 the worst of the three.
#
# Then counts what was stored: every request must be one handled update.
# Also per handled update: the round trips to Redis (the read events the
# server processed, less the replicas' health pings: one per request or
# pipeline a connection sent), the server's CPU, and the replicas' CPU (on
# each side): CPU per update is what load on the machine distorts least.
# Not a test: run it by hand, on a quiet machine.
#
#   bash benches/redis.sh [DURATION_SECS]   (10)
#   BODIES=N  distinct bodies to sign up front (default 80000 per second)
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
BODIES=${BODIES:-$((DURATION * 80000))}
if ! command -v wrk >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
if ! command -v redis-server >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null
fi
source benches/common.sh
export FLY_BOT_TOKEN=bench-token FLY_WEBHOOK_SECRET=bench-secret
start_emulator
export FLY_BASE_URL=$EMULATOR_URL

make_bodies callback_query "$WORK/bodies.ndjson" "$BODIES"
write_distinct_lua "$WORK/distinct.lua" "$WORK/bodies.ndjson"

run_wrk() { # url label threads connections part parts
    wrk -t"$3" -c"$4" -d"${DURATION}s" --latency -s "$WORK/distinct.lua" "$1" -- "$3" "$5" "$6" >"$WORK/$2.wrk"
}

# requests/s, p99 in ms, non-2xx answers, repeated bodies of one wrk report.
read_wrk() { # label
    local rps p99 bad wrapped
    read -r _ rps _ p99 bad wrapped < <(wrk_figures "$WORK/$1.wrk" "$1" 2>/dev/null)
    echo "$rps $p99 $bad $wrapped"
}

start_replica() { # state label
    "$FLY" -q serve-webhook --bind 127.0.0.1 --port 0 --state "$1" >"$WORK/$2.url" &
    PIDS+=($!)
    REPLICA_PIDS+=($!)
    REPLICA_URL=$(wait_for_line "$WORK/$2.url")
}

# user+sys CPU seconds of process $1 so far.
cpu_secs() { awk -v tick="$(getconf CLK_TCK)" '{ print ($14 + $15) / tick }' "/proc/$1/stat"; }

# CPU seconds of the replicas running now, summed.
replicas_cpu() {
    local total=0 pid
    for pid in "${REPLICA_PIDS[@]}"; do total=$(python3 -c "print($total + $(cpu_secs "$pid"))"); done
    echo "$total"
}

# Field $2 of redis-cli INFO section $1 (a number; 0 when absent).
redis_info() { redis-cli -p "$REDIS_PORT" info "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2; found = 1 } END { if (!found) print 0 }'; }

# The calls of one command in INFO commandstats.
redis_calls() { redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[:=,]' -v k="cmdstat_$1" '$1 == k { print $3; found = 1 } END { if (!found) print 0 }'; }

stop_replicas() {
    for pid in "${REPLICA_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    REPLICA_PIDS=()
}

# --- one replica, SQLite
REPLICA_PIDS=()
start_replica "$WORK/sqlite.db" sqlite
sqlite_cpu0=$(replicas_cpu)
run_wrk "$REPLICA_URL" sqlite 2 32 0 1
sqlite_cpu=$(python3 -c "print($(replicas_cpu) - $sqlite_cpu0)")
read -r sqlite_rps sqlite_p99 sqlite_bad sqlite_wrapped < <(read_wrk sqlite)
stop_replicas
sqlite_stored=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from handled_updates").fetchone()[0])' "$WORK/sqlite.db")

# --- three replicas, one Redis (loopback TCP, no persistence)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
urls=()
for n in 0 1 2; do
    start_replica "redis://127.0.0.1:$REDIS_PORT" "redis$n"
    urls+=("$REPLICA_URL")
done
redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
redis_cpu0=$(python3 -c "print($(redis_info cpu used_cpu_user) + $(redis_info cpu used_cpu_sys))")
replicas_cpu0=$(replicas_cpu)
for n in 0 1 2; do
    run_wrk "${urls[$n]}" "redis$n" 1 11 "$n" 3 &
    WRK_PIDS+=($!)
done
wait "${WRK_PIDS[@]}"
replicas_cpu=$(python3 -c "print($(replicas_cpu) - $replicas_cpu0)")
redis_cpu=$(python3 -c "print($(redis_info cpu used_cpu_user) + $(redis_info cpu used_cpu_sys) - $redis_cpu0)")
redis_reads=$(redis_info stats total_reads_processed)
redis_pings=$(redis_calls ping)
redis_evalsha=$(redis_calls evalsha)
stop_replicas
redis_stored=$(redis-cli -p "$REDIS_PORT" eval "return #redis.call('keys', ARGV[1])" 0 '*:handled:*')
redis_rows=()
for n in 0 1 2; do redis_rows+=("$(read_wrk "redis$n")"); done

python3 - "$DURATION" "$sqlite_rps $sqlite_p99 $sqlite_bad $sqlite_wrapped $sqlite_stored $sqlite_cpu" \
    "$redis_stored $replicas_cpu $redis_cpu $redis_reads $redis_pings $redis_evalsha" "${redis_rows[@]}" <<'PY'
import sys
duration = float(sys.argv[1])
s_rps, s_p99, s_bad, s_wrapped, s_stored, s_cpu = sys.argv[2].split()
redis_stored, replicas_cpu, redis_cpu, reads, pings, evalsha = (float(x) for x in sys.argv[3].split())
redis_stored = int(redis_stored)
parts = [row.split() for row in sys.argv[4:]]
r_rps = sum(float(p[0]) for p in parts)
r_p99 = max(float(p[1]) for p in parts)
r_bad = sum(int(p[2]) for p in parts)
r_wrapped = sum(int(p[3]) for p in parts)
print(f"serve-webhook, distinct updates, {duration:.0f} s each")
print(f"{'set-up':<32} {'updates/s':>10}   {'p99':>9}   {'non-2xx':>7}   {'stored':>8}")
print(f"{'1 replica, SQLite file':<32} {float(s_rps):10.0f}   {float(s_p99):6.2f} ms   {s_bad:>7}   {s_stored:>8}")
print(f"{'3 replicas, one Redis':<32} {r_rps:10.0f}   {r_p99:6.2f} ms   {r_bad:>7}   {redis_stored:>8}")
per = ", ".join(f"{float(p[0]):.0f}/s p99 {float(p[1]):.2f} ms" for p in parts)
print(f"  per replica: {per}")
if int(s_wrapped) or r_wrapped:
    print("warning: ran out of distinct bodies (repeats were sent); raise BODIES")
per_update = max(redis_stored, 1)
print(f"per handled update: {(reads - pings) / per_update:.2f} round trips to Redis "
      f"({evalsha / per_update:.2f} EVALSHA), Redis CPU {redis_cpu / per_update * 1e6:.1f} us, "
      f"replicas' CPU {replicas_cpu / per_update * 1e6:.1f} us "
      f"(1 replica on SQLite: {float(s_cpu) / max(int(s_stored), 1) * 1e6:.1f} us)")
print(f"3 replicas on Redis / 1 on SQLite: {r_rps / float(s_rps):.2f}x updates/s (target >= 0.5x)")
PY
