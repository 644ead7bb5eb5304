//! The operator API: HTTP+JSON on a unix socket, and its client used by the CLI.
//! `docs/openapi.yaml` documents every route; in short:
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/vms` | `[VmStatus]` |
//! | GET | `/v1/vms/{vm}` | `VmStatus` |
//! | GET | `/v1/vms/{vm}/guest-info?wait_ms=N` | [`GuestInfoReport`] |
//! | POST | `/v1/vms/{vm}/ping?count=N&size=B` | [`PingReport`] |
//! | POST | `/v1/vms/{vm}/restart` | `{}` |
//! | GET | `/v1/vms/{vm}/resources` | `GuestResources` (layer mounts, loop devices, cgroups) |
//! | POST | `/v1/vms/{vm}/probe` | `{"goodbye": …}`: the shim's answer to a garbage frame |
//! | POST | `/v1/vms/{vm}/baseline` (body `{"args": […]}`) | `{"output", "exit"}`: a plain spawn in the shim |
//! | POST | `/v1/vms/{vm}/containers` (body `RunOptions`) | NDJSON [`RunUpdate`]s |
//! | GET | `/v1/vms/{vm}/containers` | `[ContainerView]` |
//! | GET | `/v1/vms/{vm}/containers/{id}/logs?follow=B&exec=E` | log records (see `containers::logs`) |
//! | POST | `/v1/vms/{vm}/containers/{id}/exec` (body [`ExecRequest`]) | `{"exec_id": …}` |
//! | POST | `/v1/vms/{vm}/containers/{id}/kill?signal=N&exec=E` | `{}` |
//! | GET | `/v1/vms/{vm}/containers/{id}/wait?exec=E` | `ExitRecord` |
//! | GET | `/v1/vms/{vm}/containers/{id}/stats` | `ContainerStats` |
//! | POST | `/v1/vms/{vm}/containers/{id}/stdin?exec=E&close=B` (body: bytes) | `{}` |
//! | DELETE | `/v1/vms/{vm}/containers/{id}?force=B` | `{}` |
//! | GET | `/v1/images` | `[ImageStatus]` |
//!
//! Errors answer with a non-2xx status and [`ApiErrorBody`].

pub mod client;
pub mod server;

use gantry_proto::{ContainerState, ExitStatus, GuestInfo};
use serde::{Deserialize, Serialize};

pub use crate::vm::VmStatus;

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// What went wrong and, where possible, what to do about it.
    pub error: String,
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
    /// It failed; nothing was left behind.
    Failed(String),
}

/// `POST /v1/vms/{vm}/containers/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

/// One container as `ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerView {
    /// Its name.
    pub id: String,
    /// Its image (unknown for containers an earlier agent created).
    pub image: Option<String>,
    /// Its state in the guest.
    pub state: ContainerState,
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
