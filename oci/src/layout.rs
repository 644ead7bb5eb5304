//! OCI image layout directories as an image source.
//!
//! A layout is `oci-layout` (`{"imageLayoutVersion":"1.0.0"}`), `index.json` and
//! `blobs/sha256/<hex>`. An image is found by tag through the
//! `org.opencontainers.image.ref.name` annotation of `index.json`'s entries (or by digest);
//! from there it is the same manifest → config → layers walk as with a registry, and every
//! file is checked against its digest like a download.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::destination::{BlobData, BlobOutcome, EncodedManifest, ImageDestination};
use crate::fsutil;
use crate::manifest::{Descriptor, ImageIndex, OCI_INDEX, Platform};
use crate::reference::Digest;
use crate::source::{BlobSink, BlobVerifier, FetchedManifest, ImageSource, VerifyError};

/// The annotation naming an image in a layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Largest `index.json` or manifest read.
const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Read size for blobs.
const READ_CHUNK: usize = 1 << 20;
/// The content of `oci-layout` that [`LayoutWriter`] writes.
const LAYOUT_MARKER: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Errors of layout sources and destinations. Messages include their causes (none is a
/// `source`, which reporters printing the chain would repeat).
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
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
        check_marker(&root.join("oci-layout"))?;
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

    /// Every `index.json` entry, named or not (unnamed ones are often referrers: artifacts
    /// with a `subject`).
    pub fn entries(&self) -> &[Descriptor] {
        &self.index.manifests
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
        blob_path(&self.root, digest)
    }

    /// Reads a manifest blob, verified.
    pub fn read_manifest(&self, descriptor: &Descriptor) -> Result<FetchedManifest, LayoutError> {
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

/// Checks a layout's `oci-layout` file.
fn check_marker(marker_path: &Path) -> Result<(), LayoutError> {
    let marker: LayoutMarker =
        serde_json::from_slice(&read_capped(marker_path, 4096)?).map_err(|e| {
            LayoutError::Invalid {
                path: marker_path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
    if !marker.image_layout_version.starts_with("1.") {
        return Err(LayoutError::Invalid {
            path: marker_path.to_path_buf(),
            reason: format!("unsupported layout version {}", marker.image_layout_version),
        });
    }
    Ok(())
}

/// Where a layout keeps the blob `digest`.
fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs").join("sha256").join(digest.hex())
}

fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, LayoutError> {
    let io_error = |error| io_at(path)(error);
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
        let size = std::fs::metadata(&path).map_err(io_at(&path))?.len();
        self.layout
            .read_manifest(&Descriptor::new("", digest.clone(), size))
    }

    async fn fetch_blob<S: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> Result<String, LayoutError> {
        let path = self.layout.blob_path(&descriptor.digest);
        let io_error = |error| io_at(&path)(error);
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

/// Creates or extends an OCI image layout directory: blobs and `index.json` entries.
///
/// Each file is written under a temporary name in its final directory, synced and renamed
/// into place (then the directory is synced), so readers see whole files only and a crash
/// leaves the previous state. Two writers adding names to one layout at the same time may
/// lose one of the names (the last `index.json` wins); blobs are never lost.
#[derive(Debug, Clone)]
pub struct LayoutWriter {
    root: PathBuf,
}

impl LayoutWriter {
    /// Opens the layout at `root` for writing, creating the directory, `oci-layout` and an empty
    /// `index.json` when missing; an existing layout must be version 1.
    pub fn create(root: &Path) -> Result<LayoutWriter, LayoutError> {
        let blobs = root.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        let marker = root.join("oci-layout");
        if marker.exists() {
            check_marker(&marker)?;
        } else {
            write_atomically(&marker, |file| file.write_all(LAYOUT_MARKER))?;
        }
        let index = root.join("index.json");
        if !index.exists() {
            let empty = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []});
            write_atomically(&index, |file| file.write_all(&json_bytes(&empty)))?;
        }
        Ok(LayoutWriter {
            root: root.to_path_buf(),
        })
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the layout holds the blob `descriptor` names (a file of the right size: files
    /// only ever appear complete).
    pub fn has_blob(&self, descriptor: &Descriptor) -> Result<bool, LayoutError> {
        let path = blob_path(&self.root, &descriptor.digest);
        match std::fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file() && meta.len() == descriptor.size),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_at(&path)(error)),
        }
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<Digest, LayoutError> {
        let digest = Digest::of(bytes);
        let path = blob_path(&self.root, &digest);
        write_atomically(&path, |file| file.write_all(bytes))?;
        Ok(digest)
    }

    /// Stores the file `from` as the blob `descriptor` names, checking it on the way: a file
    /// that does not match is not stored.
    pub fn copy_blob(&self, descriptor: &Descriptor, from: &Path) -> Result<(), LayoutError> {
        let path = blob_path(&self.root, &descriptor.digest);
        let mut input = std::fs::File::open(from).map_err(io_at(from))?;
        // The verifier's error, kept apart from I/O errors to name the file that is wrong.
        let mut mismatch = None;
        let result = write_atomically(&path, |file| {
            let mut verifier = BlobVerifier::new(descriptor);
            let mut fail = |error: VerifyError| {
                mismatch = Some(error.clone());
                std::io::Error::other(error)
            };
            let mut buffer = vec![0; READ_CHUNK];
            loop {
                let n = input.read(&mut buffer)?;
                let Some(chunk) = buffer.get(..n).filter(|c| !c.is_empty()) else {
                    break;
                };
                verifier.update(chunk).map_err(&mut fail)?;
                file.write_all(chunk)?;
            }
            verifier.finish().map_err(fail)
        });
        match (result, mismatch) {
            (Err(_), Some(error)) => Err(LayoutError::Verify {
                path: from.to_path_buf(),
                error,
            }),
            (result, _) => result,
        }
    }

    /// Lists the manifest or index `descriptor` names in `index.json` under `name` (its
    /// `org.opencontainers.image.ref.name`), replacing the entry that had the name; with an
    /// empty name, adds an unnamed entry unless one for the same digest is there. Other
    /// entries and fields of `index.json` are kept.
    pub fn name_image(&self, descriptor: &Descriptor, name: &str) -> Result<(), LayoutError> {
        let path = self.root.join("index.json");
        let invalid = |reason: &str| LayoutError::Invalid {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let mut index: serde_json::Value =
            serde_json::from_slice(&read_capped(&path, MAX_DOCUMENT_BYTES)?)
                .map_err(|e| invalid(&e.to_string()))?;
        let object = index
            .as_object_mut()
            .ok_or_else(|| invalid("not a JSON object"))?;
        object
            .entry("mediaType")
            .or_insert_with(|| OCI_INDEX.into());
        let manifests = object
            .entry("manifests")
            .or_insert_with(|| json!([]))
            .as_array_mut()
            .ok_or_else(|| invalid("manifests is not an array"))?;
        let ref_name = |entry: &serde_json::Value| {
            entry["annotations"][REF_NAME_ANNOTATION]
                .as_str()
                .map(str::to_string)
        };
        let digest = descriptor.digest.to_string();
        manifests.retain(|entry| {
            if name.is_empty() {
                ref_name(entry).is_some() || entry["digest"] != digest.as_str()
            } else {
                ref_name(entry).as_deref() != Some(name)
            }
        });
        let mut entry = json!({
            "mediaType": descriptor.media_type,
            "digest": digest,
            "size": descriptor.size,
        });
        if let Some(artifact_type) = &descriptor.artifact_type {
            entry["artifactType"] = artifact_type.as_str().into();
        }
        if !name.is_empty() {
            entry["annotations"] = json!({ REF_NAME_ANNOTATION: name });
        }
        manifests.push(entry);
        write_atomically(&path, |file| file.write_all(&json_bytes(&index)))
    }
}

/// An image of a layout being written, as an [`ImageDestination`].
#[derive(Debug, Clone)]
pub struct LayoutDestination {
    /// The layout.
    pub writer: LayoutWriter,
    /// The name (`ref.name`) the image gets; empty for an unnamed `index.json` entry.
    pub name: String,
}

impl LayoutDestination {
    /// Runs blocking file work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(LayoutWriter) -> Result<T, LayoutError> + Send + 'static,
    ) -> Result<T, LayoutError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || work(writer))
            .await
            .unwrap_or_else(|join| {
                Err(io_at(&self.writer.root)(std::io::Error::other(
                    join.to_string(),
                )))
            })
    }
}

impl ImageDestination for LayoutDestination {
    type Error = LayoutError;

    fn describe(&self) -> String {
        if self.name.is_empty() {
            format!("oci:{}", self.writer.root.display())
        } else {
            format!("oci:{}:{}", self.writer.root.display(), self.name)
        }
    }

    async fn reuse_blob(
        &self,
        descriptor: &Descriptor,
    ) -> Result<Option<BlobOutcome>, LayoutError> {
        Ok(self
            .writer
            .has_blob(descriptor)?
            .then_some(BlobOutcome::Existed))
    }

    async fn put_blob(
        &self,
        descriptor: &Descriptor,
        data: BlobData,
    ) -> Result<BlobOutcome, LayoutError> {
        if self.writer.has_blob(descriptor)? {
            return Ok(BlobOutcome::Existed);
        }
        let descriptor = descriptor.clone();
        self.blocking(move |writer| match data {
            BlobData::File(path) => writer.copy_blob(&descriptor, &path),
            BlobData::Bytes(bytes) => {
                let mut verifier = BlobVerifier::new(&descriptor);
                verifier
                    .update(&bytes)
                    .and_then(|()| verifier.finish())
                    .map_err(|error| LayoutError::Verify {
                        path: blob_path(writer.root(), &descriptor.digest),
                        error,
                    })?;
                writer.write_blob(&bytes).map(drop)
            }
        })
        .await?;
        Ok(BlobOutcome::Stored)
    }

    async fn put_manifest(
        &self,
        manifest: &EncodedManifest,
        tagged: bool,
    ) -> Result<(), LayoutError> {
        let manifest = manifest.clone();
        let name = self.name.clone();
        self.blocking(move |writer| {
            writer.write_blob(&manifest.bytes)?;
            if tagged {
                writer.name_image(&manifest.descriptor(), &name)?;
            }
            Ok(())
        })
        .await
    }
}

/// `index.json` and friends, pretty-printed as other tools write them.
fn json_bytes(value: &serde_json::Value) -> Vec<u8> {
    // Serializing a `Value` cannot fail (its keys are strings).
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + '_ {
    move |error| LayoutError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// [`fsutil::write_atomic_with`], with the layout's error.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<(), LayoutError> {
    fsutil::write_atomic_with(path, write).map_err(io_at(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_layout_opens_and_names_replace_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layout");
        let writer = LayoutWriter::create(&root).unwrap();
        assert!(OciLayout::open(&root).unwrap().names().is_empty());

        let one = Descriptor::of(crate::manifest::OCI_MANIFEST, b"{\"one\":1}");
        assert!(!writer.has_blob(&one).unwrap());
        assert_eq!(writer.write_blob(b"{\"one\":1}").unwrap(), one.digest);
        assert!(writer.has_blob(&one).unwrap());
        writer.name_image(&one, "v1").unwrap();
        let two = Descriptor::of(crate::manifest::OCI_MANIFEST, b"{\"two\":2}");
        writer.write_blob(b"{\"two\":2}").unwrap();
        writer.name_image(&two, "v2").unwrap();
        writer.name_image(&two, "v1").unwrap();
        writer.name_image(&two, "").unwrap();
        writer.name_image(&two, "").unwrap();

        // Reopening an existing layout keeps what it holds.
        let writer = LayoutWriter::create(&root).unwrap();
        assert!(writer.has_blob(&one).unwrap());
        let layout = OciLayout::open(&root).unwrap();
        let mut names = layout.names();
        names.sort();
        assert_eq!(names, ["v1", "v2"]);
        assert_eq!(layout.find("v1").unwrap().digest, two.digest);
        assert_eq!(layout.index.manifests.len(), 3, "{:?}", layout.index);
        // No temporary file is left behind.
        let leftovers: Vec<_> = std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_copied_blob_is_checked_and_a_bad_one_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LayoutWriter::create(&dir.path().join("layout")).unwrap();
        let source = dir.path().join("blob");
        let bytes = vec![7u8; 3 * READ_CHUNK + 5];
        std::fs::write(&source, &bytes).unwrap();
        let good = Descriptor::of("application/octet-stream", &bytes);
        writer.copy_blob(&good, &source).unwrap();
        assert!(writer.has_blob(&good).unwrap());

        let mut bad = Descriptor::of("application/octet-stream", b"other");
        bad.size = bytes.len() as u64;
        let error = writer.copy_blob(&bad, &source).unwrap_err();
        assert!(matches!(error, LayoutError::Verify { .. }), "{error}");
        assert!(!writer.has_blob(&bad).unwrap());
        let entries = std::fs::read_dir(writer.root().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(entries, 1, "only the good blob is there");
    }

    #[test]
    fn a_foreign_layout_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"2.0.0"}"#,
        )
        .unwrap();
        assert!(LayoutWriter::create(dir.path()).is_err());
    }
}
