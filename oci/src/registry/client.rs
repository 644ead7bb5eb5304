//! The HTTP side of the distribution API.
//!
//! Every operation walks the registry's endpoints in order (configured mirrors first, then the
//! registry itself) and moves to the next one when an endpoint fails. Within one endpoint,
//! 5xx/429 answers, transport errors, stalls and truncated bodies are retried with exponential
//! backoff; a truncated blob resumes with a `Range` request. Every document and blob is
//! checked against its digest; a mismatch names the endpoint that served it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode};
use tracing::{debug, info, warn};

use super::auth::{AuthError, Challenge, CredentialStore, Token, TokenResponse};
use super::config::{ConfigError, RegistryConfig};
use crate::manifest::{Descriptor, MANIFEST_ACCEPT, Platform};
use crate::reference::{Digest, Reference};
use crate::source::{BlobSink, BlobVerifier, FetchedManifest, ImageSource, VerifyError};

/// Largest token-endpoint answer accepted.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// Most characters of an error body kept for messages.
const MAX_ERROR_BODY: usize = 512;
/// Most bytes of an error body read (enough for a distribution error document).
const MAX_ERROR_READ: usize = 8 << 10;

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A CA file could not be read or parsed.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The credentials file is unusable.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Building the HTTP client failed.
    #[error("building the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The request URL.
        url: String,
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// Credentials were refused or are missing.
    #[error("{url}: unauthorized: {detail}")]
    Unauthorized {
        /// The request URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// Connecting, sending or reading failed.
    #[error("{url}: {}", transport_cause(source))]
    Transport {
        /// The request URL.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server sent nothing for too long.
    #[error("{url}: no data for {after:?}")]
    Stalled {
        /// The request URL.
        url: String,
        /// The stall timeout.
        after: Duration,
    },
    /// A body ended early and retries were exhausted.
    #[error("{url}: body ended after {got} of {expected} bytes")]
    Truncated {
        /// The request URL.
        url: String,
        /// Bytes received.
        got: u64,
        /// Bytes expected.
        expected: u64,
    },
    /// A document is larger than allowed.
    #[error("{url}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// The request URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The content does not match its digest or size.
    #[error("{url}: {error}")]
    Verify {
        /// The request URL (the source that sent the bad bytes).
        url: String,
        /// What did not match.
        error: VerifyError,
    },
    /// A `206` whose range is not the one asked for.
    #[error("{url}: bad Content-Range {content_range:?} for a request from byte {offset}")]
    BadRange {
        /// The request URL.
        url: String,
        /// The header sent.
        content_range: String,
        /// The offset asked for.
        offset: u64,
    },
    /// A ranged read asked for an empty range, or one past the blob's end.
    #[error("blob {digest}: cannot read bytes {start}..{end} of a {size}-byte blob")]
    InvalidRange {
        /// The blob.
        digest: Digest,
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// The sink refused the blob (the blob itself verified).
    #[error("storing the blob: {0}")]
    Sink(String),
    /// A push step failed.
    #[error("pushing {what} to {repository}: {error}")]
    Push {
        /// What was pushed (`blob sha256:…`, `manifest TAG`).
        what: String,
        /// `host/repository`.
        repository: String,
        /// Why (in the message, so not a `source`).
        error: Box<RegistryError>,
    },
    /// An upload's `Location` is missing or unusable.
    #[error("{url}: the registry sent no usable upload Location (got {location:?})")]
    BadLocation {
        /// The request that got it.
        url: String,
        /// What it sent.
        location: String,
    },
    /// A referrer is not what its listing said, or cannot be stored.
    #[error("referrer {digest}: {reason}")]
    Referrer {
        /// The referrer's manifest (or, when pushing, its subject).
        digest: Digest,
        /// What is wrong.
        reason: String,
    },
    /// A referrers listing is not an image index.
    #[error("{url}: not a referrers listing: {reason}")]
    Listing {
        /// Where it was read.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// Every endpoint failed; their errors in order.
    #[error("{what}: every endpoint failed: {}", errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    AllEndpointsFailed {
        /// What was being fetched.
        what: String,
        /// One error per endpoint.
        errors: Vec<RegistryError>,
    },
}

impl RegistryError {
    /// Whether retrying the same endpoint may help.
    pub(super) fn is_retriable(&self) -> bool {
        match self {
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            RegistryError::Transport { .. }
            | RegistryError::Stalled { .. }
            | RegistryError::Truncated { .. } => true,
            _ => false,
        }
    }

    /// Whether the registry could not be reached or could not answer (as opposed to an
    /// answer: not found, unauthorized, a bad document): a caller holding a copy of what it
    /// asked for may use that instead.
    pub fn is_unreachable(&self) -> bool {
        match self {
            RegistryError::AllEndpointsFailed { errors, .. } => {
                !errors.is_empty() && errors.iter().all(RegistryError::is_unreachable)
            }
            error => error.is_retriable(),
        }
    }
}

/// One base URL serving the distribution API for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// `scheme://host[:port][/prefix]`, no trailing slash.
    pub(super) base: String,
    /// `host[:port]`, for credentials.
    pub(super) host: String,
}

impl Endpoint {
    fn from_url(url: &str) -> Endpoint {
        let base = url.trim_end_matches('/').to_string();
        let host = base
            .split_once("://")
            .map_or(base.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Endpoint { base, host }
    }
}

#[derive(Debug, Default)]
struct AuthCache {
    /// The last challenge seen per endpoint base.
    challenges: HashMap<String, Challenge>,
    /// Bearer tokens per (endpoint base, scope).
    tokens: HashMap<(String, String), Token>,
}

/// Bytes of a blob read with [`RegistryClient::fetch_blob_range`], unverified.
#[derive(Debug, Clone)]
pub struct BlobRange {
    /// Exactly the bytes asked for.
    pub bytes: Bytes,
    /// The URL that served them.
    pub url: String,
    /// The server ignored `Range` and sent the blob from its start.
    pub ranges_ignored: bool,
}

/// A client for OCI distribution registries.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    platform: Platform,
    credentials: CredentialStore,
    auth: Mutex<AuthCache>,
    /// Mirror base URLs that could not be reached, and until when they are skipped.
    unreachable_mirrors: Mutex<HashMap<String, Instant>>,
}

/// How long a mirror that could not be reached is skipped.
pub const MIRROR_COOLDOWN: Duration = Duration::from_secs(30);

impl RegistryClient {
    /// Builds a client: loads the CA files and the credentials file named in `config`.
    pub fn new(config: RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let platform = config.platform()?;
        let credentials = match &config.credentials_file {
            Some(path) => CredentialStore::load(path)?,
            None => CredentialStore::default(),
        };
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .user_agent(concat!("gantry-agent/", env!("CARGO_PKG_VERSION")));
        for path in &config.ca_files {
            let fail = |reason: String| RegistryError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| fail(e.to_string()))?;
            if certs.is_empty() {
                return Err(fail("no certificate in the file".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(RegistryError::Client)?;
        Ok(RegistryClient {
            http,
            config,
            platform,
            credentials,
            auth: Mutex::new(AuthCache::default()),
            unreachable_mirrors: Mutex::new(HashMap::new()),
        })
    }

    /// The credentials it sends.
    pub fn credentials(&self) -> &CredentialStore {
        &self.credentials
    }

    /// Replaces the credentials (e.g. from the CLI or tests).
    pub fn with_credentials(mut self, credentials: CredentialStore) -> Self {
        self.credentials = credentials;
        self
    }

    /// The configuration in use.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// The platform picked from indexes.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The endpoints for a registry, in the order they are tried: its mirrors (but those that
    /// could not be reached in the last [`MIRROR_COOLDOWN`]), then the registry itself.
    fn endpoints(&self, reference: &Reference) -> Vec<Endpoint> {
        let now = Instant::now();
        let mut unreachable = self.lock_unreachable();
        unreachable.retain(|_, until| *until > now);
        let mut endpoints: Vec<Endpoint> = self
            .config
            .mirrors
            .get(&reference.registry)
            .into_iter()
            .flatten()
            .map(|url| Endpoint::from_url(url))
            .filter(|endpoint| !unreachable.contains_key(&endpoint.base))
            .collect();
        endpoints.push(self.origin(reference));
        endpoints
    }

    /// Notes an endpoint's failure: a mirror that could not be reached is skipped for
    /// [`MIRROR_COOLDOWN`], so that every later request does not pay its retries again (the
    /// registry itself is always tried: it is the last resort).
    fn endpoint_failed(&self, endpoint: &Endpoint, reference: &Reference, error: &RegistryError) {
        let unreachable = matches!(
            error,
            RegistryError::Transport { .. } | RegistryError::Stalled { .. }
        );
        if unreachable && *endpoint != self.origin(reference) {
            warn!(mirror = %endpoint.base, ?MIRROR_COOLDOWN, "mirror unreachable: skipped for a while");
            self.lock_unreachable()
                .insert(endpoint.base.clone(), Instant::now() + MIRROR_COOLDOWN);
        }
    }

    /// The registry itself, without mirrors (where pushes go).
    pub(super) fn origin(&self, reference: &Reference) -> Endpoint {
        let host = reference.api_host();
        let scheme = if self.config.is_insecure(&reference.registry) {
            "http"
        } else {
            "https"
        };
        Endpoint {
            base: format!("{scheme}://{host}"),
            host: reference.registry.clone(),
        }
    }

    /// The URL of manifest `target` (a tag or digest) on the registry itself.
    pub(super) fn manifest_url(&self, reference: &Reference, target: &str) -> String {
        format!(
            "{}/v2/{}/manifests/{target}",
            self.origin(reference).base,
            reference.repository
        )
    }

    pub(super) fn stall_timeout(&self) -> Duration {
        Duration::from_millis(self.config.stall_timeout_ms)
    }

    /// Fetches a manifest by tag or digest (`target`), verified: against `target` when it is
    /// a digest, and against the server's `Docker-Content-Digest` when it sends one.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        target: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let expected: Option<Digest> = target.parse().ok();
        let mut errors = Vec::new();
        for endpoint in self.endpoints(reference) {
            let url = format!(
                "{}/v2/{}/manifests/{}",
                endpoint.base, reference.repository, target
            );
            match self
                .fetch_manifest_from(&endpoint, reference, &url, expected.as_ref())
                .await
            {
                Ok(manifest) => return Ok(manifest),
                Err(error) => {
                    warn!(%error, "manifest fetch failed, trying the next endpoint if any");
                    self.endpoint_failed(&endpoint, reference, &error);
                    errors.push(error);
                }
            }
        }
        Err(RegistryError::AllEndpointsFailed {
            what: format!(
                "manifest {}/{}:{target}",
                reference.registry, reference.repository
            ),
            errors,
        })
    }

    async fn fetch_manifest_from(
        &self,
        endpoint: &Endpoint,
        reference: &Reference,
        url: &str,
        expected: Option<&Digest>,
    ) -> Result<FetchedManifest, RegistryError> {
        let limit = self.config.max_manifest_bytes;
        let mut attempt = 0;
        loop {
            let result: Result<_, RegistryError> = async {
                let response = self
                    .send(endpoint, &reference.repository, url, |request| {
                        request.header(header::ACCEPT, MANIFEST_ACCEPT)
                    })
                    .await?;
                let response = expect_status(url, response, &[StatusCode::OK]).await?;
                let media_type = header_str(response.headers(), header::CONTENT_TYPE);
                let served_digest = header_str(response.headers(), "docker-content-digest");
                let bytes = self.read_capped(url, response, limit).await?;
                Ok((bytes, media_type, served_digest))
            }
            .await;
            let (bytes, media_type, served_digest) = match result {
                Ok(ok) => ok,
                Err(error) if error.is_retriable() && attempt < self.config.retries => {
                    attempt += 1;
                    self.back_off(url, attempt, &error).await;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let digest = Digest::of(&bytes);
            let verify = |wanted: &Digest| {
                if *wanted == digest {
                    Ok(())
                } else {
                    Err(RegistryError::Verify {
                        url: url.to_string(),
                        error: VerifyError::Digest {
                            expected: wanted.clone(),
                            actual: digest.clone(),
                        },
                    })
                }
            };
            if let Some(expected) = expected {
                verify(expected)?;
            }
            if let Some(served) = served_digest
                .as_deref()
                .and_then(|d| d.parse::<Digest>().ok())
            {
                verify(&served)?;
            }
            debug!(url, %digest, size = bytes.len(), "fetched manifest");
            return Ok(FetchedManifest {
                bytes,
                media_type,
                digest,
                source: url.to_string(),
            });
        }
    }

    /// Streams a blob into `sink`, verified against `descriptor`; returns the URL that served
    /// it. Endpoints are tried in order; a digest mismatch resets the sink and moves on.
    pub async fn fetch_blob<S: BlobSink>(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> Result<String, RegistryError> {
        let mut errors = Vec::new();
        let mut dirty = false;
        for endpoint in self.endpoints(reference) {
            if dirty {
                sink.reset()
                    .await
                    .map_err(|e| RegistryError::Sink(e.to_string()))?;
                dirty = false;
            }
            let url = format!(
                "{}/v2/{}/blobs/{}",
                endpoint.base, reference.repository, descriptor.digest
            );
            match self
                .fetch_blob_from(&endpoint, reference, &url, descriptor, sink, &mut dirty)
                .await
            {
                Ok(()) => return Ok(url),
                Err(error @ RegistryError::Sink(_)) => return Err(error),
                Err(error) => {
                    warn!(%error, "blob fetch failed, trying the next endpoint if any");
                    self.endpoint_failed(&endpoint, reference, &error);
                    errors.push(error);
                }
            }
        }
        Err(RegistryError::AllEndpointsFailed {
            what: format!("blob {}", descriptor.digest),
            errors,
        })
    }

    /// Reads bytes `range` of the blob `descriptor` names (a `Range` request), trying the
    /// endpoints in order and retrying each as a whole-blob fetch would.
    ///
    /// The bytes are **not** verified here: a range cannot be checked against the blob's
    /// digest. The caller checks them against what it trusts for that range (the lazy format's
    /// chunk index, a zTOC span digest) before using them. A server that ignores `Range` and
    /// answers `200` with the whole blob still yields exactly the range (the bytes before it
    /// are read and dropped), and [`BlobRange::ranges_ignored`] tells the caller so it can
    /// switch to one streamed download.
    pub async fn fetch_blob_range(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        range: Range<u64>,
    ) -> Result<BlobRange, RegistryError> {
        if range.start >= range.end || range.end > descriptor.size {
            return Err(RegistryError::InvalidRange {
                digest: descriptor.digest.clone(),
                start: range.start,
                end: range.end,
                size: descriptor.size,
            });
        }
        let mut errors = Vec::new();
        for endpoint in self.endpoints(reference) {
            let url = format!(
                "{}/v2/{}/blobs/{}",
                endpoint.base, reference.repository, descriptor.digest
            );
            let mut attempt = 0;
            let result = loop {
                match self
                    .fetch_range_from(&endpoint, reference, &url, range.clone())
                    .await
                {
                    Err(error) if error.is_retriable() && attempt < self.config.retries => {
                        attempt += 1;
                        self.back_off(&url, attempt, &error).await;
                    }
                    other => break other,
                }
            };
            match result {
                Ok(read) => return Ok(read),
                Err(error) => {
                    warn!(%error, "ranged blob read failed, trying the next endpoint if any");
                    self.endpoint_failed(&endpoint, reference, &error);
                    errors.push(error);
                }
            }
        }
        Err(RegistryError::AllEndpointsFailed {
            what: format!(
                "bytes {}..{} of blob {}",
                range.start, range.end, descriptor.digest
            ),
            errors,
        })
    }

    async fn fetch_range_from(
        &self,
        endpoint: &Endpoint,
        reference: &Reference,
        url: &str,
        range: Range<u64>,
    ) -> Result<BlobRange, RegistryError> {
        let wanted = range.end - range.start;
        let response = self
            .send(endpoint, &reference.repository, url, |request| {
                request.header(
                    header::RANGE,
                    format!("bytes={}-{}", range.start, range.end - 1),
                )
            })
            .await?;
        let mut response = expect_status(
            url,
            response,
            &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
        )
        .await?;
        let ranges_ignored = response.status() == StatusCode::OK;
        if !ranges_ignored {
            let content_range =
                header_str(response.headers(), header::CONTENT_RANGE).unwrap_or_default();
            if content_range_bounds(&content_range) != Some((range.start, range.end - 1)) {
                return Err(RegistryError::BadRange {
                    url: url.to_string(),
                    content_range,
                    offset: range.start,
                });
            }
        }
        let mut skip = if ranges_ignored { range.start } else { 0 };
        // `wanted` is at most the blob's size, which the caller bounded by its descriptor.
        let mut bytes = BytesMut::with_capacity(usize::try_from(wanted).unwrap_or(0));
        let stall = self.stall_timeout();
        while (bytes.len() as u64) < wanted {
            let chunk = match within(url, stall, response.chunk()).await? {
                None => break,
                Some(chunk) => chunk,
            };
            let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
            skip -= drop as u64;
            let chunk = &chunk[drop..];
            let room = usize::try_from(wanted - bytes.len() as u64).unwrap_or(usize::MAX);
            bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if (bytes.len() as u64) < wanted {
            return Err(RegistryError::Truncated {
                url: url.to_string(),
                got: bytes.len() as u64,
                expected: wanted,
            });
        }
        debug!(
            url,
            start = range.start,
            len = wanted,
            ranges_ignored,
            "fetched blob range"
        );
        Ok(BlobRange {
            bytes: bytes.freeze(),
            url: url.to_string(),
            ranges_ignored,
        })
    }

    async fn fetch_blob_from<S: BlobSink>(
        &self,
        endpoint: &Endpoint,
        reference: &Reference,
        url: &str,
        descriptor: &Descriptor,
        sink: &mut S,
        dirty: &mut bool,
    ) -> Result<(), RegistryError> {
        let mut verifier = BlobVerifier::new(descriptor);
        // A sink that refused the data: keep reading to tell a bad source (digest mismatch)
        // from bad content (the digest matches, the content is what it is).
        let mut sink_error: Option<String> = None;
        let mut attempt = 0;
        let stall = self.stall_timeout();
        while verifier.received() < descriptor.size {
            let offset = verifier.received();
            let result: Result<(), RegistryError> = async {
                let response = self
                    .send(endpoint, &reference.repository, url, |request| {
                        if offset > 0 {
                            request.header(header::RANGE, format!("bytes={offset}-"))
                        } else {
                            request
                        }
                    })
                    .await?;
                let response = expect_status(
                    url,
                    response,
                    &[StatusCode::OK, StatusCode::PARTIAL_CONTENT],
                )
                .await?;
                // A server that ignores Range resends from the start: skip what we have.
                let mut skip = offset;
                if response.status() == StatusCode::PARTIAL_CONTENT {
                    let content_range =
                        header_str(response.headers(), header::CONTENT_RANGE).unwrap_or_default();
                    if range_start(&content_range) != Some(offset) {
                        return Err(RegistryError::BadRange {
                            url: url.to_string(),
                            content_range,
                            offset,
                        });
                    }
                    skip = 0;
                }
                let mut response = response;
                loop {
                    let chunk = match within(url, stall, response.chunk()).await? {
                        None => return Ok(()),
                        Some(chunk) => chunk,
                    };
                    let chunk = if skip > 0 {
                        let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                        skip -= drop as u64;
                        chunk.slice(drop..)
                    } else {
                        chunk
                    };
                    if chunk.is_empty() {
                        continue;
                    }
                    verifier
                        .update(&chunk)
                        .map_err(|error| RegistryError::Verify {
                            url: url.to_string(),
                            error,
                        })?;
                    if sink_error.is_none() {
                        *dirty = true;
                        if let Err(error) = sink.write(chunk).await {
                            if error.fatal {
                                return Err(RegistryError::Sink(error.to_string()));
                            }
                            sink_error = Some(error.to_string());
                        }
                    }
                }
            }
            .await;
            let error = match result {
                Ok(()) if verifier.received() >= descriptor.size => break,
                Ok(()) => RegistryError::Truncated {
                    url: url.to_string(),
                    got: verifier.received(),
                    expected: descriptor.size,
                },
                Err(error) => error,
            };
            if !error.is_retriable() || attempt >= self.config.retries {
                return Err(error);
            }
            attempt += 1;
            self.back_off(url, attempt, &error).await;
        }
        verifier.finish().map_err(|error| RegistryError::Verify {
            url: url.to_string(),
            error,
        })?;
        match sink_error {
            Some(error) => Err(RegistryError::Sink(error)),
            None => Ok(()),
        }
    }

    pub(super) async fn back_off(&self, url: &str, attempt: u32, error: &RegistryError) {
        let delay = self.config.backoff(attempt);
        info!(url, attempt, ?delay, %error, "retrying");
        tokio::time::sleep(delay).await;
    }

    /// Sends a GET with the pull scope; see [`RegistryClient::send_as`].
    async fn send(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        url: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let scope = format!("repository:{repository}:pull");
        self.send_as(endpoint, &scope, Method::GET, url, build)
            .await
    }

    /// Sends a request (built by `build` on a fresh request each time), answering an
    /// authentication challenge once. `scope` is one or more token scopes separated by spaces.
    /// Credentials and tokens go only to the endpoint's own origin: a URL elsewhere (an upload
    /// `Location` on a storage host) is sent without them. Errors are returned, not retried:
    /// the callers retry whole operations (request and body) with backoff.
    pub(super) async fn send_as(
        &self,
        endpoint: &Endpoint,
        scope: &str,
        method: Method,
        url: &str,
        build: impl Fn(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let stall = self.stall_timeout();
        let authorized = same_origin(url, &endpoint.base);
        let mut answered_challenge = false;
        loop {
            let mut request = build(self.http.request(method.clone(), url));
            if authorized && let Some(authorization) = self.authorization(endpoint, scope).await? {
                request = request.header(header::AUTHORIZATION, authorization);
            }
            let response = within(url, stall, request.send()).await?;
            let status = response.status();
            if status != StatusCode::UNAUTHORIZED {
                if status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT
                {
                    return Err(RegistryError::Status {
                        url: url.to_string(),
                        status: status.as_u16(),
                        body: String::new(),
                    });
                }
                return Ok(response);
            }
            // 401: answer the challenge once (a cached token may just have expired).
            if answered_challenge || !authorized {
                return Err(RegistryError::Unauthorized {
                    url: url.to_string(),
                    detail: "credentials or token refused".into(),
                });
            }
            let challenge = header_str(response.headers(), header::WWW_AUTHENTICATE);
            let challenge = Challenge::parse(challenge.as_deref().unwrap_or_default())?;
            debug!(url, ?challenge, "authentication challenge");
            if challenge == Challenge::Basic && self.credentials.get(&endpoint.host).is_none() {
                return Err(RegistryError::Unauthorized {
                    url: url.to_string(),
                    detail: format!("no credentials for {}", endpoint.host),
                });
            }
            let mut cache = self.lock_auth();
            cache
                .tokens
                .remove(&(endpoint.base.clone(), scope.to_string()));
            cache.challenges.insert(endpoint.base.clone(), challenge);
            drop(cache);
            answered_challenge = true;
        }
    }

    fn lock_unreachable(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // A map of deadlines: no invariant a panic could break.
        self.unreachable_mirrors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthCache> {
        // The cache holds no invariant a panic could break: keep using it.
        self.auth
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The `Authorization` value for a request, after a challenge was seen for the endpoint.
    async fn authorization(
        &self,
        endpoint: &Endpoint,
        scope: &str,
    ) -> Result<Option<String>, RegistryError> {
        let key = (endpoint.base.clone(), scope.to_string());
        let challenge = {
            let cache = self.lock_auth();
            let Some(challenge) = cache.challenges.get(&endpoint.base).cloned() else {
                return Ok(None);
            };
            if let Some(token) = cache.tokens.get(&key)
                && token.refresh_at > Instant::now()
            {
                return Ok(Some(format!("Bearer {}", token.value)));
            }
            challenge
        };
        let credential = self.credentials.get(&endpoint.host);
        // Where the credentials would go is the registry's (or a mirror's) word: check it.
        let withheld = |target: &str| match self.config.may_send_credentials(&endpoint.host, target)
        {
            Ok(()) => false,
            Err(reason) => {
                if credential.is_some() {
                    warn!(registry = %endpoint.host, target, %reason, "credentials withheld");
                }
                true
            }
        };
        match challenge {
            Challenge::Basic => {
                if withheld(&endpoint.base) {
                    return Ok(None);
                }
                Ok(credential.map(|c| basic_authorization(&c.username, &c.password)))
            }
            Challenge::Bearer { realm, service, .. } => {
                let credential = credential.filter(|_| !withheld(&realm));
                let mut request = self.http.get(&realm);
                // One `scope` parameter per scope, as the token spec asks.
                for scope in scope.split_whitespace() {
                    request = request.query(&[("scope", scope)]);
                }
                if let Some(service) = &service {
                    request = request.query(&[("service", service.as_str())]);
                }
                if let Some(credential) = credential {
                    request = request.basic_auth(&credential.username, Some(&credential.password));
                }
                let stall = self.stall_timeout();
                let response = within(&realm, stall, request.send()).await?;
                if response.status() == StatusCode::UNAUTHORIZED
                    || response.status() == StatusCode::FORBIDDEN
                {
                    return Err(RegistryError::Unauthorized {
                        url: realm,
                        detail: "the token service refused the credentials".into(),
                    });
                }
                let response = expect_status(&realm, response, &[StatusCode::OK]).await?;
                let body = self
                    .read_capped(&realm, response, MAX_TOKEN_RESPONSE)
                    .await?;
                let token = serde_json::from_slice::<TokenResponse>(&body)
                    .ok()
                    .and_then(|t| t.into_token(Instant::now()))
                    .ok_or_else(|| RegistryError::Unauthorized {
                        url: realm.clone(),
                        detail: "the token service sent no token".into(),
                    })?;
                debug!(realm, scope, "got a bearer token");
                let value = format!("Bearer {}", token.value);
                self.lock_auth().tokens.insert(key, token);
                Ok(Some(value))
            }
        }
    }

    /// Reads a whole body of at most `limit` bytes.
    pub(super) async fn read_capped(
        &self,
        url: &str,
        mut response: Response,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let too_large = || RegistryError::TooLarge {
            url: url.to_string(),
            limit,
        };
        // Taken now: reqwest's figure shrinks as the body is read.
        let declared = response.content_length();
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let stall = self.stall_timeout();
        let mut body = Vec::new();
        loop {
            match within(url, stall, response.chunk()).await? {
                None => break,
                Some(chunk) => {
                    if (body.len() as u64).saturating_add(chunk.len() as u64) > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
            }
        }
        if let Some(expected) = declared
            && expected != body.len() as u64
        {
            return Err(RegistryError::Truncated {
                url: url.to_string(),
                got: body.len() as u64,
                expected,
            });
        }
        Ok(body)
    }
}

fn basic_authorization(username: &str, password: &str) -> String {
    use base64::Engine as _;
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    format!("Basic {encoded}")
}

pub(super) fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_string)
}

/// What a transport error was, down to its root cause: `reqwest` alone says only "error sending
/// request for url", which hides whether the connection was refused, the name did not resolve,
/// TLS failed or the server timed out.
fn transport_cause(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else if error.is_body() || error.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let mut causes: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let text = cause.to_string();
        // Each level often repeats the one below; keep the new words only.
        if !causes.iter().any(|c| c.contains(&text)) {
            causes.retain(|c| !text.contains(c.as_str()));
            causes.push(text);
        }
        source = cause.source();
    }
    if causes.is_empty() {
        format!("{kind}: {error}")
    } else {
        format!("{kind}: {}", causes.join(": "))
    }
}

/// Awaits one step of an HTTP exchange (the answer's headers, the next body chunk), failing it
/// as stalled when nothing happens for `stall`.
pub(super) async fn within<T>(
    url: &str,
    stall: Duration,
    step: impl Future<Output = reqwest::Result<T>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(stall, step).await {
        Err(_) => Err(RegistryError::Stalled {
            url: url.to_string(),
            after: stall,
        }),
        Ok(Err(source)) => Err(RegistryError::Transport {
            url: url.to_string(),
            source,
        }),
        Ok(Ok(value)) => Ok(value),
    }
}

/// `bytes START-END/TOTAL` → (START, END).
fn content_range_bounds(content_range: &str) -> Option<(u64, u64)> {
    let (start, rest) = content_range
        .trim()
        .strip_prefix("bytes ")?
        .split_once('-')?;
    let end = rest.split('/').next()?;
    Some((start.trim().parse().ok()?, end.trim().parse().ok()?))
}

/// `bytes START-END/TOTAL` → START.
fn range_start(content_range: &str) -> Option<u64> {
    content_range
        .trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether two URLs have the same scheme, host and port.
pub(super) fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// Passes `response` on if its status is one of `wanted`, else turns it into an error.
pub(super) async fn expect_status(
    url: &str,
    response: Response,
    wanted: &[StatusCode],
) -> Result<Response, RegistryError> {
    if wanted.contains(&response.status()) {
        return Ok(response);
    }
    let status = response.status().as_u16();
    // The body only explains the status: read at most MAX_ERROR_READ bytes of it, for at most
    // two seconds, whatever the server sends.
    let mut response = response;
    let mut body = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while body.len() < MAX_ERROR_READ {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let room = MAX_ERROR_READ - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            _ => break,
        }
    }
    Err(RegistryError::Status {
        url: url.to_string(),
        status,
        body: describe_error_body(&body),
    })
}

/// The distribution API's error document, `{"errors":[{"code":…,"message":…,"detail":…}]}`.
#[derive(serde::Deserialize)]
struct ErrorDocument {
    errors: Vec<ErrorEntry>,
}

#[derive(serde::Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// What an error body says, at most [`MAX_ERROR_BODY`] characters: the codes and messages of a
/// distribution error document, else the start of the text. The body comes from the registry
/// (untrusted): control characters are dropped so it cannot rewrite the operator's terminal.
fn describe_error_body(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<ErrorDocument>(body) {
        Ok(document) if !document.errors.is_empty() => document
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (false, true) => e.code.clone(),
                _ => e.message.clone(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(body).into_owned(),
    };
    text.trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_BODY)
        .collect()
}

/// An image in a registry, as an [`ImageSource`].
#[derive(Debug, Clone, Copy)]
pub struct RegistrySource<'a> {
    /// The client.
    pub client: &'a RegistryClient,
    /// The image.
    pub reference: &'a Reference,
}

impl ImageSource for RegistrySource<'_> {
    type Error = RegistryError;

    fn describe(&self) -> String {
        self.reference.to_string()
    }

    fn platform(&self) -> Platform {
        self.client.platform.clone()
    }

    fn max_config_bytes(&self) -> u64 {
        self.client.config.max_config_bytes
    }

    async fn fetch_root_manifest(&self) -> Result<FetchedManifest, RegistryError> {
        self.client
            .fetch_manifest(self.reference, &self.reference.manifest_target())
            .await
    }

    async fn fetch_manifest(&self, digest: &Digest) -> Result<FetchedManifest, RegistryError> {
        self.client
            .fetch_manifest(self.reference, &digest.to_string())
            .await
    }

    async fn fetch_blob<S: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> Result<String, RegistryError> {
        self.client
            .fetch_blob(self.reference, descriptor, sink)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_registry_that_gave_no_answer_is_out_of_reach() {
        let status = |status| RegistryError::Status {
            url: "http://r.example/v2/".into(),
            status,
            body: String::new(),
        };
        let all = |errors| RegistryError::AllEndpointsFailed {
            what: "manifest".into(),
            errors,
        };
        assert!(status(503).is_unreachable());
        assert!(!status(404).is_unreachable());
        assert!(!status(401).is_unreachable());
        assert!(all(vec![status(502), status(500)]).is_unreachable());
        assert!(
            !all(vec![status(502), status(404)]).is_unreachable(),
            "one endpoint answered: the image is not there"
        );
        assert!(!all(Vec::new()).is_unreachable());
    }

    #[test]
    fn endpoints_mirrors_first() {
        let mut config = RegistryConfig::default();
        config.mirrors.insert(
            "docker.io".into(),
            vec![
                "https://m1.example/".into(),
                "http://127.0.0.1:5001/prefix".into(),
            ],
        );
        let client = RegistryClient::new(config).unwrap();
        let reference: Reference = "debian".parse().unwrap();
        let endpoints = client.endpoints(&reference);
        let bases: Vec<&str> = endpoints.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "https://m1.example",
                "http://127.0.0.1:5001/prefix",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(endpoints[1].host, "127.0.0.1:5001");
        assert_eq!(endpoints[2].host, "docker.io");
        let local: Reference = "127.0.0.1:5000/x".parse().unwrap();
        assert_eq!(client.endpoints(&local)[0].base, "http://127.0.0.1:5000");
    }

    #[tokio::test]
    async fn an_unreachable_mirror_is_skipped_for_a_while_and_the_registry_never() {
        let mut config = RegistryConfig::default();
        config.mirrors.insert(
            "127.0.0.1:5000".into(),
            vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:2".into()],
        );
        config.connect_timeout_ms = 200;
        let client = RegistryClient::new(config).unwrap();
        let reference: Reference = "127.0.0.1:5000/x".parse().unwrap();
        let unreachable = client
            .http
            .get("http://127.0.0.1:1/")
            .send()
            .await
            .map(|_| ())
            .unwrap_err();
        let transport = |url: &str| RegistryError::Transport {
            url: url.into(),
            source: unreachable,
        };
        let endpoints = client.endpoints(&reference);
        client.endpoint_failed(
            &endpoints[0],
            &reference,
            &transport("http://127.0.0.1:1/v2/"),
        );
        let bases = |client: &RegistryClient| -> Vec<String> {
            client
                .endpoints(&reference)
                .into_iter()
                .map(|e| e.base)
                .collect()
        };
        assert_eq!(
            bases(&client),
            ["http://127.0.0.1:2", "http://127.0.0.1:5000"]
        );
        // An answer with an error status is not "unreachable"; the registry itself stays.
        let status = RegistryError::Status {
            url: "u".into(),
            status: 500,
            body: String::new(),
        };
        client.endpoint_failed(&endpoints[1], &reference, &status);
        client.endpoint_failed(&endpoints[2], &reference, &status);
        assert_eq!(
            bases(&client),
            ["http://127.0.0.1:2", "http://127.0.0.1:5000"]
        );
        // Once the cooldown is over, the mirror is tried again.
        client
            .lock_unreachable()
            .values_mut()
            .for_each(|until| *until = Instant::now());
        assert_eq!(bases(&client).len(), 3);
    }

    #[test]
    fn error_bodies_are_summarized_and_capped() {
        let document = br#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:00"},{"code":"DENIED"}]}"#;
        assert_eq!(
            describe_error_body(document),
            "MANIFEST_BLOB_UNKNOWN: blob unknown to registry; DENIED"
        );
        assert_eq!(
            describe_error_body(b"  plain\ntext\x1b[2J "),
            "plain text [2J"
        );
        assert_eq!(describe_error_body(&[b'x'; 4000]).len(), MAX_ERROR_BODY);
        assert_eq!(describe_error_body(br#"{"errors":[]}"#), r#"{"errors":[]}"#);
    }

    #[test]
    fn origins() {
        assert!(same_origin("http://h:5000/v2/x?y=1", "http://h:5000"));
        assert!(same_origin("https://h/v2/", "https://h:443"));
        assert!(!same_origin("http://h:5001/v2/", "http://h:5000"));
        assert!(!same_origin("https://h:5000/v2/", "http://h:5000"));
        assert!(!same_origin("http://other:5000/v2/", "http://h:5000"));
        assert!(!same_origin("/v2/relative", "http://h:5000"));
    }

    #[test]
    fn content_range() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes */200"), None);
        assert_eq!(range_start("items 1-2/3"), None);
        assert_eq!(content_range_bounds("bytes 100-199/200"), Some((100, 199)));
        assert_eq!(content_range_bounds("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(content_range_bounds("bytes */200"), None);
        assert_eq!(content_range_bounds("bytes 100/200"), None);
    }
}
