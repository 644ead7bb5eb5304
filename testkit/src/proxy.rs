//! A fault-injecting HTTP proxy in front of a registry: corrupt, truncate, stall or fail blobs,
//! demand bearer tokens, ignore `Range`, and log what it saw.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use gantry_oci::reference::Digest;
use serde_json::json;

/// Faults the proxy injects.
#[derive(Debug, Default)]
pub struct Faults {
    /// Flip a byte in every blob body larger than 1 KiB (layers, not configs).
    pub corrupt_blobs: AtomicBool,
    /// Cut this many blob bodies over 1 KiB in half (then behave).
    pub truncate_blobs: AtomicU32,
    /// Answer this many requests with 500 (then behave).
    pub fail_requests: AtomicU32,
    /// Answer every request with 500.
    pub always_fail: AtomicBool,
    /// Stall this many blob bodies after their first bytes (then behave).
    pub stall_blobs: AtomicU32,
    /// Stall blobs larger than this forever after their first 64 KiB (0 = off).
    pub stall_large_blobs_over: AtomicU64,
    /// Require bearer tokens from /token; a token works for this many requests (0 = off).
    pub bearer_token_uses: AtomicU32,
    /// Drop `Range` headers: the registry then answers `200` with whole blobs.
    pub ignore_ranges: AtomicBool,
    /// Name this host (`host:port`) as the token realm's instead of the proxy's own.
    pub realm_host: Mutex<Option<String>>,
    /// Answer every request with a 500 whose body never ends.
    pub endless_error_bodies: AtomicBool,
    /// Flip the byte at one offset of one blob in the responses that carry it.
    pub flip_blob_byte: Mutex<Option<FlipByte>>,
}

/// A byte of a blob the proxy flips, `times` times (`u32::MAX`: always).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlipByte {
    /// The blob.
    pub digest: Digest,
    /// The byte's offset in the blob.
    pub offset: u64,
    /// How many more responses get it flipped.
    pub times: u32,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct ProxyLog {
    pub requests: Vec<(String, Option<String>)>,
    pub token_requests: u32,
    /// Token requests that carried credentials (an `Authorization` header).
    pub token_requests_with_credentials: u32,
    pub blob_bytes_sent: u64,
}

struct ProxyState {
    upstream: String,
    faults: Arc<Faults>,
    log: Arc<Mutex<ProxyLog>>,
    client: reqwest::Client,
    tokens: Mutex<BTreeMap<String, u32>>,
    token_counter: AtomicU32,
    port: u16,
}

/// A fault-injecting HTTP proxy in front of a registry.
#[derive(Debug)]
pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
    pub log: Arc<Mutex<ProxyLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let log = Arc::new(Mutex::new(ProxyLog::default()));
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            faults: faults.clone(),
            log: log.clone(),
            client: reqwest::Client::new(),
            tokens: Mutex::new(BTreeMap::new()),
            token_counter: AtomicU32::new(0),
            port,
        });
        let app = axum::Router::new()
            .fallback(proxy_handler)
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            port,
            faults,
            log,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob GETs seen, by digest.
    pub fn blob_requests(&self, digest: &Digest) -> usize {
        self.blob_ranges(digest).len()
    }

    /// Requests carrying a Range header.
    pub fn range_requests(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(_, range)| range.is_some())
            .count()
    }

    pub fn request_count(&self) -> usize {
        self.log.lock().unwrap().requests.len()
    }

    /// The `Range` headers of the requests for blob `digest`, in order (`None`: whole blob).
    pub fn blob_ranges(&self, digest: &Digest) -> Vec<Option<String>> {
        let needle = format!("/blobs/{digest}");
        self.log
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(path, _)| path.ends_with(&needle))
            .map(|(_, range)| range.clone())
            .collect()
    }

    /// Stops serving: new connections are refused and open ones closed (the registry is gone).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// The first byte offset of a `Content-Range: bytes S-E/N` value.
fn content_range_start(value: &str) -> Option<u64> {
    value
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

async fn proxy_handler(State(state): State<Arc<ProxyState>>, request: Request) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers = request.headers().clone();
    let faults = &state.faults;

    if path.starts_with("/token") {
        let mut log = state.log.lock().unwrap();
        log.token_requests += 1;
        if headers.contains_key("authorization") {
            log.token_requests_with_credentials += 1;
        }
        drop(log);
        let n = state.token_counter.fetch_add(1, Ordering::SeqCst);
        let token = format!("tok-{n}");
        state.tokens.lock().unwrap().insert(
            token.clone(),
            faults.bearer_token_uses.load(Ordering::SeqCst),
        );
        return json_response(StatusCode::OK, json!({"token": token, "expires_in": 300}));
    }
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state
        .log
        .lock()
        .unwrap()
        .requests
        .push((path.clone(), range.clone()));

    if faults.bearer_token_uses.load(Ordering::SeqCst) > 0 {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let valid = presented.is_some_and(|token| {
            let mut tokens = state.tokens.lock().unwrap();
            match tokens.get_mut(&token) {
                Some(uses) if *uses > 0 => {
                    *uses -= 1;
                    true
                }
                _ => false,
            }
        });
        if !valid {
            let mut response = json_response(StatusCode::UNAUTHORIZED, json!({"errors": []}));
            response.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_str(&format!(
                    "Bearer realm=\"http://{}/token\",service=\"test\"",
                    faults
                        .realm_host
                        .lock()
                        .unwrap()
                        .clone()
                        .unwrap_or_else(|| format!("127.0.0.1:{}", state.port))
                ))
                .unwrap(),
            );
            return response;
        }
    }
    if faults.endless_error_bodies.load(Ordering::SeqCst) {
        let chunks = futures::stream::repeat_with(|| {
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 64 << 10]))
        });
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from_stream(chunks))
            .unwrap();
    }
    if faults.always_fail.load(Ordering::SeqCst) || take_one(&faults.fail_requests) {
        return json_response(StatusCode::INTERNAL_SERVER_ERROR, json!({"errors": []}));
    }

    let method = request.method().clone();
    let is_head = method == axum::http::Method::HEAD;
    // Pushes send bodies (uploads, manifests).
    let Ok(body) = axum::body::to_bytes(request.into_body(), usize::MAX).await else {
        return json_response(StatusCode::BAD_REQUEST, json!({"error": "unreadable body"}));
    };
    let mut upstream = state
        .client
        .request(method, format!("{}{path}", state.upstream))
        .body(body);
    for name in ["accept", "range", "content-type"] {
        if name == "range" && faults.ignore_ranges.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(value) = headers.get(name) {
            upstream = upstream.header(name, value.clone());
        }
    }
    let response = match upstream.send().await {
        Ok(response) => response,
        Err(error) => {
            return json_response(StatusCode::BAD_GATEWAY, json!({"error": error.to_string()}));
        }
    };
    let status = response.status();
    let mut out_headers = HeaderMap::new();
    for name in [
        "content-type",
        "docker-content-digest",
        "content-range",
        "accept-ranges",
        "location",
        "docker-upload-uuid",
    ] {
        if let Some(value) = response.headers().get(name) {
            out_headers.insert(name, value.clone());
        }
    }
    // A HEAD answer has no body but states the blob's length.
    let head_length = (is_head && status.is_success())
        .then(|| response.headers().get("content-length").cloned())
        .flatten();
    let mut body = response.bytes().await.unwrap_or_default().to_vec();
    let is_blob = path.contains("/blobs/") && status.is_success();
    let mut builder = Response::builder().status(status.as_u16());
    for (name, value) in &out_headers {
        builder = builder.header(name, value);
    }
    builder = match head_length {
        Some(length) => builder.header("content-length", length),
        None => builder.header("content-length", body.len()),
    };
    if !is_blob {
        return builder.body(Body::from(body)).unwrap();
    }
    state.log.lock().unwrap().blob_bytes_sent += body.len() as u64;
    {
        let mut flip = faults.flip_blob_byte.lock().unwrap();
        if let Some(target) = flip.as_mut().filter(|target| {
            target.times > 0 && path.ends_with(&format!("/blobs/{}", target.digest))
        }) {
            let start = out_headers
                .get("content-range")
                .and_then(|value| value.to_str().ok())
                .and_then(content_range_start)
                .unwrap_or(0);
            let at = target
                .offset
                .checked_sub(start)
                .and_then(|at| usize::try_from(at).ok());
            if let Some(byte) = at.and_then(|at| body.get_mut(at)) {
                *byte ^= 0x01;
                if target.times != u32::MAX {
                    target.times -= 1;
                }
            }
        }
    }
    let middle = body.len() / 2;
    if faults.corrupt_blobs.load(Ordering::SeqCst)
        && body.len() > 1024
        && let Some(byte) = body.get_mut(middle)
    {
        *byte ^= 0x55;
    }
    let stall_over = faults.stall_large_blobs_over.load(Ordering::SeqCst);
    if stall_over > 0 && body.len() as u64 > stall_over {
        let head = Bytes::copy_from_slice(&body[..65536.min(body.len())]);
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if take_one(&faults.stall_blobs) {
        let head = Bytes::copy_from_slice(&body[..(body.len() / 2)]);
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Bytes::new())
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    if body.len() > 1024 && take_one(&faults.truncate_blobs) {
        let head = Bytes::copy_from_slice(&body[..(body.len() / 2)]);
        // The pause lets the first half reach the client before the connection breaks.
        let stream = futures::stream::iter(vec![Ok::<_, std::io::Error>(head)]).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Err(std::io::Error::other("truncated by the fault proxy"))
            }),
        );
        return builder.body(Body::from_stream(stream)).unwrap();
    }
    builder.body(Body::from(body)).unwrap()
}

use futures::StreamExt as _;

fn json_response(status: StatusCode, value: serde_json::Value) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}
