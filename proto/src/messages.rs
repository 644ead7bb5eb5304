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

impl Message {
    /// The message's kind, for logs and `Goodbye` reasons (never its untrusted content).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Request(_) => "Request",
            Message::Response(_) => "Response",
            Message::Event(_) => "Event",
            Message::Goodbye { .. } => "Goodbye",
        }
    }
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
    /// Mount the layers, build the root file system and the container's namespaces and cgroup,
    /// and prepare (but do not run) its process. Answered with `Reply::Done`.
    CreateContainer(ContainerSpec),
    /// Run a created container's process. Answered with `Reply::Done`.
    StartContainer {
        /// The container.
        container_id: ContainerId,
    },
    /// Run another process inside a running container's namespaces and cgroup.
    Exec {
        /// The container.
        container_id: ContainerId,
        /// A name for the process, unique within the container.
        exec_id: ExecId,
        /// What to run.
        process: ProcessSpec,
    },
    /// Send a signal to a container's main process or to one of its execs.
    Signal {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
        /// The signal number.
        signal: i32,
    },
    /// Wait until a process has exited; answered with `Reply::Exited`.
    Wait {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
    },
    /// Remove a stopped container: its mounts, loop devices and cgroup.
    DeleteContainer {
        /// The container.
        container_id: ContainerId,
    },
    /// List the containers; answered with `Reply::Containers`.
    ListContainers,
    /// Resource usage from the container's cgroup; answered with `Reply::Stats`.
    Stats {
        /// The container.
        container_id: ContainerId,
    },
    /// Write to a process's standard input.
    WriteStdin {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Close a process's standard input.
    CloseStdin {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
    },
    /// The agent consumed `bytes` of a process's output: the shim may send that much more.
    OutputCredit {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
        /// Bytes consumed since the last credit.
        bytes: u32,
    },
    /// Report what the guest holds for containers: layer mounts, loop devices, overlays,
    /// cgroups. Answered with `Reply::GuestResources`.
    GuestResources,
    /// Run a command directly in the shim's namespaces: no container, no mounts. The floor that
    /// container start latency is measured against. Answered with `Reply::Baseline`.
    SpawnBaseline {
        /// `argv`, with a path or a name found in the shim's `PATH`.
        args: Vec<String>,
    },
    /// Make this connection the one events (output, exits, OOM) go to, with fresh output
    /// windows. Added in protocol 1.1: a 1.0 agent's connections subscribe on connect, so a
    /// short-lived connection of a 1.1 agent (a probe) never takes the events. `Reply::Done`.
    SubscribeEvents,
    /// `CreateContainer` whose main process runs on a pseudo-terminal of `size`: the terminal is
    /// its controlling terminal and its stdin, stdout and stderr; its output comes as `Stdout`.
    /// Added in protocol 1.2 (a new variant rather than a field of `ProcessSpec`, whose encoding
    /// a 1.1 shim must keep reading). `Reply::Done`.
    CreateContainerTty {
        /// The container, as for `CreateContainer`.
        spec: ContainerSpec,
        /// The terminal's initial size.
        size: TtySize,
    },
    /// `Exec` on a pseudo-terminal of `size`, as `CreateContainerTty`. Added in protocol 1.2.
    ExecTty {
        /// The container.
        container_id: ContainerId,
        /// A name for the process, unique within the container.
        exec_id: ExecId,
        /// What to run.
        process: ProcessSpec,
        /// The terminal's initial size.
        size: TtySize,
    },
    /// Sets the window size of a process's terminal (the process gets `SIGWINCH`). Added in
    /// protocol 1.2. `Reply::Done`; `InvalidState` for a process without a terminal.
    ResizeTty {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
        /// The new size.
        size: TtySize,
    },
    /// `SubscribeEvents` that loses no output: the shim keeps each process's output until the
    /// agent has it (`OutputReceived`), and resends what a process wrote from `positions` on
    /// (from the oldest output it kept for a process not listed), as `Event::OutputAt`, before
    /// any newer output; then the `Exit` of each process that has ended, again. Added in
    /// protocol 1.3. `Reply::Done`.
    SubscribeEventsFrom {
        /// How far the agent holds each process's output.
        positions: Vec<OutputPosition>,
    },
    /// The agent holds a process's output up to `position` (its offset in the process's
    /// output, both streams counted in the order sent): the shim may forget it and send as much
    /// more. Replaces `OutputCredit` on a connection subscribed with `SubscribeEventsFrom`: a
    /// position said twice is no credit twice. Added in protocol 1.3. No reply is awaited by
    /// the shim's window; `Reply::Done`.
    OutputReceived {
        /// The container.
        container_id: ContainerId,
        /// `None` for the main process.
        exec_id: Option<ExecId>,
        /// Bytes of the process's output the agent holds, from its start.
        position: u64,
    },
}

/// How far the agent holds one process's output (see `Op::SubscribeEventsFrom`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct OutputPosition {
    /// The container.
    pub container_id: ContainerId,
    /// `None` for the main process.
    pub exec_id: Option<ExecId>,
    /// Bytes of the process's output (both streams) the agent holds, from its start.
    pub position: u64,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TtySize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl Default for TtySize {
    /// 24 × 80, the terminal size when the client's is unknown.
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

impl Op {
    /// The protocol version that introduced this operation: send it only to a peer whose
    /// `Hello` announced at least that (an older one cannot even decode it).
    pub fn required_version(&self) -> crate::ProtocolVersion {
        match self {
            Op::SubscribeEvents => crate::EVENTS_BY_SUBSCRIPTION,
            Op::CreateContainerTty { .. } | Op::ExecTty { .. } | Op::ResizeTty { .. } => {
                crate::TTY_OPERATIONS
            }
            Op::SubscribeEventsFrom { .. } | Op::OutputReceived { .. } => crate::RESUMABLE_OUTPUT,
            _ => ProtocolVersion { major: 1, minor: 0 },
        }
    }
}

/// What the guest holds for containers, for operators and leak checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GuestResources {
    /// Mounted layers.
    pub layer_mounts: Vec<LayerMountInfo>,
    /// Loop devices with a backing file (`/dev/loopN`).
    pub loop_devices: Vec<String>,
    /// Overlay mounts (container roots) in the shim's namespace.
    pub overlay_mounts: u32,
    /// Container cgroups under the shim's cgroup.
    pub container_cgroups: Vec<String>,
}

/// At most this many layers no container uses stay mounted in a guest for the next start (the
/// shim unmounts the least recently released beyond it); they are reported with 0 users.
pub const IDLE_LAYER_MOUNTS_KEPT: usize = 16;

/// One mounted layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LayerMountInfo {
    /// The layer's digest.
    pub digest: String,
    /// Its extent's offset on the layer-store disk.
    pub offset: u64,
    /// Containers using the mount; 0 for a layer kept mounted for the next start.
    pub users: u32,
}

/// Everything the shim needs to create a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ContainerSpec {
    /// Its name, unique within the VM.
    pub container_id: ContainerId,
    /// The image's layers, lowest first, as extents of the layer-store disk.
    pub layers: Vec<LayerExtent>,
    /// The main process.
    pub process: ProcessSpec,
    /// The container's host name.
    pub hostname: String,
    /// Limits for its cgroup.
    pub resources: Resources,
    /// The size of the writable layer (a tmpfs), in bytes.
    pub writable_layer_bytes: u64,
}

/// Where a layer's EROFS image lies on the layer-store disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct LayerExtent {
    /// The layer's identity (the digest of its EROFS image); layers with one digest share a mount.
    pub digest: String,
    /// Byte offset on the disk (a multiple of 512).
    pub offset: u64,
    /// Length in bytes (a multiple of 512).
    pub length: u64,
}

/// A process to run, resolved from the image config and the request's overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProcessSpec {
    /// `argv`; `args[0]` is looked up in `PATH` from `env` if it has no slash.
    pub args: Vec<String>,
    /// `KEY=VALUE` pairs.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The image's `User` form: `name`, `uid`, `name:group`, `uid:gid`; empty for root. Names are
    /// resolved in the container's `/etc/passwd` and `/etc/group`.
    pub user: String,
    /// Whether the agent will write to standard input (else it reads `/dev/null`).
    pub stdin: bool,
}

/// cgroup v2 limits; `None` leaves the controller unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Resources {
    /// `memory.max`, bytes.
    pub memory_max_bytes: Option<u64>,
    /// `cpu.max` quota in microseconds per `cpu_period_us`.
    pub cpu_quota_us: Option<u64>,
    /// `cpu.max` period in microseconds (100000 when only a quota is given).
    pub cpu_period_us: Option<u64>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// The life stage of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ContainerState {
    /// Created, its process not started.
    Created,
    /// Its main process runs.
    Running,
    /// Its main process has exited.
    Stopped,
}

/// One line of `ListContainers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ContainerSummary {
    /// The container.
    pub container_id: ContainerId,
    /// Its state.
    pub state: ContainerState,
    /// The main process's pid in the guest, while it runs.
    pub pid: Option<u32>,
    /// How the main process ended, once it has.
    pub exit: Option<ExitStatus>,
    /// The layers it mounts, by digest.
    pub layers: Vec<String>,
}

/// Resource usage read from a container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ContainerStats {
    /// `memory.current`.
    pub memory_current_bytes: u64,
    /// `memory.max`, `None` when unlimited.
    pub memory_max_bytes: Option<u64>,
    /// `memory.peak`, where the kernel has it.
    pub memory_peak_bytes: Option<u64>,
    /// `usage_usec` from `cpu.stat`.
    pub cpu_usage_us: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `oom_kill` from `memory.events`.
    pub oom_kills: u64,
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
    /// For operations that return nothing but success.
    Done,
    /// For `Op::Wait`.
    Exited(ExitStatus),
    /// For `Op::ListContainers`.
    Containers(Vec<ContainerSummary>),
    /// For `Op::Stats`.
    Stats(ContainerStats),
    /// For `Op::GuestResources`.
    GuestResources(GuestResources),
    /// For `Op::SpawnBaseline`.
    Baseline {
        /// Standard output, at most 64 KiB.
        output: Vec<u8>,
        /// How it ended.
        exit: ExitStatus,
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
    /// The object is in the wrong state for this operation (e.g. deleting a running container).
    InvalidState,
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
    /// `Output` with its place in the process's output: sent instead of `Output` on a
    /// connection subscribed with `SubscribeEventsFrom` (protocol 1.3), so that the agent can
    /// tell a resent chunk from a new one.
    OutputAt {
        /// The container.
        container_id: ContainerId,
        /// `None` for the container's main process.
        exec_id: Option<ExecId>,
        /// Which stream.
        stream: OutputStream,
        /// The offset of `data`'s first byte in the process's output, both streams counted.
        offset: u64,
        /// The bytes, at most the negotiated chunk size.
        data: Vec<u8>,
    },
}
