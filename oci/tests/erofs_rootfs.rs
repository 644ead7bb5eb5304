//! Real root file systems, archived by GNU tar, converted and compared with the source tree:
//! - always: a busybox-static tree (applet symlinks, device nodes, setuid, xattrs, hard links,
//!   sparse files) in GNU and pax formats, including the three GNU sparse pax formats;
//! - `--ignored`: a Debian root from `debootstrap --variant=minbase bookworm`, cached under the
//!   cargo target directory (the first run downloads it, which takes a few minutes).

mod erofs_common;

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use erofs_common::*;
use gantry_oci::ConvertOptions;

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    let c_name = CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated; value is readable for its length.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c_path is NUL-terminated; mknod does not retain it.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
}

fn run(command: &mut Command) {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A small root file system around /bin/busybox (from busybox-static).
fn busybox_root(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        let path = root.join(applet);
        if path.exists() {
            continue;
        }
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let depth = applet.matches('/').count();
        symlink(format!("{}bin/busybox", "../".repeat(depth)), &path).unwrap();
    }
    for dir in [
        "etc",
        "proc",
        "sys",
        "dev",
        "root",
        "tmp",
        "var/log",
        "home/user",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/hostname"), "gantry\n").unwrap();
    fs::hard_link(root.join("etc/passwd"), root.join("etc/passwd-")).unwrap();
    mknod(&root.join("dev/null"), libc::S_IFCHR, 1, 3);
    mknod(&root.join("dev/vda"), libc::S_IFBLK, 254, 0);
    mknod(&root.join("dev/initctl"), libc::S_IFIFO, 0, 0);
    fs::copy("/bin/busybox", root.join("bin/su")).unwrap();
    fs::set_permissions(root.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    set_xattr(&root.join("bin/su"), "security.capability", &{
        let mut v = vec![1, 0, 0, 2];
        v.extend_from_slice(&[0x0a, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        v
    });
    set_xattr(&root.join("etc/hostname"), "user.origin", b"test");
    set_xattr(&root.join("home/user"), "trusted.note", b"t");
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    // Sparse: data, a 1 MiB hole, data, and a hole at the end.
    let mut sparse = fs::File::create(root.join("var/log/lastlog")).unwrap();
    sparse.write_all(&vec![b'a'; 5000]).unwrap();
    use std::io::Seek;
    sparse.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
    sparse.write_all(&[b'b'; 100]).unwrap();
    sparse.set_len(3 << 20).unwrap();
}

/// Archives `root` with GNU tar (`extra` selects the format), converts it, and compares what
/// erofs-rs and the mounted image show with the source tree.
fn check_round_trip(root: &Path, work: &Path, name: &str, extra: &[&str], xattrs: bool) {
    let tar_path = work.join(format!("{name}.tar"));
    run(Command::new("tar")
        .args(extra)
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(&tar_path)
        .arg("-C")
        .arg(root)
        .arg("."));
    let tar = fs::read(&tar_path).unwrap();
    let (summary, image) = convert(&tar, work, name, &ConvertOptions::default());
    assert!(summary.entries > 250, "{summary:?}");

    let (mut expected, expected_links) = read_directory_tree(root, xattrs);
    if !xattrs {
        for attrs in expected.values_mut() {
            attrs.xattrs.clear();
        }
    }
    let check = Check {
        xattrs,
        ..Check::ALL
    };
    let (actual, links) = read_with_erofs_rs(&image);
    let problems = diff_listings(&expected, &actual, check);
    assert!(
        problems.is_empty(),
        "{name} via erofs-rs:\n{}",
        problems.join("\n")
    );
    assert_eq!(links, expected_links, "{name}: hard links via erofs-rs");

    let (ok, log) = fsck_check(&image);
    assert!(ok, "{name}: fsck.erofs: {log}");

    if let Some(mount) = Mount::erofs(&image, &work.join(format!("{name}-mnt"))) {
        let (mounted, links) = read_directory_tree(&mount.dir, xattrs);
        let problems = diff_listings(&expected, &mounted, check);
        assert!(
            problems.is_empty(),
            "{name} via the kernel:\n{}",
            problems.join("\n")
        );
        assert_eq!(links, expected_links, "{name}: hard links via the kernel");
        // busybox from the image runs.
        let output = Command::new(mount.dir.join("bin/busybox"))
            .arg("echo")
            .arg("hello from erofs")
            .output()
            .unwrap();
        assert_eq!(output.stdout, b"hello from erofs\n");
    }
}

#[test]
fn busybox_root_round_trips_in_every_tar_format() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    busybox_root(&root);
    check_round_trip(&root, work.path(), "gnu", &["--format=gnu"], false);
    check_round_trip(
        &root,
        work.path(),
        "gnu-sparse",
        &["--format=gnu", "--sparse"],
        false,
    );
    check_round_trip(
        &root,
        work.path(),
        "pax-xattrs",
        &["--format=posix", "--xattrs", "--xattrs-include=*"],
        true,
    );
    for version in ["0.0", "0.1", "1.0"] {
        check_round_trip(
            &root,
            work.path(),
            &format!("pax-sparse-{version}"),
            &[
                "--format=posix",
                "--xattrs",
                "--xattrs-include=*",
                &format!("--sparse-version={version}"),
            ],
            true,
        );
    }
}

/// A Debian minbase root, cached as a tarball under the target directory.
fn debootstrap_tarball() -> PathBuf {
    let cache = target_cache_dir("debootstrap");
    let tarball = cache.join("bookworm-minbase.tar");
    if tarball.exists() {
        return tarball;
    }
    let root = cache.join("root");
    let _ = fs::remove_dir_all(&root);
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg("http://deb.debian.org/debian"));
    let partial = cache.join("bookworm-minbase.tar.partial");
    run(Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
        ])
        .arg("-cf")
        .arg(&partial)
        .arg("-C")
        .arg(&root)
        .arg("."));
    fs::rename(&partial, &tarball).unwrap();
    tarball
}

#[test]
#[ignore = "needs debootstrap and network on first run (cached afterwards); run with --ignored"]
fn debootstrap_minbase_round_trips() {
    let tarball = debootstrap_tarball();
    let cache = tarball.parent().unwrap();
    let root = cache.join("root");
    let work = tempfile::tempdir().unwrap();
    let tar = fs::read(&tarball).unwrap();
    let (summary, image) = convert(&tar, work.path(), "debian", &ConvertOptions::default());
    eprintln!(
        "debootstrap minbase: {} entries, {} byte tar -> {} byte image",
        summary.entries,
        tar.len(),
        summary.size
    );
    let (expected, expected_links) = read_directory_tree(&root, true);
    let (actual, links) = read_with_erofs_rs(&image);
    let problems = diff_listings(&expected, &actual, Check::ALL);
    assert!(
        problems.is_empty(),
        "via erofs-rs:\n{}",
        problems.join("\n")
    );
    assert_eq!(links, expected_links);
    let (ok, log) = fsck_check(&image);
    assert!(ok, "fsck.erofs: {log}");
    if let Some(mount) = Mount::erofs(&image, &work.path().join("mnt")) {
        let (mounted, links) = read_directory_tree(&mount.dir, true);
        let problems = diff_listings(&expected, &mounted, Check::ALL);
        assert!(
            problems.is_empty(),
            "via the kernel:\n{}",
            problems.join("\n")
        );
        assert_eq!(links, expected_links);
        // The image's own dpkg can read its database: chroot into a read-only root.
        let output = Command::new("chroot")
            .arg(&mount.dir)
            .args(["dpkg-query", "-W", "-f", "${Package}\\n", "base-files"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "base-files");
    }
}
