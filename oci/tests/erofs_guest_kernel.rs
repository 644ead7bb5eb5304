//! The guest's kernel (Debian's Linux 6.1, booted under QEMU/TCG with a busybox initramfs)
//! mounts converted images from virtio-blk disks and sees exactly what the host kernel sees:
//! the same listing (types, modes, owners, mtimes, sizes, link counts, device numbers),
//! the same file contents and symlink targets, and the same overlayfs union of two layers.
//!
//! Skips (with a message) when QEMU, the 6.1 kernel or busybox-static is missing.

mod erofs_common;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use erofs_common::*;
use gantry_oci::ConvertOptions;

const MODULES: [&str; 11] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "libcrc32c",
    "erofs",
    "overlay",
    "loop",
];

/// Prints a listing of the tree at `$1`: one `S|` line per path (stat), `H|` per regular file
/// (sha256), `L|` per symlink (target). Sorted, so two kernels can be compared line by line.
const LIST_SCRIPT: &str = r#"
list() {
  cd "$1" || exit 1
  busybox find . -exec busybox stat -c 'S|%n|%f|%a|%u|%g|%Y|%s|%t|%T|%h' {} + | busybox sort
  busybox find . -type f -exec busybox sha256sum {} + | busybox sed 's/^/H|/' | busybox sort
  busybox find . -type l | busybox sort | while read -r l; do echo "L|$l|$(busybox readlink "$l")"; done
  cd /
}
"#;

fn find_kernel() -> Option<(PathBuf, PathBuf)> {
    let kernel = fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("vmlinuz-6.1.") && name.ends_with("-amd64")
        })?;
    let version = kernel
        .file_name()?
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    let modules = PathBuf::from("/lib/modules").join(version);
    modules.is_dir().then_some((kernel, modules))
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if path.file_name()?.to_str()? == format!("{name}.ko") {
            return Some(path);
        }
    }
    None
}

/// An initramfs whose init loads the modules, mounts the disks and prints their listings.
fn build_initramfs(work: &Path, modules: &Path) -> PathBuf {
    let root = work.join("initramfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("modules")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut insmods = String::new();
    for name in MODULES {
        let module = find_module(modules, name).unwrap_or_else(|| panic!("module {name}"));
        fs::copy(&module, root.join("modules").join(format!("{name}.ko"))).unwrap();
        insmods.push_str(&format!("busybox insmod /modules/{name}.ko 2>/dev/null\n"));
    }
    let init = format!(
        r#"#!/bin/busybox sh
export PATH=/bin
busybox mkdir -p /proc /sys /dev /rich /lower /upper /union
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
{insmods}
{LIST_SCRIPT}
busybox mount -t erofs -o ro /dev/vda /rich || echo "MOUNT-FAILED vda"
busybox mount -t erofs -o ro /dev/vdb /lower || echo "MOUNT-FAILED vdb"
busybox mount -t erofs -o ro /dev/vdc /upper || echo "MOUNT-FAILED vdc"
busybox mount -t overlay -o lowerdir=/upper:/lower overlay /union || echo "MOUNT-FAILED overlay"
echo GANTRY-RICH-BEGIN
list /rich
echo GANTRY-RICH-END
echo GANTRY-UNION-BEGIN
list /union
echo GANTRY-UNION-END
busybox dmesg | busybox grep -i erofs | busybox sed 's/^/DMESG|/'
busybox poweroff -f
"#
    );
    let init_path = root.join("init");
    fs::write(&init_path, init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755)).unwrap();
    let cpio = work.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio --quiet -o -H newc > '{}'",
            root.display(),
            cpio.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio");
    cpio
}

/// Boots the kernel with the disks and returns the console output.
fn boot(kernel: &Path, initramfs: &Path, disks: &[&Path]) -> String {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .args([
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"]);
    for disk in disks {
        command.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,readonly=on",
            disk.display()
        ));
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut output = Vec::new();
        let _ = stdout.read_to_end(&mut output);
        output
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the guest did not power off within 300 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = reader.join().unwrap();
    String::from_utf8_lossy(&output).replace('\r', "")
}

fn section<'a>(output: &'a str, name: &str) -> Vec<&'a str> {
    let begin = format!("GANTRY-{name}-BEGIN");
    let end = format!("GANTRY-{name}-END");
    let start = output
        .find(&begin)
        .unwrap_or_else(|| panic!("no {begin} in the console output:\n{output}"));
    let stop = output[start..].find(&end).expect("section end") + start;
    output[start + begin.len()..stop]
        .lines()
        .filter(|l| !l.is_empty())
        .collect()
}

/// The same listing on the host, with the host's busybox.
fn host_listing(dir: &Path) -> String {
    let output = Command::new("/bin/busybox")
        .arg("sh")
        .arg("-c")
        .arg(format!("{LIST_SCRIPT}\nlist '{}'", dir.display()))
        .env("PATH", "/bin:/usr/bin")
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn layer(specs: &[Spec], work: &Path, name: &str) -> PathBuf {
    convert(
        &tar_of(specs, LongNames::Pax),
        work,
        name,
        &ConvertOptions::default(),
    )
    .1
}

#[test]
fn linux_6_1_reads_the_images_as_the_host_kernel_does() {
    let Some((kernel, modules)) = find_kernel() else {
        eprintln!("SKIP: no /boot/vmlinuz-6.1.*-amd64 (apt-get install linux-image-amd64)");
        return;
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
        || !Path::new("/bin/busybox").exists()
    {
        eprintln!("SKIP: needs qemu-system-x86 and busybox-static");
        return;
    }
    let work = tempfile::tempdir().unwrap();

    // Layer A: a varied tree (inline and block data, holes, xattrs, long and odd names,
    // devices, hard links, a directory of several blocks).
    let mut rich = vec![
        Spec::dir("etc").mtime(5),
        Spec::file("etc/passwd", "root:x:0:0").mode(0o644),
        Spec::file("etc/shadow", "root:*").mode(0o640).owner(0, 42),
        Spec::hardlink("etc/passwd-", "etc/passwd"),
        Spec::file("bin/su", vec![0x7f; 9000])
            .mode(0o4755)
            .xattr("security.capability", [1, 0, 0, 2, 10, 32, 0, 0]),
        Spec::symlink("bin/sh", "busybox"),
        Spec::symlink("long", "x/".repeat(1800)),
        Spec::new("dev/null", SpecKind::Char(1, 3)).mode(0o666),
        Spec::new("dev/vda", SpecKind::Block(254, 0)),
        Spec::new("dev/fifo", SpecKind::Fifo),
        Spec::file("home/big-ids", "x")
            .owner(100_000, 200_000)
            .mtime(-5),
        Spec::file("data/exact", vec![3u8; 8192]),
        Spec::file("data/tail", vec![4u8; 8192 + 77]).xattr("user.x", vec![b'v'; 3500]),
        Spec::file("data/holes", {
            let mut v = vec![5u8; 4096];
            v.extend_from_slice(&[0u8; 8192]);
            v.extend_from_slice(&[6u8; 10]);
            v
        }),
        Spec::file(b"odd/\xe9t\xe9".as_slice(), "latin-1"),
        Spec::file(format!("deep/{}", "n".repeat(250)), "long name"),
    ];
    for i in 0..400 {
        rich.push(Spec::file(
            format!("many/entry-{i:04}-{}", "z".repeat(i % 50)),
            format!("{i}"),
        ));
    }
    let rich_image = layer(&rich, work.path(), "rich");

    // Layers B (lower) and C (upper) for an overlay union.
    let lower = layer(
        &[
            Spec::file("etc/passwd", "lower passwd"),
            Spec::file("etc/group", "lower group"),
            Spec::file("doc/a", "a"),
            Spec::file("doc/b", "b"),
            Spec::file("keep", "kept"),
        ],
        work.path(),
        "lower",
    );
    let upper = layer(
        &[
            Spec::file("etc/passwd", "upper passwd"),
            Spec::file("etc/.wh.group", ""),
            Spec::file("doc/.wh..wh..opq", ""),
            Spec::file("doc/c", "c"),
            Spec::file("new", "new"),
        ],
        work.path(),
        "upper",
    );

    let initramfs = build_initramfs(work.path(), &modules);
    let console = boot(&kernel, &initramfs, &[&rich_image, &lower, &upper]);
    assert!(
        !console.contains("MOUNT-FAILED"),
        "a mount failed:\n{console}"
    );
    let dmesg: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("DMESG|"))
        .collect();
    assert!(
        !dmesg
            .iter()
            .any(|l| l.contains("corrupt") || l.contains("err")),
        "kernel complaints: {dmesg:?}"
    );

    let Some(rich_mount) = Mount::erofs(&rich_image, &work.path().join("rich-mnt")) else {
        return;
    };
    let host_rich = host_listing(&rich_mount.dir);
    let guest_rich = section(&console, "RICH");
    let host_rich: Vec<&str> = host_rich.lines().filter(|l| !l.is_empty()).collect();
    assert!(host_rich.len() > 400);
    assert_eq!(
        guest_rich, host_rich,
        "Linux 6.1 and the host kernel disagree"
    );

    let lower_mount = Mount::erofs(&lower, &work.path().join("lower-mnt")).unwrap();
    let upper_mount = Mount::erofs(&upper, &work.path().join("upper-mnt")).unwrap();
    let union = Mount::overlay(
        &[&upper_mount.dir, &lower_mount.dir],
        &work.path().join("union"),
    )
    .unwrap();
    let host_union = host_listing(&union.dir);
    let host_union: Vec<&str> = host_union.lines().filter(|l| !l.is_empty()).collect();
    let guest_union = section(&console, "UNION");
    assert_eq!(guest_union, host_union, "overlay unions differ");
    let joined = guest_union.join("\n");
    assert!(joined.contains("S|./doc/c|"));
    assert!(
        !joined.contains("./doc/a"),
        "the opaque directory hides lower content"
    );
    assert!(
        !joined.contains("./etc/group"),
        "the whiteout hides the lower file"
    );
    assert!(joined.contains("S|./keep|"));
}
