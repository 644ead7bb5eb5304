//! Starting the helper process (`gantry-shim __container-init` / `__container-exec`) and reading
//! its status lines. See [`super::nsinit`] for the other side.
//!
//! The status channel is a unix stream socket rather than a pipe so that the helper can pass the
//! new process's pidfd along with its `pid N` line (`SCM_RIGHTS`): only the helper, as the
//! process's parent, can open one without racing the pid's reuse (see [`super::pidfd`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, socketpair,
};

use super::nsinit::{CONFIG_FD, START_FD, STATUS_FD, TARGET_FD};
use super::pidfd::PidFd;

/// Errors starting a helper or hearing from it.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A pipe or the process could not be created.
    #[error("starting the container helper: {0}")]
    Spawn(std::io::Error),
    /// The helper reported a failure.
    #[error("{0}")]
    Failed(String),
    /// The helper said something unexpected or nothing in time.
    #[error("container helper: {0}")]
    Protocol(String),
}

/// The process's standard streams, as the helper (and then the process) inherits them.
#[derive(Debug)]
pub struct ProcessStdio {
    /// Standard input.
    pub stdin: OwnedFd,
    /// Standard output.
    pub stdout: OwnedFd,
    /// Standard error.
    pub stderr: OwnedFd,
}

/// A started helper.
#[derive(Debug)]
pub struct Helper {
    /// The helper's own pid (a direct child of the shim).
    pub helper_pid: i32,
    /// Status lines from the helper and then from the container process until it execs.
    pub status: StatusReader,
    /// The start pipe (init only): one byte starts the container.
    pub start: Option<File>,
}

/// Creates a close-on-exec pipe.
pub fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| LaunchError::Spawn(errno.into()))
}

/// Creates the close-on-exec status socket pair (the shim's end, the helper's end).
fn status_socket() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|errno| LaunchError::Spawn(errno.into()))
}

/// Starts `gantry-shim <mode>` with `plan` on [`CONFIG_FD`] and the given stdio; `target` (exec
/// only) is the pidfd of the container's init, inherited as [`TARGET_FD`].
pub fn spawn_helper(
    mode: &str,
    plan: &[u8],
    stdio: ProcessStdio,
    with_start: bool,
    target: Option<BorrowedFd<'_>>,
) -> Result<Helper, LaunchError> {
    let (config_read, config_write) = pipe()?;
    let (status_read, status_write) = status_socket()?;
    let (start_read, start_write) = match with_start {
        true => {
            let (read, write) = pipe()?;
            (Some(read), Some(write))
        }
        false => (None, None),
    };
    // Fixed-size: the pre_exec closure below must not allocate.
    let moves: [Option<(i32, i32)>; 4] = [
        Some((config_read.as_raw_fd(), CONFIG_FD)),
        Some((status_write.as_raw_fd(), STATUS_FD)),
        start_read.as_ref().map(|fd| (fd.as_raw_fd(), START_FD)),
        target.map(|fd| (fd.as_raw_fd(), TARGET_FD)),
    ];

    let mut command = Command::new("/proc/self/exe");
    command
        .arg(mode)
        .env_clear()
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: the closure runs between fork and exec; it allocates nothing and only calls fcntl
    // and dup2, which are async-signal-safe, on descriptors the parent keeps open until spawn
    // returns.
    unsafe {
        command.pre_exec(move || {
            // First lift every source out of the target range, so no dup2 clobbers a source that
            // happens to sit on another's target number; dup2 then clears close-on-exec.
            let mut lifted = [None; 4];
            for (slot, pair) in lifted.iter_mut().zip(moves) {
                if let Some((source, target)) = pair {
                    let high = libc::fcntl(source, libc::F_DUPFD_CLOEXEC, 64);
                    if high < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    *slot = Some((high, target));
                }
            }
            for (high, target) in lifted.into_iter().flatten() {
                if libc::dup2(high, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(LaunchError::Spawn)?;
    // The reaper collects the helper; the Child handle is not waited on.
    let helper_pid = child.id() as i32;
    drop(child);
    drop((config_read, status_write, start_read));
    let mut config = File::from(config_write);
    config
        .write_all(plan)
        .map_err(|err| LaunchError::Protocol(format!("sending the plan: {err}")))?;
    drop(config);
    Ok(Helper {
        helper_pid,
        status: StatusReader::new(status_read),
        start: start_write.map(File::from),
    })
}

/// Reads newline-terminated status lines, and the descriptors passed with them, with a deadline.
#[derive(Debug)]
pub struct StatusReader {
    socket: OwnedFd,
    buffer: Vec<u8>,
    /// Descriptors received (`SCM_RIGHTS`), oldest first.
    fds: VecDeque<OwnedFd>,
}

/// What the status pipe said.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// A line (without its newline).
    Line(String),
    /// The pipe closed: every writer is gone (for a process, it exec'd).
    Closed,
}

impl StatusReader {
    fn new(socket: OwnedFd) -> Self {
        Self {
            socket,
            buffer: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// Reads what is there (at least one byte, or 0 at end of stream), keeping passed fds.
    fn receive(&mut self, chunk: &mut [u8]) -> Result<usize, nix::errno::Errno> {
        let mut iov = [IoSliceMut::new(chunk)];
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let message = recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut received = Vec::new();
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                received.extend(fds);
            }
        }
        let bytes = message.bytes;
        for fd in received {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process for us; nothing
            // else refers to them.
            self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(bytes)
    }

    /// The next line, or `Closed`; an error after `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Result<Status, LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Ok(Status::Line(
                    String::from_utf8_lossy(&line[..end]).into_owned(),
                ));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LaunchError::Protocol(format!(
                    "no status within {timeout:?}"
                )));
            }
            let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => {}
                Err(errno) => return Err(LaunchError::Protocol(format!("poll: {errno}"))),
            }
            let mut chunk = [0u8; 512];
            match self.receive(&mut chunk) {
                Ok(0) if self.buffer.is_empty() => return Ok(Status::Closed),
                Ok(0) => {
                    let rest = String::from_utf8_lossy(&self.buffer).into_owned();
                    self.buffer.clear();
                    return Ok(Status::Line(rest));
                }
                Ok(n) => {
                    // A status line is short; a helper that floods the pipe is broken.
                    if self.buffer.len() + n > 64 * 1024 {
                        return Err(LaunchError::Protocol("status line too long".into()));
                    }
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(err) => return Err(LaunchError::Protocol(format!("reading status: {err}"))),
            }
        }
    }

    /// Reads `pid N` and the pidfd the helper passed with it.
    pub fn expect_pid(&mut self, timeout: Duration) -> Result<(i32, PidFd), LaunchError> {
        let pid = match self.next(timeout)? {
            Status::Line(line) => parse_line(&line)?
                .strip_prefix("pid ")
                .and_then(|pid| pid.parse().ok())
                .ok_or_else(|| LaunchError::Protocol(format!("expected a pid, got {line:?}")))?,
            Status::Closed => {
                return Err(LaunchError::Protocol(
                    "the helper exited without a pid".into(),
                ));
            }
        };
        let pidfd = self.fds.pop_front().ok_or_else(|| {
            LaunchError::Protocol(format!("the helper sent pid {pid} without its pidfd"))
        })?;
        Ok((pid, PidFd::from_owned(pidfd)))
    }

    /// Reads `ready`.
    pub fn expect_ready(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        match self.next(timeout)? {
            Status::Line(line) if parse_line(&line)? == "ready" => Ok(()),
            Status::Line(line) => Err(LaunchError::Protocol(format!(
                "expected ready, got {line:?}"
            ))),
            Status::Closed => Err(LaunchError::Protocol(
                "the container's init exited before it was ready".into(),
            )),
        }
    }

    /// Waits for the exec: the pipe closes on success, an error line says why not.
    pub fn expect_exec(&mut self, timeout: Duration) -> Result<(), LaunchError> {
        match self.next(timeout)? {
            Status::Closed => Ok(()),
            Status::Line(line) => {
                parse_line(&line)?;
                Err(LaunchError::Protocol(format!("unexpected status {line:?}")))
            }
        }
    }
}

/// Turns `error …` into an error; passes anything else through.
fn parse_line(line: &str) -> Result<&str, LaunchError> {
    match line.strip_prefix("error ") {
        Some(message) => Err(LaunchError::Failed(message.to_owned())),
        None => Ok(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader whose peer sent `pid_line` with a pidfd of a child, then `rest`.
    fn reader_with(pid_line: &[u8], rest: &[u8]) -> (StatusReader, std::process::Child) {
        let (read, write) = status_socket().unwrap();
        let child = std::process::Command::new("/bin/sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id() as i32).unwrap();
        let fds = [pidfd.as_fd().as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            write.as_raw_fd(),
            &[std::io::IoSlice::new(pid_line)],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut write = File::from(write);
        write.write_all(rest).unwrap();
        drop(write);
        (StatusReader::new(read), child)
    }

    fn reap(mut child: std::process::Child) {
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn status_lines_parse() {
        let (mut reader, child) = reader_with(b"pid 42\n", b"ready\n");
        let (pid, pidfd) = reader.expect_pid(Duration::from_secs(1)).unwrap();
        assert_eq!(pid, 42);
        assert!(
            pidfd.is_alive(),
            "the passed descriptor is the child's pidfd"
        );
        reap(child);
        reader.expect_ready(Duration::from_secs(1)).unwrap();
        reader.expect_exec(Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn error_lines_become_failures() {
        let (mut reader, child) = reader_with(b"pid 7\n", b"error exec nope: ENOENT\n");
        assert_eq!(reader.expect_pid(Duration::from_secs(1)).unwrap().0, 7);
        reap(child);
        match reader.expect_exec(Duration::from_secs(1)) {
            Err(LaunchError::Failed(message)) => assert_eq!(message, "exec nope: ENOENT"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pid_without_its_pidfd_is_refused() {
        let (read, write) = status_socket().unwrap();
        File::from(write).write_all(b"pid 9\n").unwrap();
        let mut reader = StatusReader::new(read);
        assert!(matches!(
            reader.expect_pid(Duration::from_secs(1)),
            Err(LaunchError::Protocol(_))
        ));
    }

    #[test]
    fn silence_times_out() {
        let (read, _write) = status_socket().unwrap();
        let mut reader = StatusReader::new(read);
        assert!(matches!(
            reader.next(Duration::from_millis(50)),
            Err(LaunchError::Protocol(_))
        ));
    }
}
