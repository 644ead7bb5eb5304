#!/usr/bin/env bash
# Builds a Debian root file system from the host's own installed files, for benchmarks that
# cannot debootstrap (no package mirror reachable). It stands in for
# `debootstrap --variant=minbase --include=PACKAGE,... SUITE DIR`: the same package set, taken
# from the host's dpkg database instead of a mirror, so it needs no network.
#
# Usage: qemu/host-root.sh DIR [PACKAGE...]
#
# What DIR gets:
#   - every file dpkg lists for the host's installed packages of Priority "required", apt, each
#     PACKAGE, and everything those depend on (Pre-Depends and Depends, first installed
#     alternative, virtual packages through Provides; Recommends are left out, as debootstrap
#     does), except /usr/share/doc, /usr/share/man, /usr/share/info and /usr/share/locale;
#   - the host's alternatives symlinks (/etc/alternatives and the links to it) for those files;
#   - the merged-/usr symlinks (/bin -> usr/bin ...), as the host has them;
#   - the host's system accounts (/etc/passwd and /etc/group, ids below 1000 and nobody), with
#     locked /etc/shadow and /etc/gshadow, and what maintainer scripts made in /etc (ld.so.cache,
#     profile, nsswitch.conf, shells, motd, environment, localtime, timezone, mtab);
#   - a dpkg database of just those packages (/var/lib/dpkg/status and info/), and
#     /var/lib/dpkg/gantry-host-root naming what was asked for;
#   - empty /dev, /proc, /sys, /run, /tmp, /var/tmp and /root.
# A copy of the host's /usr would not do: a development host's /usr holds gigabytes (toolchains,
# SDKs, kernel modules), and whatever happens to be installed would change the image from host
# to host. Measured on a Debian bookworm host when this was written: with no PACKAGE 90
# packages, 71 MB; with python3-minimal 95 packages, 88 MB; with python3 112 packages, 101 MB. Debootstrap's root of the same packages is larger by the
# documentation, man pages, locales and apt caches left out here, and the files' versions are
# whatever the host has installed.
#
# Owners, modes, symlinks, hard links and extended attributes are kept (tar --xattrs, as root).
#
# Prints one line on stdout saying what DIR holds, e.g.
#   host files: 95 packages (Priority required, apt, python3-minimal and their dependencies), 88 MB
# and progress on stderr.
#
# Idempotent: DIR is built as DIR.partial and renamed when complete; an existing DIR is kept and
# only described again. Remove DIR to rebuild it.
#
# Needs (as root): a Debian host (dpkg-query, with those packages installed), GNU tar, awk.
set -euo pipefail
shopt -s inherit_errexit

die() {
	echo "host-root: error: $*" >&2
	exit 1
}
note() { echo "host-root: $*" >&2; }

[[ $# -ge 1 && -n $1 ]] || die "usage: qemu/host-root.sh DIR [PACKAGE...]"
dir=${1%/}
shift
extra=("$@")
[[ $(id -u) == 0 ]] || die "run as root (copying other users' files with their owners needs it)"
command -v dpkg-query >/dev/null || die "'dpkg-query' not found: this needs a Debian host"

# Paths dpkg lists that a published base image leaves out, and the mount points of the host's
# pseudo file systems (made empty below: their contents are the running host's).
readonly EXCLUDED='^/(usr/share/(doc|man|info|locale)|dev|proc|sys|run|tmp)(/|$)'

describe() { # root
	local packages mb
	packages=$(grep -c '^Package: ' "$1/var/lib/dpkg/status") || packages=0
	mb=$(du -sm --apparent-size "$1" | cut -f1)
	local what="Priority required, apt"
	[[ -s $1/var/lib/dpkg/gantry-host-root ]] && what=$(<"$1/var/lib/dpkg/gantry-host-root")
	echo "host files: $packages packages ($what and their dependencies), $mb MB"
}

if [[ -d $dir ]]; then
	describe "$dir"
	exit 0
fi

# --- which packages --------------------------------------------------------------------------
arch=$(dpkg --print-architecture)
# One line per installed package of this architecture (or all):
#   package <TAB> priority <TAB> provides <TAB> pre-depends, depends
installed=$(dpkg-query -W -f='${db:Status-Abbrev}\t${Package}\t${Architecture}\t${Priority}\t${Provides}\t${Pre-Depends}, ${Depends}\n' |
	awk -F'\t' -v arch="$arch" '$1 ~ /^ii/ && ($3 == arch || $3 == "all") { print $2 "\t" $4 "\t" $5 "\t" $6 }')
for package in "${extra[@]}"; do
	awk -F'\t' -v package="$package" '$1 == package { found = 1 } END { exit !found }' <<<"$installed" ||
		die "package '$package' is not installed on this host (install it, or let debootstrap make the root)"
done
packages=$(awk -F'\t' -v seeds="apt ${extra[*]}" '
	function bare(name) { # "libc6:any (>= 2.34)" -> "libc6"
		sub(/^[ \t]+/, "", name); sub(/[ \t(].*$/, "", name); sub(/:.*$/, "", name)
		return name
	}
	{
		installed[$1] = 1
		depends[$1] = $4
		if ($2 == "required") queue[++tail] = $1
		n = split($3, provided, ",")
		for (i = 1; i <= n; i++) {
			virtual = bare(provided[i])
			if (virtual != "" && !(virtual in provider)) provider[virtual] = $1
		}
	}
	END {
		n = split(seeds, seed, " ")
		for (i = 1; i <= n; i++) queue[++tail] = seed[i]
		for (head = 1; head <= tail; head++) {
			package = queue[head]
			if (package in chosen || !(package in installed)) continue
			chosen[package] = 1
			print package
			groups = split(depends[package], group, ",")
			for (g = 1; g <= groups; g++) {
				alternatives = split(group[g], alternative, "|")
				for (a = 1; a <= alternatives; a++) {
					name = bare(alternative[a])
					if (name in installed) { queue[++tail] = name; break }
					if (name in provider) { queue[++tail] = provider[name]; break }
				}
			}
		}
	}' <<<"$installed" | sort)
count=$(wc -l <<<"$packages")
note "$count packages: $(tr '\n' ' ' <<<"$packages")"

# --- which files -----------------------------------------------------------------------------
# dpkg lists paths as packaged (/bin/sh, /lib/x86_64-linux-gnu/...); on a merged-/usr host
# /bin and the others are symlinks into /usr, and tar would archive /bin/sh's target under the
# symlink's name, so the list names every file by its /usr path and the links themselves.
declare -A merged=()
for top in bin sbin lib lib32 lib64 libx32; do
	[[ -L /$top ]] && merged[$top]=$(readlink "/$top")
done
list=$(mktemp)
trap 'rm -f "$list"' EXIT
{
	# shellcheck disable=SC2086 # one word per package
	dpkg-query -L $packages 2>/dev/null | grep '^/' || true
	for top in "${!merged[@]}"; do echo "/$top"; done
} | grep -Ev "$EXCLUDED" | awk -v links="${!merged[*]}" -v targets="${merged[*]}" '
	BEGIN {
		n = split(links, link, " "); split(targets, target, " ")
		for (i = 1; i <= n; i++) to["/" link[i]] = "/" target[i]
	}
	{
		top = $0; sub(/^\/[^\/]*/, "", top) # the rest after the first component
		first = substr($0, 1, length($0) - length(top))
		if (top != "" && first in to) $0 = to[first] top
		if ($0 != "/.") print
	}' | sort -u >"$list.all"
mv "$list.all" "$list"

# Keep what exists (an admin or a dpkg path-exclude may have removed packaged files), and the
# alternatives links whose choice is one of those files.
declare -A wanted=()
while IFS= read -r path; do
	[[ -e $path || -L $path ]] && wanted[$path]=1
done <"$list"
while IFS= read -r link; do
	choice=/etc/alternatives/$(basename "$(readlink "$link")")
	target=$(readlink "$choice" 2>/dev/null) || continue
	if [[ -n ${wanted[$target]:-} ]]; then
		wanted[$link]=1
		wanted[$choice]=1
	fi
done < <(find /usr -xdev -type l -lname '/etc/alternatives/*' 2>/dev/null)
printf '%s\n' "${!wanted[@]}" | sed 's|^/||' | sort >"$list"

# --- the tree --------------------------------------------------------------------------------
partial=$dir.partial
rm -rf "$partial"
mkdir -p "$partial"
note "copying $(wc -l <"$list") paths into $partial"
tar --create --no-recursion --numeric-owner --xattrs --xattrs-include='*' --acls \
	--directory=/ --files-from="$list" --file=- |
	tar --extract --numeric-owner --xattrs --xattrs-include='*' --acls --same-permissions \
		--same-owner --directory="$partial" --file=-

# Accounts: what base-passwd and adduser would have made, without the host's users or hashes.
awk -F: '$3 < 1000 || $3 == 65534' /etc/passwd >"$partial/etc/passwd"
awk -F: '$3 < 1000 || $3 == 65534' /etc/group >"$partial/etc/group"
awk -F: '{ print $1 ":*:19000:0:99999:7:::" }' "$partial/etc/passwd" >"$partial/etc/shadow"
awk -F: '{ print $1 ":*::" }' "$partial/etc/group" >"$partial/etc/gshadow"
chmod 0644 "$partial/etc/passwd" "$partial/etc/group"
chmod 0640 "$partial/etc/shadow" "$partial/etc/gshadow"
chown 0:42 "$partial/etc/shadow" "$partial/etc/gshadow" # group shadow, as Debian has it
# What maintainer scripts made in /etc rather than shipped, so no dpkg list names it.
for file in ld.so.cache profile nsswitch.conf shells motd environment localtime timezone mtab; do
	[[ -e /etc/$file || -L /etc/$file ]] && cp -a "/etc/$file" "$partial/etc/"
done
# A dpkg database of the copied packages only.
dpkg_dir=$partial/var/lib/dpkg
mkdir -p "$dpkg_dir/info" "$dpkg_dir/updates" "$dpkg_dir/triggers"
awk -v chosen="$(tr '\n' ' ' <<<"$packages")" '
	BEGIN { RS = ""; ORS = "\n\n"; n = split(chosen, c, " "); for (i = 1; i <= n; i++) keep[c[i]] = 1 }
	{ name = $0; sub(/^Package: /, "", name); sub(/\n.*/, "", name); if (name in keep) print }
' /var/lib/dpkg/status >"$dpkg_dir/status"
declare -A chosen=()
while IFS= read -r package; do chosen[$package]=1; done <<<"$packages"
for file in /var/lib/dpkg/info/*; do
	name=$(basename "$file")
	package=${name%.*} # "libc6:amd64.list" -> "libc6:amd64"; "python3.11.list" -> "python3.11"
	[[ -n ${chosen[${package%%:*}]:-} ]] && cp -a "$file" "$dpkg_dir/info/"
done
for file in diversions statoverride; do
	[[ -e /var/lib/dpkg/$file ]] && cp -a "/var/lib/dpkg/$file" "$dpkg_dir/"
done
touch "$dpkg_dir/available"
mkdir -p "$partial"/{dev,proc,sys,run,tmp,root,var/tmp}
chmod 1777 "$partial/tmp" "$partial/var/tmp"
chmod 0700 "$partial/root"
what="Priority required, apt"
[[ ${#extra[@]} -gt 0 ]] && what+=", ${extra[*]}"
echo "$what" >"$dpkg_dir/gantry-host-root"

mv "$partial" "$dir"
describe "$dir"
