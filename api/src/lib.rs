//! Gantry's operator API: the request and answer types, the streamed formats, and a client.
//!
//! The agent serves it (HTTP+JSON on a unix socket); the CLI and the containerd shim use this
//! crate to talk to the agent without linking the agent. It depends on `gantry-proto` only (for
//! the states and exit statuses the shim reports). `docs/openapi.yaml` documents every route; in
//! short:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/agent` | [`AgentInfo`] |
//! | GET | `/v1/vms` | `[VmStatus]` |
//! | POST | `/v1/vms` (body [`AttachVm`]) | `VmStatus`: a VM attached at run time |
//! | GET | `/v1/vms/{vm}` | `VmStatus` |
//! | DELETE | `/v1/vms/{vm}` | `{}`: detached, its QEMU (if launched) stopped, its state removed |
//! | GET | `/v1/vms/{vm}/guest-info?wait_ms=N` | [`GuestInfoReport`] |
//! | POST | `/v1/vms/{vm}/ping?count=N&size=B` | [`PingReport`] |
//! | POST | `/v1/vms/{vm}/restart` | `{}` |
//! | GET | `/v1/vms/{vm}/resources` | `GuestResources` (layer mounts, loop devices, cgroups) |
//! | POST | `/v1/vms/{vm}/probe` | `{"goodbye": …}`: the shim's answer to a garbage frame |
//! | POST | `/v1/vms/{vm}/baseline` (body `{"args": […]}`) | `{"output", "exit"}`: a plain spawn in the shim |
//! | POST | `/v1/vms/{vm}/containers` (body `RunOptions`) | NDJSON [`RunUpdate`]s |
//! | GET | `/v1/vms/{vm}/containers` | `[ContainerView]` |
//! | GET | `/v1/vms/{vm}/containers/{id}/logs?follow=B&exec=E` | log records ([`records`]) |
//! | POST | `/v1/vms/{vm}/containers/{id}/start` | `{}`: starts a container made with `create_only` |
//! | POST | `/v1/vms/{vm}/containers/{id}/exec` (body [`ExecRequest`]) | `{"exec_id": …}` |
//! | POST | `/v1/vms/{vm}/containers/{id}/kill?signal=N&exec=E` | `{}` |
//! | GET | `/v1/vms/{vm}/containers/{id}/wait?exec=E` | `ExitRecord` |
//! | GET | `/v1/vms/{vm}/containers/{id}/stats` | `ContainerStats` |
//! | POST | `/v1/vms/{vm}/containers/{id}/stdin?exec=E&close=B` (body: bytes) | `{}` |
//! | POST | `/v1/vms/{vm}/containers/{id}/resize?exec=E&rows=R&cols=C` | `{}` (a `tty` process) |
//! | DELETE | `/v1/vms/{vm}/containers/{id}?force=B` | `{}` |
//! | GET | `/v1/images` | `[ImageStatus]` |
//!
//! Errors answer with a non-2xx status and [`ApiErrorBody`].
//!
//! - [`client`]: [`ApiClient`], requests over the unix socket.
//! - [`stream`]: cutting streamed answers into NDJSON lines and log records.
//! - [`records`]: the log record format.

pub mod client;
pub mod records;
pub mod stream;

use gantry_proto::{ExitStatus, GuestInfo, TtySize};
use serde::{Deserialize, Serialize};

pub use client::{ApiClient, ApiClientError};

/// Where clients find the agent when nothing names its socket.
pub const DEFAULT_API_SOCKET: &str = "/run/gantry/agent.sock";
/// The environment variable that names the agent's socket (the CLI's `--api-socket`, and the
/// containerd shim, which inherits containerd's environment).
pub const API_SOCKET_ENV: &str = "GANTRY_API_SOCKET";

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong and, where possible, what to do about it.
    pub error: String,
    /// The kind of error, stable across versions (programs branch on this, people read `error`).
    #[serde(default)]
    pub code: ErrorCode,
}

/// The stable kinds of API errors (`code` in every error answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something invalid (400).
    InvalidArgument,
    /// The caller may not do this (403).
    Forbidden,
    /// No such VM, container, exec, route (404).
    NotFound,
    /// The method is not served on this route (405).
    MethodNotAllowed,
    /// The name is taken, or the object is in the wrong state (409).
    Conflict,
    /// The body is larger than the API accepts (413).
    PayloadTooLarge,
    /// The body is not JSON where JSON is needed (415).
    UnsupportedMediaType,
    /// The guest answered wrongly or a source failed (502).
    BadGateway,
    /// The guest is not reachable now (503).
    Unavailable,
    /// The agent failed (500); also what an unknown code reads as.
    #[default]
    Internal,
}

impl ErrorCode {
    /// The code an HTTP status stands for.
    pub fn for_status(status: u16) -> ErrorCode {
        match status {
            400 | 422 => ErrorCode::InvalidArgument,
            401 | 403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            415 => ErrorCode::UnsupportedMediaType,
            502 | 504 => ErrorCode::BadGateway,
            503 => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// `GET /v1/vms/{vm}/guest-info`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestInfoReport {
    /// The VM.
    pub vm: String,
    /// What the shim said.
    pub guest: GuestInfo,
    /// The request's round trip through the vsock device, in microseconds.
    pub round_trip_us: u64,
}

/// `POST /v1/vms/{vm}/ping`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PingReport {
    /// The VM.
    pub vm: String,
    /// Each ping's round trip, in microseconds, in order.
    pub round_trips_us: Vec<u64>,
}

/// One line of the `run` answer stream: progress lines, then the id or an error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunUpdate {
    /// A step of the run (pulling, converting, mapping, creating).
    Progress(String),
    /// The container runs under this name.
    Started(String),
    /// With [`RunOptions::create_only`]: the container is made under this name, its process
    /// not started (`POST …/start` starts it).
    Created(String),
    /// It failed; nothing was left behind.
    Failed(String),
    /// A layer's download, for a live display (plain output shows the `Progress` lines). The
    /// agent coalesces these: a client that reads slowly gets the latest count, never a backlog.
    Layer(LayerProgress),
}

/// How far one layer's download is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerProgress {
    /// Position in the image's manifest.
    pub index: usize,
    /// Bytes received.
    pub received: u64,
    /// The layer blob's size.
    pub size: u64,
}

/// `POST /v1/vms/{vm}/containers/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Its name; generated when absent.
    pub exec_id: Option<String>,
    /// The command.
    pub command: Vec<String>,
    /// Added to the container's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    pub workdir: Option<String>,
    /// User (default: the container's).
    pub user: Option<String>,
    /// Whether the operator will write to standard input (`POST …/stdin?exec=E`).
    #[serde(default)]
    pub stdin: bool,
    /// Run the process on a pseudo-terminal (stdout and stderr merged; resize with
    /// `POST …/resize?exec=E`). Needs a guest shim of protocol 1.2 or later.
    #[serde(default)]
    pub tty: bool,
    /// The terminal's initial size (default 24 × 80); only with `tty`.
    #[serde(default)]
    pub tty_size: Option<TtySize>,
}

/// A container's state as the operator sees it: the guest's states, and `Lost` for a container
/// the guest no longer knows (it restarted or crashed after creating it). A lost container keeps
/// its name and logs until `rm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    /// Created, not started.
    Created,
    /// Its main process runs.
    Running,
    /// Its main process has exited.
    Stopped,
    /// The guest no longer has it.
    Lost,
}

impl From<gantry_proto::ContainerState> for ContainerState {
    fn from(state: gantry_proto::ContainerState) -> Self {
        match state {
            gantry_proto::ContainerState::Created => ContainerState::Created,
            gantry_proto::ContainerState::Running => ContainerState::Running,
            gantry_proto::ContainerState::Stopped => ContainerState::Stopped,
        }
    }
}

/// One container as `ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerView {
    /// Its name.
    pub id: String,
    /// Its image (unknown for containers an earlier agent created).
    pub image: Option<String>,
    /// Its state.
    pub state: ContainerState,
    /// For a lost container: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// Its main process in the guest, while it runs.
    pub pid: Option<u32>,
    /// How it ended.
    pub exit: Option<ExitStatus>,
    /// Whether the kernel OOM-killed one of its processes.
    pub oom_killed: bool,
    /// Its layers, by digest.
    pub layers: Vec<String>,
    /// When it was created (Unix seconds), if this agent created it.
    pub created_unix: Option<u64>,
}

/// What the operator sees of a VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmStatus {
    /// Its name.
    pub name: String,
    /// Its vsock CID.
    pub guest_cid: u64,
    /// Whether a shim session is up now.
    pub connected: bool,
    /// Sessions established since the agent started (reconnects make it grow).
    pub sessions: u64,
    /// The shim's software version, while connected.
    pub shim_version: Option<String>,
    /// Whether the agent launched (and owns) its QEMU.
    pub launched: bool,
    /// For a launched VM: from QEMU's start to the shim's `Hello`, for the latest boot.
    pub boot_to_ready_ms: Option<u64>,
    /// Time to open the vsock connection and exchange `Hello`s, for the latest session.
    pub session_setup_us: Option<u64>,
    /// Why the latest connection attempt or session failed, if it did.
    pub last_error: Option<String>,
    /// The layers mapped into its layer store (their EROFS images' digests, by offset): only
    /// layers of images this VM asked for.
    #[serde(default)]
    pub mapped_layers: Vec<String>,
    /// The vhost-user socket of its vsock device (the VMM connects to it).
    #[serde(default)]
    pub vsock_socket: String,
    /// The vhost-user socket of its layer store.
    #[serde(default)]
    pub layer_socket: String,
    /// Attached through `POST /v1/vms` (so `DELETE` detaches it), not named in `agent.toml`.
    #[serde(default)]
    pub attached_at_run_time: bool,
}

/// A VM to attach at run time (`POST /v1/vms`): the agent becomes its devices and, with
/// `launch`, starts its QEMU from `agent.toml`'s `[vm_template]`. The agent keeps serving it
/// across its own restarts until `DELETE /v1/vms/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVm {
    /// Its name (a directory name under the agent's state: letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The guest's vsock context id (3 or more), unique on the card; 0 or absent: the agent
    /// picks the lowest free one (the answer's `guest_cid` says which).
    #[serde(default)]
    pub guest_cid: u64,
    /// Start QEMU from the config's `[vm_template]`; otherwise the operator's VMM connects to
    /// the sockets.
    #[serde(default)]
    pub launch: bool,
    /// Where the vsock device listens (absolute); default: in the VM's state directory.
    #[serde(default)]
    pub vsock_socket: Option<String>,
    /// Where the layer store listens (absolute); default: in the VM's state directory.
    #[serde(default)]
    pub layer_socket: Option<String>,
    /// Request queues of the layer store; default as for configured VMs.
    #[serde(default)]
    pub layer_queues: Option<u16>,
    /// Guest memory in MiB instead of the template's (with `launch`).
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Guest CPUs instead of the template's (with `launch`).
    #[serde(default)]
    pub cpus: Option<u32>,
}

/// What the operator asked `run` for. Unknown fields are refused: a typo like `"comand"` must
/// not start the image's default command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    /// The image: `default`, an OCI layout `oci:DIR[:NAME]`, or a registry reference.
    pub image: String,
    /// The container's name; generated when absent.
    pub name: Option<String>,
    /// Replaces the image's `Cmd`.
    #[serde(default)]
    pub command: Vec<String>,
    /// Replaces the image's `Entrypoint` (and then its `Cmd` is ignored, as in Docker).
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` added to (or replacing in) the image's `Env`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Replaces the image's `WorkingDir`.
    pub workdir: Option<String>,
    /// Replaces the image's `User`.
    pub user: Option<String>,
    /// Host name (default: the container's name).
    pub hostname: Option<String>,
    /// `memory.max` in bytes.
    pub memory_bytes: Option<u64>,
    /// CPUs as a fraction (`cpu.max`).
    pub cpus: Option<f64>,
    /// `pids.max`.
    pub pids_limit: Option<u64>,
    /// Size of the writable layer in bytes.
    pub writable_layer_bytes: Option<u64>,
    /// Whether the operator will write to standard input.
    #[serde(default)]
    pub stdin: bool,
    /// Run the main process on a pseudo-terminal (stdout and stderr merged; resize with
    /// `POST …/resize`). Needs a guest shim of protocol 1.2 or later.
    #[serde(default)]
    pub tty: bool,
    /// The terminal's initial size (default 24 × 80); only with `tty`.
    #[serde(default)]
    pub tty_size: Option<TtySize>,
    /// How layers in the lazy format are brought in (default: the agent's `lazy.mode`).
    #[serde(default)]
    pub pull_mode: Option<PullMode>,
    /// Make the container but do not start its process: the stream ends with
    /// [`RunUpdate::Created`], and `POST …/start` starts it (runtimes such as containerd
    /// create and start in two steps, with the output plumbing set up between them).
    #[serde(default)]
    pub create_only: bool,
}

/// `GET /v1/agent`: what a client needs to know of the agent before it asks for VMs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's software version.
    pub version: String,
    /// Whether `agent.toml` has a `[vm_template]`, so that `POST /v1/vms` with `launch` can
    /// boot VMs.
    pub vm_template: bool,
    /// The VMs served now, by name.
    pub vms: Vec<String>,
}

/// How the layers of an image in the lazy format (`application/vnd.erofs+zstd`) are brought
/// into the cache. Layers in tar formats are always downloaded whole before the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullMode {
    /// Only the chunks the guest reads (and their read-ahead) are fetched.
    Lazy,
    /// Start as `lazy`, then fetch the rest of each layer in the background.
    #[default]
    Fill,
    /// Every chunk is fetched before the container starts.
    Eager,
}

impl PullMode {
    /// The mode's name as the CLI and the config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            PullMode::Lazy => "lazy",
            PullMode::Fill => "fill",
            PullMode::Eager => "eager",
        }
    }
}

impl std::str::FromStr for PullMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lazy" => Ok(PullMode::Lazy),
            "fill" => Ok(PullMode::Fill),
            "eager" => Ok(PullMode::Eager),
            other => Err(format!("unknown pull mode {other:?} (lazy, fill or eager)")),
        }
    }
}

/// What `GET /v1/lazy` reports: the lazy fetcher's counters since the agent started, and the
/// lazy layers open now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LazyStats {
    /// Chunks stored after a guest asked for them (coalesced neighbours included).
    pub foreground_chunks: u64,
    /// Chunks stored by read-ahead, trace prefetch and background fill.
    pub background_chunks: u64,
    /// Blob bytes received.
    pub bytes: u64,
    /// Range requests sent.
    pub requests: u64,
    /// Responses discarded because a chunk failed verification.
    pub verification_failures: u64,
    /// Fetches that gave up.
    pub failed_fetches: u64,
    /// How long guests' reads waited for their chunk: bucket upper bounds in milliseconds
    /// (the last bucket has none) and counts.
    pub park_time_ms_buckets: Vec<(Option<u64>, u64)>,
    /// Per origin (registry repository, file, peer): chunks and bytes it delivered.
    pub origins: Vec<OriginStats>,
    /// The lazy layers open now.
    pub layers: Vec<LazyLayerStats>,
    /// The peer agents this agent asks, and what it served them.
    #[serde(default)]
    pub peers: PeerStats,
}

/// The peer cache, as `GET /v1/lazy` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    /// The peers asked for chunks, with their health.
    pub peers: Vec<PeerHealth>,
    /// Requests this agent's peer endpoint answered with bytes.
    pub served_requests: u64,
    /// Bytes it sent.
    pub served_bytes: u64,
    /// Requests it answered 404 (not held durably here).
    pub not_held: u64,
    /// Requests it refused 401 (no or a wrong token).
    pub unauthorized: u64,
}

/// One peer agent, as this agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHealth {
    /// Its base URL.
    pub url: String,
    /// Whether it is asked now (not on backoff).
    pub live: bool,
    /// Range requests sent to it.
    pub requests: u64,
    /// Of those, answered 404 (it did not hold the bytes).
    pub not_held: u64,
    /// Requests that failed (connect, timeout, stall, error status).
    pub failures: u64,
    /// Responses whose bytes failed verification.
    pub bad_bytes: u64,
}

/// Chunks one origin delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginStats {
    /// The origin's name.
    pub origin: String,
    /// Chunks it delivered that were stored.
    pub chunks: u64,
    /// Blob bytes it sent.
    pub bytes: u64,
    /// Responses from it that failed verification.
    pub verification_failures: u64,
}

/// One open lazy layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayerStats {
    /// The layer blob's digest.
    pub digest: String,
    /// Chunks in the layer.
    pub chunks: u64,
    /// Chunks present.
    pub present_chunks: u64,
    /// Blob bytes fetched for it by this agent.
    pub fetched_bytes: u64,
    /// The blob's size up to its chunk index (what a full fetch costs).
    pub blob_bytes: u64,
}

/// How much of a cluster manifest's image is brought in ahead of its first `run` (ordered:
/// each level includes the ones before it).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchLevel {
    /// The manifest, config and chunk indexes.
    Metadata,
    /// That, and the chunks of the image's startup trace (cached, or beside the image).
    #[default]
    Trace,
    /// Every chunk of every layer.
    All,
}

impl PrefetchLevel {
    /// The level's name as manifests spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefetchLevel::Metadata => "metadata",
            PrefetchLevel::Trace => "trace",
            PrefetchLevel::All => "all",
        }
    }
}

/// Where a cluster manifest's image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchState {
    /// Waiting for its turn.
    Queued,
    /// Being resolved or fetched.
    Fetching,
    /// Brought in as far as its level says.
    Complete,
    /// Its metadata is in, its data is not: it would not fit the manifest's disk budget
    /// (`error` says how much it needs).
    Partial,
    /// Failed; `error` says why (retried on the next apply).
    Failed,
}

impl PrefetchState {
    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefetchState::Queued => "queued",
            PrefetchState::Fetching => "fetching",
            PrefetchState::Complete => "complete",
            PrefetchState::Partial => "partial",
            PrefetchState::Failed => "failed",
        }
    }
}

/// `GET /v1/manifest`: the cluster manifest in force and how far its images are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStatus {
    /// How many manifests were applied (0: none yet).
    pub generation: u64,
    /// When the one in force was applied (Unix milliseconds).
    pub applied_unix_ms: u64,
    /// Sections of the manifest this agent validates but does not act on yet.
    pub not_applied: Vec<String>,
    /// Its images, highest priority first.
    pub images: Vec<ManifestImageStatus>,
}

/// One image of [`ManifestStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestImageStatus {
    /// The reference as the manifest names it.
    pub reference: String,
    /// The platform asked for.
    pub platform: Option<String>,
    /// Its priority.
    pub priority: i64,
    /// Whether its layers are pinned.
    pub pin: bool,
    /// How much of it is brought in.
    pub prefetch: PrefetchLevel,
    /// The reference by digest it was resolved to (once, when the entry appeared).
    pub resolved: Option<String>,
    /// Where it is.
    pub state: PrefetchState,
    /// The last error.
    pub error: Option<String>,
    /// When its prefetch started (Unix milliseconds).
    pub started_unix_ms: Option<u64>,
    /// When it completed (Unix milliseconds).
    pub completed_unix_ms: Option<u64>,
    /// While its data is fetched: milliseconds until it is in, at the rate so far.
    pub eta_ms: Option<u64>,
    /// Its layers.
    pub layers: Vec<ManifestLayerStatus>,
}

/// One layer of a [`ManifestImageStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLayerStatus {
    /// The layer blob.
    pub digest: String,
    /// Chunks present.
    pub present_chunks: u64,
    /// Chunks in all.
    pub chunks: u64,
}

/// `POST /v1/images/prefetch`: bring an image into the cache without running it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// The image, as `run` takes it.
    pub image: String,
    /// How its lazy-format layers come in (default: the agent's `lazy.mode`). `lazy` fetches
    /// only their chunk indexes, `fill` starts the background fill, `eager` answers once
    /// every chunk is present.
    #[serde(default)]
    pub pull_mode: Option<PullMode>,
}

/// What a prefetch did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchReport {
    /// The image's name in the cache.
    pub image: String,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// Layers of the image.
    pub layers: usize,
    /// Of which in the lazy format.
    pub lazy_layers: usize,
}
