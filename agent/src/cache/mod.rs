//! The content-addressed layer cache on the card (DESIGN §4).
//!
//! On disk, under the cache directory:
//! ```text
//! lock                          exclusive flock for short metadata changes (records, gc)
//! images/<sha256(name)>.json    one ImageRecord per image name, replaced atomically
//! layers/sha256-<blob hex>/     one published layer, keyed by its blob digest:
//!     image.erofs               the EROFS image, a sparse file
//!     chunks.bitmap             present chunks (all set after a full conversion)
//!     chunk-index.bin           lazy layers only: the verified chunk index (its payload)
//!     blob                      lazy layers only: the blob as the registry has it, sparse
//!                               (each chunk's stored frame, and the index section), kept so
//!                               that bundles and peers hand out the very bytes it vouches for
//!     layer.json                LayerMeta; also the file pins lock (shared flock)
//! documents/sha256-<hex>       the image manifests and configs records name, as fetched
//! locks/sha256-<hex>.lock       per-layer single-flight lock (exclusive flock while fetching)
//! tmp/<pid>-<n>/                work in progress, owned while its owner.lock is held
//! ```
//! Publication is atomic: a layer is built in its own `tmp/` directory, every file fsynced,
//! and the directory renamed into `layers/` (then `layers/` fsynced). A crash leaves either no
//! layer or a complete one; stale `tmp/` directories are removed when found unowned.
//! A lazily fetched layer (the `application/vnd.erofs+zstd` format) is published as soon as its
//! chunk index is verified, with a sparse image and an empty bitmap; the fetcher fills it in
//! place (`lazy::layer`), setting a chunk's bit only after its data is durable.
//! Image records are written after all their layers are published, so a record never names a
//! layer that was not published (complete, or lazy) when it was written (eviction may remove one later: such an
//! image shows as incomplete and the next pull fetches the missing layers again).
//!
//! Pins are shared flocks on a layer's `layer.json`; eviction takes the exclusive lock without
//! waiting, so a layer pinned by any process is never evicted. Least recently used order is
//! the modification time of `layer.json`, touched on every pin.

pub mod bitmap;
pub mod lock;
pub mod trace;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use gantry_oci::chunked::ChunkIndex;
use gantry_oci::layer_index::LayerIndex;
use gantry_oci::manifest::{Descriptor, ImageConfiguration};
use gantry_oci::ztoc::synth::{LayerMap, synthesize};
use gantry_oci::ztoc::toc::Ztoc;
use gantry_oci::{ConvertOptions, ConvertSummary, Digest};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use self::bitmap::{BitmapError, ChunkBitmap, DEFAULT_CHUNK_SIZE};
use self::lock::{FileLock, LockMode};
use crate::metrics::CacheMetrics;
use crate::sync::lock;
use gantry_oci::fsutil::{self, sync_dir, unique_suffix, write_atomic};

const IMAGE_FILE: &str = "image.erofs";
const BITMAP_FILE: &str = "chunks.bitmap";
const META_FILE: &str = "layer.json";
const INDEX_FILE: &str = "chunk-index.bin";
const BLOB_FILE: &str = "blob";
/// Every file a published layer directory may hold (what its allocated size counts).
const LAYER_FILES: [&str; 5] = [IMAGE_FILE, BITMAP_FILE, META_FILE, INDEX_FILE, BLOB_FILE];
/// Largest chunk index read back from the cache.
const MAX_INDEX_BYTES: u64 = 256 << 20;
/// The largest encoded gzip layer map read back: a 32 KiB window per span (4 MiB) and 20 bytes
/// per file, so a 64 GiB layer of a million files.
const MAX_LAYER_MAP_BYTES: u64 = 1 << 30;
const OWNER_LOCK: &str = "owner.lock";
/// Largest record or layer metadata file read back.
const MAX_METADATA_BYTES: u64 = 16 << 20;

/// Cache settings; TOML-friendly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Disk budget for layers in bytes (allocated size of the EROFS images); 0 = unlimited.
    /// Unpinned layers are evicted least recently used first to stay within it.
    pub budget_bytes: u64,
    /// Chunk size of the chunk bitmaps (a power of two, at least 4096).
    pub chunk_size: u32,
    /// Layers of one image fetched and converted at the same time.
    pub parallel_layers: usize,
    /// Largest uncompressed layer accepted (the decompression-bomb cap).
    pub max_layer_uncompressed_bytes: u64,
    /// Most tar entries per layer.
    pub max_layer_entries: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let convert = ConvertOptions::default();
        CacheConfig {
            budget_bytes: 0,
            chunk_size: DEFAULT_CHUNK_SIZE,
            parallel_layers: 3,
            max_layer_uncompressed_bytes: convert.max_uncompressed_size,
            max_layer_entries: convert.max_entries,
        }
    }
}

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file-system operation failed.
    #[error("cache {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A metadata file does not parse.
    #[error("cache {path}: corrupt metadata: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A chunk bitmap failed.
    #[error("cache {path}: {source}")]
    Bitmap {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: BitmapError,
    },
    /// The layer is not in the cache (never pulled, or evicted).
    #[error("layer {0} is not in the cache")]
    LayerMissing(Digest),
    /// No image of that name.
    #[error("no image named {0:?} in the cache")]
    ImageMissing(String),
    /// A blocking task died.
    #[error("cache task: {0}")]
    Task(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `layer.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The layer blob's digest (the cache key).
    pub blob_digest: Digest,
    /// The blob's size.
    pub blob_size: u64,
    /// The blob's media type.
    pub media_type: String,
    /// Digest of the EROFS image.
    pub erofs_digest: Digest,
    /// Size of the EROFS image.
    pub erofs_size: u64,
    /// Chunk size of the bitmap.
    pub chunk_size: u32,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// When it was published (Unix seconds).
    pub created_unix: u64,
    /// For a lazily fetched layer: what vouches for its chunk index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<LazyLayerMeta>,
}

/// What `layer.json` adds for a lazily fetched layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyLayerMeta {
    /// Digest of the chunk-index payload (from the layer descriptor, checked at publication).
    pub index_digest: Digest,
    /// Where the chunk-index section starts in the blob.
    pub section_start: u64,
    /// Whether the layer directory keeps the blob's bytes beside the image (layers
    /// published before the cache did so do not).
    #[serde(default)]
    pub keeps_blob: bool,
    /// The lazy format: what the index file holds.
    #[serde(default)]
    pub format: LazyFormat,
}

/// How a lazy layer's blob maps onto its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LazyFormat {
    /// The chunked EROFS format: the index file is the blob's chunk-index payload.
    #[default]
    Chunked,
    /// A gzip layer as it is: the image was synthesized from its zTOC, and the index file is
    /// the encoded layer map.
    Gzip,
}

/// Where a lazy layer's kept blob and its bitmap are ([`Cache::lazy_blob_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyBlobFiles {
    /// The sparse blob copy: a chunk's frame is valid once its bit is set.
    pub blob: PathBuf,
    /// The chunk bitmap.
    pub bitmap: PathBuf,
    /// The blob's size.
    pub blob_size: u64,
}

/// A layer in the cache, as an image record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer blob's digest.
    pub blob_digest: Digest,
    /// The blob's size.
    pub blob_size: u64,
    /// Digest of the EROFS image.
    pub erofs_digest: Digest,
    /// Size of the EROFS image.
    pub erofs_size: u64,
    /// Path of the EROFS image (a sparse file).
    pub erofs_path: PathBuf,
    /// Path of its chunk bitmap.
    pub bitmap_path: PathBuf,
    /// Whether the layer is fetched lazily (its bitmap may be incomplete).
    #[serde(default)]
    pub lazy: bool,
}

/// An image in the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The name it was pulled as (`host/repo:tag`, or a layout's name).
    pub name: String,
    /// Digest of the platform's image manifest.
    pub manifest_digest: Digest,
    /// Digest of the index it was picked from, if any.
    pub index_digest: Option<Digest>,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// The parsed config (entrypoint, cmd, env, working dir, user).
    pub config: ImageConfiguration,
    /// The layers, bottom first.
    pub layers: Vec<LayerRecord>,
    /// When it was first pulled as it is (Unix seconds): a pull that finds the same record
    /// leaves it alone.
    pub pulled_at_unix: u64,
}

impl ImageRecord {
    /// Sum of the EROFS image sizes.
    pub fn erofs_size(&self) -> u64 {
        self.layers.iter().map(|l| l.erofs_size).sum()
    }
}

/// A record and whether all its layers are still cached.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    /// The record.
    #[serde(flatten)]
    pub record: ImageRecord,
    /// Layers evicted since the pull.
    pub missing_layers: Vec<Digest>,
    /// How much of each layer is present, in order.
    pub layer_presence: Vec<LayerPresence>,
}

/// How much of a layer the cache holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerPresence {
    /// The layer blob.
    pub blob_digest: Digest,
    /// Whether it is fetched lazily.
    pub lazy: bool,
    /// Chunks in its bitmap.
    pub chunks: u64,
    /// Chunks present.
    pub present_chunks: u64,
}

/// Keeps a layer from eviction while held (in this or any process).
#[derive(Debug)]
pub struct PinGuard {
    digest: Digest,
    _lock: FileLock,
}

impl PinGuard {
    /// The pinned layer.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

/// The right to fetch one layer (single flight); dropping it lets the next waiter in.
#[derive(Debug)]
pub struct LayerSlot {
    _in_process: tokio::sync::OwnedMutexGuard<()>,
    _cross_process: FileLock,
}

/// A layer being built in `tmp/`; removed on drop unless published.
#[derive(Debug)]
pub struct LayerBuild {
    dir: PathBuf,
    image: PathBuf,
    owner: Option<FileLock>,
}

impl LayerBuild {
    /// Where the converter writes the EROFS image.
    pub fn image_path(&self) -> &Path {
        &self.image
    }
}

impl Drop for LayerBuild {
    fn drop(&mut self) {
        if self.owner.is_some()
            && let Err(error) = fs::remove_dir_all(&self.dir)
            && error.kind() != io::ErrorKind::NotFound
        {
            warn!(dir = %self.dir.display(), %error, "cannot remove a failed layer build");
        }
    }
}

/// What a garbage collection or eviction did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Stale temporary directories removed.
    pub temp_removed: usize,
    /// Layers removed, with their allocated sizes.
    pub layers_removed: Vec<(Digest, u64)>,
    /// Layers that would have been removed but are pinned.
    pub pinned_kept: Vec<Digest>,
    /// Allocated bytes of all layers afterwards.
    pub layers_bytes: u64,
    /// Startup traces removed with the last image of their manifest.
    pub traces_removed: usize,
}

/// The layer cache.
#[derive(Debug)]
pub struct Cache {
    root: PathBuf,
    config: CacheConfig,
    in_flight: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    metrics: CacheMetrics,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root` and removes unowned temporary files.
    pub fn open(root: &Path, config: CacheConfig) -> Result<Cache, CacheError> {
        for dir in ["images", "layers", "locks", "tmp", "documents"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(io_error(&path))?;
        }
        let cache = Cache {
            root: root.to_path_buf(),
            config,
            in_flight: Mutex::new(HashMap::new()),
            metrics: CacheMetrics::default(),
        };
        let lock = cache.root.join("lock");
        let held = FileLock::acquire(&lock, LockMode::Exclusive, true).map_err(io_error(&lock))?;
        let removed = cache.clean_temp()?;
        drop(held);
        if removed > 0 {
            info!(removed, "removed unfinished work left by a previous run");
        }
        Ok(cache)
    }

    /// The same cache, counting hits, misses and evictions into `metrics`.
    pub fn with_metrics(self, metrics: CacheMetrics) -> Self {
        Self { metrics, ..self }
    }

    /// Where hits, misses and evictions are counted.
    pub fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Converter options for layers entering the cache (fsync before publication).
    pub fn convert_options(&self) -> ConvertOptions {
        ConvertOptions {
            max_uncompressed_size: self.config.max_layer_uncompressed_bytes,
            max_entries: self.config.max_layer_entries,
            sync: true,
            ..ConvertOptions::default()
        }
    }

    fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join("layers").join(digest.file_name())
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", Digest::of(name.as_bytes()).hex()))
    }

    fn layer_record(&self, meta: &LayerMeta) -> LayerRecord {
        let dir = self.layer_dir(&meta.blob_digest);
        LayerRecord {
            blob_digest: meta.blob_digest.clone(),
            blob_size: meta.blob_size,
            erofs_digest: meta.erofs_digest.clone(),
            erofs_size: meta.erofs_size,
            erofs_path: dir.join(IMAGE_FILE),
            bitmap_path: dir.join(BITMAP_FILE),
            lazy: meta.lazy.is_some(),
        }
    }

    /// The layer's metadata, if the layer is cached.
    pub fn layer(&self, digest: &Digest) -> Result<Option<LayerMeta>, CacheError> {
        let path = self.layer_dir(digest).join(META_FILE);
        match read_json::<LayerMeta>(&path) {
            Ok(meta) if meta.blob_digest == *digest => Ok(Some(meta)),
            Ok(_) => Err(CacheError::Corrupt {
                path,
                reason: "layer.json names another digest".into(),
            }),
            Err(CacheError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Pins a cached layer against eviction and marks it used; `None` if it is not cached.
    pub fn pin_layer_if_present(
        &self,
        digest: &Digest,
    ) -> Result<Option<(LayerRecord, PinGuard)>, CacheError> {
        let path = self.layer_dir(digest).join(META_FILE);
        let lock = match FileLock::acquire(&path, LockMode::Shared, false) {
            Ok(lock) => lock,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(&path)(error)),
        };
        // Eviction renames the directory away while holding the exclusive lock: the file we
        // locked must still be the one at the path.
        let locked = lock.file().metadata().map_err(io_error(&path))?;
        match fs::metadata(&path) {
            Ok(current) if current.ino() == locked.ino() && current.dev() == locked.dev() => {}
            _ => return Ok(None),
        }
        if let Err(error) = lock.file().set_modified(SystemTime::now()) {
            debug!(%error, "cannot touch layer.json for LRU");
        }
        let Some(meta) = self.layer(digest)? else {
            return Ok(None);
        };
        Ok(Some((
            self.layer_record(&meta),
            PinGuard {
                digest: digest.clone(),
                _lock: lock,
            },
        )))
    }

    /// Pins a layer; fails if it is no longer cached.
    pub fn pin(&self, layer: &LayerRecord) -> Result<PinGuard, CacheError> {
        self.pin_layer_if_present(&layer.blob_digest)?
            .map(|(_, pin)| pin)
            .ok_or_else(|| CacheError::LayerMissing(layer.blob_digest.clone()))
    }

    /// Pins every layer of an image.
    pub fn pin_image(&self, image: &ImageRecord) -> Result<Vec<PinGuard>, CacheError> {
        image.layers.iter().map(|layer| self.pin(layer)).collect()
    }

    /// Takes the single-flight lock of a layer: one holder at a time across tasks and processes.
    pub async fn lock_layer(&self, digest: &Digest) -> Result<LayerSlot, CacheError> {
        let mutex = {
            let mut in_flight = lock(&self.in_flight);
            // Entries nobody holds or waits for are done with: the map stays as small as the
            // number of layers being fetched right now.
            in_flight.retain(|_, mutex| Arc::strong_count(mutex) > 1);
            in_flight.entry(digest.clone()).or_default().clone()
        };
        let in_process = mutex.lock_owned().await;
        let path = self
            .root
            .join("locks")
            .join(format!("{}.lock", digest.file_name()));
        let cross_process = tokio::task::spawn_blocking({
            let path = path.clone();
            move || FileLock::acquire(&path, LockMode::Exclusive, true)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
        .map_err(io_error(&path))?;
        Ok(LayerSlot {
            _in_process: in_process,
            _cross_process: cross_process,
        })
    }

    /// A fresh directory in `tmp/` for building a layer.
    pub fn begin_build(&self) -> Result<LayerBuild, CacheError> {
        let dir = self.root.join("tmp").join(unique_suffix());
        fs::create_dir(&dir).map_err(io_error(&dir))?;
        let owner_path = dir.join(OWNER_LOCK);
        let owner = FileLock::acquire(&owner_path, LockMode::Exclusive, true)
            .map_err(io_error(&owner_path))?;
        Ok(LayerBuild {
            image: dir.join(IMAGE_FILE),
            dir,
            owner: Some(owner),
        })
    }

    /// Publishes a converted layer: bitmap and metadata written and fsynced, the directory
    /// renamed into `layers/`. Returns the layer pinned.
    pub async fn publish_layer(
        &self,
        mut build: LayerBuild,
        descriptor: &Descriptor,
        summary: &ConvertSummary,
    ) -> Result<(LayerRecord, PinGuard), CacheError> {
        let erofs_digest: Digest =
            summary
                .oci_digest()
                .parse()
                .map_err(|_| CacheError::Corrupt {
                    path: build.image.clone(),
                    reason: "the converter reported a malformed digest".into(),
                })?;
        let meta = LayerMeta {
            blob_digest: descriptor.digest.clone(),
            blob_size: descriptor.size,
            media_type: descriptor.media_type.clone(),
            erofs_digest,
            erofs_size: summary.size,
            chunk_size: self.config.chunk_size,
            uncompressed_size: summary.uncompressed_size,
            created_unix: unix_now(),
            lazy: None,
        };
        let target = self.layer_dir(&descriptor.digest);
        let dir = build.dir.clone();
        let layers = self.root.join("layers");
        let task_meta = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), CacheError> {
            let bitmap = dir.join(BITMAP_FILE);
            ChunkBitmap::create(&bitmap, task_meta.erofs_size, task_meta.chunk_size, true)
                .map_err(|source| CacheError::Bitmap {
                    path: bitmap.clone(),
                    source,
                })?;
            publish_dir(&dir, &task_meta, &target, &layers)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        build.owner = None;
        info!(layer = %descriptor.digest, erofs = %meta.erofs_digest, size = meta.erofs_size, "layer published");
        self.pin_layer_if_present(&descriptor.digest)?
            .ok_or_else(|| CacheError::LayerMissing(descriptor.digest.clone()))
    }

    /// Publishes a lazily fetched layer whose chunk index was verified: an empty sparse image
    /// of the index's uncompressed size, a bitmap with no chunk present, the index itself, a
    /// sparse copy of the blob holding only the index `section` (its bytes as in the blob)
    /// and the metadata, fsynced and renamed into `layers/`. Returns the layer pinned.
    pub async fn publish_lazy_layer(
        &self,
        descriptor: &Descriptor,
        index: &ChunkIndex,
        index_digest: &Digest,
        erofs_digest: Digest,
        section: &[u8],
    ) -> Result<(LayerRecord, PinGuard), CacheError> {
        let mut build = self.begin_build()?;
        let section_end = index.section_start().checked_add(section.len() as u64);
        if section_end.is_none_or(|end| end > descriptor.size) {
            return Err(CacheError::Corrupt {
                path: build.dir.join(BLOB_FILE),
                reason: format!(
                    "the chunk index section at {} ({} bytes) is not inside the {}-byte blob",
                    index.section_start(),
                    section.len(),
                    descriptor.size
                ),
            });
        }
        let meta = LayerMeta {
            blob_digest: descriptor.digest.clone(),
            blob_size: descriptor.size,
            media_type: descriptor.media_type.clone(),
            erofs_digest,
            erofs_size: index.uncompressed_size(),
            chunk_size: 0,
            uncompressed_size: index.uncompressed_size(),
            created_unix: unix_now(),
            lazy: Some(LazyLayerMeta {
                index_digest: index_digest.clone(),
                section_start: index.section_start(),
                keeps_blob: true,
                format: LazyFormat::Chunked,
            }),
        };
        let target = self.layer_dir(&descriptor.digest);
        let dir = build.dir.clone();
        let image = build.image.clone();
        let layers = self.root.join("layers");
        let task_meta = meta.clone();
        let (payload, count) = (index.payload_bytes(), index.len() as u64);
        let (section, section_start) = (section.to_vec(), index.section_start());
        tokio::task::spawn_blocking(move || -> Result<(), CacheError> {
            let file = fs::File::create(&image).map_err(io_error(&image))?;
            file.set_len(task_meta.erofs_size)
                .and_then(|()| file.sync_all())
                .map_err(io_error(&image))?;
            let blob = dir.join(BLOB_FILE);
            let file = fs::File::create(&blob).map_err(io_error(&blob))?;
            file.set_len(task_meta.blob_size)
                .and_then(|()| file.write_all_at(&section, section_start))
                .and_then(|()| file.sync_all())
                .map_err(io_error(&blob))?;
            let bitmap = dir.join(BITMAP_FILE);
            ChunkBitmap::create_variable(&bitmap, task_meta.erofs_size, count).map_err(
                |source| CacheError::Bitmap {
                    path: bitmap.clone(),
                    source,
                },
            )?;
            let index_path = dir.join(INDEX_FILE);
            write_atomic(&index_path, &payload).map_err(io_error(&index_path))?;
            publish_dir(&dir, &task_meta, &target, &layers)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        build.owner = None;
        info!(layer = %descriptor.digest, chunks = count, size = meta.erofs_size, "lazy layer published");
        self.pin_layer_if_present(&descriptor.digest)?
            .ok_or_else(|| CacheError::LayerMissing(descriptor.digest.clone()))
    }

    /// Publishes a gzip layer to be read lazily as it is: its EROFS image synthesized from
    /// `ztoc` (metadata written, data blocks holes), a bitmap with the metadata chunks present,
    /// the encoded layer map, an empty sparse copy of the blob and the metadata, fsynced and
    /// renamed into `layers/`. Returns the layer pinned.
    ///
    /// The record's `erofs_digest` names the image that will be: the blob's digest and the
    /// synthesized image's (data as zeros) hashed together, so two layers with the same files
    /// but other bytes never share a name.
    pub async fn publish_gzip_layer(
        &self,
        descriptor: &Descriptor,
        ztoc: Ztoc,
        options: &ConvertOptions,
    ) -> Result<(LayerRecord, PinGuard), CacheError> {
        let mut build = self.begin_build()?;
        let target = self.layer_dir(&descriptor.digest);
        let dir = build.dir.clone();
        let image = build.image.clone();
        let layers = self.root.join("layers");
        let descriptor_task = descriptor.clone();
        let options = options.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<LayerMeta, CacheError> {
            let descriptor = descriptor_task;
            let file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&image)
                .map_err(io_error(&image))?;
            // Scratch space for the writer, gone with its descriptor.
            let spool_path = dir.join("tails");
            let spool = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&spool_path)
                .map_err(io_error(&spool_path))?;
            fs::remove_file(&spool_path).map_err(io_error(&spool_path))?;
            let uncompressed_size = ztoc.gzip.uncompressed_size;
            let layer =
                synthesize(ztoc, file, spool, &options).map_err(|error| CacheError::Corrupt {
                    path: image.clone(),
                    reason: format!("synthesizing the layer: {error}"),
                })?;
            layer.file.sync_all().map_err(io_error(&image))?;
            let map = layer.map;
            let mut naming = Vec::from(*b"gantry-gzip-layer\0");
            naming.extend_from_slice(descriptor.digest.to_string().as_bytes());
            naming.push(0);
            naming.extend_from_slice(&layer.digest);
            let encoded = map.encode();
            let meta = LayerMeta {
                blob_digest: descriptor.digest.clone(),
                blob_size: descriptor.size,
                media_type: descriptor.media_type.clone(),
                erofs_digest: Digest::of(&naming),
                erofs_size: map.image_size(),
                chunk_size: 0,
                uncompressed_size,
                created_unix: unix_now(),
                lazy: Some(LazyLayerMeta {
                    index_digest: Digest::of(&encoded),
                    section_start: 0,
                    keeps_blob: true,
                    format: LazyFormat::Gzip,
                }),
            };
            let blob = dir.join(BLOB_FILE);
            let file = fs::File::create(&blob).map_err(io_error(&blob))?;
            file.set_len(meta.blob_size)
                .and_then(|()| file.sync_all())
                .map_err(io_error(&blob))?;
            let bitmap_path = dir.join(BITMAP_FILE);
            let bitmap_error = |source| CacheError::Bitmap {
                path: bitmap_path.clone(),
                source,
            };
            let mut bitmap =
                ChunkBitmap::create_variable(&bitmap_path, meta.erofs_size, map.len() as u64)
                    .map_err(bitmap_error)?;
            let written: Vec<u64> = (0..map.len())
                .filter(|&chunk| map.is_metadata(chunk))
                .map(|chunk| chunk as u64)
                .collect();
            bitmap.set_present_many(&written).map_err(bitmap_error)?;
            let index_path = dir.join(INDEX_FILE);
            write_atomic(&index_path, &encoded).map_err(io_error(&index_path))?;
            publish_dir(&dir, &meta, &target, &layers)?;
            Ok(meta)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))??;
        build.owner = None;
        info!(layer = %descriptor.digest, size = meta.erofs_size, "gzip layer published for lazy reading");
        self.pin_layer_if_present(&descriptor.digest)?
            .ok_or_else(|| CacheError::LayerMissing(descriptor.digest.clone()))
    }

    /// The chunk map of a lazily fetched layer, read back and checked against the digest its
    /// metadata recorded.
    pub fn lazy_index(&self, digest: &Digest) -> Result<LayerIndex, CacheError> {
        let dir = self.layer_dir(digest);
        let meta = self
            .layer(digest)?
            .ok_or_else(|| CacheError::LayerMissing(digest.clone()))?;
        let path = dir.join(INDEX_FILE);
        let corrupt = |reason: String| CacheError::Corrupt {
            path: path.clone(),
            reason,
        };
        let lazy = meta
            .lazy
            .ok_or_else(|| corrupt("the layer is not a lazy layer".into()))?;
        let cap = match lazy.format {
            LazyFormat::Chunked => MAX_INDEX_BYTES,
            LazyFormat::Gzip => MAX_LAYER_MAP_BYTES,
        };
        let payload = fsutil::read_capped(&path, cap).map_err(io_error(&path))?;
        if Digest::of(&payload) != lazy.index_digest {
            return Err(corrupt("the chunk index does not match its digest".into()));
        }
        match lazy.format {
            LazyFormat::Chunked => ChunkIndex::parse_payload(&payload, lazy.section_start)
                .map(LayerIndex::from)
                .map_err(|e| corrupt(e.to_string())),
            LazyFormat::Gzip => LayerMap::decode(&payload)
                .map(LayerIndex::from)
                .map_err(|e| corrupt(e.to_string())),
        }
    }

    /// The sparse copy of a lazy layer's blob, if the layer keeps one: its stored frames are
    /// valid where the bitmap says the chunk is present, and the index section always.
    pub fn lazy_blob_path(&self, digest: &Digest) -> Result<Option<PathBuf>, CacheError> {
        let meta = self
            .layer(digest)?
            .ok_or_else(|| CacheError::LayerMissing(digest.clone()))?;
        Ok(self.kept_blob(digest, &meta).map(|files| files.blob))
    }

    /// The files of a lazy layer that keeps its blob, for serving ranges of it to peers: the
    /// sparse blob copy and the chunk bitmap (`None`: not cached, not lazy, or no blob kept).
    pub fn lazy_blob_files(&self, digest: &Digest) -> Result<Option<LazyBlobFiles>, CacheError> {
        Ok(self
            .layer(digest)?
            .and_then(|meta| self.kept_blob(digest, &meta)))
    }

    /// The kept blob's files of layer `digest` whose metadata is `meta`, if it keeps one.
    fn kept_blob(&self, digest: &Digest, meta: &LayerMeta) -> Option<LazyBlobFiles> {
        let dir = self.layer_dir(digest);
        meta.lazy
            .as_ref()
            .filter(|lazy| lazy.keeps_blob)
            .map(|_| LazyBlobFiles {
                blob: dir.join(BLOB_FILE),
                bitmap: dir.join(BITMAP_FILE),
                blob_size: meta.blob_size,
            })
    }

    fn document_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("documents").join(digest.file_name())
    }

    /// A kept manifest or config, checked against its digest; `None` if not kept (an image
    /// pulled before the cache kept them).
    pub fn document(&self, digest: &Digest) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.document_path(digest);
        let bytes = match fsutil::read_capped(&path, MAX_METADATA_BYTES) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(io_error(&path)(error)),
        };
        if Digest::of(&bytes) != *digest {
            return Err(CacheError::Corrupt {
                path,
                reason: "the document does not match its digest".into(),
            });
        }
        Ok(Some(bytes))
    }

    /// Writes (or replaces) an image record, keeping `documents` (its manifest and config as
    /// fetched, content-addressed) first, so the image can be handed on byte for byte
    /// (bundles, peers). Both under the metadata lock: a GC never sees the documents without
    /// the record that names them. A record equal to the stored one but for its pull time is
    /// not written again: every run of a cached image pulls it, and replacing the file costs
    /// two fsyncs on the start path.
    pub async fn write_image(
        &self,
        record: &ImageRecord,
        documents: Vec<Vec<u8>>,
    ) -> Result<(), CacheError> {
        let path = self.record_path(&record.name);
        let document_paths: Vec<(PathBuf, Vec<u8>)> = documents
            .into_iter()
            .map(|bytes| (self.document_path(&Digest::of(&bytes)), bytes))
            .collect();
        let record = record.clone();
        let json = serde_json::to_vec_pretty(&record).map_err(|e| CacheError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let lock = self.root.join("lock");
        tokio::task::spawn_blocking(move || {
            let _lock =
                FileLock::acquire(&lock, LockMode::Exclusive, true).map_err(io_error(&lock))?;
            if document_paths.iter().all(|(document, _)| document.exists())
                && read_json::<ImageRecord>(&path).is_ok_and(|stored| {
                    let candidate = ImageRecord {
                        pulled_at_unix: stored.pulled_at_unix,
                        ..record.clone()
                    };
                    candidate == stored
                })
            {
                return Ok(());
            }
            for (document, bytes) in &document_paths {
                if !document.exists() {
                    write_atomic(document, bytes).map_err(io_error(document))?;
                }
            }
            write_atomic(&path, &json).map_err(io_error(&path))
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
    }

    /// The record of an image, if cached.
    pub fn image(&self, name: &str) -> Result<Option<ImageRecord>, CacheError> {
        let path = self.record_path(name);
        match read_json::<ImageRecord>(&path) {
            Ok(record) => Ok(Some(self.fix_paths(record))),
            Err(CacheError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    /// Paths in a record are derived from the cache root, whatever was stored.
    fn fix_paths(&self, mut record: ImageRecord) -> ImageRecord {
        for layer in &mut record.layers {
            let dir = self.layer_dir(&layer.blob_digest);
            layer.erofs_path = dir.join(IMAGE_FILE);
            layer.bitmap_path = dir.join(BITMAP_FILE);
        }
        record
    }

    fn records(&self) -> Result<Vec<ImageRecord>, CacheError> {
        let dir = self.root.join("images");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_json::<ImageRecord>(&path) {
                Ok(record) => records.push(self.fix_paths(record)),
                Err(error) => warn!(%error, "skipping an unreadable image record"),
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Every image record, with the layers evicted since.
    pub fn images(&self) -> Result<Vec<ImageStatus>, CacheError> {
        self.records()?
            .into_iter()
            .map(|record| {
                let mut missing = Vec::new();
                let mut presence = Vec::new();
                for layer in &record.layers {
                    if self.layer(&layer.blob_digest)?.is_none() {
                        missing.push(layer.blob_digest.clone());
                        continue;
                    }
                    // The bitmap file is what is durable: a chunk counts once its bit is there.
                    let (chunks, present_chunks) = ChunkBitmap::open(&layer.bitmap_path)
                        .map(|bitmap| (bitmap.chunk_count(), bitmap.present_count()))
                        .map_err(|source| CacheError::Bitmap {
                            path: layer.bitmap_path.clone(),
                            source,
                        })?;
                    presence.push(LayerPresence {
                        blob_digest: layer.blob_digest.clone(),
                        lazy: layer.lazy,
                        chunks,
                        present_chunks,
                    });
                }
                Ok(ImageStatus {
                    record,
                    missing_layers: missing,
                    layer_presence: presence,
                })
            })
            .collect()
    }

    /// Removes an image record, then the layers no other image uses (unless pinned).
    pub async fn remove_image(&self, name: &str) -> Result<GcReport, CacheError> {
        let path = self.record_path(name);
        let name = name.to_string();
        self.with_lock(move |cache| {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    return Err(CacheError::ImageMissing(name));
                }
                Err(error) => return Err(io_error(&path)(error)),
            }
            let images = cache.root.join("images");
            sync_dir(&images).map_err(io_error(&images))?;
            cache.remove_unreferenced()
        })
        .await
    }

    /// Garbage collection: removes unowned temporary files, layers no image uses (unless
    /// pinned), then evicts least recently used layers down to the budget.
    pub async fn gc(&self) -> Result<GcReport, CacheError> {
        let metrics = self.metrics.clone();
        self.with_lock(move |cache| {
            let temp_removed = cache.clean_temp()?;
            let mut report = cache.remove_unreferenced()?;
            let evicted = cache.evict_to_budget()?;
            metrics.evicted(evicted.layers_removed.iter().map(|(_, bytes)| *bytes));
            report.temp_removed = temp_removed;
            report.layers_removed.extend(evicted.layers_removed);
            report.pinned_kept = evicted.pinned_kept;
            report.layers_bytes = evicted.layers_bytes;
            Ok(report)
        })
        .await
    }

    /// Evicts least recently used unpinned layers until the layers fit the budget.
    pub async fn enforce_budget(&self) -> Result<GcReport, CacheError> {
        if self.config.budget_bytes == 0 {
            return Ok(GcReport::default());
        }
        let report = self.with_lock(|cache| cache.evict_to_budget()).await?;
        self.metrics
            .evicted(report.layers_removed.iter().map(|(_, bytes)| *bytes));
        Ok(report)
    }

    /// Allocated bytes of all cached layers.
    pub fn layers_bytes(&self) -> Result<u64, CacheError> {
        Ok(self.scan_layers()?.iter().map(|l| l.allocated).sum())
    }

    /// Runs `f` on a blocking thread holding the cache's exclusive metadata lock.
    async fn with_lock<T: Send + 'static>(
        &self,
        f: impl FnOnce(&CacheView) -> Result<T, CacheError> + Send + 'static,
    ) -> Result<T, CacheError> {
        let view = CacheView {
            root: self.root.clone(),
            config: self.config.clone(),
        };
        tokio::task::spawn_blocking(move || {
            let lock = view.root.join("lock");
            let _lock =
                FileLock::acquire(&lock, LockMode::Exclusive, true).map_err(io_error(&lock))?;
            f(&view)
        })
        .await
        .map_err(|e| CacheError::Task(e.to_string()))?
    }

    fn clean_temp(&self) -> Result<usize, CacheError> {
        CacheView {
            root: self.root.clone(),
            config: self.config.clone(),
        }
        .clean_temp()
    }

    fn scan_layers(&self) -> Result<Vec<ScannedLayer>, CacheError> {
        CacheView {
            root: self.root.clone(),
            config: self.config.clone(),
        }
        .scan_layers()
    }
}

/// The parts of the cache the blocking maintenance work needs (owned, for `spawn_blocking`).
#[derive(Debug)]
struct CacheView {
    root: PathBuf,
    config: CacheConfig,
}

#[derive(Debug)]
struct ScannedLayer {
    digest: Digest,
    allocated: u64,
    last_used: SystemTime,
}

impl CacheView {
    /// Removes `tmp/` entries whose owner is gone (their `owner.lock` is not held).
    fn clean_temp(&self) -> Result<usize, CacheError> {
        let tmp = self.root.join("tmp");
        let mut removed = 0;
        for entry in fs::read_dir(&tmp).map_err(io_error(&tmp))? {
            let path = entry.map_err(io_error(&tmp))?.path();
            let owned = match FileLock::try_acquire(&path.join(OWNER_LOCK), LockMode::Exclusive) {
                Ok(Some(_)) => false,
                Ok(None) => true,
                // No owner lock: an eviction in progress or a crashed one; only gc (holding
                // the metadata lock) and open get here, so it is stale.
                Err(_) => false,
            };
            if owned {
                continue;
            }
            let result = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                Ok(()) => removed += 1,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => warn!(path = %path.display(), %error, "cannot remove stale work"),
            }
        }
        Ok(removed)
    }

    fn scan_layers(&self) -> Result<Vec<ScannedLayer>, CacheError> {
        let dir = self.root.join("layers");
        let mut layers = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let entry = entry.map_err(io_error(&dir))?;
            let Some(digest) = entry.file_name().to_str().and_then(Digest::from_file_name) else {
                continue;
            };
            let path = entry.path();
            let allocated = LAYER_FILES
                .iter()
                .filter_map(|f| fs::metadata(path.join(f)).ok())
                .map(|m| m.blocks().saturating_mul(512))
                .sum();
            let last_used = fs::metadata(path.join(META_FILE))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            layers.push(ScannedLayer {
                digest,
                allocated,
                last_used,
            });
        }
        Ok(layers)
    }

    /// The layers some readable image record names. An unreadable record is skipped (and
    /// said so), as everywhere else: one corrupt file must not stop removal and GC for every
    /// other image; the layers it alone named become evictable, which only costs a refetch.
    /// The layer blobs, and the manifests and configs, the image records name.
    fn referenced(&self) -> Result<(HashSet<Digest>, HashSet<Digest>), CacheError> {
        let dir = self.root.join("images");
        let (mut referenced, mut manifests) = (HashSet::new(), HashSet::new());
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_json::<ImageRecord>(&path) {
                Ok(record) => {
                    manifests.insert(record.manifest_digest);
                    manifests.insert(record.config_digest);
                    manifests.extend(record.index_digest);
                    referenced.extend(record.layers.into_iter().map(|l| l.blob_digest));
                }
                Err(error) => warn!(%error, "skipping an unreadable image record"),
            }
        }
        Ok((referenced, manifests))
    }

    /// Removes a layer unless pinned; `Ok(false)` if pinned.
    fn evict(&self, digest: &Digest) -> Result<bool, CacheError> {
        let dir = self.root.join("layers").join(digest.file_name());
        let meta = dir.join(META_FILE);
        let lock = match FileLock::try_acquire(&meta, LockMode::Exclusive) {
            Ok(Some(lock)) => lock,
            Ok(None) => return Ok(false),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                // A directory without metadata is not a published layer: remove it.
                let _ = fs::remove_dir_all(&dir);
                return Ok(true);
            }
            Err(error) => return Err(io_error(&meta)(error)),
        };
        let graveyard = self
            .root
            .join("tmp")
            .join(format!("evict-{}", unique_suffix()));
        fs::rename(&dir, &graveyard).map_err(io_error(&dir))?;
        let layers = self.root.join("layers");
        sync_dir(&layers).map_err(io_error(&layers))?;
        drop(lock);
        fs::remove_dir_all(&graveyard).map_err(io_error(&graveyard))?;
        info!(layer = %digest, "layer removed from the cache");
        Ok(true)
    }

    fn remove_unreferenced(&self) -> Result<GcReport, CacheError> {
        let (referenced, manifests) = self.referenced()?;
        let mut report = GcReport {
            traces_removed: trace::remove_traces_except(&self.root, &manifests)
                .map_err(io_error(&self.root.join("traces")))?,
            ..GcReport::default()
        };
        self.remove_documents_except(&manifests)?;
        for layer in self.scan_layers()? {
            if referenced.contains(&layer.digest) {
                continue;
            }
            if self.evict(&layer.digest)? {
                report.layers_removed.push((layer.digest, layer.allocated));
            } else {
                report.pinned_kept.push(layer.digest);
            }
        }
        report.layers_bytes = self.scan_layers()?.iter().map(|l| l.allocated).sum();
        Ok(report)
    }

    /// Removes the kept documents no record names (a config is named by its digest too).
    fn remove_documents_except(&self, keep: &HashSet<Digest>) -> Result<(), CacheError> {
        let dir = self.root.join("documents");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io_error(&dir)(error)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error(&dir))?;
            let name = entry.file_name();
            // Temporary files of an atomic write in progress do not parse as digests.
            let Some(digest) = name.to_str().and_then(Digest::from_file_name) else {
                continue;
            };
            if !keep.contains(&digest)
                && let Err(error) = fs::remove_file(entry.path())
                && error.kind() != io::ErrorKind::NotFound
            {
                warn!(path = %entry.path().display(), %error, "cannot remove a document");
            }
        }
        Ok(())
    }

    fn evict_to_budget(&self) -> Result<GcReport, CacheError> {
        let mut layers = self.scan_layers()?;
        let mut total: u64 = layers.iter().map(|l| l.allocated).sum();
        let mut report = GcReport::default();
        let budget = self.config.budget_bytes;
        if budget != 0 && total > budget {
            layers.sort_by_key(|l| l.last_used);
            for layer in layers {
                if total <= budget {
                    break;
                }
                if self.evict(&layer.digest)? {
                    total = total.saturating_sub(layer.allocated);
                    report.layers_removed.push((layer.digest, layer.allocated));
                } else {
                    report.pinned_kept.push(layer.digest);
                }
            }
            if total > budget {
                warn!(
                    total,
                    budget, "the pinned layers alone exceed the cache budget"
                );
            }
        }
        report.layers_bytes = total;
        Ok(report)
    }
}

/// The last steps of a publication (blocking): the metadata written, the owner lock removed,
/// the build directory synced and renamed to `target`, and `layers/` synced.
fn publish_dir(
    dir: &Path,
    meta: &LayerMeta,
    target: &Path,
    layers: &Path,
) -> Result<(), CacheError> {
    let meta_path = dir.join(META_FILE);
    let json = serde_json::to_vec_pretty(meta).map_err(|e| CacheError::Corrupt {
        path: meta_path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&meta_path, &json).map_err(io_error(&meta_path))?;
    // The owner lock file is not part of a published layer.
    let owner = dir.join(OWNER_LOCK);
    fs::remove_file(&owner).map_err(io_error(&owner))?;
    sync_dir(dir).map_err(io_error(dir))?;
    fs::rename(dir, target).map_err(io_error(target))?;
    sync_dir(layers).map_err(io_error(layers))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, CacheError> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    if len > MAX_METADATA_BYTES {
        return Err(CacheError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is too large for metadata"),
        });
    }
    serde_json::from_reader(io::BufReader::new(file)).map_err(|e| CacheError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_single_flight_map_holds_only_layers_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), CacheConfig::default()).unwrap();
        for i in 0..100u32 {
            let slot = cache
                .lock_layer(&Digest::of(&i.to_le_bytes()))
                .await
                .unwrap();
            drop(slot);
        }
        let held = cache.lock_layer(&Digest::of(b"held")).await.unwrap();
        assert!(
            lock(&cache.in_flight).len() <= 2,
            "{}",
            lock(&cache.in_flight).len()
        );
        drop(held);
    }
}
