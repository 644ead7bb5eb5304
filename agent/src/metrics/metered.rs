//! [`MeteredSource`]: an image source whose requests count into a registry's
//! [`SourceCounters`]: one request per manifest or blob asked for (the client's own retries and
//! mirrors inside it), the bytes that arrived (a blob that started over counts both tries: they
//! crossed the network), and the requests that failed.

use bytes::Bytes;
use gantry_oci::Digest;
use gantry_oci::manifest::{Descriptor, Platform};
use gantry_oci::source::{BlobSink, FetchedManifest, ImageSource, SinkError};

use super::SourceCounters;

/// `inner`, counted.
#[derive(Debug)]
pub struct MeteredSource<'a, S> {
    inner: &'a S,
    counters: SourceCounters,
}

impl<'a, S> MeteredSource<'a, S> {
    /// Counts `inner`'s requests into `counters`.
    pub fn new(inner: &'a S, counters: SourceCounters) -> Self {
        Self { inner, counters }
    }

    fn count_manifest<E>(&self, fetched: &Result<FetchedManifest, E>) {
        match fetched {
            Ok(manifest) => self.counters.request(manifest.bytes.len() as u64, false),
            Err(_) => self.counters.request(0, true),
        }
    }
}

/// Passes a blob on to `inner`, counting its bytes.
struct ByteCounter<'s, K> {
    inner: &'s mut K,
    bytes: u64,
}

impl<K: BlobSink> BlobSink for ByteCounter<'_, K> {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        self.bytes += chunk.len() as u64;
        self.inner.write(chunk).await
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.inner.reset().await
    }
}

impl<S: ImageSource> ImageSource for MeteredSource<'_, S> {
    type Error = S::Error;

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn platform(&self) -> Platform {
        self.inner.platform()
    }

    fn max_config_bytes(&self) -> u64 {
        self.inner.max_config_bytes()
    }

    async fn fetch_root_manifest(&self) -> Result<FetchedManifest, Self::Error> {
        let fetched = self.inner.fetch_root_manifest().await;
        self.count_manifest(&fetched);
        fetched
    }

    async fn fetch_manifest(&self, digest: &Digest) -> Result<FetchedManifest, Self::Error> {
        let fetched = self.inner.fetch_manifest(digest).await;
        self.count_manifest(&fetched);
        fetched
    }

    async fn fetch_blob<K: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut K,
    ) -> Result<String, Self::Error> {
        let mut counted = ByteCounter {
            inner: sink,
            bytes: 0,
        };
        let fetched = self.inner.fetch_blob(descriptor, &mut counted).await;
        self.counters.request(counted.bytes, fetched.is_err());
        fetched
    }
}
