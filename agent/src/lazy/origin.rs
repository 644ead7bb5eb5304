//! Where a lazy layer's bytes come from: a [`BlobOrigin`] reads byte ranges of one layer blob.
//! The fetcher asks peers first ([`PeerRoutes`], DESIGN §5), then the layer's own origins in
//! order (the registry with its mirrors, a file); the bytes are unverified until the fetcher
//! checks them against the chunk index.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures::future::BoxFuture;
use gantry_oci::Reference;
use gantry_oci::manifest::Descriptor;
use gantry_oci::registry::RegistryClient;
use gantry_oci::source::{BlobSink, SinkError};

use crate::metrics::SourceKind;

/// Errors of reading a range from an origin.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    /// The registry failed (after its own retries and mirrors).
    #[error(transparent)]
    Registry(#[from] gantry_oci::registry::RegistryError),
    /// A local file failed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task died.
    #[error("origin task: {0}")]
    Task(String),
    /// The origin cannot stream whole blobs.
    #[error("{0} cannot stream the whole blob")]
    NoStreaming(String),
    /// A peer does not hold the bytes (yet): not a failure of the peer.
    #[error("{0} does not hold these bytes")]
    NotHeld(String),
    /// A peer failed (refused, timed out, stalled, answered wrongly).
    #[error("{origin}: {reason}")]
    Peer {
        /// The peer.
        origin: String,
        /// What happened.
        reason: String,
    },
}

/// Receives a whole blob, in order from its first byte, while it downloads.
pub trait StreamReceiver: Send {
    /// The next bytes. An error stops the download.
    fn receive(&mut self, bytes: &[u8]) -> Result<(), String>;
    /// The download starts over from the first byte (another endpoint took over).
    fn reset(&mut self);
}

/// One place that holds a layer blob and serves byte ranges of it.
pub trait BlobOrigin: Send + Sync + fmt::Debug {
    /// Reads exactly `range` of the blob (unverified).
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>>;

    /// Reads `range` of the blob, appending to `into` as bytes arrive. On failure what arrived
    /// stays in `into`, so the next origin resumes at the byte this one reached (and a future
    /// dropped by a timeout keeps what it appended).
    fn read_range_into<'a>(
        &'a self,
        range: Range<u64>,
        into: &'a mut Vec<u8>,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(async move {
            let bytes = self.read_range(range).await?;
            into.extend_from_slice(&bytes);
            Ok(())
        })
    }

    /// Bytes this origin sent failed verification: a peer goes on backoff and is counted.
    fn delivered_bad_bytes(&self) {}

    /// A name for logs and errors (`registry.example/app@sha256:…`, a file path).
    fn describe(&self) -> String;

    /// Whether the origin was seen to ignore `Range` and send whole blobs: the fetcher then
    /// streams the blob once ([`Self::stream_blob`]) rather than asking chunk by chunk.
    fn ignores_ranges(&self) -> bool {
        false
    }

    /// The registry (`host[:port]` as references name it) this origin reaches, mirrors
    /// included, for per-registry limits; `None` for origins that are no registry.
    fn registry(&self) -> Option<&str> {
        None
    }

    /// The registry or peer this origin's requests count for in the metrics (by default its
    /// [`Self::registry`]); `None`: not counted (a local file).
    fn counted_as(&self) -> Option<(SourceKind, &str)> {
        self.registry().map(|host| (SourceKind::Registry, host))
    }

    /// Downloads the whole blob into `receiver` (verified against the blob's digest at the
    /// end, where the origin can).
    fn stream_blob<'a>(
        &'a self,
        receiver: &'a mut dyn StreamReceiver,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        let _ = receiver;
        Box::pin(async move { Err(OriginError::NoStreaming(self.describe())) })
    }
}

/// The peer agents, as the fetcher sees them (implemented by the `peer` module).
pub trait PeerRoutes: Send + Sync + fmt::Debug {
    /// Origins reading blob `blob` from the live peers, in the order to ask them for bytes whose
    /// first chunk has `key` (its checksum): the peer owning `key` by rendezvous hashing first.
    fn origins(&self, blob: &gantry_oci::Digest, key: &[u8]) -> Vec<Arc<dyn BlobOrigin>>;

    /// Who fetches `key` from the registry: this agent (`None`), or the live peer that owns it
    /// (its URL).
    fn owner(&self, key: &[u8]) -> Option<String>;

    /// Whether any peer is configured at all.
    fn is_empty(&self) -> bool;
}

/// A [`StreamReceiver`] as the registry client's blob sink.
struct ReceiverSink<'a>(&'a mut dyn StreamReceiver);

impl BlobSink for ReceiverSink<'_> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.0.receive(&chunk).map_err(|message| SinkError {
            fatal: true,
            message,
        })
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.0.reset();
        Ok(())
    }
}

/// A layer blob in a registry (with the client's mirrors, auth and retries).
#[derive(Debug)]
pub struct RegistryOrigin {
    client: Arc<RegistryClient>,
    reference: Reference,
    descriptor: Descriptor,
    ranges_ignored: AtomicBool,
}

impl RegistryOrigin {
    /// The blob `descriptor` names, in the repository of `reference`.
    pub fn new(client: Arc<RegistryClient>, reference: Reference, descriptor: Descriptor) -> Self {
        Self {
            client,
            reference,
            descriptor,
            ranges_ignored: AtomicBool::new(false),
        }
    }
}

impl BlobOrigin for RegistryOrigin {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>> {
        Box::pin(async move {
            let read = self
                .client
                .fetch_blob_range(&self.reference, &self.descriptor, range)
                .await?;
            if read.ranges_ignored {
                self.ranges_ignored.store(true, Ordering::Relaxed);
            }
            Ok(read.bytes)
        })
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}@{}",
            self.reference.registry, self.reference.repository, self.descriptor.digest
        )
    }

    fn ignores_ranges(&self) -> bool {
        self.ranges_ignored.load(Ordering::Relaxed)
    }

    fn registry(&self) -> Option<&str> {
        Some(&self.reference.registry)
    }

    fn stream_blob<'a>(
        &'a self,
        receiver: &'a mut dyn StreamReceiver,
    ) -> BoxFuture<'a, Result<(), OriginError>> {
        Box::pin(async move {
            let mut sink = ReceiverSink(receiver);
            self.client
                .fetch_blob(&self.reference, &self.descriptor, &mut sink)
                .await?;
            Ok(())
        })
    }
}

/// A layer blob in a local file (an OCI layout's `blobs/sha256/…`, an imported bundle).
#[derive(Debug)]
pub struct FileOrigin {
    path: PathBuf,
}

impl FileOrigin {
    /// The blob stored at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }
}

impl BlobOrigin for FileOrigin {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, OriginError>> {
        let path = self.path.clone();
        Box::pin(async move {
            let error_path = path.clone();
            tokio::task::spawn_blocking(move || {
                let file = File::open(&path)?;
                let len = usize::try_from(range.end.saturating_sub(range.start))
                    .map_err(|_| std::io::Error::other("range too large"))?;
                let mut bytes = vec![0u8; len];
                file.read_exact_at(&mut bytes, range.start)?;
                Ok(Bytes::from(bytes))
            })
            .await
            .map_err(|error| OriginError::Task(error.to_string()))?
            .map_err(|source| OriginError::File {
                path: error_path,
                source,
            })
        })
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
