//! Writes an EROFS image as an `application/vnd.erofs+zstd` layer blob with an embedded chunk
//! index (§3.3, §3.4.3), in one streaming pass.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Range;

use sha2::{Digest as _, Sha256};
use tracing::debug;
use zstd::zstd_safe::{self, CParameter};

use super::error::ChunkedError;
use super::frame;
use super::hashing::HashingWriter;
use super::index::{ChunkEntry, ChunkIndex, MAX_CHUNK_LEN};
use super::media::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_INDEX_RANGE, ANNOTATION_UNCOMPRESSED_DIGEST,
    ChunkCompression, DEFAULT_CHUNK_SIZE, MEDIA_TYPE_EROFS_ZSTD,
};
use crate::manifest::Descriptor;
use crate::reference::Digest;

/// How [`write_chunked_layer`] cuts and compresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedLayerOptions {
    /// Uncompressed bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// zstd compression level.
    pub zstd_level: i32,
}

impl Default for ChunkedLayerOptions {
    /// 1 MiB chunks at zstd level 3 (zstd's own default: fast to write on the card, and the
    /// layer is written once per image, read many times).
    fn default() -> Self {
        ChunkedLayerOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: 3,
        }
    }
}

/// What [`write_chunked_layer`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedLayer {
    /// Digest of the blob.
    pub digest: Digest,
    /// Size of the blob.
    pub size: u64,
    /// Digest of the image (the layer's DiffID).
    pub uncompressed_digest: Digest,
    /// Size of the image.
    pub uncompressed_size: u64,
    /// Digest of the index payload.
    pub index_digest: Digest,
    /// The index section (its skippable frame) in the blob.
    pub index_range: Range<u64>,
    /// Chunks in the index.
    pub chunk_count: usize,
}

impl ChunkedLayer {
    /// The layer descriptor: media type application/vnd.erofs+zstd, digest, size, the three
    /// annotations.
    pub fn descriptor(&self) -> Descriptor {
        let annotations = BTreeMap::from([
            (
                ANNOTATION_INDEX_RANGE.to_string(),
                format!("{}:{}", self.index_range.start, self.index_range.end),
            ),
            (
                ANNOTATION_INDEX_DIGEST.to_string(),
                self.index_digest.to_string(),
            ),
            (
                ANNOTATION_UNCOMPRESSED_DIGEST.to_string(),
                self.uncompressed_digest.to_string(),
            ),
        ]);
        Descriptor {
            media_type: MEDIA_TYPE_EROFS_ZSTD.to_string(),
            digest: self.digest.clone(),
            size: self.size,
            platform: None,
            annotations,
            urls: Vec::new(),
            artifact_type: None,
        }
    }
}

/// Writes an EROFS image read from `image` as a +zstd layer blob into `out` (streaming: memory
/// bounded by a couple of chunks, never the whole image): one zstd frame per chunk_size chunk
/// (the last may be shorter), checksums SHA-256 of each compressed frame as stored, then the
/// index in a skippable frame (magic 0x184D2A50) at a 4-byte aligned offset (pad with a zero
/// skippable frame if needed, as the spec allows). Deterministic output. HashAlgo=1,
/// HashSize=32.
///
/// The padding frame belongs to the last chunk's stored bytes (they run to the index section,
/// §3.4.2), so the last checksum covers it: any reader hashing the range the index names gets
/// the checksum the index holds.
pub fn write_chunked_layer<R: Read, W: Write>(
    mut image: R,
    out: W,
    options: &ChunkedLayerOptions,
) -> Result<ChunkedLayer, ChunkedError> {
    if options.chunk_size == 0 || u64::from(options.chunk_size) > MAX_CHUNK_LEN {
        return Err(ChunkedError::InvalidChunkSize);
    }
    let chunk_size = u64::from(options.chunk_size);
    let compress_error = |chunk| move |source| ChunkedError::Compress { chunk, source };
    let mut compressor =
        zstd::bulk::Compressor::new(options.zstd_level).map_err(compress_error(0))?;
    // Stated rather than left to defaults, since the bytes must not change under us: frames
    // say their size (readers check it before decoding) and carry no checksum of their own
    // (the index's SHA-256 covers them).
    for parameter in [
        CParameter::ContentSizeFlag(true),
        CParameter::ChecksumFlag(false),
        CParameter::DictIdFlag(false),
    ] {
        compressor
            .set_parameter(parameter)
            .map_err(compress_error(0))?;
    }
    let mut out = HashingWriter::new(out);
    let mut input = Vec::with_capacity(options.chunk_size as usize);
    let mut frame = Vec::new();
    let mut image_hash = Sha256::new();
    let mut uncompressed_size = 0u64;
    let mut entries: Vec<ChunkEntry> = Vec::new();
    // The hash of the frame written last, left open: padding may still join its stored bytes.
    let mut open_checksum: Option<Sha256> = None;
    loop {
        input.clear();
        // At most one chunk: the buffer never grows past it.
        let n = (&mut image)
            .take(chunk_size)
            .read_to_end(&mut input)
            .map_err(ChunkedError::Input)?;
        if n == 0 {
            break;
        }
        close_checksum(&mut entries, &mut open_checksum);
        let data = &input[..];
        image_hash.update(data);
        frame.clear();
        frame.reserve(zstd_safe::compress_bound(n));
        compressor
            .compress_to_buffer(data, &mut frame)
            .map_err(compress_error(entries.len()))?;
        entries.push(ChunkEntry {
            block_offset: out.written(),
            uncompressed_offset: uncompressed_size,
            checksum: None,
        });
        out.write_all(&frame).map_err(ChunkedError::Output)?;
        open_checksum = Some(Sha256::new_with_prefix(&frame));
        uncompressed_size += n as u64;
        if (n as u64) < chunk_size {
            break;
        }
    }
    if let Some(padding) = frame::padding_frame(out.written()) {
        out.write_all(&padding).map_err(ChunkedError::Output)?;
        if let Some(hasher) = open_checksum.as_mut() {
            hasher.update(&padding);
        }
    }
    close_checksum(&mut entries, &mut open_checksum);
    let chunk_count = entries.len();
    let section_start = out.written();
    let index = ChunkIndex::new(
        ChunkCompression::Zstd,
        uncompressed_size,
        section_start,
        true,
        entries,
    )?;
    let payload = index.payload_bytes();
    let payload_len = u32::try_from(payload.len())
        .map_err(|_| ChunkedError::IndexTooLarge(payload.len() as u64))?;
    out.write_all(&frame::skippable_header(payload_len))
        .map_err(ChunkedError::Output)?;
    out.write_all(&payload).map_err(ChunkedError::Output)?;
    let (digest, size) = out.finish().map_err(ChunkedError::Output)?;
    debug!(
        %digest,
        size,
        uncompressed_size,
        chunk_count,
        chunk_size,
        "wrote a chunked EROFS layer"
    );
    Ok(ChunkedLayer {
        digest,
        size,
        uncompressed_digest: Digest::from_sha256(image_hash.finalize().into()),
        uncompressed_size,
        index_digest: Digest::of(&payload),
        index_range: section_start..size,
        chunk_count,
    })
}

/// Stores the finished hash of the last frame in its entry.
fn close_checksum(entries: &mut [ChunkEntry], open: &mut Option<Sha256>) {
    if let (Some(hasher), Some(entry)) = (open.take(), entries.last_mut()) {
        entry.checksum = Some(hasher.finalize().into());
    }
}
