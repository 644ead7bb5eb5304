# Sourced by the guest build scripts: builds gantry-shim as a static binary (it runs as the
# initramfs' /init, and in any distribution without its libraries) and prints its path.
# Expects: repo_root, cargo, and die() from the sourcing script.

readonly SHIM_TARGET_TRIPLE=x86_64-unknown-linux-gnu

build_static_shim() {
	local target_dir shim
	target_dir=$(cd "$repo_root" && "$cargo" metadata --format-version 1 --no-deps |
		sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
	[[ -n $target_dir ]] || die "cannot find cargo's target directory"
	(cd "$repo_root" && RUSTFLAGS="-C target-feature=+crt-static" "$cargo" build --quiet --release \
		-p gantry-shim --target "$SHIM_TARGET_TRIPLE") || die "building gantry-shim failed"
	shim=$target_dir/$SHIM_TARGET_TRIPLE/release/gantry-shim
	[[ -x $shim ]] || die "the shim was not built at $shim"
	if LC_ALL=C ldd "$shim" 2>&1 | grep -q '=>'; then
		die "$shim is dynamically linked: it cannot run as /init"
	fi
	echo "$shim"
}
