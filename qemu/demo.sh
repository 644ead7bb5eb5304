#!/usr/bin/env bash
# The main job: build the guest and the agent, start the agent with one guest under QEMU (TCG by
# default; GANTRY_ACCEL=kvm on hosts where KVM works), and run a container from the embedded
# default image (busybox from the card's busybox-static; no registry needed), printing its output
# and the time from `run` to its first output.
set -euo pipefail
cd "$(dirname "$0")/.."

accel="${GANTRY_ACCEL:-tcg}"
qemu/build-guest.sh
cargo build --release --locked -p gantry-agent
agent=target/release/gantry-agent

work=$(mktemp -d -t gantry-demo.XXXXXX)
cat > "$work/agent.toml" <<TOML
api_socket = "$work/agent.sock"
state_dir = "$work/state"

[[vm]]
name = "demo"
guest_cid = 3
vsock_socket = "$work/demo.vsock"
layer_socket = "$work/demo.blk"
[vm.launch]
kernel = "$PWD/target/guest/vmlinux"
initrd = "$PWD/target/guest/initramfs.img"
memory_mib = 512
accel = "$accel"
console_log = "$work/demo.console.log"
TOML

"$agent" serve --config "$work/agent.toml" 2> "$work/agent.log" &
agent_pid=$!
# VMs outlive the agent (an upgrade or crash does not stop them): stop the guest, then the agent.
trap '"$agent" --api-socket "$work/agent.sock" vm stop demo >/dev/null 2>&1; kill $agent_pid 2>/dev/null; wait $agent_pid 2>/dev/null; echo "logs kept in $work"' EXIT
for _ in $(seq 200); do [[ -S "$work/agent.sock" ]] && break; sleep 0.05; done

export GANTRY_API_SOCKET="$work/agent.sock"
echo "--- booting the guest and waiting for its shim"
"$agent" guest-info demo --wait 180
echo "--- a container from the embedded default image (first run: builds and converts the image)"
"$agent" run --timing --name hello default sh -c 'echo "Hello from a Gantry container: $(hostname), $(uname -r)"; id; ls /'
echo "--- the same again, warm (image cached, layer already mapped)"
"$agent" run --timing --rm default echo warm start
echo "--- containers and VMs"
"$agent" ps -a
"$agent" rm hello >/dev/null
"$agent" vm ls
echo "--- round trips through the agent's vsock device"
"$agent" ping demo --count 200
