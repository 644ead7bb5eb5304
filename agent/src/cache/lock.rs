//! `flock(2)` locks on files: cross-process, released by the kernel when the holder dies.
//!
//! Each lock opens its own file description, so two locks taken by one process on the same
//! file conflict exactly as locks of two processes would.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// A held lock; dropping it unlocks.
#[derive(Debug)]
pub struct FileLock {
    _lock: Flock<File>,
}

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders.
    Shared,
    /// One holder.
    Exclusive,
}

impl FileLock {
    /// The locked file.
    pub fn file(&self) -> &File {
        &self._lock
    }

    /// Waits for the lock on `path`, creating the file if `create`.
    pub fn acquire(path: &Path, mode: LockMode, create: bool) -> io::Result<FileLock> {
        let file = open(path, create)?;
        let arg = match mode {
            LockMode::Shared => FlockArg::LockShared,
            LockMode::Exclusive => FlockArg::LockExclusive,
        };
        loop {
            match Flock::lock(file.try_clone()?, arg) {
                Ok(lock) => return Ok(FileLock { _lock: lock }),
                Err((_, Errno::EINTR)) => continue,
                Err((_, errno)) => return Err(io::Error::from(errno)),
            }
        }
    }

    /// Takes the lock on `path` if nobody holds a conflicting one; `Ok(None)` if taken.
    pub fn try_acquire(path: &Path, mode: LockMode) -> io::Result<Option<FileLock>> {
        let file = open(path, false)?;
        let arg = match mode {
            LockMode::Shared => FlockArg::LockSharedNonblock,
            LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
        };
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(FileLock { _lock: lock })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(io::Error::from(errno)),
        }
    }
}

fn open(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(false)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_within_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let shared = FileLock::acquire(&path, LockMode::Shared, true).unwrap();
        assert!(
            FileLock::try_acquire(&path, LockMode::Shared)
                .unwrap()
                .is_some()
        );
        assert!(
            FileLock::try_acquire(&path, LockMode::Exclusive)
                .unwrap()
                .is_none()
        );
        drop(shared);
        let exclusive = FileLock::try_acquire(&path, LockMode::Exclusive).unwrap();
        assert!(exclusive.is_some());
        assert!(
            FileLock::try_acquire(&path, LockMode::Shared)
                .unwrap()
                .is_none()
        );
    }
}
