#!/usr/bin/env bash
# Packages gantry-shim for a Debian (or Debian-based) guest whose systemd starts it.
#
# Usage: qemu/build-shim-deb.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to <repo>/target/guest. Prints the package's path.
#
# The package holds:
#   /usr/sbin/gantry-shim                        the static shim (no library dependencies)
#   /lib/systemd/system/gantry-shim.service      qemu/systemd/gantry-shim.service
#   /usr/lib/modules-load.d/gantry-shim.conf     the kernel modules it needs (qemu/systemd/)
# and enables the unit on install (deb-systemd-helper, as debhelper's snippets do), starting it
# at once when systemd runs.
#
# Needs: dpkg-deb (dpkg), binutils (strip), cargo. Reproducible: the same shim gives the same
# package bytes (SOURCE_DATE_EPOCH=0, sorted, root-owned).
set -euo pipefail
shopt -s inherit_errexit

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$script_dir/.." && pwd)
out_dir=${1:-$repo_root/target/guest}
cargo=${CARGO:-cargo}

die() {
	echo "build-shim-deb: error: $*" >&2
	exit 1
}
command -v dpkg-deb >/dev/null || die "'dpkg-deb' not found: install the Debian package 'dpkg'"
command -v strip >/dev/null || die "'strip' not found: install the Debian package 'binutils'"

# shellcheck source=qemu/static-shim.sh
source "$script_dir/static-shim.sh"
shim=$(build_static_shim)
version=$(cd "$repo_root" && "$cargo" metadata --format-version 1 --no-deps |
	sed -n 's/.*"name":"gantry-shim","version":"\([^"]*\)".*/\1/p')
[[ -n $version ]] || die "cannot read gantry-shim's version from cargo metadata"

mkdir -p "$out_dir"
staging=$(mktemp -d "$out_dir/.shim-deb.XXXXXX")
trap 'rm -rf "$staging"' EXIT
root=$staging/root
install -d "$root/DEBIAN" "$root/usr/sbin" "$root/lib/systemd/system" "$root/usr/lib/modules-load.d"
strip --strip-debug -o "$root/usr/sbin/gantry-shim" "$shim"
chmod 0755 "$root/usr/sbin/gantry-shim"
install -m 0644 "$script_dir/systemd/gantry-shim.service" "$root/lib/systemd/system/"
install -m 0644 "$script_dir/systemd/gantry-shim.conf" "$root/usr/lib/modules-load.d/"

cat >"$root/DEBIAN/control" <<CONTROL
Package: gantry-shim
Version: $version
Architecture: amd64
Maintainer: Gantry developers <dev@gantry.invalid>
Section: admin
Priority: optional
Depends: init-system-helpers
Recommends: systemd, kmod
Installed-Size: $(($(stat -c %s "$root/usr/sbin/gantry-shim") / 1024 + 8))
Description: guest end of the Gantry container control plane
 Runs the containers the Gantry agent (on the host's offload card) asks for, and talks to the
 agent over virtio-vsock. Started by systemd as gantry-shim.service.
CONTROL
cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = configure ] || [ "$1" = abort-upgrade ]; then
	deb-systemd-helper unmask gantry-shim.service >/dev/null || true
	deb-systemd-helper enable gantry-shim.service >/dev/null || true
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		systemd-modules-load /usr/lib/modules-load.d/gantry-shim.conf || true
		deb-systemd-invoke restart gantry-shim.service >/dev/null || true
	fi
fi
SCRIPT
cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop gantry-shim.service >/dev/null || true
fi
SCRIPT
cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -x /usr/bin/deb-systemd-helper ]; then
	deb-systemd-helper mask gantry-shim.service >/dev/null || true
fi
if [ "$1" = purge ] && [ -x /usr/bin/deb-systemd-helper ]; then
	deb-systemd-helper purge gantry-shim.service >/dev/null || true
	deb-systemd-helper unmask gantry-shim.service >/dev/null || true
fi
SCRIPT
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
find "$root" -exec touch -h -d @0 {} +

package=$out_dir/gantry-shim_${version}_amd64.deb
SOURCE_DATE_EPOCH=0 dpkg-deb --root-owner-group -Zxz --build "$root" "$staging/package.deb" >/dev/null
if cmp -s "$staging/package.deb" "$package"; then
	echo "build-shim-deb: $package (unchanged)" >&2
else
	mv -f "$staging/package.deb" "$package"
	echo "build-shim-deb: $package (updated)" >&2
fi
echo "$package"
