#!/usr/bin/env bash
# The test command: lint, build the guest and the binaries, run every test (QEMU guests included).
# Tests that lack a tool print "SKIP: ..." and pass; here that fails the run, because
# qemu/setup-host.sh installs every tool and a skip would hide a broken install step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "guest build"
qemu/build-guest.sh
qemu/build-distro-guest.sh     # Debian bookworm with systemd starting the packaged shim (~2 min the first time)
step "binaries"
cargo build --workspace --bins --locked
step "tests"
mkdir -p target
cargo test --workspace --locked -- --nocapture 2>&1 | tee target/test-output.log
if grep -n "SKIP:" target/test-output.log; then
    echo "error: the tests above were skipped; install what they name (qemu/setup-host.sh)" >&2
    exit 1
fi
