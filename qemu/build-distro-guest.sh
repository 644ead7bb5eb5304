#!/usr/bin/env bash
# Builds a tenant-style distribution guest: Debian bookworm whose systemd starts gantry-shim
# (installed from the package qemu/build-shim-deb.sh makes), on a plain ext4 disk image, and the
# kernel and initrd that image boots with (its own, from its /boot).
#
# Usage: qemu/build-distro-guest.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $GANTRY_DISTRO_GUEST_DIR, else <repo>/target/distro-guest.
#
# Produces in OUTPUT_DIR:
#   disk.img        raw ext4 root file system (sparse, 2 GiB), UUID in root-uuid
#   vmlinuz         the image's kernel (linux-image-amd64 of bookworm)
#   initrd.img      the image's initramfs-tools initrd (MODULES=list: virtio disk and ext4)
#   cmdline         the kernel command-line words that boot it (root=UUID=… ro)
#   kernel-release  the image's kernel release
#
# The debootstrap tree is kept in OUTPUT_DIR/root and reused while the suite, the package list
# and the mirror stay the same (it takes a few minutes to make); each run installs the current
# shim package into it and writes the disk image again only when something changed.
#
# For tests, the image logs root in on the serial console (ttyS0) without a password: the agent's
# console socket is then a root shell into the guest, as a host's console would be. Do not use it
# as a tenant image.
#
# Environment:
#   GANTRY_DISTRO_GUEST_DIR   output directory (when no argument is given)
#   GANTRY_DEBIAN_MIRROR      debootstrap's mirror (default: the host's apt source for Debian)
#
# Needs (as root): debootstrap, e2fsprogs (mkfs.ext4 -d), dpkg; and what build-shim-deb.sh needs.
set -euo pipefail
shopt -s inherit_errexit

readonly SUITE=bookworm
readonly PACKAGES=systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,zstd
readonly ROOT_UUID=5f1e0b8e-6a52-4b8e-9c1d-6a7d2f0e9b31
readonly DISK_SIZE=2G

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
out_dir=${1:-${GANTRY_DISTRO_GUEST_DIR:-$repo_root/target/distro-guest}}

die() {
	echo "build-distro-guest: error: $*" >&2
	exit 1
}
note() { echo "build-distro-guest: $*" >&2; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "'debootstrap' not found: install the Debian package 'debootstrap'"
command -v mkfs.ext4 >/dev/null || die "'mkfs.ext4' not found: install the Debian package 'e2fsprogs'"

# The mirror apt on this host uses for Debian, so a machine with a local mirror uses it too.
host_mirror() {
	local uri
	uri=$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' \
		/etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
	[[ -n $uri ]] || uri=$(sed -n 's/^deb[[:space:]]\+\(http[^[:space:]]*\/debian\)\/\{0,1\}[[:space:]].*/\1/p' \
		/etc/apt/sources.list 2>/dev/null | head -n 1)
	echo "${uri:-http://deb.debian.org/debian}"
}
mirror=${GANTRY_DEBIAN_MIRROR:-$(host_mirror)}

mkdir -p "$out_dir"
root=$out_dir/root
base_key="$SUITE $PACKAGES $mirror"

# --- the debootstrap tree (kept) ----------------------------------------------------------------
if [[ ! -f $root/.gantry-base || $(cat "$root/.gantry-base") != "$base_key" ]]; then
	note "debootstrap $SUITE ($PACKAGES) from $mirror: a few minutes"
	rm -rf "$root" "$root.new"
	# A mirror can fail a download now and then; one more try from scratch before giving up.
	for attempt in 1 2; do
		rm -rf "$root.new"
		if debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root.new" "$mirror" \
			>"$out_dir/debootstrap.log" 2>&1; then
			break
		fi
		[[ $attempt == 1 ]] || die "debootstrap failed twice; see $out_dir/debootstrap.log"
		note "debootstrap failed ($(tail -n 1 "$out_dir/debootstrap.log")); trying again in 10 s"
		sleep 10
	done
	# A VM image's initrd needs only what mounts its root: the virtio disk and ext4 (Debian's
	# default, MODULES=most, makes it 30 MB, unpacked by an emulated CPU at every boot).
	sed -i 's/^MODULES=.*/MODULES=list/' "$root.new/etc/initramfs-tools/initramfs.conf"
	printf '%s\n' virtio_pci virtio_blk ext4 >>"$root.new/etc/initramfs-tools/modules"
	chroot "$root.new" update-initramfs -u -k all >>"$out_dir/debootstrap.log" 2>&1 ||
		die "update-initramfs failed; see $out_dir/debootstrap.log"
	rm -rf "$root.new"/var/cache/apt/archives/*.deb "$root.new"/var/lib/apt/lists/*
	echo "$base_key" >"$root.new/.gantry-base"
	mv "$root.new" "$root"
fi

# --- the shim and the image's settings ---------------------------------------------------------
package=$("$script_dir/build-shim-deb.sh" "$out_dir")
# Everything the disk is made of, beside the tree: the disk is rewritten only when it changes.
inputs=$(cat "$package" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
release=$(basename "$(ls -1 "$root"/boot/vmlinuz-* | sort -V | tail -n 1)")
release=${release#vmlinuz-}
[[ -f $root/boot/initrd.img-$release ]] || die "no initrd for kernel $release in the image"

if [[ -f $out_dir/disk.img && $(cat "$out_dir/.disk-inputs" 2>/dev/null) == "$inputs" ]]; then
	disk_state=unchanged
else
	cp "$package" "$root/tmp/gantry-shim.deb"
	chroot "$root" dpkg -i /tmp/gantry-shim.deb >/dev/null 2>&1 || die "installing the shim package failed"
	rm -f "$root/tmp/gantry-shim.deb"
	[[ -L $root/etc/systemd/system/sysinit.target.wants/gantry-shim.service ]] ||
		die "the package did not enable gantry-shim.service"

	echo "gantry-guest" >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\tgantry-guest\n' >"$root/etc/hosts"
	printf 'UUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' "$ROOT_UUID" >"$root/etc/fstab"
	# A fixed machine id: no first-boot questions on the console, and the same image every time.
	echo "${ROOT_UUID//-/}" >"$root/etc/machine-id"
	autologin=$root/etc/systemd/system/serial-getty@ttyS0.service.d
	mkdir -p "$autologin"
	cat >"$autologin/autologin.conf" <<'UNIT'
# Test image only: root's shell on the serial console (the agent's console socket).
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM
UNIT

	note "writing disk.img (ext4, $DISK_SIZE sparse)"
	rm -f "$out_dir/disk.img.new"
	truncate -s "$DISK_SIZE" "$out_dir/disk.img.new"
	mkfs.ext4 -q -F -U "$ROOT_UUID" -L gantry-root -d "$root" "$out_dir/disk.img.new" ||
		die "mkfs.ext4 failed"
	mv -f "$out_dir/disk.img.new" "$out_dir/disk.img"
	echo "$inputs" >"$out_dir/.disk-inputs"
	disk_state=updated
fi

# --- publish ---------------------------------------------------------------------------------------
cp "$root/boot/vmlinuz-$release" "$out_dir/vmlinuz"
cp "$root/boot/initrd.img-$release" "$out_dir/initrd.img"
echo "$release" >"$out_dir/kernel-release"
echo "$ROOT_UUID" >"$out_dir/root-uuid"
echo "root=UUID=$ROOT_UUID ro" >"$out_dir/cmdline"

cat <<SUMMARY
Distribution guest ($SUITE, systemd, $(basename "$package")) in $out_dir:
  disk.img        $(du -h --apparent-size "$out_dir/disk.img" | cut -f1) ($disk_state; $(du -h "$out_dir/disk.img" | cut -f1) used)
  vmlinuz         $(du -h "$out_dir/vmlinuz" | cut -f1) (kernel $release)
  initrd.img      $(du -h "$out_dir/initrd.img" | cut -f1)
  cmdline         $(cat "$out_dir/cmdline")
SUMMARY
