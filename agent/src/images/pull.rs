//! Pulling an image: fetch, verify, convert, publish into the cache.
//!
//! Every image source (a registry, an OCI layout directory) implements `gantry_oci`'s
//! [`ImageSource`] and goes through the same pipeline:
//! 1. the root manifest (by tag or digest), verified; an index is resolved to the configured
//!    platform's manifest, verified again;
//! 2. the config blob, size-capped and verified, then parsed;
//! 3. each layer: a cache hit is pinned and reused; a miss takes the layer's single-flight
//!    lock, streams the blob through a [`gantry_oci::BlobVerifier`] into the EROFS converter (a blocking
//!    thread), and publishes the image into the cache only if the digest matched;
//! 4. the image record is written atomically, then the size budget is enforced.
//!
//! The converter parses the bytes while they arrive (it is hardened for hostile input and
//! writes only inside a temporary directory); its output is discarded unless the whole blob
//! then matched its digest, so nothing unverified ever enters the cache.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::cache::{Cache, CacheError, ImageRecord, LayerRecord, PinGuard};
use crate::lazy::origin::BlobOrigin;
use crate::metrics::Metrics;
use gantry_oci::chunked::{ChunkCompression, IndexLocation, erofs_layer_kind};
use gantry_oci::compression::Compression;
use gantry_oci::manifest::{
    Descriptor, ImageConfiguration, ImageManifest, ManifestDocument, ManifestError, is_tar_layer,
};
use gantry_oci::source::{
    self, BlobSink, ConfigFetchError, CountingSink, FetchedManifest, ImageSource, SinkError,
};
use gantry_oci::{ConvertError, ConvertOptions, ConvertSummary, Digest, convert_layer};

/// Errors of pulling an image.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The source failed (network, auth, digest mismatch naming the source, …).
    #[error("{image}: {error}")]
    Source {
        /// The image.
        image: String,
        /// The source's error.
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A manifest or config does not parse or is unsupported.
    #[error("{image}: {what} from {source_name}: {error}")]
    Document {
        /// The image.
        image: String,
        /// Which document.
        what: &'static str,
        /// Where it came from.
        source_name: String,
        /// The parser's error.
        #[source]
        error: Box<ManifestError>,
    },
    /// An index inside an index (not supported).
    #[error("{image}: the index entry for {platform} is itself an index")]
    NestedIndex {
        /// The image.
        image: String,
        /// The platform.
        platform: String,
    },
    /// The config blob is larger than allowed.
    #[error("{image}: config {digest} is {size} bytes, over the limit of {limit}")]
    ConfigTooLarge {
        /// The image.
        image: String,
        /// Its digest.
        digest: Digest,
        /// Its declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Converting a (verified) layer failed.
    #[error("{image}: layer {digest}: {message}")]
    Convert {
        /// The image.
        image: String,
        /// The layer blob.
        digest: Digest,
        /// The converter's error.
        message: String,
    },
    /// A layer in the lazy format cannot be brought in.
    #[error("{image}: layer {digest}: {message}")]
    Lazy {
        /// The image.
        image: String,
        /// The layer blob.
        digest: Digest,
        /// Why.
        message: String,
    },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// How a pull reaches the blobs of lazy-format layers: their chunk index now, their chunks
/// later (through the fetcher).
pub struct LazyPull<'a> {
    /// The origin of a layer blob of this image.
    pub origin: &'a (dyn Fn(&Descriptor) -> Arc<dyn BlobOrigin> + Send + Sync),
    /// Where the chunk-index reads count for their registry (`None`: not counted).
    pub metrics: Option<&'a Metrics>,
}

impl std::fmt::Debug for LazyPull<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyPull").finish_non_exhaustive()
    }
}

/// Largest chunk-index section fetched (1 MiB chunks with SHA-256 need 48 bytes each: this
/// covers layers of over a terabyte).
const MAX_INDEX_SECTION_BYTES: u64 = 64 << 20;
/// Largest uncompressed chunk accepted: the fetcher holds whole chunks in memory.
const MAX_CHUNK_BYTES: u64 = 64 << 20;

/// What a pull reports while it runs.
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// The manifest (and config) are known.
    Resolved {
        /// The image.
        image: String,
        /// The platform manifest's digest.
        manifest_digest: Digest,
        /// Number of layers.
        layers: usize,
        /// Sum of the layer blob sizes.
        total_bytes: u64,
    },
    /// A layer was already in the cache.
    LayerCached {
        /// Position in the manifest.
        index: usize,
        /// The blob digest.
        digest: Digest,
    },
    /// A layer is being fetched and converted.
    LayerStarted {
        /// Position in the manifest.
        index: usize,
        /// The blob digest.
        digest: Digest,
        /// The blob size.
        size: u64,
    },
    /// Bytes of a layer received so far (at most a few times a second per layer; 0 again when
    /// the fetch starts over from another source).
    LayerBytes {
        /// Position in the manifest.
        index: usize,
        /// Bytes received.
        received: u64,
        /// The blob size.
        size: u64,
    },
    /// A layer was fetched, verified, converted and published.
    LayerDone {
        /// Position in the manifest.
        index: usize,
        /// The blob digest.
        digest: Digest,
        /// The EROFS image size.
        erofs_size: u64,
        /// Where it came from.
        source: String,
        /// Seconds it took.
        seconds: f64,
    },
}

/// Receives [`PullEvent`]s.
pub type Progress<'a> = &'a (dyn Fn(&PullEvent) + Send + Sync);

/// A progress sink that ignores everything.
pub fn no_progress(_: &PullEvent) {}

/// Pulls the image `source` names into `cache` and records it under `source.describe()`.
pub async fn pull<S: ImageSource>(
    cache: &Cache,
    source: &S,
    progress: Progress<'_>,
) -> Result<ImageRecord, PullError> {
    pull_pinned(cache, source, progress)
        .await
        .map(|(record, _pins)| record)
}

/// [`pull`], returning the pins that kept the image's layers from eviction while it ran (one
/// per layer, in the record's order), so a caller that goes on to use the layers holds them
/// without a gap in which a GC could take them.
pub async fn pull_pinned<S: ImageSource>(
    cache: &Cache,
    source: &S,
    progress: Progress<'_>,
) -> Result<(ImageRecord, Vec<PinGuard>), PullError> {
    pull_lazy(cache, source, progress, None).await
}

/// [`pull_pinned`], with lazy-format layers published as soon as their chunk index is
/// verified (their chunks are fetched later). Without `lazy`, such layers are refused.
pub async fn pull_lazy<S: ImageSource>(
    cache: &Cache,
    source: &S,
    progress: Progress<'_>,
    lazy: Option<&LazyPull<'_>>,
) -> Result<(ImageRecord, Vec<PinGuard>), PullError> {
    let image = source.describe();
    let source_error = |error: S::Error| PullError::Source {
        image: image.clone(),
        error: Box::new(error),
    };
    let document = |what, fetched: &FetchedManifest| {
        // Tar layers are converted, lazy EROFS layers published at their chunk index.
        let pullable =
            |media_type: &str| is_tar_layer(media_type) || erofs_layer_kind(media_type).is_some();
        ManifestDocument::parse_with(&fetched.bytes, fetched.media_type.as_deref(), pullable)
            .map_err(|error| PullError::Document {
                image: image.clone(),
                what,
                source_name: fetched.source.clone(),
                error: Box::new(error),
            })
    };

    let root = source.fetch_root_manifest().await.map_err(source_error)?;
    // The documents as fetched, kept with the record: the manifest, and the index it came from.
    let mut documents = Vec::with_capacity(3);
    let (manifest, manifest_digest, index_digest) = match document("manifest", &root)? {
        ManifestDocument::Image(manifest) => {
            documents.push(root.bytes.clone());
            (manifest, root.digest.clone(), None)
        }
        ManifestDocument::Index(index) => {
            let platform = source.platform();
            let entry = index
                .select(&platform)
                .map_err(|error| PullError::Document {
                    image: image.clone(),
                    what: "index",
                    source_name: root.source.clone(),
                    error: Box::new(error),
                })?;
            let child = source
                .fetch_manifest(&entry.digest)
                .await
                .map_err(source_error)?;
            match document("manifest", &child)? {
                ManifestDocument::Image(manifest) => {
                    documents.extend([root.bytes.clone(), child.bytes.clone()]);
                    (manifest, child.digest.clone(), Some(root.digest.clone()))
                }
                ManifestDocument::Index(_) => {
                    return Err(PullError::NestedIndex {
                        image,
                        platform: platform.to_string(),
                    });
                }
            }
        }
    };

    let config_bytes = fetch_config(source, &image, &manifest).await?;
    documents.push(config_bytes.clone());
    let config = ImageConfiguration::parse(&config_bytes).map_err(|error| PullError::Document {
        image: image.clone(),
        what: "config",
        source_name: manifest.config.digest.to_string(),
        error: Box::new(error),
    })?;
    progress(&PullEvent::Resolved {
        image: image.clone(),
        manifest_digest: manifest_digest.clone(),
        layers: manifest.layers.len(),
        total_bytes: manifest.layers.iter().map(|l| l.size).sum(),
    });

    let parallel = cache.config().parallel_layers.max(1);
    // Collected first: a closure producing futures inside the stream is not `Send` for every
    // lifetime (a rustc limitation), and `run` drives pulls from spawned tasks.
    let layer_pulls: Vec<_> = manifest
        .layers
        .iter()
        .enumerate()
        .map(|(index, descriptor)| {
            pull_layer(cache, source, &image, index, descriptor, progress, lazy)
        })
        .collect();
    let results: Vec<(LayerRecord, PinGuard)> = futures::stream::iter(layer_pulls)
        .buffered(parallel)
        .try_collect()
        .await?;
    let (layers, pins): (Vec<LayerRecord>, Vec<PinGuard>) = results.into_iter().unzip();

    let record = ImageRecord {
        name: image.clone(),
        manifest_digest,
        index_digest,
        config_digest: manifest.config.digest.clone(),
        config,
        layers,
        pulled_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    cache.write_image(&record, documents).await?;
    // The pins keep this image's layers out of the eviction its own arrival may trigger.
    cache.enforce_budget().await?;
    info!(image, manifest = %record.manifest_digest, layers = record.layers.len(), "pulled");
    Ok((record, pins))
}

async fn fetch_config<S: ImageSource>(
    source: &S,
    image: &str,
    manifest: &ImageManifest,
) -> Result<Vec<u8>, PullError> {
    source::fetch_config(source, &manifest.config)
        .await
        .map_err(|error| match error {
            ConfigFetchError::TooLarge {
                digest,
                size,
                limit,
            } => PullError::ConfigTooLarge {
                image: image.to_string(),
                digest,
                size,
                limit,
            },
            ConfigFetchError::Source(error) => PullError::Source {
                image: image.to_string(),
                error: Box::new(error),
            },
        })
}

async fn pull_layer<S: ImageSource>(
    cache: &Cache,
    source: &S,
    image: &str,
    index: usize,
    descriptor: &Descriptor,
    progress: Progress<'_>,
    lazy: Option<&LazyPull<'_>>,
) -> Result<(LayerRecord, PinGuard), PullError> {
    let digest = &descriptor.digest;
    if let Some(hit) = cache.pin_layer_if_present(digest)? {
        cache.metrics().hit();
        progress(&PullEvent::LayerCached {
            index,
            digest: digest.clone(),
        });
        return Ok(hit);
    }
    // Single flight: one fetch per layer, across tasks and processes.
    let slot = cache.lock_layer(digest).await?;
    if let Some(hit) = cache.pin_layer_if_present(digest)? {
        debug!(%digest, "another pull fetched the layer meanwhile");
        cache.metrics().hit();
        progress(&PullEvent::LayerCached {
            index,
            digest: digest.clone(),
        });
        return Ok(hit);
    }
    cache.metrics().miss();
    let started = Instant::now();
    progress(&PullEvent::LayerStarted {
        index,
        digest: digest.clone(),
        size: descriptor.size,
    });
    let mut decoder = LayerDecoder::Tar(cache.convert_options());
    if let Some(kind) = erofs_layer_kind(&descriptor.media_type) {
        let lazy_error = |message: String| PullError::Lazy {
            image: image.to_string(),
            digest: digest.clone(),
            message,
        };
        if let Some(lazy) = lazy {
            let origin = (lazy.origin)(descriptor);
            if let Some(published) = publish_lazy(cache, descriptor, origin.as_ref(), lazy.metrics)
                .await
                .map_err(lazy_error)?
            {
                drop(slot);
                progress(&PullEvent::LayerDone {
                    index,
                    digest: digest.clone(),
                    erofs_size: published.0.erofs_size,
                    source: format!("{} (chunk index; chunks on demand)", origin.describe()),
                    seconds: started.elapsed().as_secs_f64(),
                });
                return Ok(published);
            }
        }
        // No usable chunk index (or no lazy fetcher here): the blob is pulled whole, decoded,
        // and checked against its uncompressed digest.
        let location = IndexLocation::from_descriptor(descriptor).ok();
        decoder = LayerDecoder::Erofs {
            kind,
            image_len: location.as_ref().map(|location| location.range.start),
            uncompressed_digest: location.and_then(|location| location.uncompressed_digest),
            max_output: cache.config().max_layer_uncompressed_bytes,
        };
    }
    let build = cache.begin_build()?;
    let size = descriptor.size;
    let mut sink = CountingSink::new(
        ConvertSink::new(build.image_path(), decoder),
        size,
        |received| {
            progress(&PullEvent::LayerBytes {
                index,
                received,
                size,
            })
        },
    );
    let fetched = source.fetch_blob(descriptor, &mut sink).await;
    let mut sink = sink.into_inner();
    let summary = match fetched {
        Ok(url) => match sink.finish().await {
            Ok(summary) => (summary, url),
            Err(error) => {
                return Err(PullError::Convert {
                    image: image.to_string(),
                    digest: digest.clone(),
                    message: error.to_string(),
                });
            }
        },
        Err(error) => {
            // A converter failure reaches here as the source's "storing the blob" error.
            sink.abort().await;
            return Err(PullError::Source {
                image: image.to_string(),
                error: Box::new(error),
            });
        }
    };
    let (summary, url) = summary;
    let pinned = cache.publish_layer(build, descriptor, &summary).await?;
    drop(slot);
    progress(&PullEvent::LayerDone {
        index,
        digest: digest.clone(),
        erofs_size: summary.size,
        source: url,
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(pinned)
}

/// Fetches and verifies a lazy-format layer's chunk index and publishes the layer with no
/// chunk present. `None`: the layer has no index the agent can use (the spec's "read
/// sequentially" cases, or nothing vouches for the index), so it must be pulled whole. Errors
/// are messages for [`PullError::Lazy`].
async fn publish_lazy(
    cache: &Cache,
    descriptor: &Descriptor,
    origin: &dyn BlobOrigin,
    metrics: Option<&Metrics>,
) -> Result<Option<(LayerRecord, PinGuard)>, String> {
    let location = match IndexLocation::from_descriptor(descriptor) {
        Ok(location) => location,
        Err(error) if error.falls_back_to_eager() => {
            info!(layer = %descriptor.digest, %error, "no usable chunk index: pulling the layer whole");
            return Ok(None);
        }
        Err(error) => return Err(error.to_string()),
    };
    let section_len = location.range.end.saturating_sub(location.range.start);
    if section_len > MAX_INDEX_SECTION_BYTES {
        return Err(format!(
            "its chunk index is {section_len} bytes, over the limit of {MAX_INDEX_SECTION_BYTES}"
        ));
    }
    let Some(index_digest) = location.digest.clone() else {
        info!(layer = %descriptor.digest, "no chunk-index digest: pulling the layer whole");
        return Ok(None);
    };
    let section = origin.read_range(location.range.clone()).await;
    if let (Some(metrics), Some((kind, name))) = (metrics, origin.counted_as()) {
        let bytes = section.as_ref().map_or(0, |section| section.len() as u64);
        metrics.source(kind, name).request(bytes, section.is_err());
    }
    let section =
        section.map_err(|e| format!("fetching the chunk index from {}: {e}", origin.describe()))?;
    let index = match location.parse(&section) {
        Ok(index) => index,
        Err(error) if error.falls_back_to_eager() => {
            info!(layer = %descriptor.digest, %error, "unusable chunk index: pulling the layer whole");
            return Ok(None);
        }
        Err(error) => return Err(format!("chunk index from {}: {error}", origin.describe())),
    };
    if let Some(chunk) = (0..index.len()).find(|&chunk| {
        let range = index.uncompressed_range(chunk);
        range.end - range.start > MAX_CHUNK_BYTES
    }) {
        return Err(format!(
            "chunk {chunk} is larger than the {MAX_CHUNK_BYTES} bytes the agent accepts"
        ));
    }
    let erofs_digest = location
        .uncompressed_digest
        .clone()
        .unwrap_or_else(|| descriptor.digest.clone());
    cache
        .publish_lazy_layer(descriptor, &index, &index_digest, erofs_digest, &section)
        .await
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Depth of the queue between the download and the converter thread.
const CONVERT_QUEUE: usize = 64;

type Converter = (
    mpsc::Sender<io::Result<Bytes>>,
    tokio::task::JoinHandle<Result<ConvertSummary, DecodeError>>,
);

/// How a downloaded layer becomes an EROFS image.
#[derive(Debug, Clone)]
enum LayerDecoder {
    /// A tar layer: converted by [`convert_layer`].
    Tar(ConvertOptions),
    /// A layer that is an EROFS image already: decoded (zstd) or copied (raw), and checked
    /// against its uncompressed digest when the descriptor names one.
    Erofs {
        kind: ChunkCompression,
        /// Where the image data ends in the blob (the chunk index's start), if known.
        image_len: Option<u64>,
        uncompressed_digest: Option<Digest>,
        max_output: u64,
    },
}

/// Why a downloaded layer could not become an image.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    /// The tar converter failed.
    #[error(transparent)]
    Tar(#[from] ConvertError),
    /// An EROFS layer did not decode.
    #[error(transparent)]
    Erofs(#[from] gantry_oci::chunked::ChunkedError),
    /// The decoded image is not the one the descriptor names.
    #[error("the decoded image is {actual}, not the annotated {expected}")]
    WrongImage {
        /// The annotation's digest.
        expected: Digest,
        /// What was decoded.
        actual: Digest,
    },
    /// Writing the image failed.
    #[error("writing {path}: {source}")]
    Output {
        /// The image file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl LayerDecoder {
    /// Runs on a blocking thread: `reader` is the blob as it downloads.
    fn decode(&self, reader: ChannelReader, output: &Path) -> Result<ConvertSummary, DecodeError> {
        let (kind, image_len, expected, max_output) = match self {
            LayerDecoder::Tar(options) => return Ok(convert_layer(reader, output, options)?),
            LayerDecoder::Erofs {
                kind,
                image_len,
                uncompressed_digest,
                max_output,
            } => (*kind, *image_len, uncompressed_digest, *max_output),
        };
        let output_error = |source| DecodeError::Output {
            path: output.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(output).map_err(output_error)?;
        let mut writer = io::BufWriter::new(&file);
        let (size, digest) = gantry_oci::chunked::decode_whole_layer(
            reader,
            &mut writer,
            kind,
            image_len,
            max_output,
        )?;
        io::Write::flush(&mut writer).map_err(output_error)?;
        drop(writer);
        if let Some(expected) = expected.as_ref().filter(|expected| **expected != digest) {
            return Err(DecodeError::WrongImage {
                expected: expected.clone(),
                actual: digest,
            });
        }
        file.sync_all().map_err(output_error)?;
        Ok(ConvertSummary {
            digest: digest.hex().to_string(),
            size,
            entries: 0,
            inodes: 0,
            compression: match kind {
                ChunkCompression::Zstd => Compression::Zstd,
                ChunkCompression::None => Compression::None,
            },
            uncompressed_size: size,
        })
    }

    /// Whether an error is a local failure (disk, I/O) rather than bad content.
    fn is_local_failure(error: &DecodeError) -> bool {
        match error {
            DecodeError::Tar(error) => is_local_failure(error),
            DecodeError::Output { .. } => true,
            DecodeError::Erofs(_) | DecodeError::WrongImage { .. } => false,
        }
    }
}

/// Feeds a blob to its decoder running on a blocking thread.
#[derive(Debug)]
struct ConvertSink {
    output: PathBuf,
    decoder: LayerDecoder,
    converter: Option<Converter>,
    /// The converter's error, once it failed.
    failure: Option<String>,
}

impl ConvertSink {
    fn new(output: &Path, decoder: LayerDecoder) -> Self {
        ConvertSink {
            output: output.to_path_buf(),
            decoder,
            converter: None,
            failure: None,
        }
    }

    fn start(&mut self) -> &mut Converter {
        self.converter.get_or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(CONVERT_QUEUE);
            let output = self.output.clone();
            let decoder = self.decoder.clone();
            let task = tokio::task::spawn_blocking(move || {
                let reader = ChannelReader {
                    receiver,
                    current: Bytes::new(),
                };
                decoder.decode(reader, &output)
            });
            (sender, task)
        })
    }

    /// Ends the input and waits for the image.
    async fn finish(&mut self) -> Result<ConvertSummary, String> {
        self.start();
        let Some((sender, task)) = self.converter.take() else {
            return Err("converter vanished".into());
        };
        drop(sender);
        match task.await {
            Ok(Ok(summary)) => Ok(summary),
            Ok(Err(error)) => Err(error.to_string()),
            Err(join) => Err(format!("converter thread: {join}")),
        }
    }

    /// Stops the converter without letting it finish an image.
    async fn abort(&mut self) {
        if let Some((sender, task)) = self.converter.take() {
            let _ = sender.send(Err(io::Error::other("aborted"))).await;
            drop(sender);
            let _ = task.await;
        }
        let _ = tokio::fs::remove_file(&self.output).await;
    }
}

/// Whether a conversion error is a local failure rather than bad content.
fn is_local_failure(error: &ConvertError) -> bool {
    matches!(
        error,
        ConvertError::Output { .. } | ConvertError::Writer(gantry_erofs::WriterError::Io(_))
    )
}

impl BlobSink for ConvertSink {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        if let Some(message) = &self.failure {
            return Err(SinkError {
                fatal: false,
                message: message.clone(),
            });
        }
        let (sender, _) = self.start();
        if sender.send(Ok(chunk)).await.is_ok() {
            return Ok(());
        }
        // The converter stopped reading: it failed.
        let (_, task) = self.converter.take().ok_or_else(|| SinkError {
            fatal: true,
            message: "converter vanished".into(),
        })?;
        let (fatal, message) = match task.await {
            Ok(Err(error)) => (LayerDecoder::is_local_failure(&error), error.to_string()),
            Ok(Ok(_)) => (
                false,
                "the layer has data after the end of the archive".into(),
            ),
            Err(join) => (true, format!("converter thread: {join}")),
        };
        self.failure = Some(message.clone());
        Err(SinkError { fatal, message })
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        self.abort().await;
        self.failure = None;
        Ok(())
    }
}

/// The converter's input: chunks from the download.
struct ChannelReader {
    receiver: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.receiver.blocking_recv() {
                None => return Ok(0),
                Some(Err(error)) => return Err(error),
                Some(Ok(chunk)) => self.current = chunk,
            }
        }
        let n = buf.len().min(self.current.len());
        let head = self.current.split_to(n);
        buf.get_mut(..n)
            .ok_or_else(|| io::Error::other("short buffer"))?
            .copy_from_slice(&head);
        Ok(n)
    }
}

/// A progress line for a pull event.
pub fn describe(event: &PullEvent) -> String {
    match event {
        PullEvent::Resolved {
            image,
            manifest_digest,
            layers,
            total_bytes,
        } => {
            format!(
                "{image}: {manifest_digest}, {layers} layer(s), {:.1} MiB",
                *total_bytes as f64 / (1 << 20) as f64
            )
        }
        PullEvent::LayerCached { index, digest } => format!("layer {index} {digest}: cached"),
        PullEvent::LayerBytes {
            index,
            received,
            size,
        } => format!(
            "layer {index}: {:.1} of {:.1} MiB",
            *received as f64 / (1 << 20) as f64,
            *size as f64 / (1 << 20) as f64
        ),
        PullEvent::LayerStarted {
            index,
            digest,
            size,
        } => {
            format!(
                "layer {index} {digest}: fetching and converting {:.1} MiB",
                *size as f64 / (1 << 20) as f64
            )
        }
        PullEvent::LayerDone {
            index,
            erofs_size,
            source,
            seconds,
            ..
        } => format!(
            "layer {index}: converted to EROFS ({:.1} MiB) from {source} in {seconds:.2} s",
            *erofs_size as f64 / (1 << 20) as f64
        ),
    }
}
