//! Moving PID 1 off the initramfs onto a tmpfs, as `switch_root` does.
//!
//! The initramfs is the kernel's `rootfs`, the root of the whole mount tree, and `pivot_root`
//! refuses to move it (EINVAL). Containers need `pivot_root` (a `chroot` can be escaped), so at
//! boot PID 1 copies the initramfs into a tmpfs, deletes the originals to give the memory back,
//! moves the tmpfs over `/`, and executes itself again from there.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sys::stat::{Mode, SFlag, mknod};

/// Set in the environment of the re-executed init, so that it does not switch again.
pub const SWITCHED_ENV: &str = "GANTRY_SHIM_SWITCHED";
const NEW_ROOT: &str = "/.gantry-root";

/// Whether this init still runs on the initramfs.
pub fn needed() -> bool {
    std::env::var_os(SWITCHED_ENV).is_none()
}

/// Copies the initramfs into a tmpfs, makes it the root and re-executes `/init`. Returns only on
/// failure (the caller goes on from the initramfs).
pub fn switch_to_tmpfs() -> std::io::Error {
    match try_switch() {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

fn try_switch() -> std::io::Result<std::convert::Infallible> {
    let new_root = Path::new(NEW_ROOT);
    std::fs::create_dir_all(new_root)?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )?;
    for entry in std::fs::read_dir("/")? {
        let entry = entry?;
        if entry.path() == new_root {
            continue;
        }
        copy_tree(&entry.path(), &new_root.join(entry.file_name()))?;
    }
    // The copies are in place: free the initramfs' memory (the running binary stays mapped).
    for entry in std::fs::read_dir("/")? {
        let path = entry?.path();
        if path == new_root {
            continue;
        }
        let _ = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
    nix::unistd::chdir(new_root)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")?;

    let argv: Vec<CString> = std::env::args_os()
        .filter_map(|arg| CString::new(arg.as_bytes()).ok())
        .collect();
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter_map(|(key, value)| {
            let mut pair = key.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            CString::new(pair).ok()
        })
        .collect();
    envp.push(CString::new(format!("{SWITCHED_ENV}=1")).map_err(std::io::Error::other)?);
    let init = CString::new("/init").map_err(std::io::Error::other)?;
    let Err(errno) = nix::unistd::execve(&init, &argv, &envp);
    Err(errno.into())
}

/// Copies a file, directory, symlink or device node, keeping modes and owners.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let metadata = std::fs::symlink_metadata(from)?;
    let kind = metadata.file_type();
    let mode = metadata.permissions().mode() & 0o7777;
    if kind.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if kind.is_dir() {
        std::fs::create_dir(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    } else if kind.is_file() {
        std::fs::copy(from, to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    } else if kind.is_char_device() || kind.is_block_device() {
        let sflag = if kind.is_char_device() {
            SFlag::S_IFCHR
        } else {
            SFlag::S_IFBLK
        };
        mknod(to, sflag, Mode::from_bits_truncate(mode), metadata.rdev())?;
    } else {
        // Sockets and fifos have no business in an initramfs; skip them.
        return Ok(());
    }
    let _ = std::os::unix::fs::lchown(to, Some(metadata.uid()), Some(metadata.gid()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_copy_with_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        std::fs::create_dir_all(from.join("bin")).unwrap();
        std::fs::write(from.join("bin/tool"), b"#!").unwrap();
        std::fs::set_permissions(
            from.join("bin/tool"),
            std::fs::Permissions::from_mode(0o751),
        )
        .unwrap();
        std::os::unix::fs::symlink("bin/tool", from.join("link")).unwrap();
        let to = dir.path().join("to");
        copy_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read(to.join("bin/tool")).unwrap(), b"#!");
        let mode = std::fs::metadata(to.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o751);
        assert_eq!(
            std::fs::read_link(to.join("link")).unwrap(),
            Path::new("bin/tool")
        );
    }
}
