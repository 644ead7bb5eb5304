//! The synthesized layer (issue 17): a gzip layer laid out as EROFS from its zTOC, its data
//! blocks filled chunk by chunk from the gzip spans, must show exactly the files the eager
//! conversion of the same blob shows; and bytes that are not the layer's never get in.

mod erofs_common;

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use erofs_common::roots::{busybox_root, debootstrap_tarball, pack_pax, run};
use erofs_common::*;
use gantry_oci::ConvertOptions;
use gantry_oci::ztoc::synth::{self, LayerMap, SynthError, SynthesizedLayer};
use gantry_oci::ztoc::toc;
use gantry_oci::ztoc::zinfo::ZinfoError;

/// A small span, so that even a test layer has many spans and files cross them.
const SPAN: u64 = 64 << 10;

/// Bytes that compress a little (text-like runs of noise): deflate blocks of a few KiB, so
/// checkpoints land close to every span's end. (`pattern` compresses so well that one deflate
/// block holds megabytes.)
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b'a' + (state % 16) as u8
        })
        .collect()
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(tar).unwrap();
    encoder.finish().unwrap()
}

/// Synthesizes the layer of gzip blob `blob` into `dir/name.erofs`, data blocks still holes.
fn synthesize(blob: &[u8], dir: &Path, name: &str, options: &ConvertOptions) -> SynthesizedLayer {
    let ztoc = toc::build(blob, SPAN).expect("zTOC");
    let image = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(format!("{name}.erofs")))
        .unwrap();
    synth::synthesize(ztoc, image, tempfile::tempfile().unwrap(), options).expect("synthesis")
}

/// The map's chunks tile the image in order, metadata first and last, blob ranges never going
/// back; returns the data chunks.
fn check_map(map: &LayerMap) -> Vec<usize> {
    assert!(map.is_metadata(0), "block 0 is the superblock's");
    let mut at = 0;
    let mut blob_end = 0;
    let mut data = Vec::new();
    for chunk in 0..map.len() {
        let range = map.image_range(chunk);
        assert_eq!(
            range.start, at,
            "chunk {chunk} starts where the one before ended"
        );
        assert!(range.end > range.start, "chunk {chunk} is empty");
        assert_eq!(map.chunk_at(range.start), Some(chunk));
        assert_eq!(map.chunk_at(range.end - 1), Some(chunk));
        let blob = map.blob_range(chunk);
        assert!(blob.start <= blob.end && blob.end <= map.compressed_size());
        assert!(blob.end >= blob_end, "chunk {chunk}'s blob range goes back");
        blob_end = blob.end;
        if map.is_metadata(chunk) {
            assert!(
                blob.is_empty(),
                "metadata chunk {chunk} has nothing to fetch"
            );
        } else {
            assert!(!blob.is_empty(), "data chunk {chunk} has bytes to fetch");
            data.push(chunk);
        }
        at = range.end;
    }
    assert_eq!(at, map.image_size());
    assert_eq!(map.chunk_at(map.image_size()), None);
    data
}

/// Fills every data chunk of `layer` from `blob`.
fn fill(layer: &SynthesizedLayer, blob: &[u8]) {
    for chunk in check_map(&layer.map) {
        let range = layer.map.blob_range(chunk);
        let image = layer.map.image_range(chunk);
        let mut out = vec![0xAA; (image.end - image.start) as usize];
        layer
            .map
            .decode_chunk_into(
                chunk,
                &blob[range.start as usize..range.end as usize],
                &mut out,
            )
            .unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
        layer.file.write_all_at(&out, image.start).unwrap();
    }
}

/// Converts `blob` eagerly and synthesizes and fills it lazily; the two images must show the
/// same files, attributes and hard links, and the filled one must pass `fsck.erofs`.
fn check_same_as_eager(blob: &[u8], dir: &Path, name: &str, options: &ConvertOptions) -> PathBuf {
    let (_, eager) = convert(blob, dir, &format!("{name}-eager"), options);
    let layer = synthesize(blob, dir, name, options);
    fill(&layer, blob);
    let image = dir.join(format!("{name}.erofs"));
    let (expected, expected_links) = read_with_erofs_rs(&eager);
    let (actual, links) = read_with_erofs_rs(&image);
    let problems = diff_listings(&expected, &actual, Check::ALL);
    assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
    assert_eq!(links, expected_links, "{name}: hard links");
    let (ok, log) = fsck_check(&image);
    assert!(ok, "{name}: fsck.erofs: {log}");
    image
}

/// Every kind of member, files much larger than a span, files smaller than a block, names
/// longer than ustar holds, xattrs, whiteouts and an opaque directory, a replaced file.
fn mixed_specs() -> Vec<Spec> {
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let mut zeros_then_data = vec![0u8; 300 << 10];
    zeros_then_data.extend_from_slice(&noise(5000, 9));
    vec![
        Spec::dir("etc"),
        Spec::file("etc/hostname", "gantry\n").xattr("user.origin", "test"),
        Spec::file("big", noise(1 << 20, 1)),
        Spec::file("odd", noise(3 * SPAN as usize + 123, 2)).mode(0o4755),
        Spec::hardlink("big-link", "big"),
        Spec::file("empty", ""),
        Spec::file("zeros", &zeros_then_data),
        Spec::dir(&long_dir),
        Spec::file(&long_name, noise(70_000, 3)).owner(1000, 100),
        Spec::symlink("etc/link", "../big"),
        Spec::new("dev-null", SpecKind::Char(1, 3)),
        Spec::new("fifo", SpecKind::Fifo),
        Spec::file("lib/.wh.gone", ""),
        Spec::dir("opaque"),
        Spec::file("opaque/.wh..wh..opq", ""),
        Spec::file("opaque/kept", noise(10_000, 4)),
        Spec::file("replaced", noise(200_000, 5)),
        Spec::file("replaced", noise(9_000, 6)),
        Spec::file("tail", noise(17, 7)).xattr("security.capability", [1, 0, 0, 2, 10, 32, 0, 0]),
    ]
}

#[test]
fn a_mixed_layer_shows_the_eager_conversions_files() {
    let dir = tempfile::tempdir().unwrap();
    let blob = gzip(&tar_of(&mixed_specs(), LongNames::Pax));
    check_same_as_eager(&blob, dir.path(), "pax", &ConvertOptions::default());
    let blob = gzip(&tar_of(&mixed_specs(), LongNames::Gnu));
    let lowest = ConvertOptions {
        lowest_layer: true,
        ..ConvertOptions::default()
    };
    check_same_as_eager(&blob, dir.path(), "gnu-lowest", &lowest);
}

#[test]
fn metadata_is_complete_before_any_data_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let specs = mixed_specs();
    let blob = gzip(&tar_of(&specs, LongNames::Pax));
    let layer = synthesize(&blob, dir.path(), "holes", &ConvertOptions::default());
    let data = check_map(&layer.map);
    assert!(data.len() > 10, "{} data chunks", data.len());
    // The tree reads without a byte of file data: names, kinds, sizes, attributes.
    let (eager, _) =
        read_with_erofs_rs(&convert(&blob, dir.path(), "eager", &Default::default()).1);
    let (holes, _) = read_with_erofs_rs(&dir.path().join("holes.erofs"));
    assert_eq!(
        holes.keys().collect::<Vec<_>>(),
        eager.keys().collect::<Vec<_>>()
    );
    for (path, attrs) in &eager {
        let seen = &holes[path];
        match (&attrs.kind, &seen.kind) {
            (
                Kind::File { size, .. },
                Kind::File {
                    size: seen_size, ..
                },
            ) => {
                assert_eq!(size, seen_size, "{}", path.escape_ascii())
            }
            (kind, seen_kind) => assert_eq!(kind, seen_kind, "{}", path.escape_ascii()),
        }
        assert_eq!(
            (attrs.perm, attrs.uid, attrs.gid, &attrs.xattrs),
            (seen.perm, seen.uid, seen.gid, &seen.xattrs)
        );
    }
    // The data blocks are holes: the image takes less disk than the files hold.
    let allocated = fs::metadata(dir.path().join("holes.erofs")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        allocated.blocks() * 512 < (1 << 20),
        "{} bytes allocated",
        allocated.blocks() * 512
    );
}

#[test]
fn a_chunk_from_wrong_bytes_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let blob = gzip(&tar_of(&mixed_specs(), LongNames::Pax));
    let layer = synthesize(&blob, dir.path(), "bad", &ConvertOptions::default());
    let chunk = check_map(&layer.map)[2];
    let range = layer.map.blob_range(chunk);
    let image = layer.map.image_range(chunk);
    let mut bytes = blob[range.start as usize..range.end as usize].to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let mut out = vec![0x55; (image.end - image.start) as usize];
    match layer.map.decode_chunk_into(chunk, &bytes, &mut out) {
        Err(SynthError::Gzip {
            source: ZinfoError::SpanDigest { .. },
            ..
        }) => {}
        other => panic!("a flipped bit was not refused: {other:?}"),
    }
    assert!(
        out.iter().all(|&b| b == 0x55),
        "a refused chunk wrote output"
    );
    // Too few bytes, and a metadata chunk, are refused too.
    assert!(
        layer
            .map
            .decode_chunk_into(chunk, &bytes[..bytes.len() - 1], &mut out)
            .is_err()
    );
    assert!(matches!(
        layer.map.decode_chunk_into(0, &[], &mut out),
        Err(SynthError::Chunk { .. })
    ));
}

#[test]
fn an_index_placing_data_outside_the_tar_or_out_of_order_is_refused() {
    let blob = gzip(&tar_of(&mixed_specs(), LongNames::Pax));
    let ztoc = toc::build(&blob[..], SPAN).unwrap();
    let position = |name: &[u8]| {
        ztoc.entries
            .iter()
            .position(|member| member.entry.path == name)
            .unwrap()
    };
    let mut past_end = ztoc.clone();
    let big = position(b"big");
    past_end.entries[big].offset = ztoc.gzip.uncompressed_size - 10;
    let mut backwards = ztoc.clone();
    let odd = position(b"odd");
    backwards.entries[odd].offset = ztoc.entries[big].offset;
    let mut huge_span = ztoc.clone();
    huge_span.gzip.checkpoints.truncate(1);
    huge_span.gzip.span_digests.truncate(1);
    huge_span.gzip.uncompressed_size = synth::MAX_SPAN_BYTES + 1;
    for (name, ztoc) in [
        ("past the end", past_end),
        ("overlapping", backwards),
        ("a huge span", huge_span),
    ] {
        let result = synth::synthesize(
            ztoc,
            tempfile::tempfile().unwrap(),
            tempfile::tempfile().unwrap(),
            &ConvertOptions::default(),
        );
        assert!(result.is_err(), "{name}: accepted");
    }
}

#[test]
fn a_sparse_member_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let file = fs::File::create(root.join("sparse")).unwrap();
    file.write_all_at(b"data", 1 << 20).unwrap();
    let tar = work.path().join("sparse.tar");
    run(Command::new("tar")
        .args(["--format=gnu", "--sparse", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&root)
        .arg("."));
    let blob = gzip(&fs::read(&tar).unwrap());
    let ztoc = toc::build(&blob[..], SPAN).unwrap();
    let result = synth::synthesize(
        ztoc,
        tempfile::tempfile().unwrap(),
        tempfile::tempfile().unwrap(),
        &ConvertOptions::default(),
    );
    assert!(
        matches!(result, Err(SynthError::SparseMember(ref name)) if name.contains("sparse")),
        "{result:?}"
    );
}

#[test]
fn a_busybox_root_shows_the_eager_conversions_files() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    busybox_root(&root);
    // The sparse file is made dense: a synthesized layer maps plain members only.
    let tar = work.path().join("root.tar");
    pack_pax(&root, &tar);
    let blob = gzip(&fs::read(&tar).unwrap());
    check_same_as_eager(&blob, work.path(), "busybox", &ConvertOptions::default());
}

#[test]
#[ignore = "needs debootstrap and network on first run (cached afterwards); run with --ignored"]
fn a_debian_minbase_root_shows_the_eager_conversions_files() {
    let work = tempfile::tempdir().unwrap();
    let blob = gzip(&fs::read(debootstrap_tarball()).unwrap());
    check_same_as_eager(&blob, work.path(), "minbase", &ConvertOptions::default());
}

#[test]
fn a_map_reads_back_as_written_and_a_damaged_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let blob = gzip(&tar_of(&mixed_specs(), LongNames::Pax));
    let layer = synthesize(&blob, dir.path(), "map", &ConvertOptions::default());
    let encoded = layer.map.encode();
    assert_eq!(LayerMap::decode(&encoded).unwrap(), layer.map);
    // Every cut is refused, as is anything after the end.
    for len in (0..encoded.len()).step_by(97) {
        assert!(LayerMap::decode(&encoded[..len]).is_err(), "cut at {len}");
    }
    let mut longer = encoded.clone();
    longer.push(0);
    assert!(LayerMap::decode(&longer).is_err());
    // A flipped byte anywhere never panics; where it lands in an offset, size or count the map
    // is refused or still describes a layout the checks accept.
    for at in (0..encoded.len()).step_by(13) {
        let mut damaged = encoded.clone();
        damaged[at] ^= 0x80;
        if let Ok(map) = LayerMap::decode(&damaged) {
            check_map(&map);
        }
    }
    // The segments must tile the data from block 1: the first one moved is refused.
    let first_segment = encoded.len() - 20 * segment_count(&layer.map);
    let mut moved = encoded.clone();
    moved[first_segment] = 2;
    assert!(
        LayerMap::decode(&moved).is_err(),
        "a segment off block 1 was accepted"
    );
}

/// Segments in `map` (each is 20 bytes at the end of the encoding).
fn segment_count(map: &LayerMap) -> usize {
    let encoded = map.encode();
    // The count is the 8 bytes before the segments: find the offset where it matches.
    (1..encoded.len() / 20)
        .find(|&count| {
            let at = encoded.len() - 20 * count - 8;
            u64::from_le_bytes(encoded[at..at + 8].try_into().unwrap()) == count as u64
        })
        .expect("a segment count")
}
