//! The keeper's control protocol: one JSON request line per connection, one JSON reply line,
//! with the stream's file descriptor attached (`SCM_RIGHTS`) to a successful `Connect`.
//!
//! JSON, not bincode: the keeper outlives agent upgrades, so an old keeper meets a newer agent;
//! named fields let either side ignore what it does not know, and an operator can read a reply
//! with `socat`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// Longest request or reply line.
pub const MAX_LINE: usize = 64 * 1024;

/// What the agent asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Open a stream to `port` in the guest; the reply carries its descriptor.
    Connect {
        /// The guest port.
        port: u32,
    },
    /// Describe the keeper.
    Status,
    /// Stop QEMU (if any) and exit.
    Stop,
}

/// What the keeper answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The stream is attached.
    Connected,
    /// The keeper's state.
    Status(KeeperStatus),
    /// The keeper is stopping.
    Stopping,
    /// The request failed.
    Error {
        /// Why, for a person.
        message: String,
        /// Whether the device is not ready yet (no frontend, or the guest driver is down):
        /// the agent retries quietly, as while the guest boots.
        not_ready: bool,
    },
}

/// A keeper's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperStatus {
    /// The keeper's pid.
    pub pid: u32,
    /// Its software version.
    pub version: String,
    /// The configuration it runs, as JSON (compared whole by an adopting agent).
    pub config: super::KeeperConfig,
    /// Its QEMU's pid, if it launched one.
    pub qemu_pid: Option<u32>,
    /// How its QEMU ended, once it has.
    pub qemu_exit: Option<String>,
    /// When QEMU was started (Unix milliseconds).
    pub qemu_started_unix_ms: Option<u64>,
    /// The vsock device's counters (absent from a keeper that predates them).
    #[serde(default)]
    pub vsock: Option<crate::metrics::VsockTotals>,
}

impl KeeperStatus {
    /// Whether this keeper runs `config` with its QEMU alive: what an agent adopts.
    pub fn runs(&self, config: &super::KeeperConfig) -> bool {
        self.config == *config && self.qemu_exit.is_none()
    }
}

/// Writes `message` as one line, with `fd` attached if given.
pub fn send<T: Serialize>(
    stream: &UnixStream,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    let raw: [RawFd; 1] = [fd.map_or(-1, |fd| fd.as_raw_fd())];
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if fd.is_some() { &rights } else { &[] };
    let mut sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(&line)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    while sent < line.len() {
        sent += sendmsg::<()>(
            stream.as_raw_fd(),
            &[io::IoSlice::new(&line[sent..])],
            &[],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    Ok(())
}

/// Reads one line (at most [`MAX_LINE`] bytes) and any descriptor sent with it.
pub fn receive<T: for<'de> Deserialize<'de>>(
    stream: &UnixStream,
) -> io::Result<(T, Option<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fd = None;
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        if line.len() > MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for control in message.cmsgs().map_err(io::Error::other)? {
            if let ControlMessageOwned::ScmRights(fds) = control {
                for raw in fds {
                    // SAFETY: the kernel just installed `raw` in this process for us (SCM_RIGHTS);
                    // nothing else owns it.
                    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    // A second descriptor is closed here, not leaked: only one is expected.
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
        let read = message.bytes;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a whole line",
            ));
        }
        line.extend_from_slice(&buf[..read]);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    let value = serde_json::from_slice(&line[..end])
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))?;
    Ok((value, fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_reply_carries_a_working_descriptor() {
        let (agent, keeper) = UnixStream::pair().unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        send(&agent, &Request::Connect { port: 1024 }, None).unwrap();
        let (request, fd): (Request, _) = receive(&keeper).unwrap();
        assert_eq!(request, Request::Connect { port: 1024 });
        assert!(fd.is_none());

        use std::os::fd::AsFd;
        send(&keeper, &Reply::Connected, Some(theirs.as_fd())).unwrap();
        drop(theirs);
        let (reply, fd): (Reply, _) = receive(&agent).unwrap();
        assert_eq!(reply, Reply::Connected);
        let mut received = UnixStream::from(fd.expect("a descriptor"));
        received.write_all(b"through").unwrap();
        let mut got = [0u8; 7];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"through");
    }

    #[test]
    fn garbage_and_overlong_lines_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{not json}\n").unwrap();
        assert!(receive::<Request>(&b).is_err());
        let writer = std::thread::spawn(move || {
            let _ = (&a).write_all(&vec![b'x'; MAX_LINE + 8192]);
        });
        let err = receive::<Request>(&b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(b);
        writer.join().unwrap();
    }
}
