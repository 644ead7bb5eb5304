//! The peer endpoint: a read-only subset of the OCI distribution API over this agent's cache,
//! for other agents (DESIGN §6).
//!
//! - `GET /v2/`: 200 for a request with the token, 401 without (as a registry answers).
//! - `HEAD`/`GET /v2/<name>/blobs/<digest>`, with `Range` (206 and `Content-Range`): a kept
//!   manifest or config whole; a lazy layer's blob where every chunk the range touches is
//!   present (its bit set, so its bytes are synced and were verified), the whole blob once
//!   every chunk is.
//! - `GET`/`HEAD /v2/<name>/manifests/<digest>`: a kept manifest or index, by digest only.
//!
//! Everything else is a 404 at once: nothing waits for a fetch, nothing is asked upstream, so
//! peer requests can never loop. The name is checked for syntax and otherwise not looked at
//! (the cache is content-addressed). At most [`MAX_REQUESTS`] requests are served at once; more
//! get a 503 rather than a queue.

use std::fs::File;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use gantry_oci::Digest;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::routes::PeerSet;
use super::{PeerError, PeerToken};
use crate::cache::bitmap::ChunkBitmap;
use crate::images::service::ImageService;

/// Requests served at once.
pub const MAX_REQUESTS: usize = 64;
/// Bytes read from the cache per body piece.
const PIECE: u64 = 1 << 20;

/// What the endpoint serves from, and who may ask.
#[derive(Debug)]
pub struct PeerEndpoint {
    images: Arc<ImageService>,
    peers: Arc<PeerSet>,
    token: PeerToken,
    limit: Arc<Semaphore>,
}

impl PeerEndpoint {
    /// Serves `images`' cache to holders of `token`, counting on `peers`.
    pub fn new(images: Arc<ImageService>, peers: Arc<PeerSet>, token: PeerToken) -> Self {
        Self {
            images,
            peers,
            token,
            limit: Arc::new(Semaphore::new(MAX_REQUESTS)),
        }
    }
}

/// Binds the endpoint's address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, PeerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PeerError::Bind { addr, source })
}

/// The endpoint's routes.
pub fn router(endpoint: Arc<PeerEndpoint>) -> Router {
    Router::new()
        .route("/v2/", get(ping))
        .route("/v2/{*path}", get(content).head(content))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&endpoint),
            authenticate,
        ))
        .with_state(endpoint)
}

/// Serves peers on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoint: Arc<PeerEndpoint>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "peer endpoint listening");
    }
    if let Err(error) = axum::serve(listener, router(endpoint)).await {
        warn!(%error, "peer endpoint stopped");
    }
}

type Shared = State<Arc<PeerEndpoint>>;

/// An OCI distribution error response.
fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    (status, axum::Json(body)).into_response()
}

async fn authenticate(State(endpoint): Shared, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    if !endpoint.token.accepts(presented) {
        endpoint
            .peers
            .served
            .unauthorized
            .fetch_add(1, Ordering::Relaxed);
        let mut response = oci_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "peer requests need the cluster's peer token",
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gantry-peer\""),
        );
        return response;
    }
    next.run(request).await
}

async fn ping() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from_static(b"{}"),
    )
        .into_response()
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blob,
    Manifest,
}

/// `<name>/blobs/<digest>` or `<name>/manifests/<reference>`.
fn split_path(path: &str) -> Option<(&str, Kind, &str)> {
    let (rest, reference) = path.rsplit_once('/')?;
    let (name, kind) = rest.rsplit_once('/')?;
    let kind = match kind {
        "blobs" => Kind::Blob,
        "manifests" => Kind::Manifest,
        _ => return None,
    };
    Some((name, kind, reference))
}

/// A `Range` header's single byte range within `size` bytes: `Ok(None)` without one,
/// `Err(())` for one that cannot be served (several ranges, past the end, malformed).
fn parse_range(value: Option<&HeaderValue>, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(value) = value else {
        return Ok(None);
    };
    let spec = value
        .to_str()
        .ok()
        .and_then(|text| text.trim().strip_prefix("bytes="))
        .ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        // The last `end` bytes.
        let suffix: u64 = end.parse().map_err(|_| ())?;
        if suffix == 0 {
            return Err(());
        }
        size.saturating_sub(suffix)..size
    } else {
        let start: u64 = start.parse().map_err(|_| ())?;
        let end = if end.is_empty() {
            size
        } else {
            end.parse::<u64>()
                .map_err(|_| ())?
                .saturating_add(1)
                .min(size)
        };
        start..end
    };
    if range.start >= range.end || range.start >= size {
        return Err(());
    }
    Ok(Some(range))
}

/// Where a served body comes from.
enum Source {
    Memory(Bytes),
    File(File),
}

/// Whether a byte range of a found body is held (whole chunks, durably).
type HeldCheck = Box<dyn Fn(&Range<u64>) -> bool + Send>;

/// A body found in the cache: its bytes, size and type.
struct Found {
    source: Source,
    size: u64,
    media_type: String,
    /// For a lazy blob: whether `range` (or the whole blob) is held.
    held: HeldCheck,
}

/// A kept document's media type, as its JSON says.
fn document_media_type(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|value| value.get("mediaType")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "application/octet-stream".to_string())
}

/// Looks `digest` up in the cache (blocking).
fn find(images: &ImageService, kind: Kind, digest: &Digest) -> Option<Found> {
    match images.cache.document(digest) {
        Ok(Some(bytes)) => {
            let size = bytes.len() as u64;
            return Some(Found {
                media_type: document_media_type(&bytes),
                source: Source::Memory(Bytes::from(bytes)),
                size,
                held: Box::new(|_| true),
            });
        }
        Ok(None) => {}
        Err(error) => {
            warn!(%digest, %error, "peer request: kept document unreadable");
            return None;
        }
    }
    if kind == Kind::Manifest {
        return None;
    }
    let files = match images.cache.lazy_blob_files(digest) {
        Ok(Some(files)) => files,
        Ok(None) => return None,
        Err(error) => {
            debug!(%digest, %error, "peer request: no usable layer");
            return None;
        }
    };
    // The open layer's bits are the newest; a layer no VM maps has its bitmap on disk.
    let (index, present): (_, Box<dyn Fn(usize) -> bool + Send>) = match images.lazy.get(digest) {
        Some(layer) => (
            layer.index().clone(),
            Box::new(move |chunk| layer.is_present(chunk)),
        ),
        None => {
            let index = images.cache.lazy_index(digest).ok()?;
            let bitmap = ChunkBitmap::open(&files.bitmap).ok()?;
            (
                index,
                Box::new(move |chunk| bitmap.is_present(chunk as u64)),
            )
        }
    };
    let file = File::open(&files.blob).ok()?;
    let size = files.blob_size;
    let held = move |range: &Range<u64>| {
        index
            .chunks_touching(range)
            .is_some_and(|chunks| chunks.into_iter().all(&present))
    };
    Some(Found {
        source: Source::File(file),
        size,
        media_type: "application/octet-stream".to_string(),
        held: Box::new(held),
    })
}

async fn content(
    State(endpoint): Shared,
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some((name, kind, reference)) = split_path(&path) else {
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "no such endpoint");
    };
    if let Err(error) = gantry_oci::reference::validate_repository(name) {
        return oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", &error.to_string());
    }
    let Ok(digest) = reference.parse::<Digest>() else {
        return match kind {
            Kind::Manifest => oci_error(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "peers serve manifests by digest only",
            ),
            Kind::Blob => oci_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "not a digest"),
        };
    };
    let Ok(permit) = Arc::clone(&endpoint.limit).try_acquire_owned() else {
        return oci_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "TOOMANYREQUESTS",
            "the peer endpoint is busy",
        );
    };
    let lookup = {
        let endpoint = Arc::clone(&endpoint);
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || find(&endpoint.images, kind, &digest)).await
    };
    let not_held = || {
        endpoint
            .peers
            .served
            .not_held
            .fetch_add(1, Ordering::Relaxed);
        let code = match kind {
            Kind::Blob => "BLOB_UNKNOWN",
            Kind::Manifest => "MANIFEST_UNKNOWN",
        };
        oci_error(StatusCode::NOT_FOUND, code, "not held by this peer")
    };
    let Ok(Some(found)) = lookup else {
        return not_held();
    };
    let range = match parse_range(headers.get(header::RANGE), found.size) {
        Ok(range) => range,
        Err(()) => {
            let mut response = oci_error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
                "one byte range inside the blob",
            );
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", found.size)) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return response;
        }
    };
    let span = range.clone().unwrap_or(0..found.size);
    if !(found.held)(&span) {
        return not_held();
    }
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, found.media_type.as_str())
        .header(header::CONTENT_LENGTH, span.end - span.start)
        .header(header::ACCEPT_RANGES, "bytes")
        .header("docker-content-digest", digest.to_string());
    response = match &range {
        Some(range) => response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", range.start, range.end - 1, found.size),
        ),
        None => response.status(StatusCode::OK),
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        endpoint
            .peers
            .served
            .requests
            .fetch_add(1, Ordering::Relaxed);
        endpoint
            .peers
            .served
            .bytes
            .fetch_add(span.end - span.start, Ordering::Relaxed);
        body(found.source, span, permit)
    };
    response
        .body(body)
        .unwrap_or_else(|_| oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "response"))
}

/// The bytes `span` of `source`, read in pieces as the client takes them; the permit is
/// held until the body ends.
fn body(source: Source, span: Range<u64>, permit: OwnedSemaphorePermit) -> Body {
    let file = match source {
        Source::Memory(bytes) => {
            let (start, end) = (span.start as usize, span.end as usize);
            drop(permit);
            return Body::from(bytes.slice(start..end));
        }
        Source::File(file) => Arc::new(file),
    };
    let pieces = futures::stream::unfold((span.start, permit), move |(at, permit)| {
        let file = Arc::clone(&file);
        let end = span.end;
        async move {
            if at >= end {
                return None;
            }
            let len = (end - at).min(PIECE);
            let read = tokio::task::spawn_blocking(move || {
                let mut bytes = vec![0u8; len as usize];
                file.read_exact_at(&mut bytes, at)
                    .map(|()| Bytes::from(bytes))
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read);
            Some((read, (at + len, permit)))
        }
    });
    Body::from_stream(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_one_span_inside_the_blob() {
        let value = |text: &str| HeaderValue::from_str(text).unwrap();
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(
            parse_range(Some(&value("bytes=10-19")), 100),
            Ok(Some(10..20))
        );
        assert_eq!(
            parse_range(Some(&value("bytes=90-")), 100),
            Ok(Some(90..100))
        );
        assert_eq!(
            parse_range(Some(&value("bytes=-10")), 100),
            Ok(Some(90..100))
        );
        assert_eq!(
            parse_range(Some(&value("bytes=90-500")), 100),
            Ok(Some(90..100))
        );
        for bad in [
            "bytes=100-",
            "bytes=5-2",
            "bytes=0-1,4-5",
            "items=0-1",
            "bytes=-0",
            "bytes=x-",
        ] {
            assert_eq!(parse_range(Some(&value(bad)), 100), Err(()), "{bad}");
        }
    }

    #[test]
    fn paths_name_a_repository_a_kind_and_a_reference() {
        assert_eq!(
            split_path("gantry/cache/blobs/sha256:ab"),
            Some(("gantry/cache", Kind::Blob, "sha256:ab"))
        );
        assert_eq!(
            split_path("app/manifests/latest"),
            Some(("app", Kind::Manifest, "latest"))
        );
        assert_eq!(split_path("app/tags/list"), None);
        assert_eq!(split_path("blobs"), None);
    }
}
