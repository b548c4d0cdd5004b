# Shared by the benchmark scripts (sourced, not run): a release build, a
# scratch directory, background processes killed on exit, and emulators.
# Sets FLY (the release binary) and WORK (removed on exit).
cargo build --release --quiet
FLY=$PWD/target/release/fly
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
    PIDS+=($!)
    EMULATOR_URL=$(wait_for_line "$WORK/emu.${1:-main}")
}
