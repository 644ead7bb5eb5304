//! One VM's extent table: which bytes of the layer-store device hold what.
//!
//! The device's address space (fixed capacity, 1 PiB by default):
//! - `[0, 1 MiB)`: the header region. Its first 4 KiB read as zeros (the kernel's partition
//!   probes find no table there); the rendered header (see below) starts at
//!   [`HEADER_OFFSET`]; the rest of the region reads as zeros.
//! - each mapped layer at a fresh offset, 1 MiB-aligned, after the previous one. A layer's
//!   extent is readable up to its length rounded up to 4 KiB (bytes past the layer's end read as
//!   zeros), so a guest with 4 KiB logical blocks can read the last block. Offsets are never
//!   reused during the table's life: after an unmap the range reads as unmapped for good, and a
//!   later layer goes elsewhere (a reused range could be served from the guest's stale page
//!   cache).
//! - the last 1 MiB: zeros (the backup GPT probe at the last sectors finds nothing).
//! - anything else is unmapped: a read that touches it fails with `VIRTIO_BLK_S_IOERR`.
//!
//! Header format, version 1 (little-endian), at device offset [`HEADER_OFFSET`]:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `GANTRYLS` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | number of entries |
//! | 16 | 8 | generation: incremented by every map and unmap |
//! | 24 | 8 | device capacity in bytes |
//! | 32 | 128 × n | entries, by increasing offset |
//!
//! Entry: offset `u64`, length `u64`, digest length `u16`, digest (UTF-8, e.g.
//! `sha256:<hex>`, at most [`MAX_DIGEST_LEN`] bytes), zero padding to 128 bytes.
//!
//! Concurrency: the queue threads read an immutable [`Snapshot`] through an `ArcSwap` (no lock,
//! no shared write on the read path). Map and unmap build a new snapshot under a mutex that only
//! they take, and publish it atomically; a request already running keeps the snapshot it
//! started with.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use arc_swap::ArcSwap;
use thiserror::Error;
use vm_memory::VolatileSlice;

use super::source::BlockSource;
use crate::metrics::BlkMetrics;

/// Size of the header region at the start of the device.
pub const HEADER_REGION_SIZE: u64 = 1 << 20;
/// Where the rendered header starts; the bytes before it read as zeros.
pub const HEADER_OFFSET: u64 = 4096;
/// Alignment of every layer's offset.
pub const LAYER_ALIGNMENT: u64 = 1 << 20;
/// Granularity of a layer extent's readable length (bytes past the layer's end read as zeros).
pub const EXTENT_BLOCK: u64 = 4096;
/// Size of the zero region at the end of the device.
pub const TAIL_ZERO_SIZE: u64 = 1 << 20;
/// Default device capacity: 1 PiB.
pub const DEFAULT_CAPACITY: u64 = 1 << 50;
/// Header magic.
pub const HEADER_MAGIC: [u8; 8] = *b"GANTRYLS";
/// Header format version.
pub const HEADER_VERSION: u32 = 1;
/// Size of the header's fixed part.
pub const HEADER_FIXED_SIZE: usize = 32;
/// Size of one header entry.
pub const HEADER_ENTRY_SIZE: usize = 128;
/// Longest digest a header entry holds.
pub const MAX_DIGEST_LEN: usize = HEADER_ENTRY_SIZE - 18;
/// Most layers mapped at once (what fits in the header region).
pub const MAX_MAPPED_LAYERS: usize =
    (HEADER_REGION_SIZE as usize - HEADER_OFFSET as usize - HEADER_FIXED_SIZE) / HEADER_ENTRY_SIZE;

/// A 4 KiB page of zeros, source of every zero fill.
static ZEROES: [u8; 4096] = [0u8; 4096];

/// Errors of map and unmap.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayerStoreError {
    /// The capacity cannot hold a header region, a layer and the tail.
    #[error("invalid capacity {0}: must be a multiple of 1 MiB and at least 3 MiB")]
    InvalidCapacity(u64),
    /// The layer has no bytes.
    #[error("layer {digest} is empty")]
    EmptyLayer {
        /// The layer's digest.
        digest: String,
    },
    /// The digest does not fit a header entry or is empty.
    #[error("digest must be 1..={MAX_DIGEST_LEN} bytes")]
    InvalidDigest,
    /// No room left in the device's address space (offsets are never reused).
    #[error("layer store address space exhausted")]
    AddressSpaceExhausted,
    /// The header region cannot list more layers.
    #[error("at most {MAX_MAPPED_LAYERS} layers can be mapped at once")]
    TooManyLayers,
    /// No layer is mapped at this offset.
    #[error("no layer mapped at offset {0}")]
    NotMapped(u64),
    /// A recorded mapping cannot be put back: its offset is unaligned, taken, or out of range.
    #[error("cannot restore a layer at offset {0:#x}: unaligned, taken or out of range")]
    NotRestorable(u64),
}

/// Where a layer is mapped on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Byte offset on the device (1 MiB-aligned).
    pub offset: u64,
    /// The layer's length in bytes.
    pub length: u64,
}

/// A mapped layer, as listed by [`LayerStore::layers`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedLayer {
    /// The layer's digest.
    pub digest: String,
    /// Where it is mapped.
    pub extent: Extent,
}

/// What backs a region of the device.
#[derive(Clone)]
enum Backing {
    /// Reads as zeros.
    Zeros,
    /// The header region: `bytes` start at [`HEADER_OFFSET`] within the region; everything else
    /// reads as zeros.
    Header(Arc<[u8]>),
    /// A layer: the source's bytes, then zeros up to the region's end.
    Layer(Arc<dyn BlockSource>),
}

impl fmt::Debug for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backing::Zeros => f.write_str("Zeros"),
            Backing::Header(bytes) => write!(f, "Header({} bytes)", bytes.len()),
            Backing::Layer(source) => write!(f, "Layer({source:?})"),
        }
    }
}

/// A readable range of the device.
#[derive(Clone, Debug)]
struct Region {
    start: u64,
    end: u64,
    backing: Backing,
}

/// Why a read of the device failed.
#[derive(Debug, Error)]
pub enum ReadError {
    /// Part of the range is not mapped for this VM.
    #[error("unmapped range at device offset {0}")]
    Unmapped(u64),
    /// The layer's source failed.
    #[error("layer source failed: {0}")]
    Source(#[from] std::io::Error),
    /// Guest memory could not be written.
    #[error("guest memory not accessible")]
    GuestMemory,
}

/// An immutable view of the extent table, as the queue threads see it.
#[derive(Debug)]
pub struct Snapshot {
    capacity: u64,
    /// Sorted by `start`, non-overlapping.
    regions: Vec<Region>,
}

impl Snapshot {
    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn region_at(&self, offset: u64) -> Option<&Region> {
        let index = self
            .regions
            .partition_point(|region| region.start <= offset);
        let region = self.regions.get(index.checked_sub(1)?)?;
        (offset < region.end).then_some(region)
    }

    /// How many bytes from `offset` (at most `max`) can be read with one [`Snapshot::read_piece`]
    /// call: up to the end of the region holding `offset`. Fails if `offset` is unmapped.
    pub fn piece_len(&self, offset: u64, max: u64) -> Result<u64, ReadError> {
        let region = self.region_at(offset).ok_or(ReadError::Unmapped(offset))?;
        Ok((region.end - offset).min(max))
    }

    /// Reads device bytes starting at `offset` into `bufs` (whose total length must not pass
    /// the end of the region holding `offset`: see [`Snapshot::piece_len`]).
    pub fn read_piece(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        waker: &Waker,
    ) -> Poll<Result<(), ReadError>> {
        let Some(region) = self.region_at(offset) else {
            return Poll::Ready(Err(ReadError::Unmapped(offset)));
        };
        let total: u64 = bufs.iter().map(|buf| buf.len() as u64).sum();
        let within = offset - region.start;
        if within
            .checked_add(total)
            .is_none_or(|end| end > region.end - region.start)
        {
            return Poll::Ready(Err(ReadError::Unmapped(region.end)));
        }
        match &region.backing {
            Backing::Zeros => Poll::Ready(fill_zeroes(bufs)),
            Backing::Header(bytes) => Poll::Ready(copy_header(bytes, within, bufs)),
            Backing::Layer(source) => {
                let source_len = source.len();
                let from_source = source_len.saturating_sub(within).min(total);
                let (head, tail) = split_slices(bufs, from_source);
                if !head.is_empty() {
                    match source.read_at(within, &head, waker) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error.into())),
                        Poll::Ready(Ok(())) => {}
                    }
                }
                Poll::Ready(fill_zeroes(&tail))
            }
        }
    }
}

/// Splits `bufs` after `at` bytes.
fn split_slices<'a>(
    bufs: &[VolatileSlice<'a>],
    at: u64,
) -> (Vec<VolatileSlice<'a>>, Vec<VolatileSlice<'a>>) {
    let mut head = Vec::with_capacity(bufs.len());
    let mut tail = Vec::new();
    let mut remaining = at;
    for buf in bufs {
        let len = buf.len() as u64;
        if remaining >= len {
            head.push(*buf);
            remaining -= len;
        } else if remaining == 0 {
            tail.push(*buf);
        } else {
            // `remaining < len`, so it fits in usize and the split is inside the slice.
            match buf.split_at(remaining as usize) {
                Ok((first, second)) => {
                    head.push(first);
                    tail.push(second);
                }
                Err(_) => tail.push(*buf),
            }
            remaining = 0;
        }
    }
    (head, tail)
}

fn fill_zeroes(bufs: &[VolatileSlice<'_>]) -> Result<(), ReadError> {
    for buf in bufs {
        let mut done = 0usize;
        while done < buf.len() {
            let take = (buf.len() - done).min(ZEROES.len());
            let part = buf
                .subslice(done, take)
                .map_err(|_| ReadError::GuestMemory)?;
            part.copy_from(&ZEROES[..take]);
            done += take;
        }
    }
    Ok(())
}

/// Copies the header region's bytes from `within` (an offset in the region) into `bufs`.
fn copy_header(header: &[u8], within: u64, bufs: &[VolatileSlice<'_>]) -> Result<(), ReadError> {
    let mut position = within;
    for buf in bufs {
        let mut done = 0usize;
        while done < buf.len() {
            let at = position + done as u64;
            let remaining = buf.len() - done;
            let part_len;
            if at < HEADER_OFFSET || at - HEADER_OFFSET >= header.len() as u64 {
                // Zeros up to the header's start, or to the end of the buffer.
                let zero_end = if at < HEADER_OFFSET {
                    HEADER_OFFSET - at
                } else {
                    u64::MAX
                };
                part_len = remaining.min(zero_end.min(ZEROES.len() as u64) as usize);
                let part = buf
                    .subslice(done, part_len)
                    .map_err(|_| ReadError::GuestMemory)?;
                part.copy_from(&ZEROES[..part_len]);
            } else {
                let from = (at - HEADER_OFFSET) as usize;
                let bytes = header.get(from..).unwrap_or_default();
                part_len = remaining.min(bytes.len());
                let part = buf
                    .subslice(done, part_len)
                    .map_err(|_| ReadError::GuestMemory)?;
                part.copy_from(&bytes[..part_len]);
            }
            done += part_len;
        }
        position += buf.len() as u64;
    }
    Ok(())
}

/// A layer in the table, with its source.
#[derive(Clone, Debug)]
struct Entry {
    digest: String,
    length: u64,
    source: Arc<dyn BlockSource>,
}

/// The writers' state.
#[derive(Debug)]
struct State {
    next_offset: u64,
    generation: u64,
    layers: BTreeMap<u64, Entry>,
}

#[derive(Debug)]
struct Inner {
    capacity: u64,
    state: Mutex<State>,
    snapshot: ArcSwap<Snapshot>,
    /// What the device served through this table (the table lives as long as the device).
    metrics: BlkMetrics,
}

/// One VM's extent table. Cheap to clone; every clone is the same table.
#[derive(Clone, Debug)]
pub struct LayerStore {
    inner: Arc<Inner>,
}

impl LayerStore {
    /// An empty table (header region and tail only) for a device of `capacity` bytes.
    pub fn new(capacity: u64) -> Result<LayerStore, LayerStoreError> {
        Self::with_metrics(capacity, BlkMetrics::default())
    }

    /// [`LayerStore::new`], the requests served through it counted into `metrics`.
    pub fn with_metrics(capacity: u64, metrics: BlkMetrics) -> Result<LayerStore, LayerStoreError> {
        if !capacity.is_multiple_of(LAYER_ALIGNMENT)
            || capacity < HEADER_REGION_SIZE + LAYER_ALIGNMENT + TAIL_ZERO_SIZE
        {
            return Err(LayerStoreError::InvalidCapacity(capacity));
        }
        let state = State {
            next_offset: HEADER_REGION_SIZE,
            generation: 0,
            layers: BTreeMap::new(),
        };
        let snapshot = build_snapshot(capacity, &state);
        Ok(LayerStore {
            inner: Arc::new(Inner {
                capacity,
                state: Mutex::new(state),
                snapshot: ArcSwap::from_pointee(snapshot),
                metrics,
            }),
        })
    }

    /// Device capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.inner.capacity
    }

    /// Where the requests served through this table are counted.
    pub fn metrics(&self) -> &BlkMetrics {
        &self.inner.metrics
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is rebuilt from scratch on every change, so a panic elsewhere cannot leave
        // it half-updated.
        crate::sync::lock(&self.inner.state)
    }

    /// The writers' state, if the table can take one more layer.
    fn state_with_room(&self) -> Result<MutexGuard<'_, State>, LayerStoreError> {
        let state = self.state();
        if state.layers.len() >= MAX_MAPPED_LAYERS {
            return Err(LayerStoreError::TooManyLayers);
        }
        Ok(state)
    }

    /// Maps a layer at a fresh 1 MiB-aligned offset and publishes it to the queue threads (and
    /// the header). Requests already running are unaffected.
    pub fn map_layer(
        &self,
        digest: &str,
        source: Arc<dyn BlockSource>,
    ) -> Result<Extent, LayerStoreError> {
        let length = check_new_layer(digest, source.as_ref())?;
        let mut state = self.state_with_room()?;
        let offset = state.next_offset;
        let usable_end = self.inner.capacity - TAIL_ZERO_SIZE;
        let next_offset = offset
            .checked_add(length)
            .and_then(|end| end.checked_next_multiple_of(LAYER_ALIGNMENT))
            .filter(|end| *end <= usable_end)
            .ok_or(LayerStoreError::AddressSpaceExhausted)?;
        state.next_offset = next_offset;
        state.generation += 1;
        self.publish_layer(&mut state, offset, digest, source);
        tracing::debug!(digest, offset, length, "layer store: layer mapped");
        Ok(Extent { offset, length })
    }

    /// Where the next layer goes and the table's generation: what a restarted agent needs
    /// beside the mappings to keep offsets unique ([`LayerStore::restore_position`]).
    pub fn position(&self) -> (u64, u64) {
        let state = self.state();
        (state.next_offset, state.generation)
    }

    /// Maps `source` at exactly `offset`, where a previous agent mapped it and the guest has it
    /// mounted. The offset must be aligned, free and inside the usable range; the next fresh
    /// offset moves past it.
    pub fn restore_layer(
        &self,
        digest: &str,
        offset: u64,
        source: Arc<dyn BlockSource>,
    ) -> Result<Extent, LayerStoreError> {
        let length = check_new_layer(digest, source.as_ref())?;
        let mut state = self.state_with_room()?;
        let usable_end = self.inner.capacity - TAIL_ZERO_SIZE;
        let end = offset
            .checked_add(length)
            .and_then(|end| end.checked_next_multiple_of(LAYER_ALIGNMENT))
            .filter(|end| {
                offset >= HEADER_REGION_SIZE
                    && offset.is_multiple_of(LAYER_ALIGNMENT)
                    && *end <= usable_end
            })
            .ok_or(LayerStoreError::NotRestorable(offset))?;
        let before_overlaps = state
            .layers
            .range(..offset)
            .next_back()
            .is_some_and(|(start, entry)| start + entry.length > offset);
        let after_overlaps = state.layers.range(offset..end).next().is_some();
        if before_overlaps || after_overlaps {
            return Err(LayerStoreError::NotRestorable(offset));
        }
        state.next_offset = state.next_offset.max(end);
        // The generation is the previous agent's ([`LayerStore::restore_position`]): putting
        // back what the guest already sees is no change to it.
        self.publish_layer(&mut state, offset, digest, source);
        tracing::debug!(digest, offset, length, "layer store: layer restored");
        Ok(Extent { offset, length })
    }

    /// Adds a checked layer at `offset` and publishes the new snapshot.
    fn publish_layer(
        &self,
        state: &mut State,
        offset: u64,
        digest: &str,
        source: Arc<dyn BlockSource>,
    ) {
        let length = source.len();
        state.layers.insert(
            offset,
            Entry {
                digest: digest.to_owned(),
                length,
                source,
            },
        );
        self.inner
            .snapshot
            .store(Arc::new(build_snapshot(self.inner.capacity, state)));
    }

    /// Moves the next fresh offset and the generation at least to a previous agent's, so
    /// that no offset it ever handed out is reused (the guest may cache its blocks).
    pub fn restore_position(&self, next_offset: u64, generation: u64) {
        let mut state = self.state();
        let usable_end = self.inner.capacity - TAIL_ZERO_SIZE;
        state.next_offset = state.next_offset.max(next_offset.min(usable_end));
        state.generation = state.generation.max(generation);
        self.inner
            .snapshot
            .store(Arc::new(build_snapshot(self.inner.capacity, &state)));
    }

    /// Unmaps the layer at `offset`. From now on, new reads of its range fail; the range is
    /// never given to another layer.
    pub fn unmap_layer(&self, offset: u64) -> Result<MappedLayer, LayerStoreError> {
        let mut state = self.state();
        let entry = state
            .layers
            .remove(&offset)
            .ok_or(LayerStoreError::NotMapped(offset))?;
        state.generation += 1;
        self.inner
            .snapshot
            .store(Arc::new(build_snapshot(self.inner.capacity, &state)));
        tracing::debug!(digest = %entry.digest, offset, "layer store: layer unmapped");
        Ok(MappedLayer {
            digest: entry.digest,
            extent: Extent {
                offset,
                length: entry.length,
            },
        })
    }

    /// The mapped layers, by increasing offset.
    pub fn layers(&self) -> Vec<MappedLayer> {
        self.state()
            .layers
            .iter()
            .map(|(offset, entry)| MappedLayer {
                digest: entry.digest.clone(),
                extent: Extent {
                    offset: *offset,
                    length: entry.length,
                },
            })
            .collect()
    }

    /// The header as rendered now (what the guest reads at [`HEADER_OFFSET`]).
    pub fn header(&self) -> Vec<u8> {
        render_header(self.inner.capacity, &self.state())
    }

    /// The current snapshot, for the queue threads.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.snapshot.load()
    }
}

/// Checks a layer about to be mapped; returns its length.
fn check_new_layer(digest: &str, source: &dyn BlockSource) -> Result<u64, LayerStoreError> {
    if digest.is_empty() || digest.len() > MAX_DIGEST_LEN {
        return Err(LayerStoreError::InvalidDigest);
    }
    match source.len() {
        0 => Err(LayerStoreError::EmptyLayer {
            digest: digest.to_owned(),
        }),
        length => Ok(length),
    }
}

fn render_header(capacity: u64, state: &State) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_FIXED_SIZE + state.layers.len() * HEADER_ENTRY_SIZE);
    bytes.extend_from_slice(&HEADER_MAGIC);
    bytes.extend_from_slice(&HEADER_VERSION.to_le_bytes());
    // MAX_MAPPED_LAYERS < u32::MAX, enforced by map_layer.
    bytes.extend_from_slice(&(state.layers.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&state.generation.to_le_bytes());
    bytes.extend_from_slice(&capacity.to_le_bytes());
    for (offset, entry) in &state.layers {
        let start = bytes.len();
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(&entry.length.to_le_bytes());
        // map_layer bounds the digest by MAX_DIGEST_LEN < u16::MAX.
        bytes.extend_from_slice(&(entry.digest.len() as u16).to_le_bytes());
        bytes.extend_from_slice(entry.digest.as_bytes());
        bytes.resize(start + HEADER_ENTRY_SIZE, 0);
    }
    bytes
}

fn build_snapshot(capacity: u64, state: &State) -> Snapshot {
    let mut regions = Vec::with_capacity(state.layers.len() + 2);
    regions.push(Region {
        start: 0,
        end: HEADER_REGION_SIZE,
        backing: Backing::Header(render_header(capacity, state).into()),
    });
    for (offset, entry) in &state.layers {
        // map_layer checked that the aligned end fits below the tail.
        let readable = entry
            .length
            .checked_next_multiple_of(EXTENT_BLOCK)
            .unwrap_or(entry.length);
        regions.push(Region {
            start: *offset,
            end: offset.saturating_add(readable),
            backing: Backing::Layer(entry.source.clone()),
        });
    }
    regions.push(Region {
        start: capacity - TAIL_ZERO_SIZE,
        end: capacity,
        backing: Backing::Zeros,
    });
    Snapshot { capacity, regions }
}
