//! Everything that can be wrong with an EROFS layer blob, its descriptor or its chunk index.

use std::io;

use super::media::ChunkCompression;
use crate::reference::Digest;

/// Errors of reading, checking, decoding and writing EROFS layers and chunk indexes.
#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    // --- The descriptor -------------------------------------------------------------------
    /// The descriptor's media type is not an EROFS layer.
    #[error("media type {0:?} is not an EROFS layer")]
    NotErofs(String),
    /// The descriptor has no `org.erofs.chunk-index.range`: the layer has no embedded index and
    /// can only be read sequentially.
    #[error("the layer has no embedded chunk index (no org.erofs.chunk-index.range annotation)")]
    NoEmbeddedIndex,
    /// `org.erofs.chunk-index.mediaType` names a format this reader does not implement.
    #[error("unsupported chunk-index media type {0:?}")]
    UnsupportedIndexMediaType(String),
    /// An annotation value does not follow its grammar.
    #[error("annotation {name} = {value:?}: {reason}")]
    BadAnnotation {
        /// The annotation.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The index range does not lie inside the blob.
    #[error("chunk-index range {start}..{end} is outside the {size}-byte blob")]
    RangeOutOfBlob {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The blob's size from the descriptor.
        size: u64,
    },
    /// The index range ends before the blob does; an embedded index is the trailing section.
    #[error("chunk-index range ends at {end}, not at the end of the {size}-byte blob")]
    IndexNotTrailing {
        /// End of the range.
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// The index section is shorter than a header (plus the frame header for zstd layers).
    #[error("chunk-index section of {len} bytes is shorter than the minimum of {min}")]
    SectionTooShort {
        /// The section's length.
        len: u64,
        /// The least a section can be.
        min: u64,
    },
    /// The index section is larger than any index this reader accepts.
    #[error("chunk-index section of {len} bytes exceeds the limit of {max}")]
    SectionTooLarge {
        /// The section's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A raw layer's `org.erofs.uncompressed-digest` differs from its digest (the spec makes
    /// them equal).
    #[error("raw layer {digest} has uncompressed digest {annotation}, not its own digest")]
    RawDigestMismatch {
        /// The annotation's value.
        annotation: Digest,
        /// The descriptor's digest.
        digest: Digest,
    },

    // --- The index section ------------------------------------------------------------------
    /// The section fetched is not as long as the range says.
    #[error("chunk-index section is {actual} bytes, the range says {expected}")]
    SectionLength {
        /// The range's length.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// The section of a zstd layer does not start with a skippable-frame magic.
    #[error(
        "chunk-index frame magic {0:#010x} is not a zstd skippable frame (0x184d2a50..=0x184d2a5f)"
    )]
    BadSkippableMagic(u32),
    /// The skippable frame's length field disagrees with the section.
    #[error("chunk-index frame declares {declared} payload bytes, the section holds {actual}")]
    FrameLength {
        /// The frame header's length.
        declared: u32,
        /// Bytes after the frame header.
        actual: u64,
    },
    /// The payload does not hash to `org.erofs.chunk-index.digest`.
    #[error("chunk-index digest is {actual}, the descriptor says {expected}")]
    IndexDigestMismatch {
        /// From the descriptor.
        expected: Digest,
        /// Of the payload.
        actual: Digest,
    },
    /// No `org.erofs.chunk-index.digest`: nothing vouches for the index, so it is not used.
    #[error("the layer has no org.erofs.chunk-index.digest: its chunk index cannot be trusted")]
    NoIndexDigest,
    /// The index carries no per-chunk checksums (`HashAlgo` 0): chunks cannot be verified one
    /// by one.
    #[error("the chunk index has no per-chunk checksums: chunks cannot be verified")]
    NoChunkChecksums,
    /// The header's compression type disagrees with the layer's media type.
    #[error("chunk index says {index} chunks, the layer's media type says {media}")]
    CompressionMismatch {
        /// From the media type.
        media: ChunkCompression,
        /// From the header.
        index: ChunkCompression,
    },

    // --- The payload header -----------------------------------------------------------------
    /// The payload is shorter than the 32-byte header.
    #[error("chunk-index payload of {0} bytes is shorter than its 32-byte header")]
    PayloadTooShort(usize),
    /// The header's magic is not `CD E4 EC 67`.
    #[error("chunk-index magic {0:02x?} is not cd e4 ec 67")]
    BadMagic([u8; 4]),
    /// A version other than 1.
    #[error("unsupported chunk-index version {0} (expected 1)")]
    UnsupportedVersion(u8),
    /// A reserved `CompressionType`.
    #[error("unknown chunk-index compression type {0}")]
    UnknownCompressionType(u8),
    /// `Flags` bits this reader does not know (they announce fields it cannot skip).
    #[error("unsupported chunk-index flags {0:#06x}")]
    UnsupportedFlags(u16),
    /// A non-zero reserved header byte.
    #[error("chunk-index reserved header byte {offset} is not zero")]
    ReservedNotZero {
        /// Its offset in the header.
        offset: usize,
    },
    /// A `HashAlgo`/`HashSize` pair the spec does not define.
    #[error("invalid chunk-index hash algorithm {algo} with size {size}")]
    InvalidHash {
        /// `HashAlgo`.
        algo: u8,
        /// `HashSize`.
        size: u8,
    },
    /// A defined hash this reader does not implement (SHA-512).
    #[error("unsupported chunk-index hash algorithm {algo} with size {size} (only SHA-256 is)")]
    UnsupportedHash {
        /// `HashAlgo`.
        algo: u8,
        /// `HashSize`.
        size: u8,
    },
    /// The payload is not exactly a header and `NumChunks` entries.
    #[error("chunk-index payload is {actual} bytes, {num_chunks} chunks need {expected}")]
    PayloadLength {
        /// `NumChunks`.
        num_chunks: u32,
        /// 32 + `NumChunks` × entry size.
        expected: u64,
        /// The payload's length.
        actual: u64,
    },

    // --- The entries ------------------------------------------------------------------------
    /// More entries than the header's `NumChunks` can count.
    #[error("{0} chunks are more than a chunk index can hold")]
    TooManyChunks(usize),
    /// Image data but no chunks to hold it.
    #[error("chunk index has no chunks for {0} bytes of image data")]
    NoChunks(u64),
    /// The first chunk does not start at uncompressed offset 0.
    #[error("chunk 0 starts at uncompressed offset {0}, not 0")]
    FirstOffsetNotZero(u64),
    /// An uncompressed offset not above its predecessor's (chunks overlap or are out of order).
    #[error(
        "chunk {chunk}: uncompressed offset {offset} is not above the previous chunk's {previous}"
    )]
    UncompressedOffsetNotIncreasing {
        /// The chunk.
        chunk: usize,
        /// Its offset.
        offset: u64,
        /// The previous chunk's.
        previous: u64,
    },
    /// An uncompressed offset at or past `UncompressedSize`.
    #[error("chunk {chunk}: uncompressed offset {offset} is not below the image size {size}")]
    UncompressedOffsetPastEnd {
        /// The chunk.
        chunk: usize,
        /// Its offset.
        offset: u64,
        /// `UncompressedSize`.
        size: u64,
    },
    /// A block offset not above its predecessor's.
    #[error("chunk {chunk}: block offset {offset} is not above the previous chunk's {previous}")]
    BlockOffsetNotIncreasing {
        /// The chunk.
        chunk: usize,
        /// Its offset.
        offset: u64,
        /// The previous chunk's.
        previous: u64,
    },
    /// A block offset at or past the start of the index section.
    #[error(
        "chunk {chunk}: block offset {offset} is not below the index section at {section_start}"
    )]
    BlockOffsetPastIndex {
        /// The chunk.
        chunk: usize,
        /// Its offset.
        offset: u64,
        /// Where the index section starts.
        section_start: u64,
    },
    /// In a raw layer the image is the blob's prefix, so a chunk's block and uncompressed
    /// offsets are the same.
    #[error(
        "raw chunk {chunk}: block offset {block_offset} differs from uncompressed offset {uncompressed_offset}"
    )]
    RawOffsetsDiffer {
        /// The chunk.
        chunk: usize,
        /// Its block offset.
        block_offset: u64,
        /// Its uncompressed offset.
        uncompressed_offset: u64,
    },
    /// In a raw layer the image ends where the index starts.
    #[error(
        "raw layer: image size {uncompressed_size} differs from the index section start {section_start}"
    )]
    RawSizeMismatch {
        /// `UncompressedSize`.
        uncompressed_size: u64,
        /// Where the index section starts.
        section_start: u64,
    },
    /// A chunk larger than a reader buffers ([`super::MAX_CHUNK_LEN`] uncompressed,
    /// [`super::MAX_STORED_CHUNK_LEN`] stored).
    #[error(
        "chunk {chunk} is {uncompressed} bytes ({stored} stored), larger than the 64 MiB a reader buffers"
    )]
    ChunkTooLarge {
        /// The chunk.
        chunk: usize,
        /// Its uncompressed length.
        uncompressed: u64,
        /// Its stored length.
        stored: u64,
    },
    /// Some entries have a checksum and others not.
    #[error("chunk {0}: checksum presence differs from the index's hash algorithm")]
    MixedChecksums(usize),

    // --- Decoding a chunk -------------------------------------------------------------------
    /// A chunk number past the index.
    #[error("chunk {chunk} does not exist (the index has {count})")]
    NoSuchChunk {
        /// The chunk asked for.
        chunk: usize,
        /// Chunks in the index.
        count: usize,
    },
    /// The output buffer is not the chunk's uncompressed length.
    #[error("chunk {chunk}: output buffer of {actual} bytes, the chunk is {expected}")]
    OutputLength {
        /// The chunk.
        chunk: usize,
        /// Its uncompressed length.
        expected: u64,
        /// The buffer's length.
        actual: u64,
    },
    /// The stored bytes are not the chunk's on-blob length.
    #[error("chunk {chunk}: {actual} stored bytes, the index says {expected}")]
    StoredLength {
        /// The chunk.
        chunk: usize,
        /// Its on-blob length.
        expected: u64,
        /// Bytes given.
        actual: u64,
    },
    /// The stored bytes do not hash to the entry's checksum.
    #[error("chunk {0}: checksum mismatch")]
    ChecksumMismatch(usize),
    /// The stored bytes do not start with a zstd data frame.
    #[error("chunk {chunk}: starts with magic {magic:#010x}, not a zstd data frame")]
    NotADataFrame {
        /// The chunk.
        chunk: usize,
        /// The first four bytes, little-endian.
        magic: u32,
    },
    /// Bytes after the chunk's frame (only the last chunk may be followed by skippable
    /// padding frames).
    #[error("chunk {chunk}: {extra} bytes after its zstd frame")]
    TrailingBytes {
        /// The chunk.
        chunk: usize,
        /// How many.
        extra: u64,
    },
    /// The frame header declares another decompressed size than the index.
    #[error("chunk {chunk}: frame declares {declared} bytes, the index says {expected}")]
    FrameContentSize {
        /// The chunk.
        chunk: usize,
        /// From the frame header.
        declared: u64,
        /// From the index.
        expected: u64,
    },
    /// The frame decodes to more bytes than the index says.
    #[error("chunk {chunk}: frame decodes to more than the {expected} bytes the index says")]
    ChunkTooLong {
        /// The chunk.
        chunk: usize,
        /// From the index.
        expected: u64,
    },
    /// The frame decodes to fewer bytes than the index says.
    #[error("chunk {chunk}: frame decodes to {decoded} bytes, the index says {expected}")]
    ChunkTooShort {
        /// The chunk.
        chunk: usize,
        /// Decoded.
        decoded: u64,
        /// From the index.
        expected: u64,
    },
    /// zstd refused the frame.
    #[error("chunk {chunk}: zstd: {reason}")]
    Zstd {
        /// The chunk.
        chunk: usize,
        /// zstd's error name.
        reason: &'static str,
    },

    // --- Whole blobs ------------------------------------------------------------------------
    /// A chunk size of zero or above [`super::MAX_CHUNK_LEN`].
    #[error("chunk size must be 1 byte to 64 MiB")]
    InvalidChunkSize,
    /// The index would not fit one skippable frame (4 GiB).
    #[error("a chunk index of {0} bytes does not fit a zstd skippable frame")]
    IndexTooLarge(u64),
    /// zstd failed to compress a chunk.
    #[error("compressing chunk {chunk}: {source}")]
    Compress {
        /// The chunk.
        chunk: usize,
        /// zstd's error.
        #[source]
        source: io::Error,
    },
    /// Reading the input (image or blob) failed.
    #[error("reading the input: {0}")]
    Input(#[source] io::Error),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
    /// The layer's zstd stream is corrupt or cut short.
    #[error("decoding the layer's zstd stream (near blob offset {offset}): {source}")]
    Stream {
        /// Compressed bytes consumed when it failed.
        offset: u64,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The decoded layer grew past the cap.
    #[error("the decoded layer exceeds the cap of {0} bytes")]
    OutputTooLarge(u64),
    /// The blob ended before its image data did.
    #[error("the blob ended after {read} bytes, its image data runs to byte {expected}")]
    TruncatedBlob {
        /// Blob bytes read.
        read: u64,
        /// Where the image data ends in the blob.
        expected: u64,
    },
}

impl ChunkedError {
    /// Whether the spec says a reader meeting this reads the layer sequentially instead (no
    /// index, an index format or feature this reader does not implement, nothing vouching for
    /// the index). Every other error means corrupt bytes or a malformed descriptor.
    pub fn falls_back_to_eager(&self) -> bool {
        matches!(
            self,
            ChunkedError::NoEmbeddedIndex
                | ChunkedError::UnsupportedIndexMediaType(_)
                | ChunkedError::NoIndexDigest
                | ChunkedError::NoChunkChecksums
                | ChunkedError::UnsupportedVersion(_)
                | ChunkedError::UnknownCompressionType(_)
                | ChunkedError::UnsupportedFlags(_)
                | ChunkedError::UnsupportedHash { .. }
                | ChunkedError::ChunkTooLarge { .. }
        )
    }
}
