//! One process as containerd sees it (a task's main process or an exec): its stdio, its state,
//! and its exit, which waiters await.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim_protos::api::Status;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::{Notify, watch};

/// The stdio names containerd gave.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    /// Standard input FIFO (empty: none).
    pub stdin: String,
    /// Standard output.
    pub stdout: String,
    /// Standard error (empty with a terminal: it is merged into stdout).
    pub stderr: String,
    /// Whether the process runs on a terminal.
    pub terminal: bool,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exited {
    /// The exit status containerd reports: the code, or 128 + the signal.
    pub status: u32,
    /// When (seconds and nanoseconds since the epoch).
    pub at: (i64, i32),
}

impl Exited {
    /// An exit now with `status`.
    pub fn now(status: u32) -> Self {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            status,
            at: (since.as_secs() as i64, since.subsec_nanos() as i32),
        }
    }

    /// The time as protobuf has it.
    pub fn timestamp(&self) -> Timestamp {
        Timestamp {
            seconds: self.at.0,
            nanos: self.at.1,
            ..Timestamp::default()
        }
    }
}

/// Where a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    /// Made, not started.
    Created,
    /// Running.
    Running,
    /// Ended.
    Stopped(Exited),
}

impl ProcessState {
    /// The state as containerd's API spells it.
    pub fn status(&self) -> Status {
        match self {
            ProcessState::Created => Status::CREATED,
            ProcessState::Running => Status::RUNNING,
            ProcessState::Stopped(_) => Status::STOPPED,
        }
    }
}

/// A process of a task.
#[derive(Debug)]
pub struct Process {
    /// Its exec id; `None` for the task's main process.
    pub exec_id: Option<String>,
    /// Its stdio.
    pub stdio: Stdio,
    /// For an exec before its start: what to run.
    pub exec: Option<gantry_api::ExecRequest>,
    state: watch::Sender<ProcessState>,
    /// Notified by `CloseIO`: its standard input is to be closed once drained.
    pub close_stdin: Arc<Notify>,
}

impl Process {
    /// A created process.
    pub fn new(
        exec_id: Option<String>,
        stdio: Stdio,
        exec: Option<gantry_api::ExecRequest>,
    ) -> Self {
        Self {
            exec_id,
            stdio,
            exec,
            state: watch::Sender::new(ProcessState::Created),
            close_stdin: Arc::new(Notify::new()),
        }
    }

    /// Its state now.
    pub fn state(&self) -> ProcessState {
        *self.state.borrow()
    }

    /// It runs.
    pub fn set_running(&self) {
        self.state.send_if_modified(|state| {
            let changed = *state == ProcessState::Created;
            if changed {
                *state = ProcessState::Running;
            }
            changed
        });
    }

    /// It ended; true the first time (a process ends once: later reports are ignored).
    pub fn set_exited(&self, exited: Exited) -> bool {
        self.state.send_if_modified(|state| {
            let first = !matches!(state, ProcessState::Stopped(_));
            if first {
                *state = ProcessState::Stopped(exited);
            }
            first
        })
    }

    /// Its exit, once it ended.
    pub fn exited(&self) -> Option<Exited> {
        match self.state() {
            ProcessState::Stopped(exited) => Some(exited),
            _ => None,
        }
    }

    /// Waits until it ends.
    pub async fn wait(&self) -> Exited {
        let mut state = self.state.subscribe();
        loop {
            if let ProcessState::Stopped(exited) = *state.borrow_and_update() {
                return exited;
            }
            if state.changed().await.is_err() {
                // The sender lives in `self`: unreachable while borrowed; report a kill.
                return Exited::now(137);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_ends_once_and_waiters_see_it() {
        let process = Arc::new(Process::new(None, Stdio::default(), None));
        assert_eq!(process.state().status(), Status::CREATED);
        process.set_running();
        assert_eq!(process.state().status(), Status::RUNNING);
        let waiter = {
            let process = Arc::clone(&process);
            tokio::spawn(async move { process.wait().await })
        };
        tokio::task::yield_now().await;
        assert!(process.set_exited(Exited::now(3)));
        assert!(
            !process.set_exited(Exited::now(9)),
            "a second end is ignored"
        );
        assert_eq!(waiter.await.unwrap().status, 3);
        assert_eq!(process.exited().unwrap().status, 3);
        process.set_running();
        assert_eq!(process.state().status(), Status::STOPPED, "no way back");
    }
}
