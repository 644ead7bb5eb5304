//! Real root file systems, archived by GNU tar, converted and compared with the source tree:
//! - always: a busybox-static tree (applet symlinks, device nodes, setuid, xattrs, hard links,
//!   sparse files) in GNU and pax formats, including the three GNU sparse pax formats;
//! - `--ignored`: a Debian root from `debootstrap --variant=minbase bookworm`, cached under the
//!   cargo target directory (the first run downloads it, which takes a few minutes).

mod erofs_common;

use std::fs;
use std::path::Path;
use std::process::Command;

use erofs_common::roots::{busybox_root, debootstrap_tarball, run};
use erofs_common::*;
use gantry_oci::ConvertOptions;

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
