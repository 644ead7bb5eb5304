//! Pseudo-terminals for processes that asked for one (`Op::CreateContainerTty`, `Op::ExecTty`).
//!
//! The shim opens the pair in its own devpts (race-free: both ends are close-on-exec from the
//! start, so no helper spawned meanwhile by another request inherits them). The slave becomes the
//! process's stdin, stdout and stderr and, in the helper just before `execve`, its controlling
//! terminal ([`make_controlling_terminal`]). The shim keeps the master: reads are the process's
//! output (one stream: a terminal merges stdout and stderr), writes its input, and
//! `TIOCSWINSZ` on it resizes the window (the kernel sends the foreground group `SIGWINCH`).

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use gantry_proto::TtySize;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};

/// Errors setting up or driving a terminal.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    /// A step of opening the pair failed.
    #[error("opening a pseudo-terminal: {what}: {errno}")]
    Open {
        /// The step.
        what: &'static str,
        /// Why.
        errno: nix::errno::Errno,
    },
    /// `TIOCSWINSZ` failed.
    #[error("setting the terminal size: {0}")]
    Resize(io::Error),
}

/// Both ends of a new pseudo-terminal.
#[derive(Debug)]
pub struct TtyPair {
    /// The shim's end: non-blocking, close-on-exec.
    pub master: OwnedFd,
    /// The process's end: close-on-exec (the helper's stdio gets a fresh, inheritable copy).
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size`.
pub fn open(size: TtySize) -> Result<TtyPair, TtyError> {
    let step = |what| move |errno| TtyError::Open { what, errno };
    let master = nix::pty::posix_openpt(
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
    )
    .map_err(step("posix_openpt"))?;
    nix::pty::grantpt(&master).map_err(step("grantpt"))?;
    nix::pty::unlockpt(&master).map_err(step("unlockpt"))?;
    let name = nix::pty::ptsname_r(&master).map_err(step("ptsname"))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(step("opening the slave"))?;
    // SAFETY: `open` just returned this descriptor; nothing else owns it.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // SAFETY: `into_raw_fd` hands over the descriptor the PtyMaster owned.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    set_size(master.as_fd(), size)?;
    Ok(TtyPair { master, slave })
}

/// Sets the window size of the terminal `fd` belongs to (either end).
pub fn set_size(fd: BorrowedFd<'_>, size: TtySize) -> Result<(), TtyError> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
        return Err(TtyError::Resize(io::Error::last_os_error()));
    }
    Ok(())
}

/// The window size of the terminal `fd` belongs to (for tests and diagnostics).
#[cfg(test)]
pub fn size(fd: BorrowedFd<'_>) -> io::Result<TtySize> {
    // SAFETY: winsize is plain old data; zero is valid.
    let mut winsize: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the one we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut winsize) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TtySize {
        rows: winsize.ws_row,
        cols: winsize.ws_col,
    })
}

/// Makes standard input, a terminal, the controlling terminal of a new session led by this
/// process. Runs in the helper just before `execve` (and in tests in `pre_exec`): it only makes
/// two system calls.
pub fn make_controlling_terminal() -> io::Result<()> {
    // SAFETY: setsid takes no arguments; it fails (EPERM) only for a process group leader.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCSCTTY on fd 0 with argument 0 (do not steal another session's terminal).
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes all of `data` to `out`, waiting whenever it would block: a terminal's master is
/// non-blocking (for the output pump, which shares it), a pipe is not.
pub fn write_all_waiting(mut out: &std::fs::File, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match out.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLOUT)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(errno) => return Err(errno.into()),
                }
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// A terminal master as an async reader. Once every slave descriptor is closed (the process and
/// whatever it left behind are gone) Linux reads `EIO`: that is the end of the output.
#[derive(Debug)]
pub struct MasterReader {
    fd: AsyncFd<OwnedFd>,
}

impl MasterReader {
    /// Wraps a non-blocking master (registers it with the reactor).
    pub fn new(master: OwnedFd) -> io::Result<Self> {
        // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped, and
        // the AsyncFd owns it from here on.
        let fd = unsafe { AsyncFd::register_with_interest(master, tokio::io::Interest::READABLE)? };
        Ok(Self { fd })
    }
}

impl AsyncRead for MasterReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let outcome = guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            });
            match outcome {
                Ok(Ok(read)) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) if err.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// Spawns `command` and drops it: it holds copies of the slave that would keep the
    /// terminal open.
    fn spawn(mut command: Command) -> std::process::Child {
        command.spawn().unwrap()
    }

    async fn read_to_end(reader: &mut MasterReader) -> Vec<u8> {
        let mut output = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), reader.read_to_end(&mut output))
            .await
            .expect("the output ends once the slave is closed")
            .expect("reading the master");
        output
    }

    #[test]
    fn a_new_pair_has_the_size_asked_for_and_resizes() {
        let pair = open(TtySize {
            rows: 40,
            cols: 132,
        })
        .unwrap();
        assert_eq!(
            size(pair.slave.as_fd()).unwrap(),
            TtySize {
                rows: 40,
                cols: 132
            }
        );
        set_size(pair.master.as_fd(), TtySize { rows: 7, cols: 9 }).unwrap();
        assert_eq!(
            size(pair.slave.as_fd()).unwrap(),
            TtySize { rows: 7, cols: 9 }
        );
        for fd in [&pair.master, &pair.slave] {
            // SAFETY: F_GETFD on a descriptor we own.
            let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
            assert_ne!(flags & libc::FD_CLOEXEC, 0, "both ends are close-on-exec");
        }
    }

    #[tokio::test]
    async fn a_child_gets_the_terminal_as_its_controlling_terminal() {
        let pair = open(TtySize { rows: 33, cols: 77 }).unwrap();
        let slave = pair.slave;
        let mut child = Command::new("/bin/sh");
        child
            .args([
                "-c",
                "stty size; test -t 0 && test -t 2 && echo tty; : </dev/tty && echo ctty; echo err >&2",
            ])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: the closure only makes the two system calls of make_controlling_terminal.
        unsafe {
            child.pre_exec(make_controlling_terminal);
        }
        let mut child = spawn(child);
        let mut reader = MasterReader::new(pair.master).unwrap();
        let output = read_to_end(&mut reader).await;
        assert!(child.wait().unwrap().success());
        let output = String::from_utf8_lossy(&output);
        // The terminal's output processing turns \n into \r\n, stderr included.
        // /dev/tty opens only for a process with a controlling terminal.
        assert_eq!(output, "33 77\r\ntty\r\nctty\r\nerr\r\n");
    }

    #[tokio::test]
    async fn input_written_to_the_master_reaches_the_process() {
        let pair = open(TtySize { rows: 24, cols: 80 }).unwrap();
        let mut child = Command::new("/bin/sh");
        let slave = pair.slave;
        child
            .args(["-c", "stty -echo; read line; echo got:$line"])
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: as above.
        unsafe {
            child.pre_exec(make_controlling_terminal);
        }
        let mut child = spawn(child);
        let input = std::fs::File::from(pair.master.try_clone().unwrap());
        write_all_waiting(&input, b"hello\n").unwrap();
        drop(input);
        let mut reader = MasterReader::new(pair.master).unwrap();
        let output = String::from_utf8_lossy(&read_to_end(&mut reader).await).into_owned();
        assert!(child.wait().unwrap().success());
        assert!(output.ends_with("got:hello\r\n"), "{output:?}");
    }
}
