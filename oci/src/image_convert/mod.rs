//! Image conversion: every layer of an image (one platform, or every platform of an index)
//! turned into the lazy EROFS format of erofs-image-spec v1, and the converted image written
//! to an [`ImageDestination`] (a registry repository or an OCI layout).
//!
//! For each manifest: the config is fetched; the layers are handled a few at a time
//! ([`ImageConvertOptions::parallel_layers`]): a tar layer (tar, tar+gzip, tar+zstd) is
//! fetched and verified, converted into EROFS ([`crate::convert_layer`], whiteouts becoming
//! overlayfs whiteouts), cut into 1 MiB zstd chunks with a chunk index
//! ([`crate::chunked::write_chunked_layer`]) and stored; a layer that is already EROFS is
//! copied as it is. Then come the config (`documents::config`), the manifest and, for an
//! index, the new index (`documents`). Everything a document references is stored before it,
//! and the tagged root last, so no reader of the destination sees a dangling reference.
//!
//! Output is deterministic: the EROFS writer, the chunked writer and the documents' JSON are,
//! so converting the same image twice gives the same digests (and a second push finds every
//! blob in place). Converting a converted image gives it back unchanged.
//!
//! - `documents`: config, manifest and index rewriting (pure functions).
//! - `layer`: one layer: fetch, convert, chunk, store; or copy.

pub mod documents;
mod layer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use tracing::debug;

pub use documents::DocumentError;
pub use layer::LayerError;

use crate::chunked::ChunkedLayerOptions;
use crate::convert::ConvertOptions;
use crate::destination::{BlobData, BlobOutcome, EncodedManifest, ImageDestination};
use crate::manifest::{
    Descriptor, ImageIndex, ImageManifest, ManifestDocument, ManifestError, OCI_CONFIG, OCI_INDEX,
    OCI_MANIFEST, Platform, RootFs,
};
use crate::reference::Digest;
use crate::source::{self, ConfigFetchError, FetchedManifest, ImageSource};

/// Which manifests of a multi-platform image to convert.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PlatformSelection {
    /// Every image manifest of the index (attestations and `unknown/unknown` entries are
    /// skipped: they describe the source's manifests, not the converted ones).
    #[default]
    All,
    /// The one an index lists for this platform (as a pull picks it).
    Only(Platform),
}

/// How to convert.
#[derive(Debug, Clone, Default)]
pub struct ImageConvertOptions {
    /// The manifests of an index to convert (a single-manifest image is converted whatever
    /// this says).
    pub platforms: PlatformSelection,
    /// Limits of the tar → EROFS conversion (`lowest_layer` is set per layer).
    pub convert: ConvertOptions,
    /// Chunk size and zstd level of the EROFS blobs.
    pub chunked: ChunkedLayerOptions,
    /// Where work files go (a temporary directory is made inside); the system's temporary
    /// directory by default.
    pub work_dir: Option<PathBuf>,
    /// Layers handled at once (at least 1; 0 means the default of 2).
    pub parallel_layers: usize,
}

/// What a conversion reports while it runs.
#[derive(Debug, Clone)]
pub enum ConvertEvent {
    /// A manifest is being converted.
    ManifestStarted {
        /// Its platform, when an index names it.
        platform: Option<String>,
        /// The source manifest.
        digest: Digest,
        /// Its layers.
        layers: usize,
    },
    /// An index entry is left out.
    ManifestSkipped {
        /// Its digest.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// A layer's download started.
    LayerFetching {
        /// Unique within the conversion.
        id: usize,
        /// Position in its manifest.
        index: usize,
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// Bytes of a layer received so far (a few times a second; 0 again when the fetch starts
    /// over from another source).
    LayerBytes {
        /// As in `LayerFetching`.
        id: usize,
        /// Bytes received.
        received: u64,
        /// The blob's size.
        size: u64,
    },
    /// A layer is downloaded and being converted.
    LayerConverting {
        /// As in `LayerFetching`.
        id: usize,
        /// Position in its manifest.
        index: usize,
        /// The source blob.
        digest: Digest,
    },
    /// A layer is converted.
    LayerConverted {
        /// As in `LayerFetching`.
        id: usize,
        /// Position in its manifest.
        index: usize,
        /// The source blob.
        source: Digest,
        /// The EROFS blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// The EROFS image's size.
        uncompressed_size: u64,
        /// Chunks in its index.
        chunks: usize,
        /// Fetch and conversion time.
        seconds: f64,
    },
    /// A blob is in the destination.
    BlobStored {
        /// The layer's id, for layers.
        id: Option<usize>,
        /// What it is (`layer`, `config`, …).
        what: &'static str,
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// How it got there.
        outcome: BlobOutcome,
    },
    /// A manifest or index is in the destination.
    ManifestStored {
        /// Its digest.
        digest: Digest,
        /// Its media type.
        media_type: String,
        /// Whether it was stored under the destination's tag (the image itself).
        tagged: bool,
    },
}

/// A plain line for an event (byte counts are for live displays: `None`).
pub fn describe(event: &ConvertEvent) -> Option<String> {
    let short = |digest: &Digest| digest.hex().get(..12).unwrap_or_default().to_string();
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    Some(match event {
        ConvertEvent::ManifestStarted {
            platform,
            digest,
            layers,
        } => format!(
            "converting manifest {}{} ({layers} layer{})",
            short(digest),
            platform
                .as_ref()
                .map(|p| format!(" for {p}"))
                .unwrap_or_default(),
            if *layers == 1 { "" } else { "s" }
        ),
        ConvertEvent::ManifestSkipped { digest, reason } => {
            format!("skipping manifest {}: {reason}", short(digest))
        }
        ConvertEvent::LayerFetching {
            index,
            digest,
            size,
            ..
        } => format!(
            "layer {index}: fetching {} ({:.1} MiB)",
            short(digest),
            mib(*size)
        ),
        ConvertEvent::LayerBytes { .. } => return None,
        ConvertEvent::LayerConverting { index, .. } => format!("layer {index}: converting"),
        ConvertEvent::LayerConverted {
            index,
            digest,
            size,
            uncompressed_size,
            chunks,
            seconds,
            ..
        } => format!(
            "layer {index}: EROFS {} ({:.1} MiB image, {:.1} MiB in {chunks} chunks) in {seconds:.1}s",
            short(digest),
            mib(*uncompressed_size),
            mib(*size)
        ),
        ConvertEvent::BlobStored {
            what,
            digest,
            outcome,
            ..
        } => {
            let how = match outcome {
                BlobOutcome::Existed => "already there",
                BlobOutcome::Mounted => "mounted",
                BlobOutcome::Stored => "stored",
            };
            format!("{what} {}: {how}", short(digest))
        }
        ConvertEvent::ManifestStored {
            digest,
            media_type,
            tagged,
        } => {
            let what = if media_type == OCI_INDEX {
                "index"
            } else {
                "manifest"
            };
            let tag = if *tagged { " (tagged)" } else { "" };
            format!("{what} {} stored{tag}", short(digest))
        }
    })
}

/// Receives [`ConvertEvent`]s.
pub type Progress<'a> = &'a (dyn Fn(&ConvertEvent) + Send + Sync);

/// What a conversion wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedImage {
    /// The source, as it describes itself.
    pub source: String,
    /// The destination, likewise.
    pub destination: String,
    /// The root document's digest (what the tag names).
    pub digest: Digest,
    /// Its media type (an OCI manifest or index).
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// The converted manifests.
    pub manifests: Vec<ConvertedManifest>,
}

/// One converted manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedManifest {
    /// The platform, when an index named it.
    pub platform: Option<String>,
    /// The source manifest.
    pub source_digest: Digest,
    /// The converted manifest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// The converted config.
    pub config_digest: Digest,
    /// Its layers, bottom first.
    pub layers: Vec<ConvertedLayer>,
}

/// One layer of a converted manifest.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertedLayer {
    /// The source layer.
    pub source_digest: Digest,
    /// Its media type.
    pub source_media_type: String,
    /// The layer in the converted manifest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// Its DiffID (the uncompressed EROFS image's digest).
    pub diff_id: Digest,
    /// Converted from tar (else copied).
    pub converted: bool,
    /// Chunks in its index, for converted layers.
    pub chunks: Option<usize>,
    /// How the blob got into the destination.
    pub blob: BlobOutcome,
}

/// Errors of converting an image. Each message includes its cause, so none is a `source`
/// (reporters that print the chain would repeat it).
#[derive(Debug, thiserror::Error)]
pub enum ImageConvertError {
    /// The source failed (network, auth, digest mismatch, …).
    #[error("{image}: {error}")]
    Source {
        /// The source image.
        image: String,
        /// The source's error.
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The destination failed.
    #[error("{destination}: {error}")]
    Destination {
        /// The destination.
        destination: String,
        /// Its error.
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A source manifest or index is unusable.
    #[error("{image}: {what} {digest}: {error}")]
    Manifest {
        /// The source image.
        image: String,
        /// Which document.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// The parser's error.
        error: Box<ManifestError>,
    },
    /// A source document cannot be rewritten.
    #[error("{image}: {what} {digest}: {error}")]
    Document {
        /// The source image.
        image: String,
        /// Which document.
        what: &'static str,
        /// Its digest.
        digest: Digest,
        /// What is wrong.
        error: DocumentError,
    },
    /// A layer cannot be converted or copied.
    #[error("{image}: layer {digest}: {error}")]
    Layer {
        /// The source image.
        image: String,
        /// The source layer.
        digest: Digest,
        /// What went wrong.
        error: LayerError,
    },
    /// The image's shape is not supported.
    #[error("{image}: {reason}")]
    Unsupported {
        /// The source image.
        image: String,
        /// What is not supported.
        reason: String,
    },
    /// The work directory cannot be made.
    #[error("making a work directory in {path}: {error}")]
    WorkDir {
        /// Where.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
}

/// A layer, converted or copied, before its place in the stack is known.
#[derive(Debug, Clone)]
struct LayerDone {
    descriptor: Descriptor,
    diff_id: Digest,
    converted: bool,
    chunks: Option<usize>,
    outcome: BlobOutcome,
}

/// One conversion's state.
struct Run<'a, S, D> {
    source: &'a S,
    destination: &'a D,
    options: &'a ImageConvertOptions,
    progress: Progress<'a>,
    image: String,
    work: tempfile::TempDir,
    next_layer_id: AtomicUsize,
    /// Converted layers by (source digest, lowest): an index's platforms often share layers.
    converted: Mutex<HashMap<(Digest, bool), LayerDone>>,
}

/// Converts the image `source` names and writes it to `destination` (the root document under
/// the destination's tag).
pub async fn convert_image<S: ImageSource, D: ImageDestination>(
    source: &S,
    destination: &D,
    options: &ImageConvertOptions,
    progress: Progress<'_>,
) -> Result<ConvertedImage, ImageConvertError> {
    let work_parent = options.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("gantry-convert-")
        .tempdir_in(&work_parent)
        .map_err(|error| ImageConvertError::WorkDir {
            path: work_parent.clone(),
            error,
        })?;
    let run = Run {
        source,
        destination,
        options,
        progress,
        image: source.describe(),
        work,
        next_layer_id: AtomicUsize::new(0),
        converted: Mutex::new(HashMap::new()),
    };
    run.image().await
}

impl<S: ImageSource, D: ImageDestination> Run<'_, S, D> {
    fn source_error(&self, error: S::Error) -> ImageConvertError {
        ImageConvertError::Source {
            image: self.image.clone(),
            error: Box::new(error),
        }
    }

    fn destination_error(&self, error: D::Error) -> ImageConvertError {
        ImageConvertError::Destination {
            destination: self.destination.describe(),
            error: Box::new(error),
        }
    }

    fn layer_error(&self, layer: &Descriptor, error: LayerError) -> ImageConvertError {
        ImageConvertError::Layer {
            image: self.image.clone(),
            digest: layer.digest.clone(),
            error,
        }
    }

    fn document_error(
        &self,
        what: &'static str,
        digest: &Digest,
    ) -> impl FnOnce(DocumentError) -> ImageConvertError + '_ {
        let digest = digest.clone();
        move |error| ImageConvertError::Document {
            image: self.image.clone(),
            what,
            digest,
            error,
        }
    }

    fn parse(
        &self,
        what: &'static str,
        fetched: &FetchedManifest,
    ) -> Result<ManifestDocument, ImageConvertError> {
        let convertible = |media_type: &str| layer::LayerKind::of(media_type).is_ok();
        ManifestDocument::parse_with(&fetched.bytes, fetched.media_type.as_deref(), convertible)
            .map_err(|error| ImageConvertError::Manifest {
                image: self.image.clone(),
                what,
                digest: fetched.digest.clone(),
                error: Box::new(error),
            })
    }

    fn remembered(&self, key: &(Digest, bool)) -> Option<LayerDone> {
        let converted = self.converted.lock().unwrap_or_else(|p| p.into_inner());
        converted.get(key).map(|done| LayerDone {
            // Stored earlier in this run.
            outcome: BlobOutcome::Existed,
            ..done.clone()
        })
    }

    fn remember(&self, key: (Digest, bool), done: &LayerDone) {
        let mut converted = self.converted.lock().unwrap_or_else(|p| p.into_inner());
        converted.insert(key, done.clone());
    }

    async fn image(&self) -> Result<ConvertedImage, ImageConvertError> {
        let root = self
            .source
            .fetch_root_manifest()
            .await
            .map_err(|error| self.source_error(error))?;
        let (encoded, manifests) = match self.parse("manifest", &root)? {
            ManifestDocument::Image(manifest) => {
                let (converted, encoded) = self.manifest(&root, &manifest, None).await?;
                (encoded, vec![converted.summary])
            }
            ManifestDocument::Index(index) => self.index(&root, &index).await?,
        };
        self.store_manifest(&encoded, true).await?;
        debug!(
            source = self.image,
            destination = self.destination.describe(),
            digest = %encoded.digest,
            "converted image"
        );
        Ok(ConvertedImage {
            source: self.image.clone(),
            destination: self.destination.describe(),
            digest: encoded.digest.clone(),
            media_type: encoded.media_type.clone(),
            size: encoded.bytes.len() as u64,
            manifests,
        })
    }

    async fn store_manifest(
        &self,
        manifest: &EncodedManifest,
        tagged: bool,
    ) -> Result<(), ImageConvertError> {
        self.destination
            .put_manifest(manifest, tagged)
            .await
            .map_err(|error| self.destination_error(error))?;
        (self.progress)(&ConvertEvent::ManifestStored {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
            tagged,
        });
        Ok(())
    }

    /// Converts the selected entries of an index; returns the new index (not yet stored) and
    /// the converted manifests (stored).
    async fn index(
        &self,
        root: &FetchedManifest,
        index: &ImageIndex,
    ) -> Result<(EncodedManifest, Vec<ConvertedManifest>), ImageConvertError> {
        let raw_entries = documents::index_entries(&root.bytes)
            .map_err(self.document_error("index", &root.digest))?;
        let selected: Vec<usize> = match &self.options.platforms {
            PlatformSelection::Only(platform) => {
                let wanted =
                    index
                        .select(platform)
                        .map_err(|error| ImageConvertError::Manifest {
                            image: self.image.clone(),
                            what: "index",
                            digest: root.digest.clone(),
                            error: Box::new(error),
                        })?;
                let position = index
                    .manifests
                    .iter()
                    .position(|entry| std::ptr::eq(entry, wanted))
                    .unwrap_or_default();
                vec![position]
            }
            PlatformSelection::All => (0..index.manifests.len())
                .filter(|&position| match skip_reason(&index.manifests[position]) {
                    Some(reason) => {
                        (self.progress)(&ConvertEvent::ManifestSkipped {
                            digest: index.manifests[position].digest.clone(),
                            reason: reason.to_string(),
                        });
                        false
                    }
                    None => true,
                })
                .collect(),
        };
        if selected.is_empty() {
            return Err(ImageConvertError::Unsupported {
                image: self.image.clone(),
                reason: "the index lists no image manifest to convert".into(),
            });
        }
        let mut entries = Vec::new();
        let mut converted = Vec::new();
        for position in selected {
            let entry = &index.manifests[position];
            let fetched = self
                .source
                .fetch_manifest(&entry.digest)
                .await
                .map_err(|error| self.source_error(error))?;
            let ManifestDocument::Image(manifest) = self.parse("manifest", &fetched)? else {
                return Err(ImageConvertError::Unsupported {
                    image: self.image.clone(),
                    reason: format!("the index entry {} is itself an index", entry.digest),
                });
            };
            let platform = entry.platform.as_ref().map(Platform::to_string);
            let (result, encoded) = self.manifest(&fetched, &manifest, platform).await?;
            self.store_manifest(&encoded, false).await?;
            entries.push((position, encoded, result.config_bytes.clone()));
            converted.push(result.summary);
        }
        let index_entries = entries
            .iter()
            .map(|(position, encoded, config)| {
                let source = raw_entries.get(*position);
                Ok(documents::IndexEntry {
                    source,
                    digest: encoded.digest.clone(),
                    size: encoded.bytes.len() as u64,
                    platform: documents::platform(source, config)
                        .map_err(self.document_error("index", &root.digest))?,
                })
            })
            .collect::<Result<Vec<_>, ImageConvertError>>()?;
        let bytes = documents::index(&root.bytes, &index_entries)
            .map_err(self.document_error("index", &root.digest))?;
        Ok((EncodedManifest::new(bytes, OCI_INDEX), converted))
    }

    /// Converts one image manifest: layers, config, the manifest itself (returned, not
    /// stored: the caller knows whether it is tagged).
    async fn manifest(
        &self,
        fetched: &FetchedManifest,
        manifest: &ImageManifest,
        platform: Option<String>,
    ) -> Result<(ManifestResult, EncodedManifest), ImageConvertError> {
        (self.progress)(&ConvertEvent::ManifestStarted {
            platform: platform.clone(),
            digest: fetched.digest.clone(),
            layers: manifest.layers.len(),
        });
        if manifest.layers.is_empty() {
            // Nothing for overlayfs to mount (§3.8: the last layer must be a mountable one).
            return Err(ImageConvertError::Unsupported {
                image: self.image.clone(),
                reason: format!("manifest {} has no layers", fetched.digest),
            });
        }
        let source_config = source::fetch_config(self.source, &manifest.config)
            .await
            .map_err(|error| match error {
                ConfigFetchError::Source(error) => self.source_error(error),
                too_large @ ConfigFetchError::TooLarge { .. } => ImageConvertError::Unsupported {
                    image: self.image.clone(),
                    reason: too_large.to_string(),
                },
            })?;
        // Only the DiffIDs are needed from the parsed form (for EROFS layers without the
        // annotation); the rewrite works on the JSON itself.
        let diff_ids = serde_json::from_slice::<ConfigRootFs>(&source_config)
            .map(|c| c.rootfs.diff_ids)
            .unwrap_or_default();

        let parallel = match self.options.parallel_layers {
            0 => 2,
            n => n,
        };
        let count = manifest.layers.len();
        let jobs: Vec<_> = manifest
            .layers
            .iter()
            .enumerate()
            .map(|(index, descriptor)| {
                self.layer(layer::LayerJob {
                    id: self.next_layer_id.fetch_add(1, Ordering::Relaxed),
                    index,
                    descriptor,
                    lowest: index == 0,
                    config_diff_ids: &diff_ids,
                })
            })
            .collect();
        let layers: Vec<LayerDone> = futures::stream::iter(jobs)
            .buffered(parallel)
            .try_collect()
            .await?;

        let layer_diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let config_bytes = documents::config(&source_config, &layer_diff_ids)
            .map_err(self.document_error("config", &manifest.config.digest))?;
        let config_descriptor = EncodedManifest::new(config_bytes.clone(), OCI_CONFIG).descriptor();
        let config_outcome = self
            .destination
            .put_blob(
                &config_descriptor,
                BlobData::Bytes(config_bytes.clone().into()),
            )
            .await
            .map_err(|error| self.destination_error(error))?;
        (self.progress)(&ConvertEvent::BlobStored {
            id: None,
            what: "config",
            digest: config_descriptor.digest.clone(),
            size: config_descriptor.size,
            outcome: config_outcome,
        });

        let placed: Vec<Descriptor> = layers
            .iter()
            .enumerate()
            .map(|(index, layer)| {
                documents::place_layer(layer.descriptor.clone(), index + 1 == count)
            })
            .collect();
        let bytes = documents::manifest(&fetched.bytes, &config_descriptor, &placed)
            .map_err(self.document_error("manifest", &fetched.digest))?;
        let encoded = EncodedManifest::new(bytes, OCI_MANIFEST);
        let summary = ConvertedManifest {
            platform,
            source_digest: fetched.digest.clone(),
            digest: encoded.digest.clone(),
            size: encoded.bytes.len() as u64,
            config_digest: config_descriptor.digest.clone(),
            layers: manifest
                .layers
                .iter()
                .zip(layers.iter().zip(&placed))
                .map(|(source, (done, placed))| ConvertedLayer {
                    source_digest: source.digest.clone(),
                    source_media_type: source.media_type.clone(),
                    digest: placed.digest.clone(),
                    media_type: placed.media_type.clone(),
                    size: placed.size,
                    diff_id: done.diff_id.clone(),
                    converted: done.converted,
                    chunks: done.chunks,
                    blob: done.outcome,
                })
                .collect(),
        };
        Ok((
            ManifestResult {
                summary,
                config_bytes,
            },
            encoded,
        ))
    }
}

/// A converted manifest's summary and its config (for the index entry's platform).
struct ManifestResult {
    summary: ConvertedManifest,
    config_bytes: Vec<u8>,
}

/// The part of a config the conversion reads.
#[derive(serde::Deserialize)]
struct ConfigRootFs {
    #[serde(default)]
    rootfs: RootFs,
}

/// Why an index entry is not converted under [`PlatformSelection::All`], if it is not.
fn skip_reason(entry: &Descriptor) -> Option<&'static str> {
    if entry.annotations.contains_key("vnd.docker.reference.type") {
        return Some("an attestation of another manifest");
    }
    if entry
        .platform
        .as_ref()
        .is_some_and(|p| p.os == "unknown" && p.architecture == "unknown")
    {
        return Some("platform unknown/unknown (not an image)");
    }
    if !matches!(
        entry.media_type.as_str(),
        "" | OCI_MANIFEST | crate::manifest::DOCKER_MANIFEST
    ) {
        return Some("not an image manifest");
    }
    None
}
