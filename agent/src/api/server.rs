//! The operator API server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{ApiErrorBody, GuestInfoReport, PingReport};
use crate::vm::{Vm, VmError, VmStatus};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket could not be bound.
    #[error("cannot listen on the API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another agent answers on the socket already.
    #[error("another agent is already listening on {0}")]
    InUse(std::path::PathBuf),
    /// Serving failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
}

/// The VMs the API serves, by name.
pub type VmTable = Arc<BTreeMap<String, Vm>>;

/// Binds `path` (replacing a stale socket file left by a dead agent).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ApiServerError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    tokio::net::UnixListener::bind(path).map_err(|source| ApiServerError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// The API's routes over `vms`.
pub fn router(vms: VmTable) -> Router {
    Router::new()
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{vm}", get(vm_status))
        .route("/v1/vms/{vm}/guest-info", get(guest_info))
        .route("/v1/vms/{vm}/ping", post(ping))
        .route("/v1/vms/{vm}/restart", post(restart))
        .with_state(vms)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    vms: VmTable,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiServerError> {
    axum::serve(listener, router(vms))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ApiServerError::Serve)
}

/// An error answer.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(err: VmError) -> Self {
        let status = match &err {
            VmError::NotConnected(_) => StatusCode::SERVICE_UNAVAILABLE,
            VmError::Session { .. } | VmError::UnexpectedReply(_) => StatusCode::BAD_GATEWAY,
            VmError::NotLaunched(_) => StatusCode::CONFLICT,
            VmError::Device { .. } | VmError::Qemu { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

fn find<'a>(vms: &'a VmTable, name: &str) -> Result<&'a Vm, ApiError> {
    vms.get(name).ok_or_else(|| {
        let known: Vec<&str> = vms.keys().map(String::as_str).collect();
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no VM named {name:?}; this agent serves: {}", known.join(", ")),
        )
    })
}

async fn list_vms(State(vms): State<VmTable>) -> Json<Vec<VmStatus>> {
    Json(vms.values().map(Vm::status).collect())
}

async fn vm_status(
    State(vms): State<VmTable>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<VmStatus>, ApiError> {
    Ok(Json(find(&vms, &name)?.status()))
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// How long to wait for the shim to connect, e.g. while the guest boots.
    #[serde(default)]
    wait_ms: u64,
}

async fn guest_info(
    State(vms): State<VmTable>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<GuestInfoReport>, ApiError> {
    let vm = find(&vms, &name)?;
    let (guest, round_trip) = vm.guest_info(Duration::from_millis(query.wait_ms)).await?;
    Ok(Json(GuestInfoReport {
        vm: name,
        guest,
        round_trip_us: round_trip.as_micros() as u64,
    }))
}

#[derive(Debug, Deserialize)]
struct PingQuery {
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    size: usize,
}

fn one() -> u32 {
    1
}

/// Bounds that keep one API call from occupying a shim for long.
const MAX_PINGS: u32 = 10_000;
const MAX_PING_BYTES: usize = 1 << 20;

async fn ping(
    State(vms): State<VmTable>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<PingQuery>,
) -> Result<Json<PingReport>, ApiError> {
    if query.count == 0 || query.count > MAX_PINGS || query.size > MAX_PING_BYTES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("count must be 1..={MAX_PINGS} and size at most {MAX_PING_BYTES} bytes"),
        ));
    }
    let vm = find(&vms, &name)?;
    let round_trips = vm.ping(query.count, query.size).await?;
    Ok(Json(PingReport {
        vm: name,
        round_trips_us: round_trips.iter().map(|d| d.as_micros() as u64).collect(),
    }))
}

async fn restart(
    State(vms): State<VmTable>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let vms = vms.clone();
    // Killing and reaping QEMU blocks; keep it off the async workers.
    tokio::task::spawn_blocking(move || find(&vms, &name)?.restart().map_err(ApiError::from))
        .await
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))??;
    Ok(Json(serde_json::json!({})))
}
