//! OCI image layout directories as an image source.
//!
//! A layout is `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`), `index.json` and
//! `blobs/sha256/<hex>`. An image is found by tag through the
//! `org.opencontainers.image.ref.name` annotation of `index.json`'s entries (or by digest);
//! from there it is the same manifest → config → layers walk as with a registry, and every
//! file is checked against its digest like a download.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::manifest::{Descriptor, ImageIndex, Platform};
use crate::reference::Digest;
use crate::source::{BlobSink, BlobVerifier, FetchedManifest, ImageSource, VerifyError};

/// The annotation naming an image in a layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Largest `index.json` or manifest read.
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Read size for blobs.
const READ_CHUNK: usize = 1 << 20;

/// Errors of layout sources.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not an OCI layout, or a malformed `index.json`.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No image by that name.
    #[error("{layout}: no image named {name:?} (available: {available})")]
    NotFound {
        /// The layout directory.
        layout: PathBuf,
        /// The name asked for.
        name: String,
        /// The names present.
        available: String,
    },
    /// A document is larger than allowed.
    #[error("{path}: larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// A blob does not match its digest or size.
    #[error("{path}: {error}")]
    Verify {
        /// The file.
        path: PathBuf,
        /// What did not match.
        error: VerifyError,
    },
    /// The sink refused the blob.
    #[error("storing the blob: {0}")]
    Sink(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

/// An opened OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
    index: ImageIndex,
}

impl OciLayout {
    /// Opens a layout: checks `oci-layout` and reads `index.json`.
    pub fn open(root: &Path) -> Result<OciLayout, LayoutError> {
        let marker_path = root.join("oci-layout");
        let marker: LayoutMarker = serde_json::from_slice(&read_capped(&marker_path, 4096)?)
            .map_err(|e| LayoutError::Invalid {
                path: marker_path.clone(),
                reason: e.to_string(),
            })?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(LayoutError::Invalid {
                path: marker_path,
                reason: format!("unsupported layout version {}", marker.image_layout_version),
            });
        }
        let index_path = root.join("index.json");
        let index = serde_json::from_slice(&read_capped(&index_path, MAX_DOCUMENT_BYTES)?)
            .map_err(|e| LayoutError::Invalid {
                path: index_path,
                reason: e.to_string(),
            })?;
        Ok(OciLayout {
            root: root.to_path_buf(),
            index,
        })
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The names (`ref.name` annotations) of the images in the layout.
    pub fn names(&self) -> Vec<String> {
        self.index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME_ANNOTATION).cloned())
            .collect()
    }

    /// The `index.json` entry for `name`: a `ref.name` annotation equal to it (or to its tag
    /// part), a digest, or — with an empty name — the only entry.
    pub fn find(&self, name: &str) -> Result<&Descriptor, LayoutError> {
        let entries = &self.index.manifests;
        let found = if name.is_empty() {
            match entries.as_slice() {
                [only] => Some(only),
                _ => None,
            }
        } else if let Ok(digest) = name.parse::<Digest>() {
            entries.iter().find(|d| d.digest == digest)
        } else {
            let annotated = |d: &&Descriptor| d.annotations.get(REF_NAME_ANNOTATION).cloned();
            entries
                .iter()
                .find(|d| annotated(d).as_deref() == Some(name))
                .or_else(|| {
                    entries
                        .iter()
                        .find(|d| annotated(d).is_some_and(|a| a.rsplit(':').next() == Some(name)))
                })
        };
        found.ok_or_else(|| LayoutError::NotFound {
            layout: self.root.clone(),
            name: name.to_string(),
            available: self.names().join(", "),
        })
    }

    /// Where the layout keeps the blob `digest` (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    /// Reads a manifest blob, verified.
    fn read_manifest(&self, descriptor: &Descriptor) -> Result<FetchedManifest, LayoutError> {
        let path = self.blob_path(&descriptor.digest);
        let bytes = read_capped(&path, MAX_DOCUMENT_BYTES)?;
        let mut verifier = BlobVerifier::new(descriptor);
        verifier
            .update(&bytes)
            .and_then(|()| verifier.finish())
            .map_err(|error| LayoutError::Verify {
                path: path.clone(),
                error,
            })?;
        Ok(FetchedManifest {
            bytes,
            media_type: Some(descriptor.media_type.clone()).filter(|m| !m.is_empty()),
            digest: descriptor.digest.clone(),
            source: path.display().to_string(),
        })
    }
}

fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, LayoutError> {
    let io_error = |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io_error)?.len();
    if len > limit {
        return Err(LayoutError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    std::fs::read(path).map_err(io_error)
}

/// One image of a layout, as an [`ImageSource`].
#[derive(Debug, Clone)]
pub struct OciLayoutSource<'a> {
    /// The layout.
    pub layout: &'a OciLayout,
    /// The image's name in the layout (tag), a digest, or empty for the only image.
    pub name: String,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// Largest config accepted.
    pub max_config_bytes: u64,
}

impl<'a> OciLayoutSource<'a> {
    /// The image `name` of `layout` for the default platform.
    pub fn new(layout: &'a OciLayout, name: &str) -> Self {
        OciLayoutSource {
            layout,
            name: name.to_string(),
            platform: Platform::default(),
            max_config_bytes: 8 << 20,
        }
    }
}

impl ImageSource for OciLayoutSource<'_> {
    type Error = LayoutError;

    fn describe(&self) -> String {
        format!("oci:{}:{}", self.layout.root.display(), self.name)
    }

    fn platform(&self) -> Platform {
        self.platform.clone()
    }

    fn max_config_bytes(&self) -> u64 {
        self.max_config_bytes
    }

    async fn fetch_root_manifest(&self) -> Result<FetchedManifest, LayoutError> {
        let descriptor = self.layout.find(&self.name)?;
        self.layout.read_manifest(descriptor)
    }

    async fn fetch_manifest(&self, digest: &Digest) -> Result<FetchedManifest, LayoutError> {
        let path = self.layout.blob_path(digest);
        let size = std::fs::metadata(&path)
            .map_err(|source| LayoutError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        self.layout.read_manifest(&Descriptor {
            media_type: String::new(),
            digest: digest.clone(),
            size,
            platform: None,
            annotations: Default::default(),
            urls: Vec::new(),
        })
    }

    async fn fetch_blob<S: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> Result<String, LayoutError> {
        let path = self.layout.blob_path(&descriptor.digest);
        let io_error = |source| LayoutError::Io {
            path: path.clone(),
            source,
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
        let mut verifier = BlobVerifier::new(descriptor);
        let mut sink_error = None;
        loop {
            let mut buffer = vec![0; READ_CHUNK];
            let n = file.read(&mut buffer).await.map_err(io_error)?;
            if n == 0 {
                break;
            }
            buffer.truncate(n);
            verifier
                .update(&buffer)
                .map_err(|error| LayoutError::Verify {
                    path: path.clone(),
                    error,
                })?;
            if sink_error.is_none()
                && let Err(error) = sink.write(Bytes::from(buffer)).await
            {
                if error.fatal {
                    return Err(LayoutError::Sink(error.message));
                }
                sink_error = Some(error.message);
            }
        }
        verifier.finish().map_err(|error| LayoutError::Verify {
            path: path.clone(),
            error,
        })?;
        match sink_error {
            Some(message) => Err(LayoutError::Sink(message)),
            None => Ok(path.display().to_string()),
        }
    }
}
