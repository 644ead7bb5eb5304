#!/usr/bin/env bash
# Runs every cargo-fuzz target of the repository for a bounded time each, one after the other:
#   fuzz/run-all.sh [SECONDS] [TARGET...]      (default 60 seconds; default every target)
# Targets: proto frame_decode; agent blk_queue, vsock_packets; oci tar_convert, manifest_parse, chunk_index, gzip_index.
# New coverage lands in each crate's fuzz/corpus/TARGET; crashes in its fuzz/artifacts/TARGET.
# Commit interesting inputs and every crash (as a regression seed): the normal test suite
# replays the corpora (proto/tests, agent/tests and oci/tests fuzz_corpus.rs).
# Runs at the lowest CPU priority: the machine is shared.
set -euo pipefail
seconds="${1:-60}"
shift || true
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
# cargo-fuzz needs nightly-only flags; the machine's toolchain is stable, so unlock them.
export RUSTC_BOOTSTRAP=1
# The tar target writes its EROFS images here (tmpfs when available).
export GANTRY_FUZZ_DIR="${GANTRY_FUZZ_DIR:-$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}"

# Keep glibc from returning large freed blocks to the kernel after every input: the EROFS
# writer's 1 MiB buffers otherwise cost page faults on each conversion.
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_TOP_PAD_=16777216

# crate-directory target max-len
all_targets=(
  "proto frame_decode 4096"
  "agent blk_queue 4096"
  "agent vsock_packets 4096"
  "oci tar_convert 4096"
  "oci manifest_parse 8192"
  "oci chunk_index 8192"
  "oci gzip_index 65536"
)
wanted=("$@")
status=0
for spec in "${all_targets[@]}"; do
  read -r crate target max_len <<<"$spec"
  if [ "${#wanted[@]}" -gt 0 ] && [[ ! " ${wanted[*]} " =~ " ${target} " ]]; then
    continue
  fi
  echo "=== $crate/fuzz $target for ${seconds}s"
  cd "$root/$crate/fuzz"
  mkdir -p "corpus/$target"
  if ! nice -n 19 cargo fuzz run --release "$target" "corpus/$target" -- \
      -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -print_final_stats=1; then
    echo "=== $target FAILED (see $crate/fuzz/artifacts/$target)"
    status=1
  fi
done
exit "$status"
