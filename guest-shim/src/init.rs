//! PID 1 duties: early mounts, a console, reaping orphans, and powering off instead of exiting.
//!
//! The shim is the initramfs' `/init` in Gantry's own guest image, but it can also run as a
//! service under another init; [`is_pid1`] tells the two apart and only PID 1 does the work here.

use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::broadcast;

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
    /// The SIGCHLD handler could not be installed.
    #[error("cannot watch SIGCHLD: {0}")]
    Signal(std::io::Error),
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

/// A child process that exited and was reaped by PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildExit {
    /// The reaped process.
    pub pid: i32,
    /// Exit code, or 128 + signal number if it was killed.
    pub code: i32,
}

/// Starts reaping every child and orphan that exits (PID 1 inherits all orphans).
///
/// Exits are published on the returned channel so that code which started a process (later:
/// containers) can learn its status even though the reaper collected it.
pub fn spawn_reaper() -> Result<broadcast::Sender<ChildExit>, InitError> {
    let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        .map_err(InitError::Signal)?;
    let (exits, _) = broadcast::channel(64);
    let publisher = exits.clone();
    tokio::spawn(async move {
        // Children may have exited before the handler existed: reap once before waiting.
        loop {
            reap_all(&publisher);
            if sigchld.recv().await.is_none() {
                tracing::error!("SIGCHLD stream ended; orphans will no longer be reaped");
                return;
            }
        }
    });
    Ok(exits)
}

fn reap_all(publisher: &broadcast::Sender<ChildExit>) {
    loop {
        let exit = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => ChildExit {
                pid: pid.as_raw(),
                code,
            },
            Ok(WaitStatus::Signaled(pid, signal, _)) => ChildExit {
                pid: pid.as_raw(),
                code: 128_i32.saturating_add(signal as i32),
            },
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(errno) => {
                tracing::warn!(%errno, "waitpid failed");
                return;
            }
        };
        tracing::debug!(pid = exit.pid, code = exit.code, "reaped child");
        // No subscriber is fine: nobody cares about this process.
        let _ = publisher.send(exit);
    }
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

    #[tokio::test]
    #[expect(
        clippy::zombie_processes,
        reason = "the reaper under test collects the child"
    )]
    async fn reaper_publishes_exit_codes() {
        let exits = spawn_reaper().expect("reaper");
        let mut subscriber = exits.subscribe();
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .expect("spawn sh");
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        let exit = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let exit = subscriber.recv().await.expect("reaper alive");
                if exit.pid == pid {
                    return exit;
                }
            }
        })
        .await
        .expect("child reaped within 10 s");
        assert_eq!(exit.code, 7);
    }
}
