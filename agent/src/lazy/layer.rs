//! One lazily fetched layer: the cache's sparse EROFS image, its chunk bitmap and chunk index,
//! and the [`BlockSource`] the layer store reads it through.
//!
//! The data path (a queue thread) reads a present chunk with `preadv` straight into guest
//! memory: an atomic load per chunk, no lock, no async. A missing chunk answers
//! [`Poll::Pending`]: the thread stores its waker, sends a foreground [`Want`] to the fetcher
//! (once per chunk until it arrives or fails) and the device parks the request. The fetcher
//! stores verified chunks with [`LazyLayer::store_chunks`] (data durable, then the bitmap, then
//! the in-memory bit, then the wake) or gives up with [`LazyLayer::fail_chunks`]: the parked
//! reads then fail with `EIO` for [`LazyLayer::failure_hold`], and a later read tries again.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use gantry_oci::Digest;
use gantry_oci::layer_index::LayerIndex;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};
use vm_memory::VolatileSlice;

use super::origin::BlobOrigin;
use crate::blk::BlockSource;
use crate::blk::source::preadv_exact;
use crate::cache::PinGuard;
use crate::cache::bitmap::{BitmapError, ChunkBitmap};
use crate::sync::lock;

/// A foreground request for one chunk, from the data path to the fetcher.
#[derive(Debug)]
pub struct Want {
    /// The layer.
    pub layer: Arc<LazyLayer>,
    /// The chunk (an index into the layer's chunk index).
    pub chunk: usize,
    /// When the guest first asked.
    pub since: Instant,
}

/// Why chunks could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The bytes of a chunk failed verification against the chunk index.
    #[error("layer {layer} chunk {chunk}: {reason}")]
    Verify {
        /// The layer blob.
        layer: Digest,
        /// The chunk.
        chunk: usize,
        /// What was wrong.
        reason: String,
    },
    /// Writing the image or the bitmap failed.
    #[error("layer {layer}: storing chunks: {source}")]
    Io {
        /// The layer blob.
        layer: Digest,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bitmap refused the update.
    #[error("layer {layer}: chunk bitmap: {source}")]
    Bitmap {
        /// The layer blob.
        layer: Digest,
        /// Why.
        #[source]
        source: BitmapError,
    },
}

/// What the fetcher counts per layer (shown by `images`).
#[derive(Debug, Default)]
pub struct LayerCounters {
    /// Chunks stored.
    pub chunks_fetched: AtomicU64,
    /// Bytes received for them, as stored in the blob.
    pub bytes_fetched: AtomicU64,
}

/// A layer whose chunks arrive while it is mapped.
#[derive(Debug)]
pub struct LazyLayer {
    /// The layer blob's digest (the cache key).
    digest: Digest,
    index: LayerIndex,
    /// The cache's sparse image, opened for reading and writing.
    image: File,
    /// The cache's sparse copy of the blob (each stored frame at its offset), when the layer
    /// keeps one.
    blob: Option<File>,
    /// Set when the complete blob failed its digest: every read fails from then on.
    poisoned: std::sync::atomic::AtomicBool,
    poison_reason: Mutex<String>,
    bitmap: Mutex<ChunkBitmap>,
    present: Box<[AtomicU64]>,
    present_count: AtomicU64,
    /// Chunks a foreground want was sent for and not yet answered.
    requested: Box<[AtomicU64]>,
    /// Per chunk: milliseconds after `epoch` of its latest failure (0: none).
    failed_at: Box<[AtomicU64]>,
    last_failure: Mutex<String>,
    failure_hold: Duration,
    epoch: Instant,
    waiters: Mutex<HashMap<usize, Vec<Waker>>>,
    origins: Mutex<Vec<Arc<dyn BlobOrigin>>>,
    wants: mpsc::UnboundedSender<Want>,
    complete: watch::Sender<bool>,
    /// Counters for the operator.
    pub counters: LayerCounters,
    /// Startup trace: chunks read since the layer opened, first touch first, while recording.
    touched: Box<[AtomicU64]>,
    trace: Mutex<Vec<usize>>,
    /// Milliseconds after `epoch` until which reads are recorded (0: never).
    recording_until: AtomicU64,
    me: Weak<LazyLayer>,
    _pin: PinGuard,
}

/// Number of 64-bit words for `bits` bits.
fn words(bits: usize) -> Box<[AtomicU64]> {
    (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

fn test_bit(words: &[AtomicU64], bit: usize) -> bool {
    words
        .get(bit / 64)
        .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
}

/// Sets `bit`; returns whether it was clear.
fn set_bit(words: &[AtomicU64], bit: usize) -> bool {
    words.get(bit / 64).is_some_and(|word| {
        let mask = 1 << (bit % 64);
        word.fetch_or(mask, Ordering::AcqRel) & mask == 0
    })
}

fn clear_bit(words: &[AtomicU64], bit: usize) {
    if let Some(word) = words.get(bit / 64) {
        word.fetch_and(!(1 << (bit % 64)), Ordering::AcqRel);
    }
}

impl LazyLayer {
    /// Opens a layer's image, bitmap and (if it keeps one) blob copy, created by the cache
    /// when the layer was published, with its verified chunk index. `pin` keeps the layer in
    /// the cache while this exists.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        digest: Digest,
        index: LayerIndex,
        image_path: &Path,
        bitmap_path: &Path,
        blob_path: Option<&Path>,
        pin: PinGuard,
        failure_hold: Duration,
        wants: mpsc::UnboundedSender<Want>,
    ) -> Result<Arc<LazyLayer>, StoreError> {
        let io_error = |source| StoreError::Io {
            layer: digest.clone(),
            source,
        };
        let image = OpenOptions::new()
            .read(true)
            .write(true)
            .open(image_path)
            .map_err(io_error)?;
        if image.metadata().map_err(io_error)?.len() != index.image_size() {
            return Err(io_error(io::Error::other(
                "the image file's size is not the chunk index's uncompressed size",
            )));
        }
        let blob = blob_path
            .map(|path| OpenOptions::new().read(true).write(true).open(path))
            .transpose()
            .map_err(io_error)?;
        let bitmap = ChunkBitmap::open(bitmap_path).map_err(|source| StoreError::Bitmap {
            layer: digest.clone(),
            source,
        })?;
        if bitmap.chunk_count() != index.len() as u64 {
            return Err(StoreError::Bitmap {
                layer: digest,
                source: BitmapError::Corrupt("the bitmap does not match the chunk index"),
            });
        }
        let present = words(index.len());
        let mut present_count = 0;
        for chunk in 0..index.len() {
            if bitmap.is_present(chunk as u64) {
                set_bit(&present, chunk);
                present_count += 1;
            }
        }
        let complete = present_count == index.len() as u64;
        let chunks = index.len();
        Ok(Arc::new_cyclic(|me| LazyLayer {
            digest,
            index,
            image,
            blob,
            poisoned: std::sync::atomic::AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
            bitmap: Mutex::new(bitmap),
            present,
            present_count: AtomicU64::new(present_count),
            requested: words(chunks),
            failed_at: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
            last_failure: Mutex::new(String::new()),
            failure_hold,
            epoch: Instant::now(),
            waiters: Mutex::new(HashMap::new()),
            origins: Mutex::new(Vec::new()),
            wants,
            complete: watch::Sender::new(complete),
            counters: LayerCounters::default(),
            touched: words(chunks),
            trace: Mutex::new(Vec::new()),
            recording_until: AtomicU64::new(0),
            me: me.clone(),
            _pin: pin,
        }))
    }

    /// The layer blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The verified chunk map.
    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    /// How long reads of a chunk fail after its fetch failed, before a read tries again.
    pub fn failure_hold(&self) -> Duration {
        self.failure_hold
    }

    /// Whether `chunk` is in the image.
    pub fn is_present(&self, chunk: usize) -> bool {
        test_bit(&self.present, chunk)
    }

    /// Whether the data path asked for `chunk` and has not been answered.
    pub fn is_requested(&self, chunk: usize) -> bool {
        test_bit(&self.requested, chunk)
    }

    /// Number of chunks present.
    pub fn present_chunks(&self) -> u64 {
        self.present_count.load(Ordering::Acquire)
    }

    /// Whether every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.present_chunks() == self.index.len() as u64
    }

    /// Uncompressed bytes of the chunks not present yet (what completing the layer adds to
    /// the cache).
    pub fn missing_bytes(&self) -> u64 {
        (0..self.index.len())
            .filter(|&chunk| !self.is_present(chunk))
            .map(|chunk| {
                let range = self.index.image_range(chunk);
                range.end - range.start
            })
            .sum()
    }

    /// Whether the layer's chunks are verified only span by span, so that the whole blob must
    /// be checked against its digest once complete (a gzip layer read as it is: its header
    /// and the index's windows are in no span digest).
    pub fn needs_blob_check(&self) -> bool {
        matches!(self.index, LayerIndex::Gzip(_)) && self.blob.is_some()
    }

    /// Hashes the complete blob copy and checks it against the layer's digest (blocking: it
    /// reads the whole blob). On a mismatch the layer is poisoned: every read fails from now
    /// on, loudly, and the error says why.
    pub fn check_blob(&self) -> Result<(), StoreError> {
        use sha2::Digest as _;
        let io_error = |source| StoreError::Io {
            layer: self.digest.clone(),
            source,
        };
        let Some(blob) = &self.blob else {
            return Ok(());
        };
        if !self.is_complete() {
            return Err(io_error(io::Error::other("the layer is not complete")));
        }
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let read = blob.read_at(&mut buffer, offset).map_err(io_error)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            offset += read as u64;
        }
        let actual = Digest::from_sha256(hasher.finalize().into());
        if actual == self.digest {
            debug!(layer = %self.digest, bytes = offset, "complete blob matches its digest");
            return Ok(());
        }
        let reason = format!(
            "the complete blob hashes to {actual}, not to its digest: the layer's index or its \
             bytes were not the layer's, and it is quarantined"
        );
        tracing::error!(layer = %self.digest, %actual, "complete blob failed its digest");
        self.poison(&reason);
        Err(StoreError::Verify {
            layer: self.digest.clone(),
            chunk: 0,
            reason,
        })
    }

    /// Fails every read of the layer from now on with `reason` (and wakes the parked ones).
    pub fn poison(&self, reason: &str) {
        *lock(&self.poison_reason) = reason.to_string();
        self.poisoned.store(true, Ordering::Release);
        let waiting: Vec<usize> = lock(&self.waiters).keys().copied().collect();
        for chunk in waiting {
            self.wake(chunk);
        }
    }

    /// Whether the layer was poisoned.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// A receiver that sees the layer become complete, and closes when the layer is dropped
    /// (for a watcher that must not keep it alive).
    pub fn completion(&self) -> watch::Receiver<bool> {
        self.complete.subscribe()
    }

    /// Waits until every chunk is present.
    pub async fn wait_complete(&self) {
        let mut complete = self.complete.subscribe();
        // The sender lives as long as `self`, so this only returns once complete.
        let _ = complete.wait_for(|complete| *complete).await;
    }

    /// Records the chunks reads touch (in first-touch order) for the next `window`: a
    /// container's startup trace.
    pub fn record_trace(&self, window: Duration) {
        let until = self
            .millis_since_epoch()
            .saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        self.recording_until.fetch_max(until, Ordering::AcqRel);
    }

    /// The chunks recorded so far, first touch first.
    pub fn trace(&self) -> Vec<usize> {
        lock(&self.trace).clone()
    }

    fn note_touched(&self, chunks: Range<usize>) {
        let until = self.recording_until.load(Ordering::Acquire);
        if until == 0 || self.millis_since_epoch() > until {
            return;
        }
        for chunk in chunks {
            // Only a first touch takes the lock.
            if set_bit(&self.touched, chunk) {
                lock(&self.trace).push(chunk);
            }
        }
    }

    /// Adds a place to fetch the blob from (kept in the order added; duplicates by name are
    /// ignored).
    pub fn add_origin(&self, origin: Arc<dyn BlobOrigin>) {
        let mut origins = lock(&self.origins);
        let name = origin.describe();
        if !origins.iter().any(|known| known.describe() == name) {
            origins.push(origin);
        }
    }

    /// Whether every known origin ignores `Range` (so the blob can only be streamed whole).
    pub fn ignores_ranges(&self) -> bool {
        let origins = lock(&self.origins);
        !origins.is_empty() && origins.iter().all(|origin| origin.ignores_ranges())
    }

    /// The registry the layer's first origin reaches, if it is one: what a per-registry
    /// limit counts the layer's fill against.
    pub fn registry(&self) -> Option<String> {
        lock(&self.origins)
            .first()
            .and_then(|origin| origin.registry().map(str::to_string))
    }

    /// The places to fetch the blob from, in order.
    pub fn origins(&self) -> Vec<Arc<dyn BlobOrigin>> {
        lock(&self.origins).clone()
    }

    /// The chunks covering uncompressed bytes `range` (empty past the end).
    fn chunks_of(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let first = self.index.chunk_at(range.start);
        let last = self.index.chunk_at(range.end - 1);
        match (first, last) {
            (Some(first), Some(last)) => first..last + 1,
            _ => 0..0,
        }
    }

    fn millis_since_epoch(&self) -> u64 {
        // +1 so that a failure in the first millisecond is not "no failure".
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// The error of a read that touches `chunk` if it failed less than the hold ago.
    fn recent_failure(&self, chunk: usize) -> Option<io::Error> {
        let at = self.failed_at.get(chunk)?.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let hold = u64::try_from(self.failure_hold.as_millis()).unwrap_or(u64::MAX);
        if self.millis_since_epoch().saturating_sub(at) >= hold {
            return None;
        }
        Some(io::Error::other(format!(
            "layer {} chunk {chunk}: {}",
            self.digest,
            lock(&self.last_failure)
        )))
    }

    /// Stores the waker for `chunk` (once per distinct waker).
    fn register_waker(&self, chunk: usize, waker: &Waker) {
        let mut waiters = lock(&self.waiters);
        let list = waiters.entry(chunk).or_default();
        if !list.iter().any(|known| known.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    fn wake(&self, chunk: usize) {
        let woken = lock(&self.waiters).remove(&chunk);
        for waker in woken.into_iter().flatten() {
            waker.wake();
        }
    }

    /// Sends foreground wants for those of `chunks` without an outstanding one. Every bit is
    /// set before the first want goes out, so the fetcher sees the whole set and can coalesce
    /// neighbours into one request.
    fn want(&self, chunks: &[usize]) {
        let new: Vec<usize> = chunks
            .iter()
            .copied()
            .filter(|&chunk| set_bit(&self.requested, chunk))
            .collect();
        let Some(layer) = self.me.upgrade() else {
            return;
        };
        let since = Instant::now();
        for chunk in new {
            let want = Want {
                layer: Arc::clone(&layer),
                chunk,
                since,
            };
            if self.wants.send(want).is_err() {
                // The fetcher is gone (the agent is stopping): fail instead of parking forever.
                self.fail_chunks(chunk..chunk + 1, "the fetcher has stopped");
            }
        }
    }

    /// Verifies the chunks `chunks` from `stored` (their bytes exactly as in the blob, back to
    /// back) and stores them: data written and synced, then the bitmap persisted, then the
    /// bits set and the waiting reads woken. Chunks already present are skipped. Nothing is
    /// stored if any chunk fails verification.
    pub fn store_chunks(&self, chunks: Range<usize>, stored: &[u8]) -> Result<(), StoreError> {
        let verify_error = |chunk: usize, reason: String| StoreError::Verify {
            layer: self.digest.clone(),
            chunk,
            reason,
        };
        let span = self.blob_span(chunks.clone());
        if span.end - span.start != stored.len() as u64 {
            return Err(verify_error(
                chunks.start,
                format!(
                    "the origin sent {} bytes for blob bytes {}..{}",
                    stored.len(),
                    span.start,
                    span.end
                ),
            ));
        }
        let mut decoded = Vec::new();
        for chunk in chunks {
            if self.is_present(chunk) {
                continue;
            }
            let range = self.index.blob_range(chunk);
            // Inside `span` (checked above), so in `stored`.
            let bytes = usize::try_from(range.start - span.start)
                .ok()
                .zip(usize::try_from(range.end - span.start).ok())
                .and_then(|(start, end)| stored.get(start..end))
                .ok_or_else(|| verify_error(chunk, "chunk outside the span".into()))?;
            let target = self.index.image_range(chunk);
            let len = usize::try_from(target.end - target.start)
                .map_err(|_| verify_error(chunk, "chunk too large".into()))?;
            let mut out = vec![0u8; len];
            self.index
                .decode_chunk_into(chunk, bytes, &mut out)
                .map_err(|error| verify_error(chunk, error))?;
            decoded.push((chunk, target.start, out, range.start, bytes));
        }
        if decoded.is_empty() {
            return Ok(());
        }
        let io_error = |source| StoreError::Io {
            layer: self.digest.clone(),
            source,
        };
        for (_, offset, bytes, blob_offset, frame) in &decoded {
            self.image.write_all_at(bytes, *offset).map_err(io_error)?;
            if let Some(blob) = &self.blob {
                blob.write_all_at(frame, *blob_offset).map_err(io_error)?;
            }
        }
        // Both durable before the bit: a set bit vouches for the image and the blob copy.
        self.image.sync_data().map_err(io_error)?;
        if let Some(blob) = &self.blob {
            blob.sync_data().map_err(io_error)?;
        }
        let indexes: Vec<u64> = decoded.iter().map(|(chunk, ..)| *chunk as u64).collect();
        lock(&self.bitmap)
            .set_present_many(&indexes)
            .map_err(|source| StoreError::Bitmap {
                layer: self.digest.clone(),
                source,
            })?;
        for (chunk, _, bytes, _, frame) in &decoded {
            if set_bit(&self.present, *chunk) {
                self.present_count.fetch_add(1, Ordering::AcqRel);
            }
            self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_fetched
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            debug!(layer = %self.digest, chunk, bytes = bytes.len(), "chunk stored");
            clear_bit(&self.requested, *chunk);
            self.wake(*chunk);
        }
        if self.is_complete() {
            self.complete.send_replace(true);
        }
        Ok(())
    }

    /// Bytes of the blob holding `chunks` (a non-empty range of chunk indexes).
    pub fn blob_span(&self, chunks: Range<usize>) -> Range<u64> {
        let start = self.index.blob_range(chunks.start).start;
        let end = self
            .index
            .blob_range(chunks.end.saturating_sub(1).max(chunks.start))
            .end;
        start..end
    }

    /// Gives up on `chunks` for now: reads waiting for them fail, and so do new reads for
    /// [`Self::failure_hold`].
    pub fn fail_chunks(&self, chunks: Range<usize>, reason: &str) {
        warn!(layer = %self.digest, chunks = ?chunks, reason, "chunks could not be fetched");
        *lock(&self.last_failure) = reason.to_string();
        let now = self.millis_since_epoch();
        for chunk in chunks {
            if let Some(at) = self.failed_at.get(chunk) {
                at.store(now, Ordering::Release);
            }
            clear_bit(&self.requested, chunk);
            self.wake(chunk);
        }
    }

    /// Forgets an outstanding foreground want for `chunk` without failing it (the fetcher
    /// dropped it because the chunk arrived another way).
    pub fn clear_request(&self, chunk: usize) {
        clear_bit(&self.requested, chunk);
        self.wake(chunk);
    }
}

impl BlockSource for LazyLayer {
    fn len(&self) -> u64 {
        self.index.image_size()
    }

    fn read_at(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        waker: &Waker,
    ) -> Poll<io::Result<()>> {
        if self.is_poisoned() {
            return Poll::Ready(Err(io::Error::other(format!(
                "layer {}: {}",
                self.digest,
                lock(&self.poison_reason)
            ))));
        }
        let len: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
        let chunks = self.chunks_of(offset..offset.saturating_add(len));
        self.note_touched(chunks.clone());
        let mut missing = false;
        for chunk in chunks.clone() {
            if self.is_present(chunk) {
                continue;
            }
            if let Some(error) = self.recent_failure(chunk) {
                return Poll::Ready(Err(error));
            }
            missing = true;
        }
        if !missing {
            return Poll::Ready(preadv_exact(&self.image, offset, bufs));
        }
        // Register before asking, then look again: a chunk stored between the first look and
        // the registration would otherwise never wake this read.
        let mut still_missing = Vec::new();
        for chunk in chunks {
            if self.is_present(chunk) {
                continue;
            }
            self.register_waker(chunk, waker);
            if !self.is_present(chunk) {
                still_missing.push(chunk);
            }
        }
        if still_missing.is_empty() {
            waker.wake_by_ref();
        } else {
            self.want(&still_missing);
        }
        Poll::Pending
    }
}
