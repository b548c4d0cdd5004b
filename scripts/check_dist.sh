#!/usr/bin/env bash
# Checks what scripts/dist.sh left in dist/ (CI runs it after dist.sh):
# the wheel installs into a fresh virtual environment and its `fly` runs the
# demo; the .deb holds every file it should, the same binary as the wheel
# and the tarball, and systemd-analyze accepts its units.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "check_dist: $*" >&2
    exit 1
}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

wheel=$(ls dist/fly-*.whl)
deb=$(ls dist/fly_*.deb)
tarball=$(ls dist/fly-*.tar.gz)
(cd dist && sha256sum --quiet -c SHA256SUMS) || fail "SHA256SUMS does not match dist/"

echo "== the wheel, in a fresh virtual environment"
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$wheel"
# On PATH once the environment is active, as after `pip install`.
(
    export PATH=$scratch/venv/bin:$PATH HOME=$scratch
    [ "$(command -v fly)" = "$scratch/venv/bin/fly" ] || fail "the wheel put no fly on PATH"
    fly --version
    fly demo >"$scratch/demo.txt" || fail "fly demo (from the wheel) exited $?"
    grep -q 'bot → u_alice *‹ echo: hello fly' "$scratch/demo.txt" &&
        grep -q '3 updates handled' "$scratch/demo.txt" ||
        { cat "$scratch/demo.txt"; fail "fly demo (from the wheel) did not answer"; }
    echo "fly demo: $(grep -c '‹' "$scratch/demo.txt") lines of conversation"
)

echo "== the .deb: $deb"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
root=$scratch/root
dpkg-deb -x "$deb" "$root"
want=(
    usr/bin/fly
    usr/share/man/man1/fly.1.gz
    usr/share/man/man1/fly-poll-echo.1.gz
    usr/share/man/man1/fly-serve-webhook.1.gz
    usr/share/bash-completion/completions/fly
    usr/share/zsh/vendor-completions/_fly
    usr/share/fish/vendor_completions.d/fly.fish
    usr/share/doc/fly/copyright
    usr/share/doc/fly/examples/mybot.env
    usr/lib/systemd/system/fly-poll-echo@.service
    usr/lib/systemd/system/fly-serve-webhook@.service
)
for file in "${want[@]}"; do
    [ -s "$root/$file" ] || fail "the .deb has no $file"
done
[ -x "$root/usr/bin/fly" ] || fail "usr/bin/fly is not executable"
# A page for fly and for every command it lists.
for command in $("$root/usr/bin/fly" --help | awk '/^Commands:/{on=1;next} on&&/^[^ ]/{on=0} on&&/^  [a-z]/&&$1!="help"{print $1}'); do
    page=$root/usr/share/man/man1/fly-$command.1.gz
    [ -s "$page" ] || fail "the .deb has no man page for fly $command"
    zcat "$page" | grep -q '^\.TH' || fail "$page is not a man page"
done
grep -q -- '-F _fly' "$root/usr/share/bash-completion/completions/fly" || fail "no bash completion"
grep -q 'Permission is hereby granted' "$root/usr/share/doc/fly/copyright" || fail "copyright lacks the licence"
echo "$(find "$root" -type f | wc -l) files, $(ls "$root/usr/share/man/man1" | wc -l) man pages"

echo "== one binary in all three"
python3 -c 'import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
[name] = [n for n in wheel.namelist() if n.endswith(".data/scripts/fly")]
sys.stdout.buffer.write(wheel.read(name))' "$wheel" >"$scratch/fly.wheel"
tar -xzf "$tarball" -C "$scratch" --wildcards '*/fly'
cmp "$scratch/fly.wheel" "$root/usr/bin/fly" || fail "the wheel's and the .deb's fly differ"
cmp "$scratch/fly.wheel" "$scratch"/fly-*/fly || fail "the wheel's and the tarball's fly differ"
listing=$(tar -tzf "$tarball")
for file in fly LICENSE README.md man/man1/fly.1.gz man/man1/fly-poll-echo.1.gz \
    completions/fly.bash completions/_fly completions/fly.fish systemd/fly-poll-echo@.service; do
    grep -qx "fly-[^/]*/$file" <<<"$listing" || fail "the tarball has no $file"
done

echo "== systemd-analyze verify, at the unpacked .deb"
# The units' dependencies (sysinit.target, …) are the system's: copied in.
cp -rn /usr/lib/systemd/system/. "$root/usr/lib/systemd/system/"
# A misspelt setting is only a warning (exit 0): none is allowed.
verified=$(systemd-analyze verify --man=no --root="$root" \
    "$root"/usr/lib/systemd/system/fly-poll-echo@.service \
    "$root"/usr/lib/systemd/system/fly-serve-webhook@.service 2>&1) ||
    fail "systemd-analyze verify: $verified"
[ -z "$verified" ] || fail "systemd-analyze verify: $verified"
echo "check_dist: all good"
