//! `GET /metrics`: the OpenMetrics exposition, as a route of the operator API (its unix socket)
//! and, when `metrics_listen` is set, on a TCP listener for a Prometheus server to scrape. The
//! TCP listener serves `/metrics` and nothing else: the API never leaves its socket.

use std::net::SocketAddr;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{info, warn};

use super::Metrics;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The TCP address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address (`metrics_listen`).
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The exposition could not be written.
    #[error("cannot encode the metrics: {0}")]
    Encode(String),
}

/// The exposition, written on a blocking thread (the state probe scans the cache directory).
pub async fn exposition(metrics: Metrics) -> Result<String, EndpointError> {
    tokio::task::spawn_blocking(move || metrics.encode())
        .await
        .map_err(|error| EndpointError::Encode(error.to_string()))?
        .map_err(|error| EndpointError::Encode(error.to_string()))
}

/// `text` as a `200` with [`CONTENT_TYPE`].
pub fn response(text: String) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

/// Binds `metrics_listen` (before anything else starts, so a taken port stops the start).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, EndpointError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EndpointError::Bind { addr, source })
}

/// The TCP listener's routes: `GET /metrics` only.
pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    match exposition(metrics).await {
                        Ok(text) => response(text),
                        Err(error) => {
                            warn!(%error, "metrics scrape failed");
                            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
                        }
                    }
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
}

/// Serves [`router`] on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening (GET /metrics)");
    }
    if let Err(error) = axum::serve(listener, router(metrics)).await {
        warn!(%error, "metrics endpoint stopped");
    }
}
