#!/usr/bin/env bash
# Benchmark: download a 256 MiB file from `fly emulator`, side by side:
# `fly fetch-media` vs `curl` on the same access URL. Both wall times include
# the batch_access call (curl's is a second curl, timed together with the
# download). Reports median wall times, the ratios and fly's peak RSS.
#
# Like is compared with like: curl does not fsync, so `fly --no-fsync` is
# compared with curl, and fly's default (fsync before rename) with curl
# followed by an fsync. `dd conv=fsync` of the same size shows what the disk
# alone needs to make 256 MiB durable: no durable download can beat it.
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
user_secs() { sed -n 's/.*User time (seconds): //p' "$1"; }

check_outputs() { # both files complete and identical
    for f in "$WORK/fly.bin" "$WORK/curl.bin"; do
        [ "$(stat -c %s "$f")" = "$SIZE" ] || { echo "$(basename "$f"): $(stat -c %s "$f") bytes, expected $SIZE"; exit 1; }
    done
    [ "$(sha256sum <"$WORK/fly.bin")" = "$(sha256sum <"$WORK/curl.bin")" ] ||
        { echo "fly.bin and curl.bin differ (sha256)"; exit 1; }
}

fly_fetch() { # $1: name of the time report; the rest: extra flags
    local report=$1; shift
    rm -f "$WORK/fly.bin"
    FLY_BASE_URL=$URL FLY_BOT_TOKEN=bench /usr/bin/time -v -o "$WORK/time.$report" \
        "$FLY" -q fetch-media "$MEDIA" -o "$WORK/fly.bin" "$@" >"$WORK/fly.out"
}

FLY_SECS=() NOSYNC_SECS=() CURL_SECS=() DURABLE_SECS=() DISK_SECS=() FLY_RSS=() CURL_RSS=()
FLY_USER=() CURL_USER=()
for run in $(seq "$RUNS"); do
    fly_fetch fly
    rm -f "$WORK/curl.bin"
    /usr/bin/time -v -o "$WORK/time.curl" bash "$WORK/curl.sh" "$URL" "$MEDIA" "$WORK/curl.bin"
    check_outputs
    fly_fetch nosync --no-fsync
    check_outputs
    rm -f "$WORK/curl.bin"
    /usr/bin/time -v -o "$WORK/time.durable" bash "$WORK/curl.sh" "$URL" "$MEDIA" "$WORK/curl.bin" fsync
    /usr/bin/time -v -o "$WORK/time.disk" dd if=/dev/zero of="$WORK/dd.bin" bs=1M \
        count=$((SIZE / 1048576)) conv=fsync status=none
    rm -f "$WORK/dd.bin"
    FLY_SECS+=("$(elapsed "$WORK/time.fly")") FLY_RSS+=("$(max_rss_kb "$WORK/time.fly")")
    FLY_RSS+=("$(max_rss_kb "$WORK/time.nosync")")
    NOSYNC_SECS+=("$(elapsed "$WORK/time.nosync")")
    CURL_SECS+=("$(elapsed "$WORK/time.curl")") CURL_RSS+=("$(max_rss_kb "$WORK/time.curl")")
    DURABLE_SECS+=("$(elapsed "$WORK/time.durable")")
    DISK_SECS+=("$(elapsed "$WORK/time.disk")")
    FLY_USER+=("$(user_secs "$WORK/time.nosync")") CURL_USER+=("$(user_secs "$WORK/time.curl")")
done

python3 - "$SIZE" "${FLY_SECS[*]}" "${NOSYNC_SECS[*]}" "${CURL_SECS[*]}" "${DURABLE_SECS[*]}" \
    "${DISK_SECS[*]}" "${FLY_RSS[*]}" "${CURL_RSS[*]}" "${FLY_USER[*]}" "${CURL_USER[*]}" <<'PY'
import sys, statistics
size = int(sys.argv[1])
fly, nosync, curl, durable, disk, fly_rss, curl_rss, fly_user, curl_user = (
    [float(x) for x in a.split()] for a in sys.argv[2:11])
mib = size / 2**20
median = statistics.median
def runs(xs): return " ".join(f"{x:.2f}" for x in xs)
def row(name, xs, rss=""):
    print(f"{name:<30} {median(xs):9.2f}  {mib/median(xs):6.0f}  {rss:>8}   {runs(xs)}")
print(f"fetch {mib:.0f} MiB ({len(fly)} runs)       median s   MiB/s  RSS MiB   runs (s)")
row("fly fetch-media --no-fsync", nosync)
row("curl (batch_access + get)", curl, f"{max(curl_rss)/1024:.1f}")
row("fly fetch-media (fsync)", fly, f"{max(fly_rss)/1024:.1f}")
row("curl + fsync", durable)
row("disk alone: dd conv=fsync", disk)
print(f"like for like, page cache:  fly --no-fsync / curl  = {median(nosync)/median(curl):.2f}x (target <= 1.25x)")
print(f"like for like, durable:     fly / (curl + fsync)   = {median(fly)/median(durable):.2f}x")
print(f"fly's default against curl without fsync:          {median(fly)/median(curl):.2f}x "
      f"(the disk alone needs {median(disk)/median(curl):.2f}x curl's time)")
print(f"fly peak RSS: {max(fly_rss)/1024:.1f} MiB (target <= 32 MiB)")
# User CPU at 10 ms resolution: a floor of 0.01 s keeps the ratio finite.
print(f"user CPU, page cache: fly --no-fsync {median(fly_user):.2f} s, curl side "
      f"{median(curl_user):.2f} s (bash, sed and both curls) = "
      f"{median(fly_user)/max(median(curl_user), 0.01):.1f}x (target <= 3x)")
print("curl side: both curl calls (batch_access + download) timed together as one bash script;")
print("wall times from /usr/bin/time -v (10 ms resolution); outputs checked: size and sha256 equal")
PY
