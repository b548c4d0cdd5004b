#!/usr/bin/env bash
# Benchmark: handlers behind `fly serve-webhook`, under wrk, every request a
# new signed text message (pre-signed bodies, each with its own update_id and
# nonce, cycled through by a wrk Lua script: see benches/common.sh). Two parts:
#
#   fork    the fork path, the same processes on each side: one /bin/sh
#           running a builtin on the update. fly serve-webhook --exec
#           'read -r x || :' (the update on stdin) against adnanh/webhook (Go;
#           Debian package `webhook`, installed when missing) running
#           /bin/sh -c 'printf %s "$1" >/dev/null' with the payload as an
#           argument (it has no stdin to give), both checking an HMAC (fly:
#           signature v1, the replay window and the nonce; webhook:
#           payload-hmac-sha256 of the body in a header) and waiting for the
#           command; 1 and 8 connections. Target: fly >= the peer's rate at
#           both.
#   python  the same Python bot (fixtures/bot.py, fixtures/worker.py: text in
#           capitals, sent back to the chat through a local emulator), a
#           process per update (--exec) against long-lived workers
#           (--exec-worker), 8 connections, --concurrency 8. Target: >= 50x.
#
# Reports requests/s, p50 and p99 latency, non-2xx answers and the server's
# own CPU time per request (its children's not counted). On a shared machine
# the load changes from one run to the next, so the fork part runs fly and
# the peer in turn, ROUNDS times each, and shows every run and the medians.
# Not a test: run it by hand.
#
#   bash benches/exec.sh [DURATION_SECS] [PART]   (10; both, fork or python)
#   ROUNDS=N     runs of each server in the fork part (default 3)
#   FLY_BEFORE=PATH  another fly binary (an older build) run in the fork
#                part's rounds too, beside the release build: before/after
#   BODIES=N     distinct bodies to sign up front (default 8000 per second)
#   SHOW_WRK=1   wrk's own reports too
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:-10}
PART=${2:-both}
BODIES=${BODIES:-$((DURATION * 8000))}
ROUNDS=${ROUNDS:-3}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v webhook >/dev/null || missing+=(webhook)
if [ ${#missing[@]} -gt 0 ]; then
    (apt-get update -qq && apt-get install -y -qq "${missing[@]}") >/dev/null
fi
source benches/common.sh
# The release build of this tree, wherever cargo put it.
FLY=${CARGO_TARGET_DIR:+$(realpath "$CARGO_TARGET_DIR")/release/fly}
FLY=${FLY:-$PWD/target/release/fly}
export FLY_BOT_TOKEN=bench-token FLY_WEBHOOK_SECRET=bench-secret

# Replies (the Python bot's) go to a local emulator.
start_emulator
export FLY_BASE_URL=$EMULATOR_URL

make_bodies message "$WORK/bodies.ndjson" "$BODIES"
write_distinct_lua "$WORK/distinct.lua" "$WORK/bodies.ndjson"

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# The CPU time (user + system, ms) process $1 has used itself, and that of
# its children it has waited for (the handlers), as "self children".
cpu_ms() { awk -v tick="$(getconf CLK_TCK)" '{print ($14 + $15) * 1000 / tick, ($16 + $17) * 1000 / tick}' "/proc/$1/stat"; }

run_wrk() { # url label connections pid
    local threads=$(($3 < 2 ? $3 : 2)) cpu_before cpu_after
    cpu_before=$(cpu_ms "$4")
    local report="$WORK/$2-$3-$RANDOM.wrk"
    wrk -t"$threads" -c"$3" -d"${DURATION}s" --latency -s "$WORK/distinct.lua" "$1" -- "$threads" >"$report"
    cpu_after=$(cpu_ms "$4")
    local requests rps p50 p99 non2xx
    read -r requests rps p50 p99 non2xx _ < <(wrk_figures "$report" "$2")
    local cpu
    cpu=$(echo "$cpu_before $cpu_after" | awk -v n="$requests" '{printf "%.3f %.3f", ($3 - $1) / n, ($4 - $2) / n}')
    echo "$2 $3 $rps $p50 $p99 $non2xx $cpu"
}

start_fly() { # label, then serve-webhook's handler arguments (BINARY: another fly)
    local label=$1
    shift
    "${BINARY:-$FLY}" -q serve-webhook --bind 127.0.0.1 --port 0 --state "$WORK/$label.db" "$@" \
        >"$WORK/$label.url" 2>"$WORK/$label.log" &
    FLY_PID=$!
    PIDS+=("$FLY_PID")
    FLY_URL=$(wait_for_line "$WORK/$label.url")
}

start_webhook() {
    local port
    port=$(free_port)
    cat >"$WORK/hooks.json" <<JSON
[{
  "id": "bot",
  "execute-command": "/bin/sh",
  "pass-arguments-to-command": [
    {"source": "string", "name": "-c"},
    {"source": "string", "name": "printf %s \\"\$1\\" >/dev/null"},
    {"source": "string", "name": "sh"},
    {"source": "entire-payload"}
  ],
  "include-command-output-in-response": true,
  "trigger-rule-mismatch-http-response-code": 401,
  "trigger-rule": {"match": {"type": "payload-hmac-sha256", "secret": "$FLY_WEBHOOK_SECRET",
                             "parameter": {"source": "header", "name": "X-Body-Signature"}}}
}]
JSON
    webhook ${PEER_VERBOSE:+-verbose} -hooks "$WORK/hooks.json" -ip 127.0.0.1 -port "$port" >"$WORK/webhook.log" 2>&1 &
    PEER_PID=$!
    PIDS+=("$PEER_PID")
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
    PEER_URL="http://127.0.0.1:$port/hooks/bot"
    # One signed body through it: answered 200 (a wrong HMAC would be 401).
    local status
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Content-Type: application/json" \
        -H "X-Body-Signature: sha256=$(tail -1 "$WORK/bodies.ndjson.hmac")" \
        --data-binary "@$WORK/check.json" "$PEER_URL")
    [ "$status" = 200 ] || { echo "adnanh/webhook answered $status to a signed body" >&2; cat "$WORK/webhook.log" >&2; exit 1; }
}
tail -1 "$WORK/bodies.ndjson" | tr -d "\n" >"$WORK/check.json"

# The floor: fly's command alone, spawned and waited for in a loop with the
# update on stdin (no HTTP, no HMAC), so a p50 can be read against what a
# fork and an exec cost here.
fork_floor() {
    python3 - "$WORK/check.json" <<'PY'
import os, statistics, sys, time
body = open(sys.argv[1], "rb").read()
runs = []
for _ in range(300):
    started = time.perf_counter()
    read_end, write_end = os.pipe()
    actions = [(os.POSIX_SPAWN_DUP2, read_end, 0), (os.POSIX_SPAWN_CLOSE, write_end)]
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "read -r x || :"], os.environ, file_actions=actions)
    os.close(read_end)
    os.write(write_end, body)
    os.close(write_end)
    os.waitpid(pid, 0)
    runs.append(time.perf_counter() - started)
print(f"{statistics.median(runs) * 1000:.2f}")
PY
}

rows=()
if [ "$PART" = both ] || [ "$PART" = fork ]; then
    FLOOR=$(fork_floor)
    for connections in 1 8; do
        for round in $(seq "$ROUNDS"); do
            # A new state file each run: every body is a new update again.
            start_fly "fork-$connections-$round" --exec 'read -r x || :'
            rows+=("fork $(run_wrk "$FLY_URL" fly-exec "$connections" "$FLY_PID")")
            stop "$FLY_PID"
            if [ -n "${FLY_BEFORE:-}" ]; then
                BINARY=$FLY_BEFORE start_fly "before-$connections-$round" --exec 'read -r x || :'
                rows+=("fork $(run_wrk "$FLY_URL" fly-before "$connections" "$FLY_PID")")
                stop "$FLY_PID"
            fi
            start_webhook
            rows+=("fork $(run_wrk "$PEER_URL" adnanh-webhook "$connections" "$PEER_PID")")
            stop "$PEER_PID"
        done
    done
fi
# The interpreter itself, not a wrapper in front of it (a pyenv shim is a
# shell script that costs more than Python's own start).
PYTHON=$(python3 -c 'import sys; print(sys.executable)')
if [ "$PART" = both ] || [ "$PART" = python ]; then
    start_fly python-exec --concurrency 8 --exec "$PYTHON $PWD/fixtures/bot.py"
    rows+=("python $(run_wrk "$FLY_URL" per-update 8 "$FLY_PID")")
    stop "$FLY_PID"
    start_fly python-worker --concurrency 8 --exec-worker "$PYTHON $PWD/fixtures/worker.py"
    rows+=("python $(run_wrk "$FLY_URL" worker 8 "$FLY_PID")")
    stop "$FLY_PID"
    # Every reply was sent: one per update the worker run answered 200.
    echo "emulator: $(curl -s "$EMULATOR_URL/_emulator/sent" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["sent"]))') replies in all" >&2
fi

[ -n "${SHOW_WRK:-}" ] && cat "$WORK"/*.wrk >&2
FLOOR=${FLOOR:-} python3 - "${rows[@]}" <<'PY'
import os, statistics, sys
rows = [line.split() for line in sys.argv[1:]]
print("handlers behind a webhook, wrk, every request a new signed text message")
print(f"{'part':<7} {'server':<16} {'conns':>5} {'requests/s':>11} {'p50':>10} {'p99':>10} {'non-2xx':>8}"
      f" {'CPU/request: server':>20} {'commands':>9}")
for part, label, conns, rps, p50, p99, bad, cpu, children in rows:
    print(f"{part:<7} {label:<16} {conns:>5} {float(rps):11.0f} {float(p50):7.2f} ms {float(p99):7.2f} ms {bad:>8}"
          f" {float(cpu):17.3f} ms {float(children):6.3f} ms")
if os.environ.get("FLOOR"):
    print(f"fly's command alone, sh -c 'read -r x || :' spawned with the update on stdin and waited for"
          f" in a loop: {os.environ['FLOOR']} ms per run (median)")
def median(label, conns, column):
    values = [float(row[column]) for row in rows if row[1] == label and row[2] == conns]
    return statistics.median(values) if values else None
for conns in ("1", "8"):
    fly, peer = median("fly-exec", conns, 3), median("adnanh-webhook", conns, 3)
    if fly and peer:
        fly_p50, peer_p50 = median("fly-exec", conns, 4), median("adnanh-webhook", conns, 4)
        print(f"fork, {conns} connection(s), medians: fly {fly:.0f}/s p50 {fly_p50:.2f} ms, "
              f"webhook {peer:.0f}/s p50 {peer_p50:.2f} ms: fly/webhook {fly / peer:.2f}x requests/s "
              f"(target >= 1x)")
    before = median("fly-before", conns, 3)
    if fly and before:
        print(f"fork, {conns} connection(s): fly/fly-before {fly / before:.2f}x requests/s, CPU per request"
              f" {median('fly-exec', conns, 7):.3f} against {median('fly-before', conns, 7):.3f} ms")
worker, per_update = median("worker", "8", 3), median("per-update", "8", 3)
if worker and per_update:
    print(f"python: worker/per-update {worker / per_update:.0f}x updates/s (target >= 50x)")
PY
