//! What every image destination provides: where a converted (or copied) image is written.
//!
//! A destination (a registry repository, an OCI layout directory) implements
//! [`ImageDestination`]: it stores blobs (skipping those it holds, mounting those it can get
//! from elsewhere without the bytes) and manifests, under their digests and, for the image
//! itself, under the destination's tag. The pipelines that write images (the image
//! conversion) are elsewhere; this is the counterpart of [`crate::source`].

use std::future::Future;
use std::path::PathBuf;

use bytes::Bytes;
use serde::Serialize;

use crate::manifest::Descriptor;
use crate::reference::Digest;

/// The bytes of a blob to store.
#[derive(Debug, Clone)]
pub enum BlobData {
    /// Small blobs (configs), in memory.
    Bytes(Bytes),
    /// Large blobs (layers), streamed from a file so they are never all in memory.
    File(PathBuf),
}

/// How a blob got into the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobOutcome {
    /// The destination already held it: nothing was sent.
    Existed,
    /// The registry linked it from another repository (a cross-repository mount): nothing
    /// was sent.
    Mounted,
    /// Its bytes were sent (uploaded to a registry, written into a layout).
    Stored,
}

/// A manifest or index, serialized, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedManifest {
    /// The JSON bytes.
    pub bytes: Vec<u8>,
    /// Its media type (the registry's `Content-Type`).
    pub media_type: String,
    /// The digest of `bytes`.
    pub digest: Digest,
}

impl EncodedManifest {
    /// Wraps serialized bytes.
    pub fn new(bytes: Vec<u8>, media_type: &str) -> Self {
        EncodedManifest {
            digest: Digest::of(&bytes),
            bytes,
            media_type: media_type.to_string(),
        }
    }

    /// A descriptor for it (no platform, no annotations).
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            &self.media_type,
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }
}

/// Where images are written: a registry repository or an OCI layout directory.
pub trait ImageDestination: Sync {
    /// The destination's error.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The destination's name (e.g. `host/repo:tag`, `oci:DIR:TAG`).
    fn describe(&self) -> String;
    /// Makes the blob present without sending its bytes when the destination can (it holds
    /// it already, or mounts it from another repository); `None` when the bytes are needed.
    fn reuse_blob(
        &self,
        descriptor: &Descriptor,
    ) -> impl Future<Output = Result<Option<BlobOutcome>, Self::Error>> + Send;
    /// Stores a blob whose bytes are in `data` (still skipping it when it is there).
    fn put_blob(
        &self,
        descriptor: &Descriptor,
        data: BlobData,
    ) -> impl Future<Output = Result<BlobOutcome, Self::Error>> + Send;
    /// Stores a manifest or index by digest; with `tagged`, also under the destination's tag
    /// (the image's root document, stored after everything it references).
    fn put_manifest(
        &self,
        manifest: &EncodedManifest,
        tagged: bool,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
