//! The chunk index (§3.4.1–3.4.2): a 32-byte header and one entry per chunk, mapping the
//! chunks of the uncompressed image to their bytes in the blob. Parsing validates everything a
//! reader later relies on (§3.4.4, §3.4.6), so lookups never fail on a parsed index.

use std::ops::Range;

use super::error::ChunkedError;
use super::media::ChunkCompression;

/// The largest uncompressed chunk accepted. A reader holds a whole chunk in memory, sized by
/// the index, so an index must not be able to ask for gigabytes; chunks this large are far
/// past what lazy loading wants anyway (Gantry writes 1 MiB). A larger chunk is not corruption:
/// [`ChunkedError::falls_back_to_eager`] holds for it.
pub const MAX_CHUNK_LEN: u64 = 64 << 20;
/// The largest stored chunk accepted: a chunk of [`MAX_CHUNK_LEN`] that zstd could not
/// compress grows by less than 1/128 (zstd's bound is 1/256 and a few bytes).
pub const MAX_STORED_CHUNK_LEN: u64 = MAX_CHUNK_LEN + (MAX_CHUNK_LEN >> 7);

/// Length of the header.
pub const INDEX_HEADER_LEN: usize = 32;
const MAGIC: [u8; 4] = [0xCD, 0xE4, 0xEC, 0x67];
const VERSION: u8 = 1;
/// `HashAlgo` of the SHA-2 family.
const HASH_SHA2: u8 = 1;
/// `HashSize` of SHA-256 and SHA-512.
const SHA256_LEN: u8 = 32;
const SHA512_LEN: u8 = 64;
/// `BlockOffset` and `UncompressedOffset`.
const ENTRY_OFFSETS_LEN: usize = 16;
/// Where the reserved bytes of the header start.
const RESERVED_START: usize = 22;

/// The little-endian `u64` at `at` of a buffer whose length the caller checked.
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}

/// One chunk: where its stored bytes start in the blob, where its data starts in the image,
/// and the SHA-256 of its stored bytes when the index carries checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the chunk's stored bytes (its zstd frame, or its raw bytes) in the blob.
    pub block_offset: u64,
    /// Offset of the chunk's data in the uncompressed image.
    pub uncompressed_offset: u64,
    /// SHA-256 of the chunk's bytes exactly as stored in the blob.
    pub checksum: Option<[u8; 32]>,
}

/// A parsed and validated chunk index, with the blob offset where its section starts (which
/// ends the last chunk's stored bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkIndex {
    compression: ChunkCompression,
    uncompressed_size: u64,
    /// `HashAlgo` 1 / `HashSize` 32; kept apart from the entries because an empty index has a
    /// hash algorithm too, and it is part of the payload (and so of its digest).
    checksums: bool,
    entries: Vec<ChunkEntry>,
    section_start: u64,
}

impl ChunkIndex {
    /// An index over `entries`, validated as a parsed one would be. `checksums` says whether
    /// every entry carries one (`HashAlgo` 1, SHA-256) or none does (`HashAlgo` 0).
    pub fn new(
        compression: ChunkCompression,
        uncompressed_size: u64,
        section_start: u64,
        checksums: bool,
        entries: Vec<ChunkEntry>,
    ) -> Result<ChunkIndex, ChunkedError> {
        if u32::try_from(entries.len()).is_err() {
            return Err(ChunkedError::TooManyChunks(entries.len()));
        }
        if let Some(chunk) = entries
            .iter()
            .position(|e| e.checksum.is_some() != checksums)
        {
            return Err(ChunkedError::MixedChecksums(chunk));
        }
        ChunkIndex {
            compression,
            uncompressed_size,
            checksums,
            entries,
            section_start,
        }
        .validated()
    }

    /// How the chunks are stored.
    pub fn compression(&self) -> ChunkCompression {
        self.compression
    }

    /// Size of the uncompressed image data (`UncompressedSize`).
    pub fn uncompressed_size(&self) -> u64 {
        self.uncompressed_size
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the index has no chunks (an empty image).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, in image order.
    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    /// Absolute blob offset where the chunk-index section starts (= end of the last chunk's
    /// stored bytes).
    pub fn section_start(&self) -> u64 {
        self.section_start
    }

    /// Whether every chunk carries a SHA-256 checksum (trivially so without chunks), so that a
    /// chunk fetched alone can be verified before use. An index without checksums (`HashAlgo`
    /// 0) can only serve a layer that is verified as a whole.
    pub fn is_verifiable(&self) -> bool {
        self.checksums || self.entries.is_empty()
    }

    /// The chunk holding uncompressed byte `offset` (binary search), None past the end.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.uncompressed_size {
            return None;
        }
        // Entry 0 starts at 0 and offset < size implies at least one entry: never 0 here.
        self.entries
            .partition_point(|e| e.uncompressed_offset <= offset)
            .checked_sub(1)
    }

    /// The uncompressed bytes of `chunk`. Panics if `chunk >= self.len()`, as slice indexing.
    pub fn uncompressed_range(&self, chunk: usize) -> Range<u64> {
        let start = self.entries[chunk].uncompressed_offset;
        let end = self
            .entries
            .get(chunk + 1)
            .map_or(self.uncompressed_size, |next| next.uncompressed_offset);
        start..end
    }

    /// The stored bytes of `chunk` in the blob (§3.4.2). Panics if `chunk >= self.len()`.
    pub fn blob_range(&self, chunk: usize) -> Range<u64> {
        let start = self.entries[chunk].block_offset;
        let end = match self.compression {
            ChunkCompression::None => {
                let data = self.uncompressed_range(chunk);
                start + (data.end - data.start)
            }
            ChunkCompression::Zstd => self
                .entries
                .get(chunk + 1)
                .map_or(self.section_start, |next| next.block_offset),
        };
        start..end
    }

    /// The largest uncompressed chunk: what a buffer for any one chunk must hold. The index
    /// alone bounds it only by the image size; readers that keep whole chunks in memory may
    /// want to refuse indexes above their own limit.
    pub fn max_chunk_len(&self) -> u64 {
        (0..self.len())
            .map(|chunk| {
                let range = self.uncompressed_range(chunk);
                range.end - range.start
            })
            .max()
            .unwrap_or(0)
    }

    /// The index payload (32-byte header + entries) as the spec lays it out.
    pub fn payload_bytes(&self) -> Vec<u8> {
        let (algo, size) = if self.checksums {
            (HASH_SHA2, SHA256_LEN)
        } else {
            (0, 0)
        };
        let entry_len = ENTRY_OFFSETS_LEN + usize::from(size);
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + self.entries.len() * entry_len);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.compression.type_byte());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        // `new` and `parse_payload` both bound the count by u32.
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_le_bytes());
        out.push(algo);
        out.push(size);
        out.resize(INDEX_HEADER_LEN, 0);
        for entry in &self.entries {
            out.extend_from_slice(&entry.block_offset.to_le_bytes());
            out.extend_from_slice(&entry.uncompressed_offset.to_le_bytes());
            if let Some(checksum) = &entry.checksum {
                out.extend_from_slice(checksum);
            }
        }
        out
    }

    /// Parses and validates a payload (no frame header) given where its section starts in the
    /// blob.
    pub fn parse_payload(payload: &[u8], section_start: u64) -> Result<ChunkIndex, ChunkedError> {
        ChunkIndex::parse_payload_as(payload, section_start, None)
    }

    /// [`ChunkIndex::parse_payload`] for a layer whose media type says `media`: a header that
    /// disagrees is refused before the entries are judged by the other compression's rules.
    pub(crate) fn parse_payload_as(
        payload: &[u8],
        section_start: u64,
        media: Option<ChunkCompression>,
    ) -> Result<ChunkIndex, ChunkedError> {
        let Some((header, body)) = payload.split_first_chunk::<INDEX_HEADER_LEN>() else {
            return Err(ChunkedError::PayloadTooShort(payload.len()));
        };
        let magic = [header[0], header[1], header[2], header[3]];
        if magic != MAGIC {
            return Err(ChunkedError::BadMagic(magic));
        }
        if header[4] != VERSION {
            return Err(ChunkedError::UnsupportedVersion(header[4]));
        }
        let compression = ChunkCompression::from_type_byte(header[5])
            .ok_or(ChunkedError::UnknownCompressionType(header[5]))?;
        if let Some(media) = media
            && media != compression
        {
            return Err(ChunkedError::CompressionMismatch {
                media,
                index: compression,
            });
        }
        let flags = u16::from_le_bytes([header[6], header[7]]);
        if flags != 0 {
            return Err(ChunkedError::UnsupportedFlags(flags));
        }
        let uncompressed_size = le_u64(header, 8);
        let num_chunks = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let checksums = match (header[20], header[21]) {
            (0, 0) => false,
            (HASH_SHA2, SHA256_LEN) => true,
            (algo @ HASH_SHA2, size @ SHA512_LEN) => {
                return Err(ChunkedError::UnsupportedHash { algo, size });
            }
            (algo, size) => return Err(ChunkedError::InvalidHash { algo, size }),
        };
        if let Some(offset) = (RESERVED_START..INDEX_HEADER_LEN).find(|&at| header[at] != 0) {
            return Err(ChunkedError::ReservedNotZero { offset });
        }
        let entry_len = ENTRY_OFFSETS_LEN + if checksums { 32 } else { 0 };
        // In u64, so no count can overflow; checked before anything is allocated, so the count
        // can never claim more entries than the payload holds.
        let expected = INDEX_HEADER_LEN as u64 + u64::from(num_chunks) * entry_len as u64;
        if payload.len() as u64 != expected {
            return Err(ChunkedError::PayloadLength {
                num_chunks,
                expected,
                actual: payload.len() as u64,
            });
        }
        let entries = body
            .chunks_exact(entry_len)
            .map(|raw| ChunkEntry {
                block_offset: le_u64(raw, 0),
                uncompressed_offset: le_u64(raw, 8),
                checksum: raw
                    .get(ENTRY_OFFSETS_LEN..)
                    .and_then(|sum| <[u8; 32]>::try_from(sum).ok()),
            })
            .collect();
        // Parsed entries carry a checksum exactly when the header says so, and the count came
        // from a u32: `new` only adds the validation.
        ChunkIndex::new(
            compression,
            uncompressed_size,
            section_start,
            checksums,
            entries,
        )
    }

    /// The rules lookups rely on: chunks in order without overlap, covering the image from 0,
    /// their stored bytes before the index section; a raw image is the blob's prefix.
    fn validated(self) -> Result<ChunkIndex, ChunkedError> {
        let size = self.uncompressed_size;
        let section_start = self.section_start;
        if self.entries.is_empty() && size > 0 {
            return Err(ChunkedError::NoChunks(size));
        }
        if self.compression == ChunkCompression::None && size != section_start {
            return Err(ChunkedError::RawSizeMismatch {
                uncompressed_size: size,
                section_start,
            });
        }
        let mut previous: Option<&ChunkEntry> = None;
        for (chunk, entry) in self.entries.iter().enumerate() {
            let offset = entry.uncompressed_offset;
            match previous {
                None if offset != 0 => return Err(ChunkedError::FirstOffsetNotZero(offset)),
                Some(before) if offset <= before.uncompressed_offset => {
                    return Err(ChunkedError::UncompressedOffsetNotIncreasing {
                        chunk,
                        offset,
                        previous: before.uncompressed_offset,
                    });
                }
                _ => {}
            }
            if offset >= size {
                return Err(ChunkedError::UncompressedOffsetPastEnd {
                    chunk,
                    offset,
                    size,
                });
            }
            if let Some(before) = previous
                && entry.block_offset <= before.block_offset
            {
                return Err(ChunkedError::BlockOffsetNotIncreasing {
                    chunk,
                    offset: entry.block_offset,
                    previous: before.block_offset,
                });
            }
            if entry.block_offset >= section_start {
                return Err(ChunkedError::BlockOffsetPastIndex {
                    chunk,
                    offset: entry.block_offset,
                    section_start,
                });
            }
            if self.compression == ChunkCompression::None && entry.block_offset != offset {
                return Err(ChunkedError::RawOffsetsDiffer {
                    chunk,
                    block_offset: entry.block_offset,
                    uncompressed_offset: offset,
                });
            }
            previous = Some(entry);
        }
        // The ranges are well defined now that the offsets are in order.
        for chunk in 0..self.entries.len() {
            let data = self.uncompressed_range(chunk);
            let stored = self.blob_range(chunk);
            let (uncompressed, stored) = (data.end - data.start, stored.end - stored.start);
            if uncompressed > MAX_CHUNK_LEN || stored > MAX_STORED_CHUNK_LEN {
                return Err(ChunkedError::ChunkTooLarge {
                    chunk,
                    uncompressed,
                    stored,
                });
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload laid out by hand from the spec's tables (not by `payload_bytes`).
    fn payload(
        compression: u8,
        size: u64,
        hash: (u8, u8),
        entries: &[(u64, u64, Option<[u8; 32]>)],
    ) -> Vec<u8> {
        let mut p = vec![0xCD, 0xE4, 0xEC, 0x67, 1, compression, 0, 0];
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        p.extend_from_slice(&[hash.0, hash.1]);
        p.extend_from_slice(&[0; 10]);
        for (block, offset, checksum) in entries {
            p.extend_from_slice(&block.to_le_bytes());
            p.extend_from_slice(&offset.to_le_bytes());
            if let Some(sum) = checksum {
                p.extend_from_slice(sum);
            }
        }
        p
    }

    #[test]
    fn uneven_chunks_are_found_and_measured() {
        // Chunks of 10, 5 and 100 bytes stored in 7, 3 and 50 bytes, the index at 60.
        let bytes = payload(
            1,
            115,
            (0, 0),
            &[(0, 0, None), (7, 10, None), (10, 15, None)],
        );
        let index = ChunkIndex::parse_payload(&bytes, 60).unwrap();
        assert_eq!(index.payload_bytes(), bytes);
        assert!(!index.is_verifiable());
        let expected = [(0..10, 0..7), (10..15, 7..10), (15..115, 10..60)];
        for (chunk, (data, stored)) in expected.iter().enumerate() {
            assert_eq!(index.uncompressed_range(chunk), *data);
            assert_eq!(index.blob_range(chunk), *stored);
        }
        let found: Vec<Option<usize>> = [0, 9, 10, 14, 15, 114, 115]
            .iter()
            .map(|&offset| index.chunk_at(offset))
            .collect();
        assert_eq!(
            found,
            [Some(0), Some(0), Some(1), Some(1), Some(2), Some(2), None]
        );
        assert_eq!(index.max_chunk_len(), 100);
    }

    #[test]
    fn raw_chunks_are_the_image_bytes() {
        let sums = [Some([1u8; 32]), Some([2u8; 32])];
        let bytes = payload(0, 12, (1, 32), &[(0, 0, sums[0]), (8, 8, sums[1])]);
        let index = ChunkIndex::parse_payload(&bytes, 12).unwrap();
        assert_eq!(index.compression(), ChunkCompression::None);
        assert_eq!(index.blob_range(1), 8..12);
        assert_eq!(index.entries()[1].checksum, sums[1]);
        assert_eq!(index.payload_bytes(), bytes);
        assert!(index.is_verifiable());
        // Block and uncompressed offsets must agree, and the image must end at the index.
        let shifted = payload(0, 12, (0, 0), &[(0, 0, None), (9, 8, None)]);
        assert!(matches!(
            ChunkIndex::parse_payload(&shifted, 12),
            Err(ChunkedError::RawOffsetsDiffer { chunk: 1, .. })
        ));
        assert!(matches!(
            ChunkIndex::parse_payload(&payload(0, 12, (0, 0), &[(0, 0, None)]), 13),
            Err(ChunkedError::RawSizeMismatch { .. })
        ));
    }

    #[test]
    fn empty_indexes_keep_their_hash_fields() {
        for hash in [(0u8, 0u8), (1, 32)] {
            let bytes = payload(1, 0, hash, &[]);
            let index = ChunkIndex::parse_payload(&bytes, 0).unwrap();
            assert!(index.is_empty() && index.is_verifiable());
            assert_eq!(index.payload_bytes(), bytes, "{hash:?}");
            assert_eq!(index.max_chunk_len(), 0);
        }
        assert!(matches!(
            ChunkIndex::parse_payload(&payload(1, 5, (0, 0), &[]), 40),
            Err(ChunkedError::NoChunks(5))
        ));
        assert!(matches!(
            ChunkIndex::parse_payload(&[0xCD, 0xE4, 0xEC, 0x67], 0),
            Err(ChunkedError::PayloadTooShort(4))
        ));
    }

    #[test]
    fn chunks_a_reader_would_not_buffer_are_refused() {
        let huge = MAX_CHUNK_LEN + 1;
        let bytes = payload(1, huge + 10, (0, 0), &[(0, 0, None), (5, huge, None)]);
        assert!(matches!(
            ChunkIndex::parse_payload(&bytes, 10),
            Err(ChunkedError::ChunkTooLarge { chunk: 0, .. })
        ));
        // Small when decoded, but stored in more than a reader fetches for one chunk.
        let bytes = payload(
            1,
            20,
            (0, 0),
            &[(0, 0, None), (MAX_STORED_CHUNK_LEN + 1, 10, None)],
        );
        let err = ChunkIndex::parse_payload(&bytes, MAX_STORED_CHUNK_LEN + 2).unwrap_err();
        assert!(
            matches!(err, ChunkedError::ChunkTooLarge { chunk: 0, stored, .. } if stored == MAX_STORED_CHUNK_LEN + 1),
            "{err}"
        );
        assert!(err.falls_back_to_eager());
    }
}
