#!/usr/bin/env bash
# The test command: lint, build the guest and the binaries, run every test (QEMU guests included).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n=== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "guest build"
qemu/build-guest.sh
step "binaries"
cargo build --workspace --bins --locked
step "tests"
cargo test --workspace --locked -- --nocapture 2>&1 | tee target/test-output.log
