//! The operator API client: what the CLI uses to talk to a running agent.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::{ApiErrorBody, ErrorCode};

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    /// Nothing answers on the socket.
    #[error(
        "cannot reach the agent at {path}: {source} (is `gantry-agent serve` running? set --api-socket)"
    )]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("API request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("invalid API request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The agent answered with an error.
    #[error("{message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The error's stable kind.
        code: ErrorCode,
        /// The agent's explanation.
        message: String,
    },
    /// The answer is not what this client expects.
    #[error("unexpected answer from the agent: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A client for one agent's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
        }
    }

    /// `GET path`, decoding a JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiClientError> {
        self.call(Method::GET, path, Vec::new()).await
    }

    /// `POST path` with an empty body, decoding a JSON answer.
    pub async fn post<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiClientError> {
        self.call(Method::POST, path, Vec::new()).await
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiClientError> {
        self.call(Method::POST, path, serde_json::to_vec(body)?)
            .await
    }

    /// `PUT path` with a JSON body, decoding a JSON answer.
    pub async fn put_json<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ApiClientError> {
        self.call(Method::PUT, path, serde_json::to_vec(body)?)
            .await
    }

    /// `DELETE path`, decoding a JSON answer.
    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiClientError> {
        self.call(Method::DELETE, path, Vec::new()).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<T, ApiClientError> {
        let response = self.open(method, path, body).await?;
        let bytes = response.collect().await?.to_bytes();
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// Sends a request and returns the answer's body as it streams in; a non-2xx answer is an
    /// error carrying the agent's explanation.
    pub async fn open(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Incoming, ApiClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection task ends by itself once the answer is consumed or dropped.
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "gantry-agent")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.into_body().collect().await?.to_bytes();
            let (message, code) = match serde_json::from_slice::<ApiErrorBody>(&body) {
                Ok(body) => (body.error, body.code),
                Err(_) => (
                    String::from_utf8_lossy(&body).into_owned(),
                    ErrorCode::for_status(status.as_u16()),
                ),
            };
            return Err(ApiClientError::Status {
                status,
                code,
                message,
            });
        }
        Ok(response.into_body())
    }
}
