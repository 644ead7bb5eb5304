#!/usr/bin/env bash
# Fuzzes frame decoding for a bounded time: proto/fuzz/run.sh [SECONDS] (default 60).
# New inputs that grow coverage land in corpus/frame_decode; commit the interesting ones, and any
# crash file under artifacts/ as a regression seed (the normal test suite replays the corpus).
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# cargo-fuzz needs nightly-only flags; the machine's toolchain is stable, so unlock them.
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run frame_decode corpus/frame_decode -- -max_total_time="$seconds" -max_len=4096
