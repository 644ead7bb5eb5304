#!/usr/bin/env bash
# Builds Gantry's guest: a Debian kernel and an initramfs whose /init is gantry-shim.
#
# Usage: qemu/build-guest.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to $GANTRY_GUEST_DIR, else <repo>/target/guest.
#
# Produces in OUTPUT_DIR:
#   vmlinuz         the installed Debian kernel (linux-image-amd64's current release)
#   vmlinux         the same kernel uncompressed (ELF with a PVH entry point): QEMU boots it
#                   directly, skipping the bzImage's own decompression, which takes ~3 s under
#                   TCG. The launch recipe prefers it to vmlinuz.
#   initramfs.img   newc cpio: /init (static gantry-shim), kernel modules, their load list,
#                   busybox (debugging, and a base for test container images)
#   kernel-release  the kernel release both were built for
#
# Idempotent: cargo rebuilds the shim only when its sources changed, and the outputs are
# rewritten only when their content changes (the archive is reproducible), so an up-to-date
# guest costs a second or two.
#
# Environment:
#   GANTRY_GUEST_DIR             output directory (when no argument is given)
#   GANTRY_KERNEL_RELEASE        kernel release to use instead of linux-image-amd64's
#   GANTRY_INITRAMFS_COMPRESSION none | gzip | zstd (default: none, see qemu/README.md)
#   CARGO_TARGET_DIR, CARGO      as usual for cargo
#
# Needs (Debian packages): linux-image-amd64, kmod, busybox-static, cpio, binutils, plus gzip/zstd if
# that compression is chosen. This script installs nothing.
set -euo pipefail
shopt -s inherit_errexit

readonly TARGET_TRIPLE=x86_64-unknown-linux-gnu
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
out_dir=${1:-${GANTRY_GUEST_DIR:-$repo_root/target/guest}}
compression=${GANTRY_INITRAMFS_COMPRESSION:-none}
cargo=${CARGO:-cargo}

die() {
	echo "build-guest: error: $*" >&2
	exit 1
}
note() { echo "build-guest: $*" >&2; }

need_command() { # command package
	command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2'"
}

# --- tools -------------------------------------------------------------------------------------
need_command cpio cpio
need_command modinfo kmod
need_command strip binutils
need_command readelf binutils
need_command "$cargo" "rustup/cargo"
case $compression in
none) ;;
gzip) need_command gzip gzip ;;
zstd) need_command zstd zstd ;;
*) die "GANTRY_INITRAMFS_COMPRESSION must be none, gzip or zstd (got '$compression')" ;;
esac

busybox=/bin/busybox
[[ -x $busybox ]] || die "$busybox not found: install the Debian package 'busybox-static'"
if LC_ALL=C ldd "$busybox" >/dev/null 2>&1; then
	die "$busybox is dynamically linked: install 'busybox-static' (not 'busybox')"
fi

# --- kernel ------------------------------------------------------------------------------------
if [[ -n ${GANTRY_KERNEL_RELEASE:-} ]]; then
	release=$GANTRY_KERNEL_RELEASE
else
	depends=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null) ||
		die "package 'linux-image-amd64' is not installed (or set GANTRY_KERNEL_RELEASE)"
	# e.g. "linux-image-6.1.0-56-amd64 (= 6.1.192-2)"
	release=$(sed -n 's/^linux-image-\([^ ,]*\).*/\1/p' <<<"$depends")
	[[ -n $release ]] || die "cannot tell the kernel release from linux-image-amd64's Depends: '$depends'"
fi
kernel=/boot/vmlinuz-$release
modules_dir=/lib/modules/$release
[[ -r $kernel ]] || die "$kernel not found: install the Debian package 'linux-image-$release'"
[[ -d $modules_dir ]] || die "$modules_dir not found: install the Debian package 'linux-image-$release'"

# --- shim --------------------------------------------------------------------------------------
note "building the static shim"
target_dir=$(cd "$repo_root" && "$cargo" metadata --format-version 1 --no-deps |
	sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target_dir ]] || die "cannot find cargo's target directory"
(cd "$repo_root" && RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --quiet --release \
	-p gantry-shim --target "$TARGET_TRIPLE") || die "building gantry-shim failed"
shim=$target_dir/$TARGET_TRIPLE/release/gantry-shim
[[ -x $shim ]] || die "the shim was not built at $shim"
if LC_ALL=C ldd "$shim" 2>&1 | grep -q '=>'; then
	die "$shim is dynamically linked: it cannot run as /init"
fi

# --- stage the initramfs -----------------------------------------------------------------------
mkdir -p "$out_dir"
staging=$(mktemp -d "$out_dir/.initramfs.XXXXXX")
trap 'rm -rf "$staging"' EXIT

mkdir -p "$staging"/{bin,dev,etc/gantry,proc,sys,run,tmp,"lib/modules/$release"}
# The release profile keeps line tables for backtraces on the host; in the guest they only cost
# boot time (the initramfs is unpacked by an emulated CPU). Symbols stay, for panic messages.
strip --strip-debug -o "$staging/init" "$shim"
chmod 0755 "$staging/init"
install -m 0755 "$busybox" "$staging/bin/busybox"
for applet in $("$busybox" --list); do
	[[ $applet == busybox ]] || ln -s busybox "$staging/bin/$applet"
done
if [[ $(id -u) == 0 ]]; then
	# The kernel opens /dev/console for init before anything is mounted.
	mknod -m 0600 "$staging/dev/console" c 5 1
else
	note "not root: no /dev/console node in the archive (the shim reopens the console after mounting devtmpfs)"
fi

# Modules: resolve each listed name, check the order, copy the .ko (decompressed if need be).
module_list=$script_dir/guest-modules.txt
[[ -r $module_list ]] || die "$module_list not found"
declare -A listed=()
list_out=$staging/etc/gantry/modules.list
echo "# Generated by qemu/build-guest.sh for $release: load in this order." >"$list_out"
while read -r name _; do
	[[ -z $name || $name == \#* ]] && continue
	path=$(modinfo -k "$release" -n "$name" 2>/dev/null) ||
		die "module '$name' not found for kernel $release (is linux-image-$release complete?)"
	if [[ $path == "(builtin)" || $path != /* ]]; then
		note "module $name is built into the kernel: skipped"
		listed[$name]=1
		continue
	fi
	for dependency in $(modinfo -k "$release" -F depends "$name" | tr ',' ' '); do
		[[ -n ${listed[$dependency]:-} ]] ||
			die "module '$name' depends on '$dependency', which is not listed before it in $module_list"
	done
	relative=${path#"$modules_dir"/}
	[[ $relative != "$path" ]] || die "module '$name' resolved outside $modules_dir: $path"
	mkdir -p "$staging/lib/modules/$release/$(dirname "$relative")"
	case $relative in
	*.ko) cp "$path" "$staging/lib/modules/$release/$relative" ;;
	*.ko.xz)
		relative=${relative%.xz}
		xz -dc "$path" >"$staging/lib/modules/$release/$relative"
		;;
	*.ko.zst)
		relative=${relative%.zst}
		zstd -qdc "$path" >"$staging/lib/modules/$release/$relative"
		;;
	*) die "module '$name' has an unknown format: $path" ;;
	esac
	echo "$relative" >>"$list_out"
	listed[$name]=1
done <"$module_list"

# Reproducible archive: fixed mtimes, sorted names, no device-specific inode numbers.
find "$staging" -exec touch -h -d @0 {} +
candidate=$out_dir/.initramfs.img.new
(
	cd "$staging"
	find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible
) | case $compression in
none) cat ;;
gzip) gzip -n -6 ;;
zstd) zstd -q -19 ;;
esac >"$candidate"

# --- publish -----------------------------------------------------------------------------------
replace_if_changed() { # new_file destination
	if cmp -s "$1" "$2"; then
		rm -f "$1"
		echo "unchanged"
	else
		mv -f "$1" "$2"
		echo "updated"
	fi
}
cp "$kernel" "$out_dir/.vmlinuz.new"
kernel_state=$(replace_if_changed "$out_dir/.vmlinuz.new" "$out_dir/vmlinuz")

# The bzImage is a small decompressor followed by the compressed ELF kernel: find the payload
# by its compression magic (as the kernel's scripts/extract-vmlinux does) and unpack it.
extract_vmlinux() { # bzImage output
	local format magic tool offset
	for format in $'\xfd7zXZ:xz -dc' $'\x1f\x8b\x08:gzip -dc' $'\x28\xb5\x2f\xfd:zstd -qdc'; do
		magic=${format%%:*}
		tool=${format#*:}
		command -v "${tool%% *}" >/dev/null 2>&1 || continue
		for offset in $(LC_ALL=C grep -abo "$magic" "$1" | cut -d: -f1); do
			# Decompressors complain about the bytes after the payload: judge by the result.
			tail -c +$((offset + 1)) "$1" | $tool >"$2" 2>/dev/null || true
			if readelf -h "$2" >/dev/null 2>&1; then
				return 0
			fi
		done
	done
	return 1
}
vmlinux_state=unchanged
if [[ $kernel_state == updated || ! -f $out_dir/vmlinux ]]; then
	extract_vmlinux "$out_dir/vmlinuz" "$out_dir/.vmlinux.new" ||
		die "cannot extract the ELF kernel from $kernel (install xz-utils, gzip or zstd)"
	# XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU needs to boot an ELF kernel.
	readelf -n "$out_dir/.vmlinux.new" | grep -q 'Unknown note type: (0x00000012)\|PHYS32_ENTRY' ||
		die "$kernel has no PVH entry point (CONFIG_PVH): cannot boot it as an ELF"
	mv -f "$out_dir/.vmlinux.new" "$out_dir/vmlinux"
	vmlinux_state=updated
fi
initramfs_state=$(replace_if_changed "$candidate" "$out_dir/initramfs.img")
echo "$release" >"$out_dir/.kernel-release.new"
replace_if_changed "$out_dir/.kernel-release.new" "$out_dir/kernel-release" >/dev/null

module_count=$(grep -vc '^#' "$list_out" || true)
size_of() { du -h --apparent-size "$1" | cut -f1; }
cat <<EOF
Gantry guest for kernel $release in $out_dir:
  vmlinuz         $(size_of "$out_dir/vmlinuz")  ($kernel_state, from $kernel)
  vmlinux         $(size_of "$out_dir/vmlinux")  ($vmlinux_state, uncompressed ELF with a PVH entry: boots ~3 s faster under TCG)
  initramfs.img   $(size_of "$out_dir/initramfs.img")  ($initramfs_state; compression: $compression; /init = gantry-shim, $module_count modules, busybox)
  kernel-release  $release
EOF
