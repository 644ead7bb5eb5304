//! Reaping children and orphans, and handing each exit status to whoever waits for that pid.
//!
//! As PID 1 (or a child subreaper) the shim inherits every orphan, including each container's
//! init (see `container::nsinit`), so one reaper collects all exits with `waitpid(-1)`. An exit
//! that nobody waits for yet is kept for a while, because a process can exit before the code that
//! started it learns its pid; it expires so that a recycled pid never receives a stale status.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_proto::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use tokio::sync::Notify;

/// How long an unclaimed exit is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(30);
/// At most this many unclaimed exits are kept (the oldest go first).
const UNCLAIMED_MAX: usize = 4096;

#[derive(Debug, Default)]
struct Book {
    exits: HashMap<i32, (ExitStatus, Instant)>,
    order: VecDeque<(i32, Instant)>,
}

impl Book {
    fn record(&mut self, pid: i32, status: ExitStatus) {
        let now = Instant::now();
        self.exits.insert(pid, (status, now));
        self.order.push_back((pid, now));
        while let Some((oldest, at)) = self.order.front().copied() {
            let expired =
                now.duration_since(at) > UNCLAIMED_TTL || self.order.len() > UNCLAIMED_MAX;
            if !expired {
                break;
            }
            self.order.pop_front();
            // Only drop the entry this queue slot recorded, not a newer exit of a reused pid.
            if self
                .exits
                .get(&oldest)
                .is_some_and(|(_, recorded)| *recorded == at)
            {
                self.exits.remove(&oldest);
            }
        }
    }

    fn take(&mut self, pid: i32) -> Option<ExitStatus> {
        let (status, at) = self.exits.remove(&pid)?;
        (at.elapsed() <= UNCLAIMED_TTL).then_some(status)
    }
}

/// The shim's reaper.
#[derive(Debug, Default)]
pub struct Reaper {
    book: Mutex<Book>,
    exited: Notify,
}

impl Reaper {
    /// Starts reaping on the current tokio runtime. Not as PID 1, the shim makes itself a child
    /// subreaper so that orphaned container processes still come to it.
    pub fn start(pid1: bool) -> std::io::Result<Arc<Self>> {
        if !pid1 {
            nix::sys::prctl::set_child_subreaper(true)?;
        }
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let publisher = Arc::clone(&reaper);
        tokio::spawn(async move {
            // Children may have exited before the handler existed: reap once before waiting.
            loop {
                publisher.reap_all();
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; orphans will no longer be reaped");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => {
                    (pid, ExitStatus::Signal(signal as i32))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(errno) => {
                    tracing::warn!(%errno, "waitpid failed");
                    return;
                }
            };
            tracing::debug!(pid = pid.as_raw(), ?status, "reaped");
            self.record(pid.as_raw(), status);
        }
    }

    fn record(&self, pid: i32, status: ExitStatus) {
        self.book
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(pid, status);
        self.exited.notify_waiters();
    }

    /// Waits for `pid` to exit; returns how it did.
    pub async fn wait(&self, pid: i32) -> ExitStatus {
        loop {
            // Register interest before looking, so an exit between the two is not missed.
            let notified = self.exited.notified();
            if let Some(status) = self
                .book
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(pid)
            {
                return status;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_recorded_before_the_wait_is_delivered() {
        let reaper = Reaper::default();
        reaper.record(10, ExitStatus::Code(3));
        assert_eq!(reaper.wait(10).await, ExitStatus::Code(3));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_later_exit() {
        let reaper = Arc::new(Reaper::default());
        let waiter = tokio::spawn({
            let reaper = Arc::clone(&reaper);
            async move { reaper.wait(11).await }
        });
        tokio::task::yield_now().await;
        reaper.record(12, ExitStatus::Code(0));
        reaper.record(11, ExitStatus::Signal(9));
        assert_eq!(waiter.await.unwrap(), ExitStatus::Signal(9));
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let mut book = Book::default();
        for pid in 0..(UNCLAIMED_MAX as i32 + 100) {
            book.record(pid, ExitStatus::Code(0));
        }
        assert!(book.exits.len() <= UNCLAIMED_MAX);
        assert_eq!(book.take(0), None, "the oldest went first");
        assert_eq!(
            book.take(UNCLAIMED_MAX as i32 + 99),
            Some(ExitStatus::Code(0))
        );
    }

    #[tokio::test]
    #[expect(
        clippy::zombie_processes,
        reason = "the reaper under test collects the children"
    )]
    async fn real_children_are_reaped_with_their_status() {
        let reaper = Reaper::start(false).unwrap();
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), reaper.wait(child.id() as i32))
            .await
            .unwrap();
        assert_eq!(status, ExitStatus::Code(7));
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -TERM $$"])
            .spawn()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), reaper.wait(child.id() as i32))
            .await
            .unwrap();
        assert_eq!(status, ExitStatus::Signal(libc::SIGTERM));
    }
}
