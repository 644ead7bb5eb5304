//! Bundles: images carried from one card's cache to another's as an OCI image layout
//! (`index.json` + blobs), DESIGN §6. Both directions work on a cache directory, with or
//! without a running agent, like `pull`.
//!
//! **Export** writes each image from the cache, in the lazy format:
//! - a lazy-format layer whose chunks are all present is copied from the blob the cache keeps
//!   beside it, byte for byte (checked against the layer digest on the way). An image made
//!   only of such layers is exported as it is: the same manifest and config bytes, the same
//!   manifest digest, so its startup trace still applies and goes along as a referrer
//!   artifact (an unnamed `index.json` entry whose `subject` is the image's manifest);
//! - any other layer (a tar layer converted on the card, or a lazy one kept without its blob)
//!   is cut from the cache's EROFS image into 1 MiB zstd chunks with a chunk index, as
//!   `image convert` would, and checked to hold the image the cache verified. Such an image
//!   gets a new config (`rootfs.diff_ids`) and manifest: the lazy form of the original, under
//!   the same name.
//!
//! A layer with chunks missing cannot be exported (nothing but its registry has them): the
//! error says so and names it.
//!
//! **Import** checks every blob an image needs against its digest before the cache sees any
//! of it (a bad one is named, and the image is skipped; other images still come in), then
//! pulls the image from the layout the way the agent pulls one (lazy layers published at their
//! chunk index), then stores every chunk from the bundle, each checked against the chunk
//! index as the fetcher checks what a registry sends, and finally keeps the image's startup
//! trace. An image whose import fails part way is removed again unless it was cached before.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use super::pull::{self, LazyPull, Progress, PullError};
use crate::cache::bitmap::ChunkBitmap;
use crate::cache::trace::{
    self, MAX_TRACE_BYTES, TRACE_ARTIFACT_TYPE, decode_trace, read_trace, trace_artifact,
};
use crate::cache::{Cache, CacheError, LayerRecord};
use crate::lazy::layer::{LazyLayer, StoreError};
use crate::lazy::origin::{BlobOrigin, FileOrigin};
use crate::lazy::{self, LazyError};
use gantry_oci::Digest;
use gantry_oci::chunked::{
    ChunkedError, ChunkedLayerOptions, erofs_layer_kind, layer_diff_id, write_chunked_layer,
};
use gantry_oci::image_convert::documents::{self, DocumentError};
use gantry_oci::layout::{LayoutError, LayoutWriter, OciLayout, OciLayoutSource};
use gantry_oci::manifest::Platform;
use gantry_oci::manifest::{
    Descriptor, EMPTY_JSON, ImageManifest, ManifestDocument, OCI_CONFIG, OCI_MANIFEST,
};
use gantry_oci::source::{BlobSink, BlobVerifier, FetchedManifest, ImageSource};

/// Largest stored span read from a bundle at once while storing chunks.
const STORE_SPAN_BYTES: u64 = 8 << 20;
/// Read size while checking a blob file.
const VERIFY_READ_BYTES: usize = 1 << 20;

/// Errors of exporting or importing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The bundle (an OCI layout) could not be read or written.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The image is not in the cache.
    #[error("no image named {0:?} in the cache")]
    ImageMissing(String),
    /// A name matches several cached images.
    #[error("{name} matches several cached images ({candidates}): name one by digest")]
    Ambiguous {
        /// The name asked for.
        name: String,
        /// The images it matches.
        candidates: String,
    },
    /// The cache does not hold what an export needs.
    #[error("{image}: {reason}")]
    NotExportable {
        /// The image.
        image: String,
        /// What is missing.
        reason: String,
    },
    /// Re-chunking a layer failed, or its result is not the image the cache verified.
    #[error("{image}: layer {layer}: {reason}")]
    Rechunk {
        /// The image.
        image: String,
        /// The layer blob.
        layer: Digest,
        /// Why.
        reason: String,
    },
    /// A document could not be rewritten.
    #[error("{image}: {source}")]
    Document {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: DocumentError,
    },
    /// A blob of the bundle does not match its digest or size, or is unreadable.
    #[error("{image}: blob {blob} of the bundle: {reason}")]
    BadBlob {
        /// The image.
        image: String,
        /// The blob.
        blob: Digest,
        /// What is wrong.
        reason: String,
    },
    /// A layer of the cache could not be opened to store chunks into.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// Pulling the image from the bundle failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// A chunk from the bundle could not be stored.
    #[error("{image}: {source}")]
    Store {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The startup trace could not be kept.
    #[error("{image}: keeping its startup trace: {source}")]
    Trace {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: trace::TraceError,
    },
    /// A file of the export failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A blocking task died.
    #[error("bundle task: {0}")]
    Task(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An image written into a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedImage {
    /// Its name in the cache and in the bundle.
    pub name: String,
    /// The manifest the bundle holds.
    pub manifest_digest: Digest,
    /// The manifest the cache holds (the same unless layers were re-chunked).
    pub cached_manifest_digest: Digest,
    /// Layers copied as the registry has them.
    pub layers_copied: usize,
    /// Layers cut from the cache's EROFS image into the lazy format.
    pub layers_rechunked: usize,
    /// Bytes of its layer blobs in the bundle.
    pub layer_bytes: u64,
    /// Whether its startup trace went along.
    pub trace: bool,
}

/// The cached image a user-given name means: the record of that name (as given, or normalized
/// as `pull` names it), or, for a tag the cache
/// does not hold by name, the only cached image of the same repository pinned by digest (how
/// a cluster manifest's prefetch names what it resolved).
pub fn find_image(cache: &Cache, name: &str) -> Result<String, BundleError> {
    if cache.image(name)?.is_some() {
        return Ok(name.to_string());
    }
    let Ok(reference) = name.parse::<gantry_oci::Reference>() else {
        return Err(BundleError::ImageMissing(name.to_string()));
    };
    let normalized = reference.to_string();
    if cache.image(&normalized)?.is_some() {
        return Ok(normalized);
    }
    let prefix = format!("{}/{}@", reference.registry, reference.repository);
    let candidates: Vec<String> = cache
        .images()?
        .into_iter()
        .map(|image| image.record.name)
        .filter(|cached| cached.starts_with(&prefix))
        .collect();
    match candidates.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(BundleError::ImageMissing(name.to_string())),
        _ => Err(BundleError::Ambiguous {
            name: name.to_string(),
            candidates: candidates.join(", "),
        }),
    }
}

/// Writes the cached images `names` into the OCI layout `bundle` (created, or extended), each
/// under its cache name and the extra names `aliases` gives it (blocking).
pub fn export(
    cache: &Cache,
    names: &[(String, Vec<String>)],
    bundle: &Path,
) -> Result<Vec<ExportedImage>, BundleError> {
    let writer = LayoutWriter::create(bundle)?;
    names
        .iter()
        .map(|(name, aliases)| export_image(cache, &writer, name, aliases))
        .collect()
}

fn export_image(
    cache: &Cache,
    writer: &LayoutWriter,
    name: &str,
    aliases: &[String],
) -> Result<ExportedImage, BundleError> {
    let not_exportable = |reason: String| BundleError::NotExportable {
        image: name.to_string(),
        reason,
    };
    let record = cache
        .image(name)?
        .ok_or_else(|| BundleError::ImageMissing(name.to_string()))?;
    // Held until the blobs are written: no GC takes a layer mid-copy.
    let _pins = cache.pin_image(&record)?;
    let kept = |digest: &Digest, what: &str| {
        cache.document(digest)?.ok_or_else(|| {
            not_exportable(format!(
                "the cache kept no {what} {digest} (the image was pulled before the cache kept \
                 documents): pull it again"
            ))
        })
    };
    let manifest_bytes = kept(&record.manifest_digest, "manifest")?;
    let config_bytes = kept(&record.config_digest, "config")?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|error| not_exportable(format!("its kept manifest does not parse: {error}")))?;
    if manifest.layers.len() != record.layers.len()
        || manifest
            .layers
            .iter()
            .zip(&record.layers)
            .any(|(descriptor, layer)| descriptor.digest != layer.blob_digest)
    {
        return Err(not_exportable(
            "its kept manifest names other layers than its record".into(),
        ));
    }
    let config_diff_ids = config_diff_ids(&config_bytes);

    let top = manifest.layers.len().saturating_sub(1);
    let (mut layers, mut diff_ids) = (Vec::new(), Vec::new());
    let (mut copied, mut rechunked, mut layer_bytes) = (0, 0, 0);
    for (position, (descriptor, layer)) in manifest.layers.iter().zip(&record.layers).enumerate() {
        let (present, chunks) = presence(layer)?;
        if present != chunks {
            return Err(not_exportable(format!(
                "layer {} has {present} of its {chunks} chunks: prefetch it whole first \
                 (`prefetch --pull-mode eager`, or `prefetch = \"all\"` in the cluster manifest)",
                layer.blob_digest
            )));
        }
        let blob = match cache.lazy_blob_path(&layer.blob_digest)? {
            Some(blob) if erofs_layer_kind(&descriptor.media_type).is_some() => Some(blob),
            _ => None,
        };
        let (exported, diff_id) = match blob {
            Some(blob) => {
                writer.copy_blob(descriptor, &blob)?;
                copied += 1;
                let diff_id = layer_diff_id(descriptor)
                    .ok()
                    .flatten()
                    .or_else(|| config_diff_ids.get(position).cloned())
                    .unwrap_or_else(|| layer.erofs_digest.clone());
                (descriptor.clone(), diff_id)
            }
            None => {
                rechunked += 1;
                let descriptor = rechunk(writer, name, layer)?;
                (
                    documents::place_layer(descriptor, position == top),
                    layer.erofs_digest.clone(),
                )
            }
        };
        layer_bytes += exported.size;
        layers.push(exported);
        diff_ids.push(diff_id);
    }

    let document_error = |source| BundleError::Document {
        image: name.to_string(),
        source,
    };
    let (manifest_bytes, media_type) = if rechunked == 0 {
        writer.write_blob(&config_bytes)?;
        let media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        (manifest_bytes, media_type)
    } else {
        let config = documents::config(&config_bytes, &diff_ids).map_err(document_error)?;
        let media_type = match manifest.config.media_type.as_str() {
            "" => OCI_CONFIG,
            media_type => media_type,
        };
        let config_descriptor = Descriptor::of(media_type, &config);
        writer.write_blob(&config)?;
        let bytes = documents::manifest(&manifest_bytes, &config_descriptor, &layers)
            .map_err(document_error)?;
        (bytes, OCI_MANIFEST.to_string())
    };
    writer.write_blob(&manifest_bytes)?;
    let manifest_descriptor = Descriptor::of(media_type, &manifest_bytes);
    writer.name_image(&manifest_descriptor, name)?;
    for alias in aliases.iter().filter(|alias| alias.as_str() != name) {
        writer.name_image(&manifest_descriptor, alias)?;
    }

    // A trace names chunks of these very layers: it goes along only with the image unchanged.
    let trace = match (rechunked, read_trace(cache.root(), &record.manifest_digest)) {
        (0, Ok(Some(trace))) => {
            let artifact = trace_artifact(&trace)
                .map_err(|error| not_exportable(format!("encoding its startup trace: {error}")))?;
            writer.write_blob(EMPTY_JSON)?;
            writer.write_blob(&artifact.bytes)?;
            let referrer = artifact.manifest(&manifest_descriptor);
            let bytes = serde_json::to_vec(&referrer).map_err(|error| {
                not_exportable(format!("encoding its trace's manifest: {error}"))
            })?;
            writer.write_blob(&bytes)?;
            let mut listed = Descriptor::of(OCI_MANIFEST, &bytes);
            listed.artifact_type = Some(TRACE_ARTIFACT_TYPE.to_string());
            writer.name_image(&listed, "")?;
            true
        }
        (_, Err(error)) => {
            warn!(image = name, %error, "the startup trace is unreadable: exported without it");
            false
        }
        _ => false,
    };
    let exported = ExportedImage {
        name: name.to_string(),
        manifest_digest: manifest_descriptor.digest.clone(),
        cached_manifest_digest: record.manifest_digest.clone(),
        layers_copied: copied,
        layers_rechunked: rechunked,
        layer_bytes,
        trace,
    };
    info!(image = name, manifest = %exported.manifest_digest, copied, rechunked, "exported");
    Ok(exported)
}

/// `rootfs.diff_ids` of a config, as far as they parse.
fn config_diff_ids(config: &[u8]) -> Vec<Digest> {
    serde_json::from_slice::<serde_json::Value>(config)
        .ok()
        .and_then(|config| {
            config["rootfs"]["diff_ids"].as_array().map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str()?.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Present and total chunks of a cached layer, as its bitmap file says.
fn presence(layer: &LayerRecord) -> Result<(u64, u64), BundleError> {
    let bitmap = ChunkBitmap::open(&layer.bitmap_path).map_err(|source| CacheError::Bitmap {
        path: layer.bitmap_path.clone(),
        source,
    })?;
    Ok((bitmap.present_count(), bitmap.chunk_count()))
}

/// Cuts the cache's EROFS image of `layer` into a lazy-format blob in the bundle; returns its
/// descriptor. The chunked writer hashes the image it read: it must be the one the cache
/// verified.
fn rechunk(
    writer: &LayoutWriter,
    image: &str,
    layer: &LayerRecord,
) -> Result<Descriptor, BundleError> {
    let rechunk_error = |reason: String| BundleError::Rechunk {
        image: image.to_string(),
        layer: layer.blob_digest.clone(),
        reason,
    };
    let work = writer.root().join(format!(
        ".gantry-export-{}",
        gantry_oci::fsutil::unique_suffix()
    ));
    let result = (|| {
        let input = File::open(&layer.erofs_path).map_err(io_at(&layer.erofs_path))?;
        let output = File::create(&work).map_err(io_at(&work))?;
        let mut output = BufWriter::new(output);
        let chunked = write_chunked_layer(
            BufReader::new(input),
            &mut output,
            &ChunkedLayerOptions::default(),
        )
        .map_err(|error: ChunkedError| rechunk_error(error.to_string()))?;
        output.flush().map_err(io_at(&work))?;
        if chunked.uncompressed_digest != layer.erofs_digest {
            return Err(rechunk_error(format!(
                "the cache's image hashes to {}, its record says {}",
                chunked.uncompressed_digest, layer.erofs_digest
            )));
        }
        let descriptor = chunked.descriptor();
        writer.copy_blob(&descriptor, &work)?;
        Ok(descriptor)
    })();
    let _ = std::fs::remove_file(&work);
    result
}

/// An image brought in from a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedImage {
    /// Its name.
    pub name: String,
    /// Its manifest.
    pub manifest_digest: Digest,
    /// Its layers.
    pub layers: usize,
    /// Chunks stored from the bundle (chunks the cache held already are not counted).
    pub chunks_stored: u64,
    /// Whether its startup trace came along.
    pub trace: bool,
}

/// An image of a bundle that was not imported.
#[derive(Debug, Clone, Serialize)]
pub struct ImportFailure {
    /// Its name in the bundle.
    pub name: String,
    /// Why (the bad blob, when one is bad).
    pub error: String,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    /// Images now in the cache.
    pub imported: Vec<ImportedImage>,
    /// Images left out.
    pub failed: Vec<ImportFailure>,
}

/// Imports every named image of the bundle at `bundle` into `cache`, for `platform` (by
/// default the card's own).
pub async fn import(
    cache: &Cache,
    bundle: &Path,
    platform: Option<Platform>,
    progress: Progress<'_>,
) -> Result<ImportReport, BundleError> {
    let layout = OciLayout::open(bundle)?;
    let platform = platform.unwrap_or_else(|| OciLayoutSource::new(&layout, "").platform);
    let mut report = ImportReport::default();
    let mut names = layout.names();
    names.dedup();
    for name in names {
        match import_image(cache, &layout, &name, &platform, progress).await {
            Ok(image) => report.imported.push(image),
            Err(error) => {
                warn!(image = name, %error, "not imported");
                report.failed.push(ImportFailure {
                    name,
                    error: error.to_string(),
                });
            }
        }
    }
    Ok(report)
}

async fn import_image(
    cache: &Cache,
    layout: &OciLayout,
    name: &str,
    platform: &Platform,
    progress: Progress<'_>,
) -> Result<ImportedImage, BundleError> {
    {
        let (layout, name, platform) = (layout.clone(), name.to_string(), platform.clone());
        tokio::task::spawn_blocking(move || verify_image(&layout, &name, &platform))
            .await
            .map_err(|error| BundleError::Task(error.to_string()))??;
    }
    let existed = cache.image(name)?.is_some();
    let mut source = OciLayoutSource::new(layout, name);
    source.platform = platform.clone();
    let source = Named { name, source };
    let blob_origin = |descriptor: &Descriptor| -> Arc<dyn BlobOrigin> {
        Arc::new(FileOrigin::new(layout.blob_path(&descriptor.digest)))
    };
    let lazy = LazyPull {
        origin: &blob_origin,
        metrics: None,
    };
    let (record, pins) = pull::pull_lazy(cache, &source, progress, Some(&lazy)).await?;
    let result = async {
        let mut chunks_stored = 0;
        for layer in record.layers.iter().filter(|layer| layer.lazy) {
            // No guest reads through this handle: nothing listens for its wants.
            let (wants, _) = tokio::sync::mpsc::unbounded_channel();
            let opened = lazy::open_cached(cache, layer, Duration::ZERO, wants)?;
            let blob = layout.blob_path(&layer.blob_digest);
            let image = name.to_string();
            chunks_stored += tokio::task::spawn_blocking(move || {
                store_all_chunks(&opened, &blob)
                    .map_err(|source| BundleError::Store { image, source })
            })
            .await
            .map_err(|error| BundleError::Task(error.to_string()))??;
        }
        let trace = import_trace(cache, layout, name, &record.manifest_digest)?;
        Ok::<_, BundleError>((chunks_stored, trace))
    }
    .await;
    drop(pins);
    match result {
        Ok((chunks_stored, trace)) => {
            info!(image = name, manifest = %record.manifest_digest, chunks_stored, trace, "imported");
            Ok(ImportedImage {
                name: name.to_string(),
                manifest_digest: record.manifest_digest,
                layers: record.layers.len(),
                chunks_stored,
                trace,
            })
        }
        Err(error) => {
            if !existed && let Err(removal) = cache.remove_image(name).await {
                warn!(image = name, %removal, "cannot remove a failed import");
            }
            Err(error)
        }
    }
}

/// An image of the bundle, recorded in the cache under its own name (not the bundle's path).
struct Named<'a> {
    name: &'a str,
    source: OciLayoutSource<'a>,
}

impl ImageSource for Named<'_> {
    type Error = LayoutError;

    fn describe(&self) -> String {
        self.name.to_string()
    }

    fn platform(&self) -> Platform {
        self.source.platform()
    }

    fn max_config_bytes(&self) -> u64 {
        self.source.max_config_bytes()
    }

    async fn fetch_root_manifest(&self) -> Result<FetchedManifest, LayoutError> {
        self.source.fetch_root_manifest().await
    }

    async fn fetch_manifest(&self, digest: &Digest) -> Result<FetchedManifest, LayoutError> {
        self.source.fetch_manifest(digest).await
    }

    async fn fetch_blob<S: BlobSink>(
        &self,
        descriptor: &Descriptor,
        sink: &mut S,
    ) -> Result<String, LayoutError> {
        self.source.fetch_blob(descriptor, sink).await
    }
}

/// Checks every blob the image `name` of `layout` needs (for `platform`) against its digest
/// and size, reading each whole.
fn verify_image(layout: &OciLayout, name: &str, platform: &Platform) -> Result<(), BundleError> {
    let bad = |blob: &Digest, reason: String| BundleError::BadBlob {
        image: name.to_string(),
        blob: blob.clone(),
        reason,
    };
    let read = |descriptor: &Descriptor| -> Result<FetchedManifest, BundleError> {
        layout
            .read_manifest(descriptor)
            .map_err(|error| bad(&descriptor.digest, error.to_string()))
    };
    let parse = |fetched: &FetchedManifest| {
        // Any layer type: which ones can be pulled is the pull's to say.
        ManifestDocument::parse_with(&fetched.bytes, fetched.media_type.as_deref(), |_| true)
            .map_err(|error| bad(&fetched.digest, error.to_string()))
    };
    let root = layout.find(name)?.clone();
    let fetched = read(&root)?;
    let manifest = match parse(&fetched)? {
        ManifestDocument::Image(manifest) => manifest,
        ManifestDocument::Index(index) => {
            let entry = index
                .select(platform)
                .map_err(|error| bad(&root.digest, error.to_string()))?
                .clone();
            match parse(&read(&entry)?)? {
                ManifestDocument::Image(manifest) => manifest,
                ManifestDocument::Index(_) => {
                    return Err(bad(&entry.digest, "an index inside an index".into()));
                }
            }
        }
    };
    for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
        verify_blob(&layout.blob_path(&descriptor.digest), descriptor)
            .map_err(|reason| bad(&descriptor.digest, reason))?;
    }
    Ok(())
}

/// Reads the file `path` whole, checking it is the blob `descriptor` names.
fn verify_blob(path: &Path, descriptor: &Descriptor) -> Result<(), String> {
    let file = File::open(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut verifier = BlobVerifier::new(descriptor);
    let mut buffer = vec![0; VERIFY_READ_BYTES];
    let mut offset = 0;
    loop {
        let n = file
            .read_at(&mut buffer, offset)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let Some(read) = buffer.get(..n).filter(|read| !read.is_empty()) else {
            break;
        };
        verifier.update(read).map_err(|error| error.to_string())?;
        offset += n as u64;
    }
    verifier.finish().map_err(|error| error.to_string())
}

/// Stores every missing chunk of `layer` from the blob file `blob` (blocking), a span of
/// chunks at a time; returns how many were stored.
fn store_all_chunks(layer: &LazyLayer, blob: &Path) -> Result<u64, StoreError> {
    let io_error = |source| StoreError::Io {
        layer: layer.digest().clone(),
        source,
    };
    let file = File::open(blob).map_err(io_error)?;
    let chunks = layer.index().len();
    let mut stored = 0;
    let mut start = 0;
    while start < chunks {
        if layer.is_present(start) {
            start += 1;
            continue;
        }
        let mut end = start + 1;
        while end < chunks && !layer.is_present(end) {
            let span = layer.blob_span(start..end + 1);
            if span.end - span.start > STORE_SPAN_BYTES {
                break;
            }
            end += 1;
        }
        let span = layer.blob_span(start..end);
        let len = usize::try_from(span.end - span.start)
            .map_err(|_| io_error(io::Error::other("a chunk span does not fit in memory")))?;
        let mut bytes = vec![0; len];
        file.read_exact_at(&mut bytes, span.start)
            .map_err(io_error)?;
        layer.store_chunks(start..end, &bytes)?;
        stored += (end - start) as u64;
        start = end;
    }
    Ok(stored)
}

/// Keeps the startup trace the bundle holds for `manifest` (a referrer artifact of it), if
/// any; whether there was one. A trace that does not check out is left out, said so.
fn import_trace(
    cache: &Cache,
    layout: &OciLayout,
    name: &str,
    manifest: &Digest,
) -> Result<bool, BundleError> {
    for entry in layout.entries() {
        if entry.artifact_type.as_deref() != Some(TRACE_ARTIFACT_TYPE) {
            continue;
        }
        let referrer = match layout.read_manifest(entry) {
            Ok(referrer) => referrer,
            Err(error) => {
                warn!(image = name, %error, "skipping an unreadable trace artifact");
                continue;
            }
        };
        let Ok(referrer) = serde_json::from_slice::<ImageManifest>(&referrer.bytes) else {
            continue;
        };
        if referrer
            .subject
            .as_ref()
            .is_none_or(|s| s.digest != *manifest)
        {
            continue;
        }
        let Some(blob) = referrer
            .layers
            .first()
            .filter(|b| b.size <= MAX_TRACE_BYTES)
        else {
            continue;
        };
        let path = layout.blob_path(&blob.digest);
        let checked = verify_blob(&path, blob)
            .and_then(|()| std::fs::read(&path).map_err(|error| error.to_string()))
            .and_then(|bytes| decode_trace(&bytes, manifest));
        match checked {
            Ok(trace) => {
                trace::write_trace(cache.root(), &trace).map_err(|source| BundleError::Trace {
                    image: name.to_string(),
                    source,
                })?;
                return Ok(true);
            }
            Err(reason) => {
                warn!(image = name, blob = %blob.digest, reason, "the bundle's startup trace is refused");
            }
        }
    }
    Ok(false)
}
