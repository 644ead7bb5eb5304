//! Real root file systems for the tests: a busybox-static tree with every kind of file, and a
//! Debian minbase root from debootstrap (cached under the target directory).

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::target_cache_dir;

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
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

pub fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c_path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: c_path is NUL-terminated; mknod does not retain it.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
}

pub fn run(command: &mut Command) {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A small root file system around /bin/busybox (from busybox-static).
pub fn busybox_root(root: &Path) {
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

/// A Debian minbase root, cached as a tarball under the target directory.
pub fn debootstrap_tarball() -> PathBuf {
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
    pack_pax(&root, &tarball);
    tarball
}

/// Packs `root` as a pax tarball with xattrs and numeric owners at `tarball` (through a
/// `.partial` file, so a tarball that exists is whole).
pub fn pack_pax(root: &Path, tarball: &Path) {
    let partial = tarball.with_extension("tar.partial");
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
        .arg(root)
        .arg("."));
    fs::rename(&partial, tarball).unwrap();
}
