//! The `chunk_index` fuzz target's check: arbitrary bytes as an EROFS layer blob whose tail is
//! its chunk-index section, through [`IndexLocation::parse`], every chunk through
//! [`ChunkIndex::decode_chunk_into`] and the whole blob through [`decode_whole_layer`].
//!
//! Input: a mode byte ([`MODE_RAW`], [`MODE_NO_DIGEST`], [`MODE_LEGACY_NAME`]), the section's
//! length from the end of the blob (u32, little-endian, clamped to the blob), then the blob. The
//! descriptor's digest annotation is the digest of the section's payload as given, so the fuzzer
//! reaches the parser without forging SHA-256.

use std::collections::BTreeMap;

use sha2::Digest as _;

use crate::chunked::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_INDEX_RANGE, ChunkCompression, ChunkIndex,
    ChunkedLayerOptions, IndexLocation, MEDIA_TYPE_EROFS, MEDIA_TYPE_EROFS_ZSTD,
    decode_whole_layer, write_chunked_layer,
};
use crate::manifest::Descriptor;
use crate::reference::Digest;

/// Mode bit: a raw `application/vnd.erofs` layer (else `+zstd`).
pub const MODE_RAW: u8 = 0x01;
/// Mode bit: no `org.erofs.chunk-index.digest` annotation.
pub const MODE_NO_DIGEST: u8 = 0x02;
/// Mode bit: name a zstd layer by containerd's older media type.
pub const MODE_LEGACY_NAME: u8 = 0x04;
/// Chunks above this are not decoded (a buffer is allocated per chunk; the parser's own limit
/// is 64 MiB, too slow to fill for every input).
const MAX_DECODED_CHUNK: u64 = 1 << 20;
/// The eager decoder's output cap.
const MAX_EAGER_OUTPUT: u64 = 4 << 20;

/// What [`check_chunk_index`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndexOutcome {
    /// The parse: `Ok(number of chunks)` or the error's text.
    pub parsed: Result<usize, String>,
    /// Chunks that decoded and verified.
    pub decoded: usize,
    /// Bytes the eager decoder produced, or its error's text.
    pub eager: Result<u64, String>,
}

/// Splits an input into (mode, blob, section start).
fn split(data: &[u8]) -> (u8, &[u8], u64) {
    let mode = data.first().copied().unwrap_or(0);
    let mut len = [0u8; 4];
    for (to, from) in len.iter_mut().zip(data.iter().skip(1)) {
        *to = *from;
    }
    let blob = data.get(5..).unwrap_or_default();
    let section_len = u64::from(u32::from_le_bytes(len)).min(blob.len() as u64);
    (mode, blob, blob.len() as u64 - section_len)
}

/// An input for [`check_chunk_index`].
pub fn chunk_index_input(mode: u8, blob: &[u8], section_start: u64) -> Vec<u8> {
    let section_len = blob.len() as u64 - section_start;
    let mut data = vec![mode];
    data.extend_from_slice(&u32::try_from(section_len).unwrap_or(u32::MAX).to_le_bytes());
    data.extend_from_slice(blob);
    data
}

/// The descriptor the input describes.
fn descriptor(mode: u8, blob: &[u8], section_start: u64) -> Descriptor {
    let raw = mode & MODE_RAW != 0;
    let section = &blob[section_start as usize..];
    let payload = if raw {
        section
    } else {
        section.get(8..).unwrap_or_default()
    };
    let mut annotations = BTreeMap::from([(
        ANNOTATION_INDEX_RANGE.to_string(),
        section_start.to_string(),
    )]);
    if mode & MODE_NO_DIGEST == 0 {
        annotations.insert(
            ANNOTATION_INDEX_DIGEST.to_string(),
            Digest::of(payload).to_string(),
        );
    }
    let media_type = match (raw, mode & MODE_LEGACY_NAME != 0) {
        (true, _) => MEDIA_TYPE_EROFS,
        (false, false) => MEDIA_TYPE_EROFS_ZSTD,
        (false, true) => "application/vnd.erofs.layer.v1+zstd",
    };
    Descriptor {
        media_type: media_type.to_string(),
        digest: Digest::of(blob),
        size: blob.len() as u64,
        platform: None,
        annotations,
        urls: Vec::new(),
        artifact_type: None,
    }
}

/// Checks one input: nothing panics; a parsed index re-serializes to the payload, its chunks
/// tile the image in order and lie before the section, `chunk_at` finds each; a chunk that
/// decodes was verified; when every chunk decodes and the first starts the blob, the eager
/// decoder's image is the chunks' concatenation.
pub fn check_chunk_index(data: &[u8]) -> ChunkIndexOutcome {
    let (mode, blob, section_start) = split(data);
    let kind = if mode & MODE_RAW != 0 {
        ChunkCompression::None
    } else {
        ChunkCompression::Zstd
    };
    let mut eager_image = Vec::new();
    let eager = decode_whole_layer(
        blob,
        &mut eager_image,
        kind,
        Some(section_start),
        MAX_EAGER_OUTPUT,
    )
    .map(|(written, digest)| {
        assert_eq!(written, eager_image.len() as u64, "eager length");
        assert_eq!(digest, Digest::of(&eager_image), "eager digest");
        written
    })
    .map_err(|e| e.to_string());

    let descriptor = descriptor(mode, blob, section_start);
    let parsed = IndexLocation::from_descriptor(&descriptor).and_then(|location| {
        assert_eq!(location.range, section_start..blob.len() as u64, "range");
        location.parse(&blob[section_start as usize..])
    });
    let index = match parsed {
        Ok(index) => index,
        Err(error) => {
            return ChunkIndexOutcome {
                parsed: Err(error.to_string()),
                decoded: 0,
                eager,
            };
        }
    };
    let section = &blob[section_start as usize..];
    let payload = if kind == ChunkCompression::Zstd {
        &section[8..]
    } else {
        section
    };
    assert_eq!(index.payload_bytes(), payload, "the payload re-serializes");
    assert_eq!(index.section_start(), section_start);
    assert!(index.is_verifiable(), "an unverifiable index was returned");

    let mut lazy_image = Vec::new();
    let mut decoded = 0;
    let mut next = 0;
    for chunk in 0..index.len() {
        let range = index.uncompressed_range(chunk);
        let stored = index.blob_range(chunk);
        assert_eq!(
            range.start, next,
            "chunk {chunk} does not follow its predecessor"
        );
        assert!(
            range.start < range.end && stored.start < stored.end,
            "empty chunk"
        );
        assert!(
            stored.end <= section_start,
            "chunk {chunk} runs into the index"
        );
        assert_eq!(index.chunk_at(range.start), Some(chunk));
        assert_eq!(index.chunk_at(range.end - 1), Some(chunk));
        next = range.end;
        let len = range.end - range.start;
        if len > MAX_DECODED_CHUNK {
            continue;
        }
        let stored_bytes = &blob[stored.start as usize..stored.end as usize];
        let mut out = vec![0u8; len as usize];
        if index
            .decode_chunk_into(chunk, stored_bytes, &mut out)
            .is_ok()
        {
            if kind == ChunkCompression::None {
                assert_eq!(out, stored_bytes, "a raw chunk is its stored bytes");
            }
            decoded += 1;
            lazy_image.extend_from_slice(&out);
        }
        // A buffer of the wrong size is refused, never written past.
        let mut short = vec![0u8; len as usize - 1];
        assert!(
            index
                .decode_chunk_into(chunk, stored_bytes, &mut short)
                .is_err()
        );
    }
    assert_eq!(
        next,
        index.uncompressed_size(),
        "the chunks cover the image"
    );
    assert_eq!(index.chunk_at(index.uncompressed_size()), None);
    let starts_the_blob = index.entries().first().is_none_or(|e| e.block_offset == 0);
    if decoded == index.len()
        && starts_the_blob
        && let Ok(written) = &eager
    {
        assert_eq!(*written, lazy_image.len() as u64, "eager and lazy lengths");
        assert!(eager_image == lazy_image, "eager and lazy images differ");
    }
    ChunkIndexOutcome {
        parsed: Ok(index.len()),
        decoded,
        eager,
    }
}

/// Named seeds of the `chunk_index` target; names starting with `valid-` parse and decode
/// fully (the corpus test checks it).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut image = Vec::new();
    for line in 0..40 {
        image.extend_from_slice(format!("seed line {line}\n").as_bytes());
    }
    image.extend((0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let write = |image: &[u8], chunk_size| {
        let mut blob = Vec::new();
        let layer = write_chunked_layer(
            image,
            &mut blob,
            &ChunkedLayerOptions {
                chunk_size,
                zstd_level: 3,
            },
        )
        .expect("writing a seed layer");
        (blob, layer)
    };
    let mut seeds = Vec::new();
    let (blob, layer) = write(&image, 128);
    let start = layer.index_range.start;
    seeds.push(("valid-zstd".to_string(), chunk_index_input(0, &blob, start)));
    seeds.push((
        "valid-zstd-legacy-name".to_string(),
        chunk_index_input(MODE_LEGACY_NAME, &blob, start),
    ));
    let (one, layer) = write(&image, 1 << 20);
    seeds.push((
        "valid-zstd-one-chunk".to_string(),
        chunk_index_input(0, &one, layer.index_range.start),
    ));
    let (empty, _) = write(&[], 4096);
    seeds.push((
        "valid-zstd-empty".to_string(),
        chunk_index_input(0, &empty, 0),
    ));

    let raw_index = ChunkIndex::new(
        ChunkCompression::None,
        image.len() as u64,
        image.len() as u64,
        true,
        (0..image.len())
            .step_by(200)
            .map(|offset| crate::chunked::ChunkEntry {
                block_offset: offset as u64,
                uncompressed_offset: offset as u64,
                checksum: Some(
                    sha2::Sha256::digest(&image[offset..(offset + 200).min(image.len())]).into(),
                ),
            })
            .collect(),
    )
    .expect("a valid raw index");
    let mut raw = image.clone();
    raw.extend_from_slice(&raw_index.payload_bytes());
    seeds.push((
        "valid-raw".to_string(),
        chunk_index_input(MODE_RAW, &raw, image.len() as u64),
    ));

    seeds.push((
        "no-digest".to_string(),
        chunk_index_input(MODE_NO_DIGEST, &blob, start),
    ));
    let mut lying_count = blob.clone();
    let count_at = start as usize + 8 + 16;
    lying_count[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    seeds.push((
        "lying-count".to_string(),
        chunk_index_input(0, &lying_count, start),
    ));
    let mut lying_size = blob.clone();
    let size_at = start as usize + 8 + 8;
    lying_size[size_at..size_at + 8].copy_from_slice(&(image.len() as u64 + 7).to_le_bytes());
    seeds.push((
        "lying-size".to_string(),
        chunk_index_input(0, &lying_size, start),
    ));
    let mut corrupt_chunk = blob.clone();
    corrupt_chunk[20] ^= 0x10;
    seeds.push((
        "corrupt-chunk".to_string(),
        chunk_index_input(0, &corrupt_chunk, start),
    ));
    seeds.push((
        "zstd-as-raw".to_string(),
        chunk_index_input(MODE_RAW, &blob, start),
    ));
    seeds
}
