//! The lazy EROFS layer format (erofs-image-spec v1) end to end: a golden blob, the zstd CLI as
//! an independent decoder, round trips through the descriptor, and each refusal with its error.
//!
//! The golden blob `tests/data/golden-chunked.bin` and its descriptor
//! `tests/data/golden-chunked.json` are rewritten by
//! `GANTRY_REGENERATE_GOLDEN=1 cargo test -p gantry-oci --test chunked_format golden`; do that
//! only when the format is meant to change (or libzstd's level-3 output did), and say so.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use gantry_oci::builder::LayerBuilder;
use gantry_oci::chunked::{
    ANNOTATION_INDEX_DIGEST, ANNOTATION_INDEX_MEDIA_TYPE, ANNOTATION_INDEX_RANGE,
    ANNOTATION_UNCOMPRESSED_DIGEST, ChunkCompression, ChunkEntry, ChunkIndex, ChunkedError,
    ChunkedLayer, ChunkedLayerOptions, IndexLocation, MEDIA_TYPE_EROFS, MEDIA_TYPE_EROFS_ZSTD,
    decode_whole_layer, erofs_layer_kind, layer_diff_id, write_chunked_layer,
};
use gantry_oci::manifest::Descriptor;
use gantry_oci::{ConvertOptions, Digest, convert_layer};
use sha2::{Digest as _, Sha256};

const GOLDEN_CHUNK: u32 = 4096;
const NO_CAP: u64 = u64::MAX;

// ---------------------------------------------------------------------------------------------
// Images and blobs
// ---------------------------------------------------------------------------------------------

/// xorshift64: incompressible bytes, the same on every run.
fn noise(len: usize, mut state: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A fixed pattern, independent of any EROFS writer (so the golden blob only changes when this
/// format does): text, zeros and noise, so chunks compress differently, and a short last chunk.
fn pattern_image() -> Vec<u8> {
    let mut image = Vec::new();
    for line in 0..300 {
        image.extend_from_slice(format!("line {line:04} of the golden chunked layer\n").as_bytes());
    }
    image.resize(image.len() + 5000, 0);
    image.extend_from_slice(&noise(6000, 0x9e37_79b9_7f4a_7c15));
    image.extend_from_slice(b"the end\n");
    image
}

/// A real EROFS image from Gantry's converter: directories, text, noise, a hole, a symlink.
fn real_image() -> Vec<u8> {
    let mut words = String::new();
    for i in 0..4000 {
        words.push_str(&format!("word{} ", i * 7919 % 1000));
    }
    let mut layer = LayerBuilder::new();
    layer
        .dir("etc", 0o755)
        .unwrap()
        .file("etc/hostname", 0o644, "gantry\n")
        .unwrap()
        .file("usr/share/words", 0o644, words)
        .unwrap()
        .file("usr/lib/noise.bin", 0o755, noise(50_000, 7))
        .unwrap()
        .file("var/zeros", 0o600, vec![0u8; 16384])
        .unwrap()
        .symlink("bin", "usr/bin")
        .unwrap();
    let tar = layer.to_tar().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.erofs");
    convert_layer(&tar[..], &path, &ConvertOptions::default()).unwrap();
    let image = std::fs::read(&path).unwrap();
    assert!(
        image.len() > 4 * 8192,
        "a multi-chunk image: {}",
        image.len()
    );
    image
}

fn write(image: &[u8], chunk_size: u32) -> (Vec<u8>, ChunkedLayer) {
    let mut blob = Vec::new();
    let options = ChunkedLayerOptions {
        chunk_size,
        ..ChunkedLayerOptions::default()
    };
    let layer = write_chunked_layer(image, &mut blob, &options).unwrap();
    (blob, layer)
}

/// The index as a lazy reader gets it: the location from the descriptor, the section fetched.
fn open(blob: &[u8], descriptor: &Descriptor) -> Result<ChunkIndex, ChunkedError> {
    let location = IndexLocation::from_descriptor(descriptor)?;
    let section = blob
        .get(location.range.start as usize..location.range.end as usize)
        .expect("the range is inside the blob");
    location.parse(section)
}

fn stored<'a>(blob: &'a [u8], index: &ChunkIndex, chunk: usize) -> &'a [u8] {
    let range = index.blob_range(chunk);
    &blob[range.start as usize..range.end as usize]
}

fn decode_chunk(blob: &[u8], index: &ChunkIndex, chunk: usize) -> Result<Vec<u8>, ChunkedError> {
    let range = index.uncompressed_range(chunk);
    let mut out = vec![0u8; (range.end - range.start) as usize];
    index.decode_chunk_into(chunk, stored(blob, index, chunk), &mut out)?;
    Ok(out)
}

/// Every chunk decoded on its own, concatenated.
fn decode_lazily(blob: &[u8], index: &ChunkIndex) -> Vec<u8> {
    (0..index.len())
        .flat_map(|chunk| decode_chunk(blob, index, chunk).unwrap())
        .collect()
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A descriptor for a blob assembled by a test.
fn descriptor_for(
    media_type: &str,
    blob: &[u8],
    range: &Range<u64>,
    payload: &[u8],
    uncompressed: Option<&[u8]>,
) -> Descriptor {
    let mut annotations = BTreeMap::from([
        (
            ANNOTATION_INDEX_RANGE.to_string(),
            format!("{}:{}", range.start, range.end),
        ),
        (
            ANNOTATION_INDEX_DIGEST.to_string(),
            Digest::of(payload).to_string(),
        ),
    ]);
    if let Some(image) = uncompressed {
        annotations.insert(
            ANNOTATION_UNCOMPRESSED_DIGEST.to_string(),
            Digest::of(image).to_string(),
        );
    }
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

/// `data` (the blob before its index section) followed by `payload` as the index section of a
/// zstd layer (in a skippable frame) or a raw one, with a descriptor vouching for it.
fn with_index(
    compression: ChunkCompression,
    data: &[u8],
    payload: &[u8],
    image: &[u8],
) -> (Vec<u8>, Descriptor) {
    let mut blob = data.to_vec();
    if compression == ChunkCompression::Zstd {
        blob.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        blob.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    }
    blob.extend_from_slice(payload);
    let range = data.len() as u64..blob.len() as u64;
    let media_type = match compression {
        ChunkCompression::None => MEDIA_TYPE_EROFS,
        ChunkCompression::Zstd => MEDIA_TYPE_EROFS_ZSTD,
    };
    let uncompressed = (compression == ChunkCompression::Zstd).then_some(image);
    let descriptor = descriptor_for(media_type, &blob, &range, payload, uncompressed);
    (blob, descriptor)
}

/// The blob Gantry wrote, with its index payload changed by `edit` and the digest annotation
/// recomputed, so only the index validation can object.
fn with_edited_index(
    blob: &[u8],
    layer: &ChunkedLayer,
    image: &[u8],
    edit: impl FnOnce(&mut Vec<u8>),
) -> (Vec<u8>, Descriptor) {
    let start = layer.index_range.start as usize;
    let mut payload = blob[start + 8..].to_vec();
    edit(&mut payload);
    with_index(ChunkCompression::Zstd, &blob[..start], &payload, image)
}

/// A zstd layer assembled from the given stored chunks (not by the writer): `chunks` are
/// (stored bytes, uncompressed length) pairs.
fn assembled_zstd_layer(
    chunks: &[(Vec<u8>, u64)],
    uncompressed_size: u64,
    image: &[u8],
) -> (Vec<u8>, Descriptor) {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    let mut offset = 0;
    for (bytes, len) in chunks {
        entries.push(ChunkEntry {
            block_offset: data.len() as u64,
            uncompressed_offset: offset,
            checksum: Some(sha256(bytes)),
        });
        data.extend_from_slice(bytes);
        offset += len;
    }
    let index = ChunkIndex::new(
        ChunkCompression::Zstd,
        uncompressed_size,
        data.len() as u64,
        true,
        entries,
    )
    .unwrap();
    with_index(ChunkCompression::Zstd, &data, &index.payload_bytes(), image)
}

/// A zstd frame of `data` that does not state its decompressed size.
fn frame_without_size(data: &[u8]) -> Vec<u8> {
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    compressor
        .set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
        .unwrap();
    let frame = compressor.compress(data).unwrap();
    assert!(
        matches!(zstd::zstd_safe::get_frame_content_size(&frame), Ok(None)),
        "the frame hides its size"
    );
    frame
}

fn zstd_cli() -> Option<PathBuf> {
    let path = Path::new("/usr/bin/zstd");
    if path.exists() {
        Some(path.to_path_buf())
    } else {
        eprintln!("SKIP: /usr/bin/zstd is not installed; the CLI cross-check did not run");
        None
    }
}

fn zstd_cli_decode(zstd: &Path, blob: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layer.zst");
    std::fs::write(&path, blob).unwrap();
    let output = Command::new(zstd)
        .args(["-d", "-q", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "zstd -d failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

// ---------------------------------------------------------------------------------------------
// The golden blob
// ---------------------------------------------------------------------------------------------

/// Reads the index section by the spec's tables (§3.4.1, §3.4.2, §3.4.3), without the crate's
/// parser, and checks every field against what the writer was given.
fn check_layout_by_the_spec(blob: &[u8], range: &Range<u64>, image: &[u8], chunk: u64) {
    let section = &blob[range.start as usize..range.end as usize];
    assert_eq!(
        range.end,
        blob.len() as u64,
        "the index is the trailing section"
    );
    assert_eq!(range.start % 4, 0, "the index frame is 4-byte aligned");
    assert_eq!(le32(section, 0), 0x184D_2A50, "skippable magic");
    assert_eq!(le32(section, 4) as usize, section.len() - 8, "frame length");
    let payload = &section[8..];
    assert_eq!(&payload[0..4], &[0xCD, 0xE4, 0xEC, 0x67], "Magic");
    assert_eq!(payload[4], 1, "Version");
    assert_eq!(payload[5], 1, "CompressionType zstd");
    assert_eq!(&payload[6..8], &[0, 0], "Flags");
    assert_eq!(le64(payload, 8), image.len() as u64, "UncompressedSize");
    let chunks = (image.len() as u64).div_ceil(chunk);
    assert_eq!(u64::from(le32(payload, 16)), chunks, "NumChunks");
    assert_eq!((payload[20], payload[21]), (1, 32), "HashAlgo, HashSize");
    assert_eq!(&payload[22..32], &[0u8; 10], "Reserved");
    assert_eq!(payload.len() as u64, 32 + chunks * 48, "payload length");
    let mut decoded = Vec::new();
    for i in 0..chunks as usize {
        let entry = &payload[32 + 48 * i..32 + 48 * (i + 1)];
        let start = le64(entry, 0) as usize;
        let end = if i + 1 < chunks as usize {
            le64(payload, 32 + 48 * (i + 1)) as usize
        } else {
            range.start as usize
        };
        assert_eq!(le64(entry, 8), i as u64 * chunk, "UncompressedOffset {i}");
        assert_eq!(&entry[16..48], &sha256(&blob[start..end]), "Checksum {i}");
        // One data frame per chunk, decodable alone by plain zstd.
        assert_eq!(le32(blob, start), 0xFD2F_B528, "chunk {i} is a data frame");
        decoded.extend(zstd::stream::decode_all(&blob[start..end]).unwrap());
    }
    assert_eq!(decoded, image);
}

#[test]
fn golden_blob_is_written_byte_for_byte_and_parses_back() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let blob_path = data.join("golden-chunked.bin");
    let descriptor_path = data.join("golden-chunked.json");
    let image = pattern_image();
    let (blob, layer) = write(&image, GOLDEN_CHUNK);
    let descriptor = layer.descriptor();
    let json = serde_json::to_string_pretty(&descriptor).unwrap() + "\n";
    if std::env::var_os("GANTRY_REGENERATE_GOLDEN").is_some() {
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(&blob_path, &blob).unwrap();
        std::fs::write(&descriptor_path, &json).unwrap();
        eprintln!("regenerated {}", blob_path.display());
    }
    let golden = std::fs::read(&blob_path).expect("the golden blob is committed");
    assert!(
        golden == blob,
        "the writer's output changed ({} bytes, golden {}): if intended, regenerate with \
         GANTRY_REGENERATE_GOLDEN=1",
        blob.len(),
        golden.len()
    );
    let golden_json = std::fs::read_to_string(&descriptor_path).unwrap();
    assert_eq!(golden_json, json, "the descriptor changed");
    let parsed: Descriptor = serde_json::from_str(&golden_json).unwrap();
    assert_eq!(parsed, descriptor);

    check_layout_by_the_spec(&golden, &layer.index_range, &image, u64::from(GOLDEN_CHUNK));
    // The golden layer exercises the padding frame: the last chunk's frame does not end at
    // a multiple of 4, so a 9–11 byte skippable frame sits between it and the index.
    let index = open(&golden, &parsed).unwrap();
    let last = index.len() - 1;
    let frame_end = index.entries()[last].block_offset as usize
        + zstd::zstd_safe::find_frame_compressed_size(stored(&golden, &index, last)).unwrap();
    assert_ne!(
        frame_end as u64,
        index.section_start(),
        "no padding in the golden blob"
    );
    assert_eq!(index.len(), 6);
    assert_eq!(decode_lazily(&golden, &index), image);
    assert_eq!(parsed.digest, Digest::of(&golden));
    assert_eq!(parsed.size, golden.len() as u64);
    assert_eq!(
        parsed.annotations[ANNOTATION_UNCOMPRESSED_DIGEST],
        Digest::of(&image).to_string()
    );
    if let Some(zstd) = zstd_cli() {
        assert_eq!(zstd_cli_decode(&zstd, &golden), image);
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn the_zstd_cli_decodes_a_written_blob_to_the_erofs_image() {
    let Some(zstd) = zstd_cli() else {
        return;
    };
    let image = real_image();
    let (blob, layer) = write(&image, 8192);
    assert!(layer.chunk_count >= 4, "{} chunks", layer.chunk_count);
    assert_eq!(zstd_cli_decode(&zstd, &blob), image);
}

#[test]
fn a_real_image_round_trips_through_the_descriptor() {
    let image = real_image();
    let (blob, layer) = write(&image, 8192);
    let descriptor = layer.descriptor();
    assert_eq!(descriptor.media_type, MEDIA_TYPE_EROFS_ZSTD);
    assert_eq!(descriptor.digest, Digest::of(&blob));
    assert_eq!(layer.uncompressed_digest, Digest::of(&image));
    assert_eq!(layer.uncompressed_size, image.len() as u64);
    assert_eq!(
        layer_diff_id(&descriptor).unwrap(),
        Some(Digest::of(&image))
    );

    let location = IndexLocation::from_descriptor(&descriptor).unwrap();
    assert_eq!(location.range, layer.index_range);
    assert_eq!(location.compression, ChunkCompression::Zstd);
    assert_eq!(location.digest.as_ref(), Some(&layer.index_digest));
    let index = open(&blob, &descriptor).unwrap();
    assert_eq!(index.len(), layer.chunk_count);
    assert_eq!(index.len(), image.len().div_ceil(8192));
    assert_eq!(index.uncompressed_size(), image.len() as u64);
    assert_eq!(index.section_start(), layer.index_range.start);
    assert_eq!(index.compression(), ChunkCompression::Zstd);
    assert!(index.is_verifiable());
    assert_eq!(
        ChunkIndex::parse_payload(&index.payload_bytes(), index.section_start()).unwrap(),
        index
    );
    assert_eq!(decode_lazily(&blob, &index), image);

    let mut eager = Vec::new();
    let (written, digest) =
        decode_whole_layer(&blob[..], &mut eager, ChunkCompression::Zstd, None, NO_CAP).unwrap();
    assert_eq!(eager, image);
    assert_eq!(
        (written, digest.clone()),
        (image.len() as u64, layer.uncompressed_digest)
    );
    let mut bounded = Vec::new();
    let with_len = decode_whole_layer(
        &blob[..],
        &mut bounded,
        ChunkCompression::Zstd,
        Some(index.section_start()),
        image.len() as u64,
    )
    .unwrap();
    assert_eq!((bounded, with_len), (image.clone(), (written, digest)));
}

#[test]
fn chunk_at_finds_chunks_at_their_boundaries() {
    let image = pattern_image();
    let (blob, layer) = write(&image, 1000);
    let index = open(&blob, &layer.descriptor()).unwrap();
    let size = image.len() as u64;
    assert_eq!(index.chunk_at(0), Some(0));
    for chunk in 0..index.len() {
        let range = index.uncompressed_range(chunk);
        assert_eq!(range.start, chunk as u64 * 1000);
        assert_eq!(index.chunk_at(range.start), Some(chunk));
        assert_eq!(index.chunk_at(range.end - 1), Some(chunk));
        if range.end < size {
            assert_eq!(index.chunk_at(range.end), Some(chunk + 1));
        }
    }
    assert_eq!(index.chunk_at(size - 1), Some(index.len() - 1));
    assert_eq!(index.chunk_at(size), None);
    assert_eq!(index.chunk_at(u64::MAX), None);
    assert_eq!(index.uncompressed_range(index.len() - 1).end, size);
    assert_eq!(index.max_chunk_len(), 1000);
    assert_eq!(
        index.blob_range(index.len() - 1).end,
        index.section_start(),
        "the last chunk runs to the index"
    );
}

#[test]
fn an_empty_image_is_a_valid_layer_of_zero_chunks() {
    let (blob, layer) = write(&[], 4096);
    assert_eq!(layer.chunk_count, 0);
    assert_eq!(layer.index_range, 0..blob.len() as u64);
    assert_eq!(blob.len(), 8 + 32, "just the index frame");
    let index = open(&blob, &layer.descriptor()).unwrap();
    assert!(index.is_empty());
    assert_eq!(index.uncompressed_size(), 0);
    assert_eq!(index.chunk_at(0), None);
    let mut out = Vec::new();
    let (written, digest) =
        decode_whole_layer(&blob[..], &mut out, ChunkCompression::Zstd, None, 0).unwrap();
    assert_eq!((written, digest), (0, Digest::of(b"")));
    // Told where the index starts (0: no frames at all), the same.
    let (written, digest) =
        decode_whole_layer(&blob[..], &mut out, ChunkCompression::Zstd, Some(0), 0).unwrap();
    assert_eq!((written, digest, out.len()), (0, Digest::of(b""), 0));
    if let Some(zstd) = zstd_cli() {
        assert_eq!(zstd_cli_decode(&zstd, &blob), b"");
    }
}

#[test]
fn output_is_deterministic_and_chunk_sizes_vary() {
    let image = real_image();
    for chunk_size in [1, 4095, 4096, 65536, 1 << 20] {
        let (first, layer) = write(&image[..image.len().min(20_000)], chunk_size);
        let (second, again) = write(&image[..image.len().min(20_000)], chunk_size);
        assert_eq!(first, second, "chunk size {chunk_size}");
        assert_eq!(layer, again);
        let index = open(&first, &layer.descriptor()).unwrap();
        assert_eq!(
            decode_lazily(&first, &index),
            &image[..image.len().min(20_000)]
        );
    }
    let mut out = Vec::new();
    let options = ChunkedLayerOptions {
        chunk_size: 0,
        ..ChunkedLayerOptions::default()
    };
    assert!(matches!(
        write_chunked_layer(&image[..], &mut out, &options),
        Err(ChunkedError::InvalidChunkSize)
    ));
}

#[test]
fn the_raw_variant_round_trips() {
    let image = real_image();
    let chunk = 8192u64;
    let entries = (0..image.len() as u64)
        .step_by(chunk as usize)
        .map(|offset| ChunkEntry {
            block_offset: offset,
            uncompressed_offset: offset,
            checksum: Some(sha256(
                &image[offset as usize..(offset + chunk).min(image.len() as u64) as usize],
            )),
        })
        .collect();
    let raw = ChunkIndex::new(
        ChunkCompression::None,
        image.len() as u64,
        image.len() as u64,
        true,
        entries,
    )
    .unwrap();
    let (blob, descriptor) =
        with_index(ChunkCompression::None, &image, &raw.payload_bytes(), &image);
    let index = open(&blob, &descriptor).unwrap();
    assert_eq!(index, raw);
    assert_eq!(index.blob_range(1), chunk..2 * chunk);
    assert_eq!(decode_lazily(&blob, &index), image);
    let mut eager = Vec::new();
    let (written, digest) = decode_whole_layer(
        &blob[..],
        &mut eager,
        ChunkCompression::None,
        Some(index.section_start()),
        NO_CAP,
    )
    .unwrap();
    assert_eq!(
        (eager, written, digest),
        (image.clone(), image.len() as u64, Digest::of(&image))
    );
    // A raw layer's DiffID is its own digest, the index included (§5.2).
    assert_eq!(layer_diff_id(&descriptor).unwrap(), Some(Digest::of(&blob)));

    // A raw chunk is verified like a compressed one.
    let mut corrupt = blob.clone();
    corrupt[10] ^= 1;
    assert!(matches!(
        decode_chunk(&corrupt, &index, 0),
        Err(ChunkedError::ChecksumMismatch(0))
    ));
    // A raw index whose entries do not name the image's own bytes is refused.
    let shifted = ChunkIndex::new(
        ChunkCompression::None,
        image.len() as u64,
        image.len() as u64 + 1,
        false,
        vec![ChunkEntry {
            block_offset: 1,
            uncompressed_offset: 0,
            checksum: None,
        }],
    );
    assert!(
        matches!(shifted, Err(ChunkedError::RawSizeMismatch { .. })),
        "{shifted:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: the index section and its descriptor
// ---------------------------------------------------------------------------------------------

/// The golden pattern written with 4 KiB chunks (6 chunks, a padding frame before the index).
fn layer() -> (Vec<u8>, ChunkedLayer, Vec<u8>) {
    let image = pattern_image();
    let (blob, layer) = write(&image, GOLDEN_CHUNK);
    (blob, layer, image)
}

fn annotated(descriptor: &Descriptor, name: &str, value: Option<&str>) -> Descriptor {
    let mut descriptor = descriptor.clone();
    match value {
        Some(value) => descriptor
            .annotations
            .insert(name.to_string(), value.to_string()),
        None => descriptor.annotations.remove(name),
    };
    descriptor
}

#[test]
fn a_corrupt_index_payload_is_a_digest_mismatch() {
    let (blob, layer, _) = layer();
    let descriptor = layer.descriptor();
    let payload_start = layer.index_range.start as usize + 8;
    // A header byte, an offset, a checksum byte, the last byte.
    for at in [
        payload_start + 8,
        payload_start + 32 + 48 + 2,
        payload_start + 32 + 20,
        blob.len() - 1,
    ] {
        let mut corrupt = blob.clone();
        corrupt[at] ^= 0x40;
        let err = open(&corrupt, &descriptor).unwrap_err();
        assert!(
            matches!(&err, ChunkedError::IndexDigestMismatch { expected, .. } if *expected == layer.index_digest),
            "byte {at}: {err}"
        );
        assert!(!err.falls_back_to_eager(), "corruption is not a fallback");
    }
}

#[test]
fn the_index_digest_annotation_must_vouch_for_the_index() {
    let (blob, layer, _) = layer();
    let descriptor = layer.descriptor();
    let other = Digest::of(b"another index").to_string();
    let err = open(
        &blob,
        &annotated(&descriptor, ANNOTATION_INDEX_DIGEST, Some(&other)),
    )
    .unwrap_err();
    assert!(
        matches!(err, ChunkedError::IndexDigestMismatch { .. }),
        "{err}"
    );
    let err = open(
        &blob,
        &annotated(&descriptor, ANNOTATION_INDEX_DIGEST, None),
    )
    .unwrap_err();
    assert!(matches!(err, ChunkedError::NoIndexDigest), "{err}");
    assert!(err.falls_back_to_eager());
    for garbage in ["sha256:XYZ", "sha512:00", "d104b1d2"] {
        let err = IndexLocation::from_descriptor(&annotated(
            &descriptor,
            ANNOTATION_INDEX_DIGEST,
            Some(garbage),
        ))
        .unwrap_err();
        assert!(
            matches!(err, ChunkedError::BadAnnotation { name, .. } if name == ANNOTATION_INDEX_DIGEST),
            "{garbage}: {err}"
        );
    }
}

#[test]
fn the_range_annotation_must_name_the_trailing_section() {
    let (blob, layer, _) = layer();
    let descriptor = layer.descriptor();
    let size = blob.len() as u64;
    let start = layer.index_range.start;
    let with_range = |range: &str| annotated(&descriptor, ANNOTATION_INDEX_RANGE, Some(range));
    // The end may be omitted.
    assert_eq!(
        open(&blob, &with_range(&start.to_string())).unwrap(),
        open(&blob, &descriptor).unwrap()
    );
    for range in [
        format!("{start}:{}", size + 1),
        format!("{}", size + 1),
        format!("{}:{start}", start + 1),
        format!("{}:{}", u64::MAX, u64::MAX),
    ] {
        let err = IndexLocation::from_descriptor(&with_range(&range)).unwrap_err();
        assert!(
            matches!(err, ChunkedError::RangeOutOfBlob { .. }),
            "{range}: {err}"
        );
    }
    let err =
        IndexLocation::from_descriptor(&with_range(&format!("{start}:{}", size - 1))).unwrap_err();
    assert!(
        matches!(err, ChunkedError::IndexNotTrailing { .. }),
        "{err}"
    );
    for range in [format!("{}", size - 39), format!("{size}")] {
        let err = IndexLocation::from_descriptor(&with_range(&range)).unwrap_err();
        assert!(
            matches!(err, ChunkedError::SectionTooShort { .. }),
            "{range}: {err}"
        );
    }
    let mut huge = with_range("0");
    huge.size = 200 << 20;
    let err = IndexLocation::from_descriptor(&huge).unwrap_err();
    assert!(matches!(err, ChunkedError::SectionTooLarge { .. }), "{err}");
    for garbage in [
        "",
        "abc",
        "12-40",
        "-5",
        "5:",
        ":5",
        "1:2:3",
        " 6588",
        "6588:6916 ",
    ] {
        let err = IndexLocation::from_descriptor(&with_range(garbage)).unwrap_err();
        assert!(
            matches!(err, ChunkedError::BadAnnotation { name, .. } if name == ANNOTATION_INDEX_RANGE),
            "{garbage:?}: {err}"
        );
    }
    // A range that starts a few bytes early or late does not find the frame.
    for shifted in [start - 4, start + 4] {
        let err = open(&blob, &with_range(&shifted.to_string())).unwrap_err();
        assert!(
            matches!(
                err,
                ChunkedError::BadSkippableMagic(_) | ChunkedError::FrameLength { .. }
            ),
            "{shifted}: {err}"
        );
    }
    let err = IndexLocation::from_descriptor(&annotated(&descriptor, ANNOTATION_INDEX_RANGE, None))
        .unwrap_err();
    assert!(matches!(err, ChunkedError::NoEmbeddedIndex), "{err}");
    assert!(err.falls_back_to_eager());
}

#[test]
fn the_section_must_be_one_skippable_frame_of_the_ranges_length() {
    let (blob, layer, image) = layer();
    let descriptor = layer.descriptor();
    let location = IndexLocation::from_descriptor(&descriptor).unwrap();
    let start = layer.index_range.start as usize;
    let section = &blob[start..];
    let err = location.parse(&section[..section.len() - 1]).unwrap_err();
    assert!(matches!(err, ChunkedError::SectionLength { .. }), "{err}");
    let mut longer = section.to_vec();
    longer.push(0);
    let err = location.parse(&longer).unwrap_err();
    assert!(matches!(err, ChunkedError::SectionLength { .. }), "{err}");
    for magic in [0x184D_2A4Fu32, 0x184D_2A60, 0xFD2F_B528, 0] {
        let mut bad = section.to_vec();
        bad[..4].copy_from_slice(&magic.to_le_bytes());
        let err = location.parse(&bad).unwrap_err();
        assert!(
            matches!(err, ChunkedError::BadSkippableMagic(m) if m == magic),
            "{magic:#x}: {err}"
        );
    }
    // Any of the sixteen skippable magics will do.
    let mut last_magic = section.to_vec();
    last_magic[..4].copy_from_slice(&0x184D_2A5Fu32.to_le_bytes());
    assert!(location.parse(&last_magic).is_ok());
    for declared in [
        0u32,
        (section.len() - 9) as u32,
        (section.len() - 7) as u32,
        u32::MAX,
    ] {
        let mut bad = section.to_vec();
        bad[4..8].copy_from_slice(&declared.to_le_bytes());
        let err = location.parse(&bad).unwrap_err();
        assert!(
            matches!(err, ChunkedError::FrameLength { declared: d, .. } if d == declared),
            "{declared}: {err}"
        );
    }
    // The same payload in a frame too long for it, the digest recomputed: the frame header
    // matches the section, the payload no longer has the length its count needs.
    let (padded, descriptor) = with_edited_index(&blob, &layer, &image, |p| p.push(0));
    let err = open(&padded, &descriptor).unwrap_err();
    assert!(matches!(err, ChunkedError::PayloadLength { .. }), "{err}");
}

/// Payload offsets: header fields, and entry `i`'s fields.
const UNCOMPRESSED_SIZE: usize = 8;
const NUM_CHUNKS: usize = 16;
fn block_offset(i: usize) -> usize {
    32 + 48 * i
}
fn uncompressed_offset(i: usize) -> usize {
    32 + 48 * i + 8
}
fn put64(payload: &mut [u8], at: usize, value: u64) {
    payload[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn out_of_order_and_overlapping_entries_are_refused_by_validation() {
    let (blob, layer, image) = layer();
    let section_start = layer.index_range.start;
    let edited = |edit: &dyn Fn(&mut Vec<u8>)| {
        let (blob, descriptor) = with_edited_index(&blob, &layer, &image, |p| edit(p));
        open(&blob, &descriptor)
    };
    let entries = open(&blob, &layer.descriptor()).unwrap().entries().to_vec();
    let (b1, b2) = (entries[1].block_offset, entries[2].block_offset);

    let err = edited(&|p| {
        put64(p, block_offset(1), b2);
        put64(p, block_offset(2), b1);
    })
    .unwrap_err();
    assert!(
        matches!(err, ChunkedError::BlockOffsetNotIncreasing { chunk: 2, .. }),
        "swapped: {err}"
    );
    let err = edited(&|p| put64(p, block_offset(2), b1)).unwrap_err();
    assert!(
        matches!(err, ChunkedError::BlockOffsetNotIncreasing { chunk: 2, .. }),
        "same block: {err}"
    );
    let err = edited(&|p| put64(p, block_offset(5), section_start)).unwrap_err();
    assert!(
        matches!(err, ChunkedError::BlockOffsetPastIndex { chunk: 5, .. }),
        "{err}"
    );
    let err = edited(&|p| put64(p, uncompressed_offset(2), 4096)).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkedError::UncompressedOffsetNotIncreasing { chunk: 2, .. }
        ),
        "same offset: {err}"
    );
    let err = edited(&|p| {
        put64(p, uncompressed_offset(1), 8192);
        put64(p, uncompressed_offset(2), 4096);
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            ChunkedError::UncompressedOffsetNotIncreasing { chunk: 2, .. }
        ),
        "swapped offsets: {err}"
    );
    let err = edited(&|p| put64(p, uncompressed_offset(0), 1)).unwrap_err();
    assert!(matches!(err, ChunkedError::FirstOffsetNotZero(1)), "{err}");
    // Overlap in the other direction: chunk 1 claims bytes chunk 2 holds.
    let err = edited(&|p| put64(p, uncompressed_offset(5), image.len() as u64)).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkedError::UncompressedOffsetPastEnd { chunk: 5, .. }
        ),
        "{err}"
    );
}

#[test]
fn header_fields_are_checked_each_with_its_error() {
    let (blob, layer, image) = layer();
    let edited = |edit: &dyn Fn(&mut Vec<u8>)| {
        let (blob, descriptor) = with_edited_index(&blob, &layer, &image, |p| edit(p));
        open(&blob, &descriptor).unwrap_err()
    };
    let err = edited(&|p| p[0] = 0xCE);
    assert!(matches!(err, ChunkedError::BadMagic(_)), "{err}");
    let err = edited(&|p| p[4] = 2);
    assert!(matches!(err, ChunkedError::UnsupportedVersion(2)), "{err}");
    assert!(err.falls_back_to_eager());
    let err = edited(&|p| p[5] = 0);
    assert!(
        matches!(
            err,
            ChunkedError::CompressionMismatch {
                media: ChunkCompression::Zstd,
                index: ChunkCompression::None
            }
        ),
        "{err}"
    );
    let err = edited(&|p| p[5] = 2);
    assert!(
        matches!(err, ChunkedError::UnknownCompressionType(2)),
        "{err}"
    );
    assert!(err.falls_back_to_eager());
    let err = edited(&|p| p[7] = 0x80);
    assert!(
        matches!(err, ChunkedError::UnsupportedFlags(0x8000)),
        "{err}"
    );
    assert!(err.falls_back_to_eager());
    for offset in 22..32 {
        let err = edited(&|p| p[offset] = 1);
        assert!(
            matches!(err, ChunkedError::ReservedNotZero { offset: o } if o == offset),
            "{offset}: {err}"
        );
    }
    let err = edited(&|p| p[21] = 64);
    assert!(
        matches!(err, ChunkedError::UnsupportedHash { algo: 1, size: 64 }),
        "{err}"
    );
    assert!(err.falls_back_to_eager());
    for (algo, size) in [(0u8, 32u8), (1, 0), (1, 20), (2, 32), (0, 64)] {
        let err = edited(&|p| {
            p[20] = algo;
            p[21] = size;
        });
        assert!(
            matches!(err, ChunkedError::InvalidHash { algo: a, size: s } if (a, s) == (algo, size)),
            "{algo}/{size}: {err}"
        );
    }
    // A count the payload cannot hold, even a huge one, is refused before any allocation.
    for count in [7u32, 5, 0, u32::MAX] {
        let err = edited(&|p| p[NUM_CHUNKS..NUM_CHUNKS + 4].copy_from_slice(&count.to_le_bytes()));
        assert!(
            matches!(err, ChunkedError::PayloadLength { num_chunks, .. } if num_chunks == count),
            "{count}: {err}"
        );
    }
    let err = edited(&|p| {
        p.truncate(p.len() - 1);
    });
    assert!(matches!(err, ChunkedError::PayloadLength { .. }), "{err}");
}

#[test]
fn an_index_without_checksums_is_not_served_lazily() {
    let (blob, layer, image) = layer();
    let index = open(&blob, &layer.descriptor()).unwrap();
    let bare: Vec<ChunkEntry> = index
        .entries()
        .iter()
        .map(|e| ChunkEntry {
            checksum: None,
            ..e.clone()
        })
        .collect();
    let bare = ChunkIndex::new(
        ChunkCompression::Zstd,
        index.uncompressed_size(),
        index.section_start(),
        false,
        bare,
    )
    .unwrap();
    assert!(!bare.is_verifiable());
    let payload = bare.payload_bytes();
    assert_eq!(payload.len(), 32 + 16 * index.len());
    assert_eq!((payload[20], payload[21]), (0, 0));
    let (unverified, descriptor) = with_index(
        ChunkCompression::Zstd,
        &blob[..index.section_start() as usize],
        &payload,
        &image,
    );
    let err = open(&unverified, &descriptor).unwrap_err();
    assert!(matches!(err, ChunkedError::NoChunkChecksums), "{err}");
    assert!(err.falls_back_to_eager());
    // The payload itself is valid, and decodes (unverified) for whoever parses it directly.
    let parsed = ChunkIndex::parse_payload(&payload, index.section_start()).unwrap();
    assert_eq!(decode_lazily(&unverified, &parsed), image);
    // Checksums on some entries only cannot be built.
    let mut mixed = index.entries().to_vec();
    mixed[3].checksum = None;
    let err = ChunkIndex::new(
        ChunkCompression::Zstd,
        index.uncompressed_size(),
        index.section_start(),
        true,
        mixed,
    )
    .unwrap_err();
    assert!(matches!(err, ChunkedError::MixedChecksums(3)), "{err}");
}

#[test]
fn media_types_legacy_names_and_the_index_media_type() {
    let (blob, layer, _) = layer();
    let descriptor = layer.descriptor();
    let expected = open(&blob, &descriptor).unwrap();
    for legacy in [
        "application/vnd.erofs.layer.v1+zstd",
        "dev.containerd.erofs.zstd",
        "dev.containerd.erofs.zstd.v1",
    ] {
        assert_eq!(erofs_layer_kind(legacy), Some(ChunkCompression::Zstd));
        let mut renamed = descriptor.clone();
        renamed.media_type = legacy.to_string();
        assert_eq!(open(&blob, &renamed).unwrap(), expected, "{legacy}");
    }
    for foreign in [
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.erofs.chunk-index.v1",
        "application/octet-stream",
    ] {
        let mut renamed = descriptor.clone();
        renamed.media_type = foreign.to_string();
        let err = IndexLocation::from_descriptor(&renamed).unwrap_err();
        assert!(matches!(err, ChunkedError::NotErofs(_)), "{foreign}: {err}");
        assert!(layer_diff_id(&renamed).is_err());
    }
    // The zstd layer parsed as raw: the section is not a raw index.
    let mut raw = descriptor.clone();
    raw.media_type = MEDIA_TYPE_EROFS.to_string();
    raw.annotations.remove(ANNOTATION_UNCOMPRESSED_DIGEST);
    assert!(open(&blob, &raw).is_err());

    let default = annotated(
        &descriptor,
        ANNOTATION_INDEX_MEDIA_TYPE,
        Some("application/vnd.erofs.chunk-index.v1"),
    );
    assert_eq!(open(&blob, &default).unwrap(), expected);
    let other = annotated(
        &descriptor,
        ANNOTATION_INDEX_MEDIA_TYPE,
        Some("application/vnd.erofs.chunk-index.v2"),
    );
    let err = IndexLocation::from_descriptor(&other).unwrap_err();
    assert!(
        matches!(err, ChunkedError::UnsupportedIndexMediaType(_)),
        "{err}"
    );
    assert!(err.falls_back_to_eager());

    // Unknown org.erofs.* annotations are informational (§2.3).
    let extra = annotated(&descriptor, "org.erofs.role", Some("overlay-lower"));
    assert_eq!(open(&blob, &extra).unwrap(), expected);
}

#[test]
fn a_raw_layers_uncompressed_digest_must_be_its_digest() {
    let image = pattern_image();
    let index = ChunkIndex::new(
        ChunkCompression::None,
        image.len() as u64,
        image.len() as u64,
        true,
        vec![ChunkEntry {
            block_offset: 0,
            uncompressed_offset: 0,
            checksum: Some(sha256(&image)),
        }],
    )
    .unwrap();
    let (blob, descriptor) = with_index(
        ChunkCompression::None,
        &image,
        &index.payload_bytes(),
        &image,
    );
    assert_eq!(open(&blob, &descriptor).unwrap(), index);
    let own = annotated(
        &descriptor,
        ANNOTATION_UNCOMPRESSED_DIGEST,
        Some(&descriptor.digest.to_string()),
    );
    assert!(IndexLocation::from_descriptor(&own).is_ok());
    let image_digest = annotated(
        &descriptor,
        ANNOTATION_UNCOMPRESSED_DIGEST,
        Some(&Digest::of(&image).to_string()),
    );
    let err = IndexLocation::from_descriptor(&image_digest).unwrap_err();
    assert!(
        matches!(err, ChunkedError::RawDigestMismatch { .. }),
        "{err}"
    );
    // A zstd index on a raw layer.
    let (_, layer, _) = layer();
    let mut zstd_payload = open(&write(&image, 4096).0, &layer.descriptor())
        .unwrap()
        .payload_bytes();
    zstd_payload[5] = 1;
    let (mixed, descriptor) = with_index(ChunkCompression::None, &image, &zstd_payload, &image);
    let err = open(&mixed, &descriptor).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkedError::CompressionMismatch {
                media: ChunkCompression::None,
                index: ChunkCompression::Zstd
            }
        ),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Refusals: decoding
// ---------------------------------------------------------------------------------------------

#[test]
fn a_lying_uncompressed_size_is_caught() {
    let (blob, layer, image) = layer();
    let size = image.len() as u64;
    let last = image.len().div_ceil(GOLDEN_CHUNK as usize) - 1;
    let with_size = |value: u64| {
        let (blob, descriptor) = with_edited_index(&blob, &layer, &image, |p| {
            put64(p, UNCOMPRESSED_SIZE, value)
        });
        (open(&blob, &descriptor), blob)
    };
    // Larger or a little smaller: only the last chunk's frame can tell, when it is decoded
    // (Gantry's frames state their size, so before decoding).
    for lie in [size + 1, size + 1000, size - 1] {
        let (index, blob) = with_size(lie);
        let index = index.unwrap();
        for chunk in 0..last {
            assert_eq!(
                decode_chunk(&blob, &index, chunk).unwrap(),
                &image[chunk * 4096..(chunk + 1) * 4096]
            );
        }
        let err = decode_chunk(&blob, &index, last).unwrap_err();
        assert!(
            matches!(err, ChunkedError::FrameContentSize { chunk, declared, expected }
                if chunk == last && declared + lie == size + expected),
            "{lie}: {err}"
        );
    }
    // So large that no reader should buffer the chunk: the index is not used.
    let err = with_size(size + (1 << 40)).0.unwrap_err();
    assert!(
        matches!(err, ChunkedError::ChunkTooLarge { chunk, .. } if chunk == last),
        "{err}"
    );
    assert!(err.falls_back_to_eager());
    // Smaller than the last chunk's start: caught at parse.
    for lie in [last as u64 * 4096, 0] {
        let err = with_size(lie).0.unwrap_err();
        assert!(
            matches!(err, ChunkedError::UncompressedOffsetPastEnd { .. }),
            "{lie}: {err}"
        );
    }

    // Frames that do not state their size are caught by decoding them, without ever writing
    // past the buffer the index sized.
    let tail = &image[4096..];
    let chunks = [
        (frame_without_size(&image[..4096]), 4096),
        (frame_without_size(tail), tail.len() as u64),
    ];
    let (honest, descriptor) = assembled_zstd_layer(&chunks, size, &image);
    assert_eq!(
        decode_lazily(&honest, &open(&honest, &descriptor).unwrap()),
        image
    );
    let (longer, descriptor) = assembled_zstd_layer(&chunks, size + 100, &image);
    let index = open(&longer, &descriptor).unwrap();
    let err = decode_chunk(&longer, &index, 1).unwrap_err();
    assert!(
        matches!(err, ChunkedError::ChunkTooShort { chunk: 1, decoded, .. } if decoded == tail.len() as u64),
        "{err}"
    );
    let (shorter, descriptor) = assembled_zstd_layer(&chunks, size - 100, &image);
    let index = open(&shorter, &descriptor).unwrap();
    let err = decode_chunk(&shorter, &index, 1).unwrap_err();
    assert!(
        matches!(err, ChunkedError::ChunkTooLong { chunk: 1, .. }),
        "{err}"
    );
    // A frame claiming gigabytes (its header says so) into a small buffer: refused, and the
    // decoder allocates nothing for it.
    let (bomb, descriptor) = assembled_zstd_layer(
        &[(
            zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap(),
            4096,
        )],
        4096,
        &image,
    );
    let index = open(&bomb, &descriptor).unwrap();
    let err = decode_chunk(&bomb, &index, 0).unwrap_err();
    assert!(
        matches!(err, ChunkedError::FrameContentSize { .. }),
        "{err}"
    );
    let (bomb, descriptor) = assembled_zstd_layer(
        &[(frame_without_size(&vec![0u8; 64 << 20]), 4096)],
        4096,
        &image,
    );
    let index = open(&bomb, &descriptor).unwrap();
    let err = decode_chunk(&bomb, &index, 0).unwrap_err();
    assert!(matches!(err, ChunkedError::ChunkTooLong { .. }), "{err}");
}

#[test]
fn stored_chunks_are_verified_and_must_be_exactly_one_frame() {
    let (blob, layer, image) = layer();
    let index = open(&blob, &layer.descriptor()).unwrap();
    let chunk1 = stored(&blob, &index, 1).to_vec();
    let mut out = vec![0u8; 4096];

    let mut flipped = chunk1.clone();
    flipped[chunk1.len() / 2] ^= 1;
    let err = index.decode_chunk_into(1, &flipped, &mut out).unwrap_err();
    assert!(matches!(err, ChunkedError::ChecksumMismatch(1)), "{err}");
    let err = index
        .decode_chunk_into(1, &chunk1[..chunk1.len() - 1], &mut out)
        .unwrap_err();
    assert!(
        matches!(err, ChunkedError::StoredLength { chunk: 1, .. }),
        "{err}"
    );
    let err = index
        .decode_chunk_into(1, &chunk1, &mut out[..4095])
        .unwrap_err();
    assert!(
        matches!(err, ChunkedError::OutputLength { chunk: 1, .. }),
        "{err}"
    );
    let err = index.decode_chunk_into(6, &chunk1, &mut out).unwrap_err();
    assert!(
        matches!(err, ChunkedError::NoSuchChunk { chunk: 6, count: 6 }),
        "{err}"
    );
    index.decode_chunk_into(1, &chunk1, &mut out).unwrap();
    assert_eq!(out, &image[4096..8192]);

    // Layers assembled by hand, each chunk's checksum over its odd stored bytes, so only the
    // frame checks can object.
    let a = zstd::bulk::compress(&image[..4096], 3).unwrap();
    let b = zstd::bulk::compress(&image[4096..8192], 3).unwrap();
    let rest = zstd::bulk::compress(&image[8192..], 3).unwrap();
    let rest_len = image.len() as u64 - 8192;
    let size = image.len() as u64;
    let decode_all_of = |chunks: &[(Vec<u8>, u64)]| {
        let (blob, descriptor) = assembled_zstd_layer(chunks, size, &image);
        let index = open(&blob, &descriptor).unwrap();
        (0..index.len())
            .map(|chunk| decode_chunk(&blob, &index, chunk))
            .collect::<Result<Vec<_>, _>>()
            .map(|chunks| Decoded(chunks.concat()))
    };
    let three =
        |first, second, last| decode_all_of(&[(first, 4096), (second, 4096), (last, rest_len)]);
    let two_frames = [a.clone(), b.clone()].concat();
    let err = decode_all_of(&[(two_frames, 8192), (rest.clone(), rest_len)]).unwrap_err();
    assert!(
        matches!(err, ChunkedError::TrailingBytes { chunk: 0, .. }),
        "{err}"
    );
    let padding = [0x50, 0x2a, 0x4d, 0x18, 1, 0, 0, 0, 0];
    let padded_first = [a.clone(), padding.to_vec()].concat();
    let err = three(padded_first, b.clone(), rest.clone()).unwrap_err();
    assert!(
        matches!(err, ChunkedError::TrailingBytes { chunk: 0, extra: 9 }),
        "padding is for the last chunk only: {err}"
    );
    let padded_last = [rest.clone(), padding.to_vec(), padding.to_vec()].concat();
    let decoded = three(a.clone(), b.clone(), padded_last).unwrap();
    assert!(decoded.0 == image, "padded layer decodes to the image");
    let garbage_last = [rest.clone(), vec![1, 2, 3]].concat();
    let err = three(a.clone(), b.clone(), garbage_last).unwrap_err();
    assert!(
        matches!(err, ChunkedError::TrailingBytes { chunk: 2, extra: 3 }),
        "{err}"
    );
    let skippable_chunk = [padding.to_vec(), a.clone()].concat();
    let err = three(skippable_chunk, b.clone(), rest.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            ChunkedError::NotADataFrame {
                chunk: 0,
                magic: 0x184D_2A50
            }
        ),
        "{err}"
    );
    let cut = a[..a.len() - 3].to_vec();
    let err = three(cut, b.clone(), rest.clone()).unwrap_err();
    assert!(
        matches!(err, ChunkedError::Zstd { chunk: 0, .. }),
        "truncated frame: {err}"
    );
    let err = three(vec![0x28, 0xb5], b, rest).unwrap_err();
    assert!(matches!(err, ChunkedError::Zstd { chunk: 0, .. }), "{err}");
}

/// Decoded bytes whose `Debug` does not print them all.
struct Decoded(Vec<u8>);

impl std::fmt::Debug for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} decoded bytes>", self.0.len())
    }
}

struct Failing;

impl std::io::Read for Failing {
    fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("the disk is gone"))
    }
}

impl std::io::Write for Failing {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("the disk is full"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn whole_layer_decoding_refuses_corrupt_truncated_and_oversized_blobs() {
    let (blob, layer, image) = layer();
    let size = image.len() as u64;
    let decode = |blob: &[u8], kind, image_len, cap| {
        decode_whole_layer(blob, &mut Vec::new(), kind, image_len, cap)
    };
    assert!(decode(&blob, ChunkCompression::Zstd, None, size).is_ok());
    let err = decode(&blob, ChunkCompression::Zstd, None, size - 1).unwrap_err();
    assert!(
        matches!(err, ChunkedError::OutputTooLarge(cap) if cap == size - 1),
        "{err}"
    );
    let cut = &blob[..layer.index_range.start as usize - 20];
    let err = decode(cut, ChunkCompression::Zstd, None, NO_CAP).unwrap_err();
    assert!(matches!(err, ChunkedError::Stream { .. }), "{err}");
    let err = decode(
        cut,
        ChunkCompression::Zstd,
        Some(layer.index_range.start),
        NO_CAP,
    )
    .unwrap_err();
    assert!(matches!(err, ChunkedError::Stream { .. }), "{err}");
    let garbage = [&blob[..], b"not zstd"].concat();
    let err = decode(&garbage, ChunkCompression::Zstd, None, NO_CAP).unwrap_err();
    assert!(matches!(err, ChunkedError::Stream { .. }), "{err}");
    // With the index's position given, what follows it is not decoded, but still read.
    let mut counted = std::io::Cursor::new(garbage.clone());
    decode_whole_layer(
        &mut counted,
        &mut Vec::new(),
        ChunkCompression::Zstd,
        Some(layer.index_range.start),
        NO_CAP,
    )
    .unwrap();
    assert_eq!(counted.position(), garbage.len() as u64);

    let err = decode(&image, ChunkCompression::None, Some(size + 1), NO_CAP).unwrap_err();
    assert!(
        matches!(err, ChunkedError::TruncatedBlob { read, expected } if read == size && expected == size + 1),
        "{err}"
    );
    let err = decode(&image, ChunkCompression::None, Some(size), size - 1).unwrap_err();
    assert!(matches!(err, ChunkedError::OutputTooLarge(_)), "{err}");
    let err = decode(&image, ChunkCompression::None, None, size - 1).unwrap_err();
    assert!(matches!(err, ChunkedError::OutputTooLarge(_)), "{err}");
    let (written, digest) = decode(&image, ChunkCompression::None, Some(100), NO_CAP).unwrap();
    assert_eq!((written, digest), (100, Digest::of(&image[..100])));

    for kind in [ChunkCompression::None, ChunkCompression::Zstd] {
        let err = decode_whole_layer(Failing, &mut Vec::new(), kind, None, NO_CAP).unwrap_err();
        assert!(matches!(err, ChunkedError::Input(_)), "{kind}: {err}");
        let err = decode_whole_layer(&blob[..], Failing, kind, None, NO_CAP).unwrap_err();
        assert!(matches!(err, ChunkedError::Output(_)), "{kind}: {err}");
    }
    let options = ChunkedLayerOptions::default();
    let err = write_chunked_layer(Failing, &mut Vec::new(), &options).unwrap_err();
    assert!(matches!(err, ChunkedError::Input(_)), "{err}");
    let err = write_chunked_layer(&image[..], Failing, &options).unwrap_err();
    assert!(matches!(err, ChunkedError::Output(_)), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Images of runs of repeated bytes and noise, so chunks compress anywhere from very well
    /// to not at all.
    fn image() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                (any::<u8>(), 1usize..5000).prop_map(|(byte, len)| vec![byte; len]),
                (any::<u64>(), 1usize..3000).prop_map(|(seed, len)| noise(len, seed | 1)),
            ],
            0..8,
        )
        .prop_map(|runs| runs.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            // Few cases in CI; PROPTEST_CASES=1000 for a longer run.
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
            ..ProptestConfig::default()
        })]

        #[test]
        fn write_parse_decode_gives_the_image_back(image in image(), chunk_size in 1u32..9000) {
            let (blob, layer) = write(&image, chunk_size);
            prop_assert_eq!(layer.chunk_count, image.len().div_ceil(chunk_size as usize));
            prop_assert_eq!(blob.len() as u64, layer.size);
            prop_assert_eq!(layer.index_range.start % 4, 0);
            let index = open(&blob, &layer.descriptor()).unwrap();
            prop_assert_eq!(decode_lazily(&blob, &index), image.clone());
            let mut eager = Vec::new();
            let (_, digest) = decode_whole_layer(
                &blob[..], &mut eager, ChunkCompression::Zstd, None, image.len() as u64,
            ).unwrap();
            prop_assert_eq!(&eager, &image);
            prop_assert_eq!(digest, layer.uncompressed_digest);
            for offset in [0, image.len() as u64 / 2, (image.len() as u64).saturating_sub(1)] {
                if let Some(chunk) = index.chunk_at(offset) {
                    prop_assert!(index.uncompressed_range(chunk).contains(&offset));
                }
            }
        }
    }
}
