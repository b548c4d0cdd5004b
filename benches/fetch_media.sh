#!/usr/bin/env bash
# Benchmark: download a 256 MiB file from `fly emulator`, side by side:
# `fly fetch-media` vs `curl` on the same access URL. Both wall times include
# the batch_access call (curl's is a second curl, timed together with the
# download). Reports median wall times, the ratio and fly's peak RSS.
# Not a test: run it by hand.
#
#   bash benches/fetch_media.sh [RUNS]       (default RUNS=3, alternating)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SIZE=268435456
MEDIA=https://cdn.example/bench.bin
if [ ! -x /usr/bin/time ]; then
    apt-get install -y -qq time >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
fi
source benches/common.sh

start_emulator; URL=$EMULATOR_URL
curl -sf -XPOST "$URL/_emulator/media" -d "{\"url\":\"$MEDIA\",\"size\":$SIZE}" >/dev/null

# The curl side: batch_access, then the download, as one timed process.
cat >"$WORK/curl.sh" <<'SH'
set -euo pipefail
access=$(curl -sf -XPOST "$1/api/v1/s/bot/files/batch_access" \
    -H 'Authorization: Bearer bench' -H 'Content-Type: application/json' \
    -d "{\"files\":[{\"url\":\"$2\"}],\"expire_seconds\":600}" \
    | sed -n 's/.*"files":{"[^"]*":"\([^"]*\)".*/\1/p')
[ -n "$access" ] || { echo "batch_access returned no access URL" >&2; exit 1; }
curl -sf -o "$3" "$access"
# With a 4th argument, make the file durable as fly does before naming it.
if [ $# -ge 4 ]; then
    python3 -c 'import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)' "$3"
fi
SH

elapsed() { # /usr/bin/time -v report -> seconds
    sed -n 's/.*Elapsed (wall clock) time.*: //p' "$1" |
        awk -F: '{ s = 0; for (i = 1; i <= NF; i++) s = s * 60 + $i; print s }'
}
max_rss_kb() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1"; }

check_outputs() { # both files complete and identical
    for f in "$WORK/fly.bin" "$WORK/curl.bin"; do
        [ "$(stat -c %s "$f")" = "$SIZE" ] || { echo "$(basename "$f"): $(stat -c %s "$f") bytes, expected $SIZE"; exit 1; }
    done
    [ "$(sha256sum <"$WORK/fly.bin")" = "$(sha256sum <"$WORK/curl.bin")" ] ||
        { echo "fly.bin and curl.bin differ (sha256)"; exit 1; }
}

FLY_SECS=() CURL_SECS=() FLY_RSS=() CURL_RSS=() DURABLE_SECS=()
for run in $(seq "$RUNS"); do
    rm -f "$WORK/fly.bin" "$WORK/curl.bin"
    FLY_BASE_URL=$URL FLY_BOT_TOKEN=bench /usr/bin/time -v -o "$WORK/time.fly" \
        "$FLY" -q fetch-media "$MEDIA" -o "$WORK/fly.bin" >"$WORK/fly.out"
    /usr/bin/time -v -o "$WORK/time.curl" bash "$WORK/curl.sh" "$URL" "$MEDIA" "$WORK/curl.bin"
    check_outputs
    rm -f "$WORK/curl.bin"
    /usr/bin/time -v -o "$WORK/time.durable" bash "$WORK/curl.sh" "$URL" "$MEDIA" "$WORK/curl.bin" fsync
    DURABLE_SECS+=("$(elapsed "$WORK/time.durable")")
    FLY_SECS+=("$(elapsed "$WORK/time.fly")") FLY_RSS+=("$(max_rss_kb "$WORK/time.fly")")
    CURL_SECS+=("$(elapsed "$WORK/time.curl")") CURL_RSS+=("$(max_rss_kb "$WORK/time.curl")")
done

python3 - "$SIZE" "${FLY_SECS[*]}" "${CURL_SECS[*]}" "${FLY_RSS[*]}" "${CURL_RSS[*]}" "${DURABLE_SECS[*]}" <<'PY'
import sys, statistics
size = int(sys.argv[1])
fly, curl, fly_rss, curl_rss, durable = ([float(x) for x in a.split()] for a in sys.argv[2:7])
mib = size / 2**20
fm, cm = statistics.median(fly), statistics.median(curl)
def runs(xs): return " ".join(f"{x:.2f}" for x in xs)
print(f"fetch {mib:.0f} MiB ({len(fly)} runs)    median wall s   MiB/s   peak RSS MiB   runs (s)")
print(f"fly fetch-media            {fm:13.2f}  {mib/fm:6.0f}   {max(fly_rss)/1024:12.1f}   {runs(fly)}")
print(f"curl (batch_access+get)    {cm:13.2f}  {mib/cm:6.0f}   {max(curl_rss)/1024:12.1f}   {runs(curl)}")
dm = statistics.median(durable)
print(f"curl + fsync (as durable)  {dm:13.2f}  {mib/dm:6.0f}   {'':>12}   {runs(durable)}")
print(f"ratio fly/curl: {fm/cm:.2f}x (target <= 1.25x); fly/(curl + fsync): {fm/dm:.2f}x")
print(f"fly peak RSS: {max(fly_rss)/1024:.1f} MiB (target <= 32 MiB)")
print("curl side: both curl calls (batch_access + download) timed together as one bash script;")
print("wall times from /usr/bin/time -v (10 ms resolution); outputs checked: size and sha256 equal")
PY
