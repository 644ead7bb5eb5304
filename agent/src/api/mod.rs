//! The operator API: HTTP+JSON on a unix socket, and its client used by the CLI.
//!
//! | method | path | body |
//! |---|---|---|
//! | GET | `/v1/vms` | `[VmStatus]` |
//! | GET | `/v1/vms/{vm}` | `VmStatus` |
//! | GET | `/v1/vms/{vm}/guest-info?wait_ms=N` | [`GuestInfoReport`] |
//! | POST | `/v1/vms/{vm}/ping?count=N&size=B` | [`PingReport`] |
//! | POST | `/v1/vms/{vm}/restart` | `{}` |
//!
//! Errors answer with a non-2xx status and [`ApiErrorBody`].

pub mod client;
pub mod server;

use gantry_proto::GuestInfo;
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
