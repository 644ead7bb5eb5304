#!/usr/bin/env bash
# Installs what Gantry's agent, its guests and its tests need on a Debian 12 host. Idempotent; run
# as root. Rust itself (cargo, clippy, rustfmt) is expected from the machine's toolchain.
set -euo pipefail

packages=(
    qemu-system-x86     # the VMM: vhost-user-blk-pci, vhost-user-vsock-pci, TCG
    linux-image-amd64   # the guest kernel and its modules
    busybox-static      # tools inside the guest's initramfs and the default image
    erofs-utils         # fsck.erofs / mkfs.erofs: oracles for the EROFS writer
    cpio                # packs the initramfs
    kmod                # modinfo: finds the guest's modules
    binutils            # strip/readelf for the guest build
    zstd gzip           # layer and initramfs compression
    debootstrap         # realistic root file systems for image tests and benchmarks
    docker-registry     # the reference OCI registry, started by tests on loopback
    skopeo              # pushes test images, and the pull benchmark's yardstick
    apache2-utils       # htpasswd for the registry auth tests
    openssl             # certificates for the registry HTTPS tests
    containerd          # Debian's containerd and ctr (and runc): the runtime v2 shim's tests
    protobuf-compiler   # protoc: the CRI client the containerd tests use is generated at build time
)

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup-host: missing packages ${missing[*]}; run this script as root" >&2
        exit 1
    fi
    echo "setup-host: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup-host: cargo is not on PATH" >&2; exit 1; }
# rust-vmm's reference vsock backend: the tests check the guest against it, independently of ours.
if ! command -v vhost-device-vsock >/dev/null && [[ ! -x ${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock ]]; then
    echo "setup-host: installing vhost-device-vsock (reference backend for the tests)"
    cargo install --locked --quiet vhost-device-vsock@0.3.0
fi
echo "setup-host: ready"
