//! What every image source provides, and how its bytes are checked.
//!
//! A source (a registry, an OCI layout directory, later a peer or a bundle) implements
//! [`ImageSource`]: it hands out manifests already checked against their digests and streams
//! blobs into a [`BlobSink`] through a [`BlobVerifier`]. The pipeline that consumes sources (the
//! agent's pull into its cache) lives with its policy, not here.

use std::future::Future;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::manifest::{Descriptor, Platform};
use crate::reference::Digest;

/// A manifest as fetched, already checked against its digest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The `Content-Type` the source gave, if any.
    pub media_type: Option<String>,
    /// The digest of `bytes`.
    pub digest: Digest,
    /// Where it came from (a URL or a file path).
    pub source: String,
}

/// Why a blob failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The content hashes to another digest.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// The digest asked for.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// More or fewer bytes than the descriptor's size.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    Size {
        /// The descriptor's size.
        expected: u64,
        /// Bytes that arrived (at least, when too many).
        actual: u64,
    },
}

/// Hashes and counts a blob as it streams; [`BlobVerifier::finish`] checks it.
#[derive(Debug)]
pub struct BlobVerifier {
    expected: Digest,
    size: u64,
    received: u64,
    hasher: Sha256,
}

impl BlobVerifier {
    /// A verifier for the blob `descriptor` names.
    pub fn new(descriptor: &Descriptor) -> Self {
        BlobVerifier {
            expected: descriptor.digest.clone(),
            size: descriptor.size,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Bytes seen so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Adds bytes; fails as soon as they exceed the declared size.
    pub fn update(&mut self, bytes: &[u8]) -> Result<(), VerifyError> {
        let received = self.received.saturating_add(bytes.len() as u64);
        if received > self.size {
            return Err(VerifyError::Size {
                expected: self.size,
                actual: received,
            });
        }
        self.received = received;
        self.hasher.update(bytes);
        Ok(())
    }

    /// Checks size and digest.
    pub fn finish(self) -> Result<(), VerifyError> {
        if self.received != self.size {
            return Err(VerifyError::Size {
                expected: self.size,
                actual: self.received,
            });
        }
        let actual = Digest::from_sha256(self.hasher.finalize().into());
        if actual != self.expected {
            return Err(VerifyError::Digest {
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }
}

/// A sink refused bytes.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    /// A local failure (disk full, I/O): stop now. Otherwise the content was refused and the
    /// source should still check the digest, to tell a corrupt source from a bad blob.
    pub fatal: bool,
    /// What happened.
    pub message: String,
}

/// Where a source streams a blob.
pub trait BlobSink: Send {
    /// The next bytes of the blob.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send;
    /// Forgets everything written: the source failed and the blob starts over from another.
    fn reset(&mut self) -> impl Future<Output = Result<(), SinkError>> + Send;
}

/// Where images come from: a registry or an OCI layout directory.
pub trait ImageSource: Sync {
    /// The source's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The image's name, used as the cache record's name (e.g. `host/repo:tag`).
    fn describe(&self) -> String;
    /// The platform to pick from an index.
    fn platform(&self) -> Platform;
    /// Largest config blob accepted.
    fn max_config_bytes(&self) -> u64;
    /// The manifest the source's reference names (tag or digest), verified.
    fn fetch_root_manifest(
        &self,
    ) -> impl Future<Output = Result<FetchedManifest, Self::Error>> + Send;
    /// A manifest by digest, verified.
    fn fetch_manifest(
        &self,
        digest: &Digest,
    ) -> impl Future<Output = Result<FetchedManifest, Self::Error>> + Send;
    /// Streams a blob into `sink`, verified against `descriptor`; returns where it came from.
    fn fetch_blob<S: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> impl Future<Output = Result<String, Self::Error>> + Send;
}

/// Collects a small blob in memory (the verifier refuses more than the declared size, which
/// the caller checked against its limit).
#[derive(Debug, Default)]
pub struct MemorySink {
    /// What arrived.
    pub bytes: Vec<u8>,
}

impl BlobSink for MemorySink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.bytes.extend_from_slice(&chunk);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.bytes.clear();
        Ok(())
    }
}

/// How often a [`CountingSink`] reports.
const REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Passes a blob on to `inner`, calling `report` with the bytes received so far a few times a
/// second and when the last byte arrives (so live displays stay cheap); after a reset (the
/// source starts over) the next report counts from 0 again.
#[derive(Debug)]
pub struct CountingSink<S, F> {
    inner: S,
    size: u64,
    received: u64,
    reported_at: Option<std::time::Instant>,
    report: F,
}

impl<S, F: Fn(u64) + Send> CountingSink<S, F> {
    /// Counts a blob of `size` bytes on its way to `inner`.
    pub fn new(inner: S, size: u64, report: F) -> Self {
        CountingSink {
            inner,
            size,
            received: 0,
            reported_at: None,
            report,
        }
    }

    /// The sink the bytes went to.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: BlobSink, F: Fn(u64) + Send> BlobSink for CountingSink<S, F> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.received += chunk.len() as u64;
        let due = self
            .reported_at
            .is_none_or(|at| at.elapsed() >= REPORT_INTERVAL);
        if due || self.received == self.size {
            self.reported_at = Some(std::time::Instant::now());
            (self.report)(self.received);
        }
        self.inner.write(chunk).await
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.received = 0;
        self.reported_at = None;
        self.inner.reset().await
    }
}

/// Why [`fetch_config`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFetchError<E: std::error::Error + 'static> {
    /// The descriptor declares more than the source accepts.
    #[error("config {digest} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Its digest.
        digest: Digest,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The source failed.
    #[error(transparent)]
    Source(E),
}

/// Fetches an image config blob into memory, verified, refusing one larger than the source's
/// [`ImageSource::max_config_bytes`] before any byte is read.
pub async fn fetch_config<S: ImageSource>(
    source: &S,
    descriptor: &Descriptor,
) -> Result<Vec<u8>, ConfigFetchError<S::Error>> {
    let limit = source.max_config_bytes();
    if descriptor.size > limit {
        return Err(ConfigFetchError::TooLarge {
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            limit,
        });
    }
    let mut sink = MemorySink::default();
    source
        .fetch_blob(descriptor, &mut sink)
        .await
        .map_err(ConfigFetchError::Source)?;
    Ok(sink.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(bytes: &[u8]) -> Descriptor {
        Descriptor::of("", bytes)
    }

    #[tokio::test]
    async fn counting_reports_the_first_and_last_bytes_and_restarts_after_a_reset() {
        let reports = std::sync::Mutex::new(Vec::new());
        let mut sink = CountingSink::new(MemorySink::default(), 6, |n| {
            reports.lock().unwrap().push(n)
        });
        for chunk in [&b"ab"[..], b"cd", b"ef"] {
            sink.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        sink.reset().await.unwrap();
        sink.write(Bytes::from_static(b"abcdef")).await.unwrap();
        // The first write and the last byte are always reported (a slow machine may add the
        // middle one), then the restart counts from 0.
        assert_eq!(sink.into_inner().bytes, b"abcdef");
        let reports = reports.into_inner().unwrap();
        assert!(
            reports == [2, 6, 6] || reports == [2, 4, 6, 6],
            "{reports:?}"
        );
    }

    #[test]
    fn verifier_checks_size_and_digest() {
        let d = descriptor(b"hello world");
        let mut v = BlobVerifier::new(&d);
        v.update(b"hello ").unwrap();
        v.update(b"world").unwrap();
        v.finish().unwrap();

        let mut v = BlobVerifier::new(&d);
        v.update(b"hello").unwrap();
        assert!(matches!(v.finish(), Err(VerifyError::Size { .. })));

        let mut v = BlobVerifier::new(&d);
        assert!(matches!(
            v.update(b"hello world!"),
            Err(VerifyError::Size { .. })
        ));

        let mut v = BlobVerifier::new(&d);
        v.update(b"hello w0rld").unwrap();
        assert!(matches!(v.finish(), Err(VerifyError::Digest { .. })));
    }
}
