#!/usr/bin/env bash
# Builds the guest and boots it against rust-vmm's reference vsock backend (vhost-device-vsock),
# checking that the shim answers over vsock. Prints boot-to-ready and round-trip timings.
#
# Usage: qemu/smoke.sh        (guest in $GANTRY_GUEST_DIR or <repo>/target/guest)
# Needs: what qemu/build-guest.sh needs, qemu-system-x86, and `cargo install vhost-device-vsock`.
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
qemu/build-guest.sh
cargo test -p gantry-e2e --test reference_vsock -- --nocapture
