//! The messages carried in frames.
//!
//! Append-only: new variants go at the end of their enum, never in between (bincode encodes a
//! variant by its index). A peer sends an operation added in minor version N only to a peer whose
//! `Hello` announced a minor version of at least N.

use serde::{Deserialize, Serialize};

use crate::version::{PROTOCOL_VERSION, ProtocolVersion};

/// Identifies a request on one connection; the response carries the same id.
pub type RequestId = u64;
/// A container's name, unique within one VM.
pub type ContainerId = String;
/// A process started by `exec` inside a container.
pub type ExecId = String;

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Message {
    /// The first frame each way.
    Hello(Hello),
    /// Agent → shim.
    Request(Request),
    /// Shim → agent, answering the request with the same id.
    Response(Response),
    /// Shim → agent, unsolicited.
    Event(Event),
    /// Either way, just before closing the connection on purpose: why it closes.
    Goodbye {
        /// Human-readable reason, for the other side's log.
        reason: String,
    },
}

/// The opening frame: who is speaking and which protocol it speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hello {
    /// The protocol version of the sender.
    pub protocol_version: ProtocolVersion,
    /// The sender's software, e.g. `gantry-shim 0.1.0`.
    pub software_version: String,
    /// Optional features the sender supports.
    pub capabilities: Vec<String>,
}

impl Hello {
    /// A `Hello` for this build's protocol version.
    pub fn new(software_version: impl Into<String>) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            software_version: software_version.into(),
            capabilities: Vec::new(),
        }
    }
}

/// An operation the agent asks the shim to perform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Request {
    /// Chosen by the agent, unique among its outstanding requests on this connection.
    pub id: RequestId,
    /// What to do.
    pub op: Op,
}

/// Operations, grouped like the kata agent's. Append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Op {
    /// Describe the guest: kernel, CPUs, memory, shim version, uptime.
    GuestInfo,
    /// Echo the payload back; measures the round trip.
    Ping {
        /// Returned unchanged in `Reply::Pong`.
        payload: Vec<u8>,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Response {
    /// The id of the request this answers.
    pub id: RequestId,
    /// What came of it.
    pub result: Result<Reply, ErrorReply>,
}

/// Successful results, one per operation. Append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Reply {
    /// For `Op::GuestInfo`.
    GuestInfo(GuestInfo),
    /// For `Op::Ping`.
    Pong {
        /// The request's payload.
        payload: Vec<u8>,
    },
}

/// A failed operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[error("{kind:?}: {message}")]
pub struct ErrorReply {
    /// The class of failure, for programs.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

/// Classes of failure. Append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ErrorKind {
    /// The shim does not implement this operation.
    Unsupported,
    /// The request's arguments are invalid.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The named object exists already.
    AlreadyExists,
    /// The shim failed for a reason of its own.
    Internal,
}

/// Facts about the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GuestInfo {
    /// `uname -r`.
    pub kernel_release: String,
    /// Online CPUs.
    pub cpus: u32,
    /// Total memory as the kernel reports it, in bytes.
    pub memory_total_bytes: u64,
    /// The shim's version.
    pub shim_version: String,
    /// Time since the guest kernel booted, in milliseconds.
    pub uptime_ms: u64,
    /// Guest uptime at the moment the shim started listening, in milliseconds.
    pub shim_ready_uptime_ms: u64,
}

/// Which output stream of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum OutputStream {
    /// File descriptor 1.
    Stdout,
    /// File descriptor 2.
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Unsolicited notices from the shim. Append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Event {
    /// A bounded chunk of a process's output.
    Output {
        /// The container.
        container_id: ContainerId,
        /// `None` for the container's main process.
        exec_id: Option<ExecId>,
        /// Which stream.
        stream: OutputStream,
        /// The bytes, at most the negotiated chunk size.
        data: Vec<u8>,
    },
    /// A process ended.
    Exit {
        /// The container.
        container_id: ContainerId,
        /// `None` for the container's main process.
        exec_id: Option<ExecId>,
        /// How it ended.
        status: ExitStatus,
    },
    /// The container's cgroup hit its memory limit and the kernel killed a process.
    Oom {
        /// The container.
        container_id: ContainerId,
    },
}
