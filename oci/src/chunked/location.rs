//! Where a layer's embedded chunk index lives and what vouches for it, read from the layer
//! descriptor's annotations (§2.3, §3.4.3), and the checks on the section once fetched.

use std::ops::Range;

use super::error::ChunkedError;
use super::frame::{self, SKIPPABLE_HEADER_LEN};
use super::index::{ChunkIndex, INDEX_HEADER_LEN};
use super::media::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_INDEX_MEDIA_TYPE, ANNOTATION_INDEX_RANGE,
    ANNOTATION_UNCOMPRESSED_DIGEST, ChunkCompression, MEDIA_TYPE_CHUNK_INDEX, erofs_layer_kind,
};
use crate::manifest::Descriptor;
use crate::reference::Digest;

/// The largest index section accepted: the section is fetched into memory whole, so a lying
/// range must not make a reader fetch gigabytes. 64 MiB hold 1.4 million SHA-256 entries,
/// 1.4 TiB of image at Gantry's 1 MiB chunks.
pub const MAX_INDEX_SECTION_LEN: u64 = 64 << 20;

/// Where a layer's embedded index lives and what vouches for it, read from the layer
/// descriptor's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexLocation {
    /// The layer form its media type names.
    pub compression: ChunkCompression,
    /// The index section in the blob; its end is the descriptor's size when the annotation
    /// omits it.
    pub range: Range<u64>,
    /// `org.erofs.chunk-index.digest`: the digest of the index payload.
    pub digest: Option<Digest>,
    /// `org.erofs.uncompressed-digest`: the digest of the decompressed image data.
    pub uncompressed_digest: Option<Digest>,
}

impl IndexLocation {
    /// Reads the location from an EROFS layer descriptor. A layer without
    /// `org.erofs.chunk-index.range`, or whose `org.erofs.chunk-index.mediaType` is not
    /// [`MEDIA_TYPE_CHUNK_INDEX`], gives an error for which
    /// [`ChunkedError::falls_back_to_eager`] holds.
    pub fn from_descriptor(descriptor: &Descriptor) -> Result<IndexLocation, ChunkedError> {
        let compression = erofs_layer_kind(&descriptor.media_type)
            .ok_or_else(|| ChunkedError::NotErofs(descriptor.media_type.clone()))?;
        let uncompressed_digest = annotated_digest(descriptor, ANNOTATION_UNCOMPRESSED_DIGEST)?;
        if compression == ChunkCompression::None
            && let Some(annotation) = &uncompressed_digest
            && annotation != &descriptor.digest
        {
            return Err(ChunkedError::RawDigestMismatch {
                annotation: annotation.clone(),
                digest: descriptor.digest.clone(),
            });
        }
        if let Some(media_type) = descriptor.annotations.get(ANNOTATION_INDEX_MEDIA_TYPE)
            && media_type != MEDIA_TYPE_CHUNK_INDEX
        {
            return Err(ChunkedError::UnsupportedIndexMediaType(media_type.clone()));
        }
        let text = descriptor
            .annotations
            .get(ANNOTATION_INDEX_RANGE)
            .ok_or(ChunkedError::NoEmbeddedIndex)?;
        let (start, end) = parse_range(text)?;
        let size = descriptor.size;
        let end = end.unwrap_or(size);
        if start > end || end > size {
            return Err(ChunkedError::RangeOutOfBlob { start, end, size });
        }
        if end != size {
            return Err(ChunkedError::IndexNotTrailing { end, size });
        }
        let range = start..end;
        check_section_len(compression, range.end - range.start)?;
        Ok(IndexLocation {
            compression,
            range,
            digest: annotated_digest(descriptor, ANNOTATION_INDEX_DIGEST)?,
            uncompressed_digest,
        })
    }

    /// Parses the section as fetched (exactly `range`'s bytes): for zstd strips and checks the
    /// skippable frame header (magic 0x184D2A50..=0x184D2A5F, frame length = section length - 8);
    /// checks the payload digest; parses; validates the entries against the blob (chunks inside
    /// [0, section start), etc.).
    ///
    /// Only an index that can be served lazily *with verification* is returned: one the
    /// descriptor vouches for by digest and that carries per-chunk checksums. Otherwise the
    /// error ([`ChunkedError::NoIndexDigest`], [`ChunkedError::NoChunkChecksums`]) tells the
    /// caller to read the layer whole ([`ChunkedError::falls_back_to_eager`]).
    pub fn parse(&self, section: &[u8]) -> Result<ChunkIndex, ChunkedError> {
        let expected = self.range.end.saturating_sub(self.range.start);
        if section.len() as u64 != expected {
            return Err(ChunkedError::SectionLength {
                expected,
                actual: section.len() as u64,
            });
        }
        check_section_len(self.compression, expected)?;
        let digest = self.digest.as_ref().ok_or(ChunkedError::NoIndexDigest)?;
        let payload = match self.compression {
            ChunkCompression::None => section,
            ChunkCompression::Zstd => {
                let (header, payload) = section.split_at(SKIPPABLE_HEADER_LEN);
                let magic = frame::le_u32(header, 0).unwrap_or_default();
                if !frame::is_skippable_magic(magic) {
                    return Err(ChunkedError::BadSkippableMagic(magic));
                }
                let declared = frame::le_u32(header, 4).unwrap_or_default();
                if u64::from(declared) != payload.len() as u64 {
                    return Err(ChunkedError::FrameLength {
                        declared,
                        actual: payload.len() as u64,
                    });
                }
                payload
            }
        };
        let actual = Digest::of(payload);
        if &actual != digest {
            return Err(ChunkedError::IndexDigestMismatch {
                expected: digest.clone(),
                actual,
            });
        }
        let index =
            ChunkIndex::parse_payload_as(payload, self.range.start, Some(self.compression))?;
        if !index.is_verifiable() {
            return Err(ChunkedError::NoChunkChecksums);
        }
        Ok(index)
    }
}

/// The layer's DiffID (§5.2): `org.erofs.uncompressed-digest` when present, else for a raw
/// layer its own digest (the digest of the whole blob, index included); `None` for a zstd layer
/// without the annotation, whose DiffID then comes from the image config's `rootfs.diff_ids`.
pub fn layer_diff_id(descriptor: &Descriptor) -> Result<Option<Digest>, ChunkedError> {
    let compression = erofs_layer_kind(&descriptor.media_type)
        .ok_or_else(|| ChunkedError::NotErofs(descriptor.media_type.clone()))?;
    let annotated = annotated_digest(descriptor, ANNOTATION_UNCOMPRESSED_DIGEST)?;
    Ok(match compression {
        ChunkCompression::Zstd => annotated,
        ChunkCompression::None => Some(descriptor.digest.clone()),
    })
}

/// An index section holds at least a header (and for zstd layers the frame header before it),
/// and at most [`MAX_INDEX_SECTION_LEN`].
fn check_section_len(compression: ChunkCompression, len: u64) -> Result<(), ChunkedError> {
    let frame_header = match compression {
        ChunkCompression::None => 0,
        ChunkCompression::Zstd => SKIPPABLE_HEADER_LEN,
    };
    let min = (INDEX_HEADER_LEN + frame_header) as u64;
    if len < min {
        return Err(ChunkedError::SectionTooShort { len, min });
    }
    if len > MAX_INDEX_SECTION_LEN {
        return Err(ChunkedError::SectionTooLarge {
            len,
            max: MAX_INDEX_SECTION_LEN,
        });
    }
    Ok(())
}

/// A digest annotation, if present.
fn annotated_digest(
    descriptor: &Descriptor,
    name: &'static str,
) -> Result<Option<Digest>, ChunkedError> {
    descriptor
        .annotations
        .get(name)
        .map(|value| {
            value.parse().map_err(|_| ChunkedError::BadAnnotation {
                name,
                value: value.clone(),
                reason: "expected sha256:<64 lowercase hex digits>",
            })
        })
        .transpose()
}

/// `range = offset [ ":" end ]`, both decimal digits only (§2.3).
fn parse_range(value: &str) -> Result<(u64, Option<u64>), ChunkedError> {
    let bad = |reason| ChunkedError::BadAnnotation {
        name: ANNOTATION_INDEX_RANGE,
        value: value.to_string(),
        reason,
    };
    let number = |text: &str| {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("expected offset[:end] in decimal digits"));
        }
        text.parse::<u64>()
            .map_err(|_| bad("offset does not fit 64 bits"))
    };
    match value.split_once(':') {
        Some((start, end)) => Ok((number(start)?, Some(number(end)?))),
        None => Ok((number(value)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_the_grammar() {
        assert_eq!(parse_range("0").unwrap(), (0, None));
        assert_eq!(parse_range("20963328").unwrap(), (20963328, None));
        assert_eq!(
            parse_range("52420608:52428800").unwrap(),
            (52420608, Some(52428800))
        );
        assert_eq!(parse_range("007:08").unwrap(), (7, Some(8)));
        for bad in [
            "",
            ":",
            "1:",
            ":2",
            "1:2:3",
            "-1",
            "+1",
            " 1",
            "1 ",
            "0x10",
            "1.0",
            "1,2",
            "18446744073709551616",
            "١",
        ] {
            let err = parse_range(bad).unwrap_err();
            assert!(
                matches!(err, ChunkedError::BadAnnotation { name, .. } if name == ANNOTATION_INDEX_RANGE),
                "{bad:?}: {err}"
            );
        }
    }
}
