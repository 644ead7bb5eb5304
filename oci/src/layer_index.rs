//! A lazy layer's chunk map, whatever its format: where each chunk of the image lies, which
//! blob bytes hold it, and how those bytes become the chunk once fetched (verified first).
//!
//! - the chunked EROFS format's chunk index: each chunk a zstd frame (or raw bytes) with its
//!   SHA-256;
//! - a synthesized gzip layer's map: data chunks inflated from gzip spans, each span checked
//!   against its SHA-256; the metadata chunks were written when the layer was synthesized and
//!   have nothing to fetch (their blob range is empty).
//!
//! Blob ranges never go back as chunks go on, but a gzip layer's neighbours may share a span:
//! readers of a whole blob keep what the next chunk needs.

use std::ops::Range;
use std::sync::Arc;

use crate::chunked::ChunkIndex;
use crate::ztoc::synth::LayerMap;

/// The chunk map of one lazy layer.
#[derive(Debug, Clone)]
pub enum LayerIndex {
    /// A layer in the chunked EROFS format.
    Chunked(ChunkIndex),
    /// A gzip layer read as it is, through its synthesized EROFS image.
    Gzip(Arc<LayerMap>),
}

impl From<ChunkIndex> for LayerIndex {
    fn from(index: ChunkIndex) -> Self {
        LayerIndex::Chunked(index)
    }
}

impl From<LayerMap> for LayerIndex {
    fn from(map: LayerMap) -> Self {
        LayerIndex::Gzip(Arc::new(map))
    }
}

impl LayerIndex {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        match self {
            LayerIndex::Chunked(index) => index.len(),
            LayerIndex::Gzip(map) => map.len(),
        }
    }

    /// Whether there are no chunks (an empty image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image's size in bytes.
    pub fn image_size(&self) -> u64 {
        match self {
            LayerIndex::Chunked(index) => index.uncompressed_size(),
            LayerIndex::Gzip(map) => map.image_size(),
        }
    }

    /// The bytes of the blob that hold chunks (for a chunked layer, the bytes before its
    /// index section).
    pub fn blob_data_size(&self) -> u64 {
        match self {
            LayerIndex::Chunked(index) => index.section_start(),
            LayerIndex::Gzip(map) => map.compressed_size(),
        }
    }

    /// The chunk holding image byte `offset`, `None` past the end.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        match self {
            LayerIndex::Chunked(index) => index.chunk_at(offset),
            LayerIndex::Gzip(map) => map.chunk_at(offset),
        }
    }

    /// The image bytes of `chunk` (`chunk` < [`Self::len`]).
    pub fn image_range(&self, chunk: usize) -> Range<u64> {
        match self {
            LayerIndex::Chunked(index) => index.uncompressed_range(chunk),
            LayerIndex::Gzip(map) => map.image_range(chunk),
        }
    }

    /// The blob bytes to fetch for `chunk` (`chunk` < [`Self::len`]).
    pub fn blob_range(&self, chunk: usize) -> Range<u64> {
        match self {
            LayerIndex::Chunked(index) => index.blob_range(chunk),
            LayerIndex::Gzip(map) => map.blob_range(chunk),
        }
    }

    /// The checksum that names `chunk`'s bytes on every card, if the format gives one per
    /// chunk (peers are picked by it).
    pub fn chunk_checksum(&self, chunk: usize) -> Option<[u8; 32]> {
        match self {
            LayerIndex::Chunked(index) => index.entries().get(chunk).and_then(|e| e.checksum),
            LayerIndex::Gzip(_) => None,
        }
    }

    /// Verifies `stored` (the bytes of [`Self::blob_range`]`(chunk)`) and decodes chunk
    /// `chunk` into `out` (its image bytes). On error `out` holds nothing to use.
    pub fn decode_chunk_into(
        &self,
        chunk: usize,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        match self {
            LayerIndex::Chunked(index) => index
                .decode_chunk_into(chunk, stored, out)
                .map_err(|error| error.to_string()),
            LayerIndex::Gzip(map) => map
                .decode_chunk_into(chunk, stored, out)
                .map_err(|error| error.to_string()),
        }
    }

    /// The chunks whose stored bytes a read of blob bytes `range` touches: what a holder of a
    /// sparse copy of the blob must have to serve it. `None` when the range reaches bytes no
    /// chunk covers that a copy never holds (a chunked blob's index section counts as held
    /// once every chunk is; a gzip blob's header before its first span does not).
    pub fn chunks_touching(&self, range: &Range<u64>) -> Option<Range<usize>> {
        let chunks = self.len();
        match self {
            LayerIndex::Chunked(index) => {
                let entries = index.entries();
                let first_offset = entries.first().map_or(0, |e| e.block_offset);
                if range.start < first_offset {
                    return None;
                }
                // Past the chunks (the index section): only when every chunk is held too.
                if range.end > index.section_start() {
                    return Some(0..chunks);
                }
                let first = entries
                    .partition_point(|e| e.block_offset <= range.start)
                    .saturating_sub(1);
                let end = entries.partition_point(|e| e.block_offset < range.end);
                Some(first..end)
            }
            LayerIndex::Gzip(map) => {
                let data: Vec<usize> = (0..chunks).filter(|&c| !map.is_metadata(c)).collect();
                let overlaps = |chunk: &usize| {
                    let blob = map.blob_range(*chunk);
                    blob.start < range.end && range.start < blob.end
                };
                let first = *data.iter().find(|c| overlaps(c))?;
                let last = *data.iter().rev().find(|c| overlaps(c))?;
                let covered = map.blob_range(first).start..map.blob_range(last).end;
                (covered.start <= range.start && range.end <= covered.end)
                    .then_some(first..last + 1)
            }
        }
    }
}
