//! Process file descriptors: a handle on one process that a recycled pid can never alias.
//!
//! The shim's reaper collects every exit with `waitpid(-1)` as soon as it happens, but the
//! container table only learns of it after the output drain window (see `DRAIN_AFTER_EXIT`), and
//! an exec'd process is reaped by its relay, not by the shim at all. A plain pid is therefore
//! stale for a while after each exit, and `kill(pid)` or `/proc/<pid>/ns/*` could reach whatever
//! process the kernel gave that number next, possibly in another container. A pidfd names the
//! process itself: once it is gone, signals through it fail with `ESRCH`.
//!
//! A pidfd is only as good as the moment it is opened: `pidfd_open(pid)` is race free only while
//! `pid` cannot have been reaped, i.e. when the caller is its parent and has not waited for it.
//! That is why the helpers in [`super::nsinit`] open them right after `fork` and pass them to the
//! shim over the status socket ([`super::launch`]).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::signal::Signal;

/// A pidfd.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid` (close-on-exec). Only race free for an unreaped child of the
    /// caller; see the module documentation.
    pub fn open(pid: i32) -> Result<Self, Errno> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory
        // is shared with the kernel.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(Errno::last());
        }
        let fd = i32::try_from(fd).map_err(|_| Errno::EBADF)?;
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it. pidfds
        // are always close-on-exec.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wraps a descriptor that is known to be a pidfd (received from a helper).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// A second descriptor for the same process.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// Sends `signal` to the process; `ESRCH` once it has exited, whatever now holds its pid.
    pub fn send_signal(&self, signal: Signal) -> Result<(), Errno> {
        // SAFETY: pidfd_send_signal(fd, sig, info = NULL, flags = 0) reads no memory of ours
        // (a null siginfo means "as kill() would send it").
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Whether the process is still there (alive or a zombie not yet reaped).
    #[cfg(test)]
    pub fn is_alive(&self) -> bool {
        // Signal 0 checks for existence only.
        // SAFETY: as in `send_signal`, with signal 0.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reaped_child_is_never_signalled_through_its_pidfd() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id() as i32).unwrap();
        assert!(pidfd.is_alive());
        pidfd.send_signal(Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        // The pid is free now and may be reused; the pidfd still names the dead process.
        assert!(!pidfd.is_alive());
        assert_eq!(pidfd.send_signal(Signal::SIGTERM), Err(Errno::ESRCH));
    }
}
