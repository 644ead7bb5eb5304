//! PID 1 duties: early mounts, a console, reaping orphans, and powering off instead of exiting.
//!
//! The shim is the initramfs' `/init` in Gantry's own guest image, but it can also run as a
//! service under another init; [`is_pid1`] tells the two apart and only PID 1 does the work here.

use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use nix::unistd::Pid;

/// Errors of the PID 1 setup.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount point could not be created.
    #[error("cannot create mount point {target}: {source}")]
    MountPoint {
        /// The directory.
        target: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A file system could not be mounted.
    #[error("cannot mount {fstype} on {target}: {errno}")]
    Mount {
        /// File-system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
}

/// One early mount of the PID 1 setup.
#[derive(Debug, Clone, Copy)]
pub struct EarlyMount {
    /// File-system type (also used as the source name).
    pub fstype: &'static str,
    /// Mount point.
    pub target: &'static str,
    /// Mount flags.
    pub flags: MsFlags,
    /// File-system specific options.
    pub data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The file systems PID 1 mounts, in order (each mount point lies in an earlier one or in `/`).
pub const EARLY_MOUNTS: &[EarlyMount] = &[
    EarlyMount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
    },
    EarlyMount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: "mode=0755",
    },
    EarlyMount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=1777",
    },
    EarlyMount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: "mode=0755",
    },
    EarlyMount {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: "nsdelegate",
    },
];

/// Whether this process is the system's init.
pub fn is_pid1() -> bool {
    nix::unistd::getpid() == Pid::from_raw(1)
}

/// Mounts [`EARLY_MOUNTS`]. A mount point that is already mounted (`EBUSY`) is left as it is.
pub fn mount_early_filesystems() -> Result<(), InitError> {
    for early in EARLY_MOUNTS {
        std::fs::create_dir_all(early.target).map_err(|source| InitError::MountPoint {
            target: early.target,
            source,
        })?;
        let data = (!early.data.is_empty()).then_some(early.data);
        match mount(
            Some(early.fstype),
            early.target,
            Some(early.fstype),
            early.flags,
            data,
        ) {
            Ok(()) => {}
            Err(Errno::EBUSY) => tracing::debug!(target = early.target, "already mounted"),
            Err(errno) => {
                return Err(InitError::Mount {
                    fstype: early.fstype,
                    target: early.target,
                    errno,
                });
            }
        }
    }
    Ok(())
}

/// Makes sure stdin, stdout and stderr are open, on `/dev/console` if the kernel could not
/// provide them (an initramfs without a `/dev/console` node starts init with no descriptors).
///
/// Must run before any other file is opened, so that descriptors 0-2 are free if missing.
pub fn ensure_console() {
    let missing: Vec<i32> = (0..=2).filter(|fd| !fd_is_open(*fd)).collect();
    if missing.is_empty() {
        return;
    }
    let Ok(console) = open(
        Path::new("/dev/console"),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    ) else {
        // Nowhere to report this: logging goes to the very console that is missing.
        return;
    };
    for fd in missing {
        if fd != console {
            // SAFETY: dup2 onto a descriptor number we just checked is not open; it touches no
            // memory and cannot invalidate a descriptor owned elsewhere in this process.
            unsafe { libc::dup2(console, fd) };
        }
    }
    if console > 2 {
        // SAFETY: `console` was opened above, is owned by nobody else, and is closed once.
        unsafe { libc::close(console) };
    }
}

fn fd_is_open(fd: i32) -> bool {
    // F_GETFD fails with EBADF exactly when the descriptor is not open.
    fcntl(fd, FcntlArg::F_GETFD).is_ok()
}

/// Powers the machine off: the end of PID 1. Never returns.
///
/// QEMU runs with `-no-reboot`, so a power-off makes it exit cleanly rather than leaving a
/// guest that hangs after a kernel panic ("attempted to kill init").
pub fn power_off() -> ! {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF) {
        Ok(never) => match never {},
        Err(errno) => tracing::error!(%errno, "power off failed; halting here"),
    }
    loop {
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_mounts_come_after_their_parents() {
        for (index, early) in EARLY_MOUNTS.iter().enumerate() {
            let parent = Path::new(early.target)
                .parent()
                .expect("absolute mount point");
            let parent_is_root = parent == Path::new("/");
            let parent_mounted_earlier = EARLY_MOUNTS.iter().take(index).any(|earlier| {
                Path::new(earlier.target) == parent || parent.starts_with(earlier.target)
            });
            assert!(
                parent_is_root || parent_mounted_earlier,
                "{} is mounted before its parent",
                early.target
            );
        }
    }

    #[test]
    fn the_required_file_systems_are_mounted() {
        for target in [
            "/proc",
            "/sys",
            "/dev",
            "/dev/pts",
            "/run",
            "/sys/fs/cgroup",
        ] {
            assert!(
                EARLY_MOUNTS.iter().any(|early| early.target == target),
                "{target} is not mounted"
            );
        }
    }

    #[test]
    fn test_process_is_not_pid1() {
        assert!(!is_pid1());
    }

    #[test]
    fn standard_descriptors_are_detected_as_open() {
        assert!(fd_is_open(2));
        assert!(!fd_is_open(987_654));
    }
}
