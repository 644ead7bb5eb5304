//! The synthesized layer: an EROFS image laid out from a gzip layer's file table, whose
//! metadata is complete at once and whose file data blocks are holes, each mapped to a range
//! of the uncompressed tar and so to the gzip spans that hold it.
//!
//! The image is cut into chunks for the lazy data path. Block 0 (the superblock) and the
//! metadata after the data are written when the layer is synthesized: they are present from
//! the start. The data blocks (block 1 up to the metadata) are laid out in tar order, so the
//! blocks whose first byte lies in one span form one run; each run is a chunk (at most
//! [`MAX_CHUNK_BLOCKS`] blocks), fetched as the compressed bytes of the spans its bytes need,
//! verified span by span, inflated from the first span's checkpoint and scattered into blocks.
//!
//! Layer semantics (whiteouts, opaque directories, replaced entries, hard links) are the eager
//! conversion's: the members go through the same converter, only the data is placed instead
//! of copied.

use std::fs::File;
use std::ops::Range;

use gantry_erofs::format::BLOCK_SIZE;
use gantry_erofs::tree::{DataPlacement, FileData};
use gantry_erofs::writer::{ImageWriter, WriterError};

use super::toc::{TocEntry, Ztoc};
use super::zinfo::{Checkpoint, GzipIndex, WINDOW, ZinfoError};
use crate::convert::{self, ConvertError, ConvertOptions, LayerTree, Members};
use crate::tar_stream::{TarEntry, TarError};

const BLOCK: u64 = BLOCK_SIZE as u64;

/// The most blocks of one data chunk (16 MiB): a chunk is held in memory while it is stored.
pub const MAX_CHUNK_BLOCKS: u32 = 4096;
/// The most uncompressed bytes of one span accepted from an index (a chunk's inflated bytes
/// are held in memory).
pub const MAX_SPAN_BYTES: u64 = 64 << 20;
/// Bytes before a span's end whose output may depend on the bits of its last compressed byte,
/// which is the next span's first: a chunk needing them fetches the next span too. Seven bits
/// hold at most three matches and a literal (775 bytes), and the symbol they end one more.
const SHARED_BYTE_REACH: u64 = 8 << 10;

/// Errors of synthesizing a layer or filling its chunks.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The index cannot be laid out (it contradicts itself or asks for too much).
    #[error("the layer's index: {0}")]
    Index(String),
    /// A member stored as a GNU or pax sparse file: its tar data is not its content.
    #[error("tar member {0} is stored sparse, which a synthesized layer cannot map")]
    SparseMember(String),
    /// The members as a tree (layer semantics, limits) failed as the eager conversion would.
    #[error(transparent)]
    Convert(#[from] ConvertError),
    /// Writing the image failed.
    #[error("writing the image: {0}")]
    Writer(#[from] WriterError),
    /// The gzip bytes of a chunk are not what the index says, or do not inflate.
    #[error("chunk {chunk}: {source}")]
    Gzip {
        /// The chunk.
        chunk: usize,
        /// Why.
        #[source]
        source: ZinfoError,
    },
    /// A chunk that is no data chunk, or a buffer of the wrong size.
    #[error("chunk {chunk}: {reason}")]
    Chunk {
        /// The chunk.
        chunk: usize,
        /// What was asked.
        reason: String,
    },
}

/// A run of one file's data blocks: image blocks from `block`, holding tar bytes from
/// `tar_offset` on, `len` bytes (the last block zero padded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    block: u32,
    tar_offset: u64,
    len: u64,
}

impl Segment {
    fn blocks(&self) -> u32 {
        // Reserved data fits the image's u32 block addresses (the writer checked).
        self.len.div_ceil(BLOCK) as u32
    }

    /// The tar bytes of the segment's blocks `blocks` (clipped to the segment).
    fn tar_range(&self, blocks: Range<u32>) -> Range<u64> {
        let first = blocks.start.max(self.block) - self.block;
        let end = blocks.end.min(self.block + self.blocks()) - self.block;
        let start = self.tar_offset + u64::from(first) * BLOCK;
        let stop = self.tar_offset + (u64::from(end) * BLOCK).min(self.len);
        start..stop
    }
}

/// What a chunk of the image is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkKind {
    /// Written at synthesis (the superblock, the metadata area).
    Metadata,
    /// File data blocks, inflated from `spans`.
    Data {
        /// The gzip spans the chunk's bytes need.
        spans: Range<usize>,
        /// The uncompressed tar bytes the chunk's blocks hold (first to last).
        tar: Range<u64>,
        /// The segments overlapping the chunk.
        segments: Range<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Chunk {
    blocks: Range<u32>,
    kind: ChunkKind,
}

/// A synthesized layer's map: the image's chunks and, for each data chunk, its place in the
/// gzip blob. Built by [`synthesize`]; lookups never fail on a built map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMap {
    gzip: GzipIndex,
    image_size: u64,
    chunks: Vec<Chunk>,
    segments: Vec<Segment>,
}

/// What [`synthesize`] made: the image file (metadata written, data blocks holes) and its map.
#[derive(Debug)]
pub struct SynthesizedLayer {
    /// The image, `map.image_size()` bytes.
    pub file: File,
    /// Where its chunks come from.
    pub map: LayerMap,
    /// Inodes in the image.
    pub inodes: u64,
    /// SHA-256 of the image as written (its data blocks as zeros).
    pub digest: [u8; 32],
}

/// The file table as converter members: data placed as holes, each placement recorded.
struct TableMembers {
    entries: std::vec::IntoIter<TocEntry>,
    current_offset: u64,
    /// The tar's size: placed data must lie inside it.
    tar_size: u64,
    segments: Vec<Segment>,
}

impl Members for TableMembers {
    fn next_member(&mut self) -> Result<Option<TarEntry>, TarError> {
        Ok(self.entries.next().map(|member| {
            self.current_offset = member.offset;
            member.entry
        }))
    }

    fn place_data(
        &mut self,
        writer: &mut ImageWriter,
        size: u64,
        _max_inline_tail: usize,
    ) -> Result<FileData, WriterError> {
        // Data in tar order, inside the tar, without overlap: what a real tar has, and what
        // keeps the chunks' spans in order.
        let after_last = self.segments.last().map_or(0, |s| s.tar_offset + s.len);
        let end = self.current_offset.checked_add(size);
        if self.current_offset < after_last || end.is_none_or(|end| end > self.tar_size) {
            return Err(WriterError::Read(std::io::Error::other(format!(
                "the index puts the data at tar bytes {}..+{size}, overlapping the member \
                 before or past the tar's end ({} bytes)",
                self.current_offset, self.tar_size
            ))));
        }
        let data = writer.reserve_file_data(size)?;
        if let DataPlacement::Flat { start_block, .. } = data.placement
            && size > 0
        {
            self.segments.push(Segment {
                block: start_block,
                tar_offset: self.current_offset,
                len: size,
            });
        }
        Ok(data)
    }
}

/// Checks what the layout relies on: spans of bounded size whose compressed bytes lie in the
/// blob, and no member stored sparse. (Where each file's data lies is checked as it is
/// placed.)
fn check_index(ztoc: &Ztoc) -> Result<(), SynthError> {
    check_gzip(&ztoc.gzip)?;
    if let Some(member) = ztoc.entries.iter().find(|member| member.entry.sparse) {
        return Err(SynthError::SparseMember(
            member.entry.path.escape_ascii().to_string(),
        ));
    }
    Ok(())
}

/// Checks the gzip index: a checkpoint at 0, one digest per span, spans in order inside the
/// blob, each inflating to at most [`MAX_SPAN_BYTES`] from not much more compressed bytes,
/// windows no larger than deflate's.
fn check_gzip(gzip: &GzipIndex) -> Result<(), SynthError> {
    let invalid = |what: String| Err(SynthError::Index(what));
    if gzip.checkpoints.is_empty() || gzip.checkpoints[0].uncompressed != 0 {
        return invalid("no checkpoint at the stream's start".into());
    }
    if gzip.span_digests.len() != gzip.checkpoints.len() {
        return invalid(format!(
            "{} span digests for {} checkpoints",
            gzip.span_digests.len(),
            gzip.checkpoints.len()
        ));
    }
    for index in 0..gzip.checkpoints.len() {
        let span = gzip.span(index).expect("index in range");
        let (compressed, uncompressed) = (span.compressed, span.uncompressed);
        if compressed.start > compressed.end
            || compressed.end > gzip.compressed_size
            || uncompressed.start >= uncompressed.end
        {
            return invalid(format!("span {index} is empty or out of order"));
        }
        let inflated = uncompressed.end - uncompressed.start;
        // Deflate never needs much more than its output (stored blocks add 5 bytes in 64 KiB).
        if inflated > MAX_SPAN_BYTES
            || compressed.end - compressed.start > inflated + inflated / 64 + (64 << 10)
        {
            return invalid(format!(
                "span {index}: {} compressed bytes for {inflated} uncompressed",
                compressed.end - compressed.start
            ));
        }
        let checkpoint = &gzip.checkpoints[index];
        if checkpoint.window.len() > WINDOW || checkpoint.bits > 7 {
            return invalid(format!(
                "checkpoint {index}: a {}-byte window, {} bits",
                checkpoint.window.len(),
                checkpoint.bits
            ));
        }
    }
    Ok(())
}

/// Lays out the layer `ztoc` describes as an EROFS image in `image` (truncated), with `spool`
/// as scratch space, exactly as [`convert::convert_to_file`] would lay out its tree, but with
/// every regular file's data left as a hole mapped to its bytes in the tar.
pub fn synthesize(
    ztoc: Ztoc,
    image: File,
    spool: File,
    options: &ConvertOptions,
) -> Result<SynthesizedLayer, SynthError> {
    check_index(&ztoc)?;
    let Ztoc { entries, gzip } = ztoc;
    let writer = ImageWriter::new(image, spool, false).map_err(WriterError::Io)?;
    let members = TableMembers {
        entries: entries.into_iter(),
        current_offset: 0,
        tar_size: gzip.uncompressed_size,
        segments: Vec::new(),
    };
    let LayerTree {
        tree,
        writer,
        members,
        ..
    } = convert::build_tree(members, writer, options)?;
    let data_end = writer.blocks_written();
    let image = writer.finish(&tree)?;
    let chunks = cut_chunks(&gzip, &members.segments, data_end, image.size);
    Ok(SynthesizedLayer {
        file: image.file,
        map: LayerMap {
            gzip,
            image_size: image.size,
            chunks,
            segments: members.segments,
        },
        inodes: image.inodes,
        digest: image.digest,
    })
}

/// The span holding uncompressed byte `offset` (the index was checked, so one does).
fn span_of(gzip: &GzipIndex, offset: u64) -> usize {
    gzip.checkpoints
        .partition_point(|c| c.uncompressed <= offset)
        .saturating_sub(1)
}

/// The spans a chunk holding uncompressed bytes `tar` needs: those holding its first and last
/// byte, and the next one when the last byte may depend on the bits it shares with it.
fn spans_needed(gzip: &GzipIndex, tar: &Range<u64>) -> Range<usize> {
    let first = span_of(gzip, tar.start);
    let mut last = span_of(gzip, tar.end - 1);
    if let (Some(span), Some(next)) = (gzip.span(last), gzip.checkpoints.get(last + 1))
        && next.bits > 0
        && tar.end + SHARED_BYTE_REACH > span.uncompressed.end
    {
        last += 1;
    }
    first..last + 1
}

/// Cuts the image into chunks: block 0, runs of data blocks by the span of their first byte
/// (at most [`MAX_CHUNK_BLOCKS`] each), the metadata after the data.
fn cut_chunks(
    gzip: &GzipIndex,
    segments: &[Segment],
    data_end: u32,
    image_size: u64,
) -> Vec<Chunk> {
    let mut chunks = vec![Chunk {
        blocks: 0..1,
        kind: ChunkKind::Metadata,
    }];
    let close = |chunks: &mut Vec<Chunk>, blocks: Range<u32>, segs: Range<usize>| {
        let tar = segments[segs.start].tar_range(blocks.clone()).start
            ..segments[segs.end - 1].tar_range(blocks.clone()).end;
        chunks.push(Chunk {
            blocks,
            kind: ChunkKind::Data {
                spans: spans_needed(gzip, &tar),
                tar,
                segments: segs,
            },
        });
    };
    // The run being built: its first block, the span of its first byte, its first segment.
    let mut run: Option<(u32, usize, usize)> = None;
    // Tar offsets only grow over the data blocks, so the span does too.
    let mut span = 0;
    for (index, segment) in segments.iter().enumerate() {
        for block in segment.block..segment.block + segment.blocks() {
            let first_byte = segment.tar_offset + u64::from(block - segment.block) * BLOCK;
            while gzip
                .checkpoints
                .get(span + 1)
                .is_some_and(|next| next.uncompressed <= first_byte)
            {
                span += 1;
            }
            match run {
                Some((start, run_span, _))
                    if run_span == span && block - start < MAX_CHUNK_BLOCKS => {}
                Some((start, _, first_segment)) => {
                    let last_segment = if segment.block == block {
                        index
                    } else {
                        index + 1
                    };
                    close(&mut chunks, start..block, first_segment..last_segment);
                    run = Some((block, span, index));
                }
                None => run = Some((block, span, index)),
            }
        }
    }
    if let Some((start, _, first_segment)) = run {
        close(&mut chunks, start..data_end, first_segment..segments.len());
    }
    let image_blocks = u32::try_from(image_size / BLOCK).unwrap_or(u32::MAX);
    if data_end < image_blocks {
        chunks.push(Chunk {
            blocks: data_end..image_blocks,
            kind: ChunkKind::Metadata,
        });
    }
    chunks
}

impl LayerMap {
    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// Whether the map has no chunks (never: block 0 is one).
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The image's size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// The gzip blob's size in bytes.
    pub fn compressed_size(&self) -> u64 {
        self.gzip.compressed_size
    }

    /// The gzip index the map reads through.
    pub fn gzip(&self) -> &GzipIndex {
        &self.gzip
    }

    /// The chunk holding image byte `offset`, if it is in the image.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.image_size {
            return None;
        }
        let block = u32::try_from(offset / BLOCK).ok()?;
        let index = self.chunks.partition_point(|c| c.blocks.end <= block);
        (index < self.chunks.len()).then_some(index)
    }

    /// The image bytes of `chunk` (empty for a chunk not in the map).
    pub fn image_range(&self, chunk: usize) -> Range<u64> {
        self.chunks.get(chunk).map_or(0..0, |c| {
            u64::from(c.blocks.start) * BLOCK..u64::from(c.blocks.end) * BLOCK
        })
    }

    /// Whether `chunk` is metadata, written when the layer was synthesized (nothing to fetch).
    pub fn is_metadata(&self, chunk: usize) -> bool {
        self.chunks
            .get(chunk)
            .is_some_and(|c| c.kind == ChunkKind::Metadata)
    }

    /// The blob bytes to fetch for `chunk`: the compressed bytes of the spans it needs. A
    /// metadata chunk has none (an empty range, before the data for block 0, after it for the
    /// rest), so blob ranges never go back as chunks go on; neighbours may share a span.
    pub fn blob_range(&self, chunk: usize) -> Range<u64> {
        let end = self.gzip.compressed_size;
        match self.chunks.get(chunk).map(|c| &c.kind) {
            // The chunk of the first span starts at the blob's first byte: the gzip header
            // is fetched with it (no span covers it; the blob's digest does, once complete).
            Some(ChunkKind::Data { spans, .. }) => self
                .gzip
                .compressed_range(spans.clone())
                .map_or(end..end, |range| {
                    if spans.start == 0 {
                        0..range.end
                    } else {
                        range
                    }
                }),
            _ if chunk == 0 => 0..0,
            _ => end..end,
        }
    }

    /// Fills `out` (the chunk's image bytes) from `compressed`, the bytes of
    /// [`Self::blob_range`]`(chunk)`: every span verified against its digest before it is
    /// inflated, file data scattered into its blocks, the rest zero.
    pub fn decode_chunk_into(
        &self,
        chunk: usize,
        compressed: &[u8],
        out: &mut [u8],
    ) -> Result<(), SynthError> {
        let refuse = |reason: String| SynthError::Chunk { chunk, reason };
        let Some(Chunk {
            blocks,
            kind:
                ChunkKind::Data {
                    spans,
                    tar,
                    segments,
                },
        }) = self.chunks.get(chunk)
        else {
            return Err(refuse("not a data chunk".into()));
        };
        let range = self.image_range(chunk);
        if out.len() as u64 != range.end - range.start {
            return Err(refuse(format!(
                "{} bytes given for a chunk of {}",
                out.len(),
                range.end - range.start
            )));
        }
        // Bytes before the first span (the gzip header) are not inflated.
        let header = self.blob_range(chunk).start;
        let spans_start = self
            .gzip
            .compressed_range(spans.clone())
            .map_or(header, |range| range.start);
        let compressed = compressed
            .get((spans_start - header) as usize..)
            .ok_or_else(|| refuse("fewer bytes than the gzip header".into()))?;
        let inflated = self
            .gzip
            .extract(spans.clone(), compressed, tar.clone())
            .map_err(|source| SynthError::Gzip { chunk, source })?;
        out.fill(0);
        for segment in &self.segments[segments.clone()] {
            let bytes = segment.tar_range(blocks.clone());
            let at = (u64::from(segment.block.max(blocks.start) - blocks.start) * BLOCK) as usize;
            let from = (bytes.start - tar.start) as usize;
            let len = (bytes.end - bytes.start) as usize;
            out[at..at + len].copy_from_slice(&inflated[from..from + len]);
        }
        Ok(())
    }
}

/// The first bytes of an encoded [`LayerMap`].
const MAP_MAGIC: &[u8; 8] = b"GZLMAP\x00\x01";
/// The most checkpoints and segments a decoded map may declare (a bound on what a corrupt
/// count makes it allocate; files hold as many entries as the eager conversion allows).
const MAX_MAP_ENTRIES: u64 = 4 << 20;

/// Reads an encoded map, field by field, every read bounds checked.
struct MapReader<'a> {
    bytes: &'a [u8],
}

impl MapReader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], SynthError> {
        if self.bytes.len() < len {
            return Err(SynthError::Index("the encoded map ends early".into()));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, SynthError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, SynthError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn count(&mut self) -> Result<usize, SynthError> {
        let count = self.u64()?;
        if count > MAX_MAP_ENTRIES {
            return Err(SynthError::Index(format!(
                "{count} entries in the encoded map"
            )));
        }
        Ok(count as usize)
    }
}

impl LayerMap {
    /// The map as bytes, for the cache: the gzip index (checkpoints with their windows, span
    /// digests) and the data segments; the chunks are cut again when it is read back.
    pub fn encode(&self) -> Vec<u8> {
        let gzip = &self.gzip;
        let mut out = Vec::new();
        out.extend_from_slice(MAP_MAGIC);
        for value in [
            self.image_size,
            gzip.span_size,
            gzip.compressed_size,
            gzip.uncompressed_size,
            gzip.checkpoints.len() as u64,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        for (checkpoint, digest) in gzip.checkpoints.iter().zip(&gzip.span_digests) {
            out.extend_from_slice(&checkpoint.compressed.to_le_bytes());
            out.extend_from_slice(&checkpoint.uncompressed.to_le_bytes());
            out.push(checkpoint.bits);
            out.extend_from_slice(&(checkpoint.window.len() as u32).to_le_bytes());
            out.extend_from_slice(&checkpoint.window);
            out.extend_from_slice(digest);
        }
        out.extend_from_slice(&(self.segments.len() as u64).to_le_bytes());
        for segment in &self.segments {
            out.extend_from_slice(&segment.block.to_le_bytes());
            out.extend_from_slice(&segment.tar_offset.to_le_bytes());
            out.extend_from_slice(&segment.len.to_le_bytes());
        }
        out
    }

    /// Reads a map [`Self::encode`] wrote, checked as an index from elsewhere is: the gzip
    /// index as [`synthesize`] checks it, the segments back to back from block 1, in tar order
    /// inside the tar, inside the image.
    pub fn decode(bytes: &[u8]) -> Result<LayerMap, SynthError> {
        let invalid = |what: String| Err(SynthError::Index(what));
        let mut reader = MapReader { bytes };
        if reader.take(MAP_MAGIC.len())? != MAP_MAGIC {
            return invalid("not an encoded layer map".into());
        }
        let image_size = reader.u64()?;
        let span_size = reader.u64()?;
        let compressed_size = reader.u64()?;
        let uncompressed_size = reader.u64()?;
        let count = reader.count()?;
        let mut checkpoints = Vec::with_capacity(count.min(1 << 16));
        let mut span_digests = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            let compressed = reader.u64()?;
            let uncompressed = reader.u64()?;
            let bits = reader.take(1)?[0];
            let window_len = reader.u32()? as usize;
            if window_len > WINDOW {
                return invalid(format!("a {window_len}-byte window"));
            }
            let window = reader.take(window_len)?.to_vec();
            let digest: [u8; 32] = reader.take(32)?.try_into().expect("32 bytes");
            checkpoints.push(Checkpoint {
                compressed,
                bits,
                uncompressed,
                window,
            });
            span_digests.push(digest);
        }
        let count = reader.count()?;
        let mut segments = Vec::with_capacity(count.min(1 << 16));
        for _ in 0..count {
            segments.push(Segment {
                block: reader.u32()?,
                tar_offset: reader.u64()?,
                len: reader.u64()?,
            });
        }
        if !reader.bytes.is_empty() {
            return invalid(format!(
                "{} bytes after the encoded map",
                reader.bytes.len()
            ));
        }
        for pair in checkpoints.windows(2) {
            if pair[1].uncompressed <= pair[0].uncompressed
                || pair[1].first_byte() < pair[0].first_byte()
            {
                return invalid("checkpoints out of order".into());
            }
        }
        let gzip = GzipIndex {
            span_size,
            checkpoints,
            span_digests,
            compressed_size,
            uncompressed_size,
        };
        check_gzip(&gzip)?;
        let mut next_block = 1u32;
        let mut tar_end = 0u64;
        for segment in &segments {
            let blocks = segment.len.div_ceil(BLOCK);
            let end = segment.tar_offset.checked_add(segment.len);
            if segment.block != next_block
                || segment.len == 0
                || segment.tar_offset < tar_end
                || end.is_none_or(|end| end > uncompressed_size)
            {
                return invalid(format!("segment at block {} out of place", segment.block));
            }
            next_block = u32::try_from(u64::from(next_block) + blocks)
                .map_err(|_| SynthError::Index("segments past the image".into()))?;
            tar_end = end.unwrap_or(u64::MAX);
        }
        if !image_size.is_multiple_of(BLOCK)
            || u64::from(next_block) * BLOCK > image_size
            || image_size / BLOCK > u64::from(u32::MAX)
        {
            return invalid(format!("the data ends past the {image_size}-byte image"));
        }
        let chunks = cut_chunks(&gzip, &segments, next_block, image_size);
        Ok(LayerMap {
            gzip,
            image_size,
            chunks,
            segments,
        })
    }
}
