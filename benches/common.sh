# Shared by the benchmark scripts (sourced, not run): a release build, a
# scratch directory, background processes killed on exit, and emulators.
# Sets FLY (the release binary) and WORK (removed on exit).
cargo build --release --quiet
FLY=${CARGO_TARGET_DIR:-$PWD/target}/release/fly
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# Prints the first line of file $1 once something has written it (10 s at most).
wait_for_line() { for _ in $(seq 200); do [ -s "$1" ] && break; sleep 0.05; done; head -1 "$1"; }

# Starts `fly emulator` on a free port in the background and sets EMULATOR_URL
# to its base URL; $1 names it, when a script runs several. Not to be called
# in $(…): the process id must reach PIDS in this shell to be killed on exit.
start_emulator() {
    "$FLY" emulator --port 0 >"$WORK/emu.${1:-main}" 2>/dev/null &
    EMULATOR_PID=$!
    PIDS+=($EMULATOR_PID)
    EMULATOR_URL=$(wait_for_line "$WORK/emu.${1:-main}")
}

# A free loopback port, for a peer that cannot listen on port 0 and say which
# port it got (redis-server, adnanh/webhook). Another process may take it
# first; a benchmark run is repeated by hand, so that is left at a failed run.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The figures of wrk report $1 (run with --latency) as one line: requests,
# requests/s, p50 and p99 in ms, non-2xx answers, repeated bodies. Warns on
# stderr, naming the run $2, when it ran out of distinct bodies.
wrk_figures() { # report label
    awk -v label="$2" '
        function ms(value) {
            if (value ~ /us$/) return value / 1000
            if (value ~ /ms$/) return value + 0
            if (value ~ /m$/) return value * 60000
            if (value ~ /s$/) return value * 1000
            return "nan"
        }
        /requests in/ { requests = $1 }
        /Requests\/sec/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx/ { bad = $NF }
        $1 == "wrapped" { wrapped = $2 }
        END {
            if (wrapped + 0 > 0)
                printf "warning: %s ran out of distinct bodies (%d repeats); raise BODIES\n", label, wrapped > "/dev/stderr"
            print requests + 0, rps + 0, p50, p99, bad + 0, wrapped + 0
        }' "$1"
}

# Writes $3 signed updates of kind $1 (callback_query, or message: a text
# message, chats u_0…u_99 in turn) to file $2, one per line, each with its own
# update_id (1000000 + $4 + its line number: each file of one run gets its
# own $4, default 0) and random nonce (as the platform's: no order for a
# B-tree to exploit), signed with $FLY_WEBHOOK_SECRET as the platform signs
# (timestamp now: inside the 300 s replay window for a few minutes). Also
# $2.hmac: per line, the HMAC-SHA256 of the whole body, for peers that check
# a header. The JSON is written as json.dumps would (sorted keys where the
# signature wants them) by string formatting: a few microseconds a body, so
# that millions can be signed up front.
make_bodies() { # kind file count [first]
    python3 - "$1" "$3" "$FLY_WEBHOOK_SECRET" "$2" "${4:-0}" <<'PY'
import hashlib, hmac, os, sys, time
kind, count, secret, path = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
first = int(sys.argv[5])
now = int(time.time())
digest, sha256 = hmac.digest, hashlib.sha256
CHUNK = 65536
with open(path, "w") as bodies, open(path + ".hmac", "w") as macs:
    for start in range(0, count, CHUNK):
        lines, line_macs = [], []
        randoms = os.urandom(16 * CHUNK).hex()
        for n in range(start, min(count, start + CHUNK)):
            i = first + n
            update_id = 1_000_000 + i
            if kind == "callback_query":
                canonical = '{"data":"approve","from":{"id":"u_%d"},"id":"cb_%d"}' % (i % 100, i)
                payload = '{"id":"cb_%d","data":"approve","from":{"id":"u_%d"}}' % (i, i % 100)
            else:
                canonical = ('{"chat":{"id":"u_%d","type":"private"},"data":{"content":"hello %d"},'
                             '"msgType":"text"}' % (i % 100, i))
                payload = ('{"chat":{"type":"private","id":"u_%d"},"msgType":"text",'
                           '"data":{"content":"hello %d"}}' % (i % 100, i))
            k = 32 * (n - start)
            nonce = randoms[k:k + 32]
            signing = "%d\n%s\nbot_bench\n%d\n%s\n%s" % (
                update_id, kind, now, nonce, sha256(canonical.encode()).hexdigest())
            signature = digest(secret, signing.encode(), "sha256").hex()
            body = ('{"update_id":%d,"type":"%s","%s":%s,"bot":{"id":"bot_bench"},"timestamp":%d,'
                    '"nonce":"%s","signature":"%s"}' % (update_id, kind, kind, payload, now, nonce,
                                                      signature))
            lines.append(body)
            line_macs.append(digest(secret, body.encode(), "sha256").hex())
        bodies.write("\n".join(lines) + "\n")
        macs.write("\n".join(line_macs) + "\n")
PY
    # The generator signs as the platform does: fly must agree.
    head -3 "$2" | "$FLY" verify-sig --lines >/dev/null
}

# Writes to $1 a wrk script that POSTs the bodies of file $2 (one per line,
# from make_bodies), each once: `wrk -tN … -s FILE URL -- N [PART PARTS]`.
# Of the file's lines, the run takes those with line % PARTS == PART (0 and 1
# by default: all; several wrk runs at once, one per replica, split them);
# each of its N threads takes every Nth of those and pre-formats its
# requests, so the run measures the server, not Lua. Every request carries
# `X-Body-Signature: sha256=<HMAC of the body>` (from $2.hmac), for peers
# that check a header. A thread that runs out starts again from its first
# body: a repeat, counted and printed as "wrapped N" at the end of the report.
write_distinct_lua() { # file bodies
    cat >"$1" <<LUA
local threads = {}
local counter = 0
function setup(thread)
    thread:set("index", counter)
    counter = counter + 1
    table.insert(threads, thread)
end
function init(args)
    local count = tonumber(args[1]) or 1
    local part, parts = tonumber(args[2] or "0"), tonumber(args[3] or "1")
    requests = {}
    local macs = io.lines("$2.hmac")
    local n, mine = 0, 0
    for line in io.lines("$2") do
        local mac = macs()
        if n % parts == part then
            if mine % count == index then
                local headers = {["Content-Type"] = "application/json", ["X-Body-Signature"] = "sha256=" .. mac}
                table.insert(requests, wrk.format("POST", nil, headers, line))
            end
            mine = mine + 1
        end
        n = n + 1
    end
    next_request = 1
    wrapped = 0
end
function request()
    local request = requests[next_request]
    next_request = next_request + 1
    if next_request > #requests then
        next_request = 1
        wrapped = wrapped + 1
    end
    return request
end
function done(summary, latency, requests)
    local total = 0
    for _, thread in ipairs(threads) do
        total = total + thread:get("wrapped")
    end
    io.write(string.format("wrapped %d\n", total))
end
LUA
}
