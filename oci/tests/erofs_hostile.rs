//! Hostile and broken input: every case ends in a clear error (naming the entry where there is
//! one), never a panic, and leaves nothing behind in the output directory.

mod erofs_common;

use std::io::Write;
use std::path::Path;

use erofs_common::*;
use gantry_oci::convert::EntryError;
use gantry_oci::tar_stream::TarError;
use gantry_oci::{ConvertError, ConvertOptions, convert_layer};

/// Converts `input` and returns the error; checks that the output directory stays empty.
fn convert_err(input: &[u8], options: &ConvertOptions) -> ConvertError {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("layer.erofs");
    let result = convert_layer(input, &output, options);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let err = match result {
        Ok(summary) => panic!("conversion succeeded: {summary:?}"),
        Err(e) => e,
    };
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    err
}

fn default_err(input: &[u8]) -> ConvertError {
    convert_err(input, &ConvertOptions::default())
}

fn tar_with_raw(entries: &[([u8; 512], Vec<u8>)]) -> Vec<u8> {
    let mut writer = TarWriter::new(LongNames::Pax);
    for (header, data) in entries {
        writer.raw(header, data);
    }
    writer.finish()
}

fn file_header(path: &[u8], size: u64) -> [u8; 512] {
    ustar_header(path, b'0', 0o644, 0, 0, size, 0, b"", (0, 0))
}

fn assert_entry_error(
    err: &ConvertError,
    index: u64,
    path: &str,
    check: impl Fn(&EntryError) -> bool,
) {
    match err {
        ConvertError::Entry {
            index: i,
            path: p,
            reason,
        } if *i == index && p == path && check(reason) => {
            let message = err.to_string();
            assert!(message.contains(path), "message names the entry: {message}");
        }
        other => panic!("unexpected error: {other:?} ({other})"),
    }
}

#[test]
fn dot_dot_components_are_refused() {
    let tar = tar_with_raw(&[
        (file_header(b"ok", 2), b"ok".to_vec()),
        (file_header(b"a/../../etc/passwd", 4), b"evil".to_vec()),
    ]);
    let err = default_err(&tar);
    assert_entry_error(&err, 2, "a/../../etc/passwd", |r| {
        matches!(r, EntryError::DotDot)
    });
}

#[test]
fn absolute_paths_are_refused() {
    let tar = tar_with_raw(&[(file_header(b"/etc/passwd", 4), b"evil".to_vec())]);
    let err = default_err(&tar);
    assert_entry_error(&err, 1, "/etc/passwd", |r| {
        matches!(r, EntryError::AbsolutePath)
    });
}

#[test]
fn absolute_paths_in_pax_records_are_refused() {
    let mut writer = TarWriter::new(LongNames::Pax);
    writer.pax(&[(b"path".to_vec(), b"/root/.ssh/authorized_keys".to_vec())]);
    writer.raw(&file_header(b"harmless", 3), b"key");
    let err = default_err(&writer.finish());
    assert_entry_error(&err, 1, "/root/.ssh/authorized_keys", |r| {
        matches!(r, EntryError::AbsolutePath)
    });
}

#[test]
fn hard_links_to_missing_targets_are_refused() {
    let link = ustar_header(b"link", b'1', 0o644, 0, 0, 0, 0, b"missing", (0, 0));
    let err = default_err(&tar_with_raw(&[(link, Vec::new())]));
    assert_entry_error(
        &err,
        1,
        "link",
        |r| matches!(r, EntryError::HardlinkTargetMissing(t) if t == "missing"),
    );
}

#[test]
fn hard_links_escaping_the_layer_are_refused() {
    let link = ustar_header(
        b"link",
        b'1',
        0o644,
        0,
        0,
        0,
        0,
        b"../../etc/shadow",
        (0, 0),
    );
    let err = default_err(&tar_with_raw(&[(link, Vec::new())]));
    assert_entry_error(
        &err,
        1,
        "link",
        |r| matches!(r, EntryError::HardlinkTarget { reason, .. } if matches!(**reason, EntryError::DotDot)),
    );
    let link = ustar_header(b"link", b'1', 0o644, 0, 0, 0, 0, b"/etc/shadow", (0, 0));
    let err = default_err(&tar_with_raw(&[(link, Vec::new())]));
    assert_entry_error(
        &err,
        1,
        "link",
        |r| matches!(r, EntryError::HardlinkTarget { reason, .. } if matches!(**reason, EntryError::AbsolutePath)),
    );
}

#[test]
fn hard_links_to_directories_are_refused() {
    let dir = ustar_header(b"d/", b'5', 0o755, 0, 0, 0, 0, b"", (0, 0));
    let link = ustar_header(b"link", b'1', 0o644, 0, 0, 0, 0, b"d", (0, 0));
    let err = default_err(&tar_with_raw(&[(dir, Vec::new()), (link, Vec::new())]));
    assert_entry_error(&err, 2, "link", |r| {
        matches!(r, EntryError::HardlinkTargetNotFile(_))
    });
}

#[test]
fn files_under_a_non_directory_are_refused() {
    let tar = tar_with_raw(&[
        (file_header(b"a", 1), b"a".to_vec()),
        (file_header(b"a/b", 1), b"b".to_vec()),
    ]);
    let err = default_err(&tar);
    assert_entry_error(
        &err,
        2,
        "a/b",
        |r| matches!(r, EntryError::ParentNotDirectory(p) if p == "a"),
    );
}

#[test]
fn symlinks_through_which_files_would_be_written_are_refused() {
    let link = ustar_header(b"etc", b'2', 0o777, 0, 0, 0, 0, b"/etc", (0, 0));
    let tar = tar_with_raw(&[
        (link, Vec::new()),
        (file_header(b"etc/passwd", 1), b"x".to_vec()),
    ]);
    let err = default_err(&tar);
    assert_entry_error(&err, 2, "etc/passwd", |r| {
        matches!(r, EntryError::ParentNotDirectory(_))
    });
}

#[test]
fn over_long_names_and_link_targets_are_refused() {
    let mut writer = TarWriter::new(LongNames::Pax);
    writer.add(&Spec::file("x".repeat(256), "x"));
    let err = default_err(&writer.finish());
    assert!(
        matches!(
            err,
            ConvertError::Entry {
                reason: EntryError::NameTooLong,
                ..
            }
        ),
        "{err:?}"
    );

    let mut writer = TarWriter::new(LongNames::Pax);
    writer.add(&Spec::symlink("s", "t".repeat(4096)));
    let err = default_err(&writer.finish());
    assert!(
        matches!(
            err,
            ConvertError::Entry {
                reason: EntryError::SymlinkTooLong,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn impossible_sizes_are_refused_before_reading() {
    let options = ConvertOptions {
        max_uncompressed_size: 1 << 20,
        ..ConvertOptions::default()
    };
    // 8 GiB declared in base-256, with no data behind it.
    let tar = tar_with_raw(&[(file_header(b"huge", 8 << 30), Vec::new())]);
    let err = convert_err(&tar, &options);
    assert_entry_error(&err, 1, "huge", |r| {
        matches!(r, EntryError::ImpossibleSize { .. })
    });
}

#[test]
fn file_data_cut_short_is_an_error_naming_the_file() {
    let mut tar = tar_with_raw(&[(file_header(b"short", 100_000), vec![7u8; 100_000])]);
    tar.truncate(512 + 50_000);
    let err = default_err(&tar);
    assert!(
        matches!(&err, ConvertError::Entry { path, .. } if path == "short"),
        "{err:?}"
    );
}

#[test]
fn a_missing_end_of_archive_marker_is_an_error() {
    let mut tar = tar_with_raw(&[(file_header(b"f", 3), b"abc".to_vec())]);
    tar.truncate(1024);
    let err = default_err(&tar);
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::MissingEndMarker,
                index: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let err = default_err(b"");
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::MissingEndMarker,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn header_checksum_mismatch_is_an_error() {
    let mut header = file_header(b"f", 3);
    header[0] = b'g';
    let err = default_err(&tar_with_raw(&[(header, b"abc".to_vec())]));
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::Checksum,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("first tar header") || err.to_string().contains("entry #0"));
}

#[test]
fn random_bytes_are_an_error() {
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = default_err(&noise);
    assert!(matches!(err, ConvertError::Tar { .. }), "{err:?}");
}

#[test]
fn unsupported_compression_is_named() {
    let err = default_err(b"\xfd7zXZ\0\0\0 rest of an xz stream");
    assert!(err.to_string().contains("xz"), "{err}");
    let err = default_err(b"BZh91AY&SY");
    assert!(err.to_string().contains("bzip2"), "{err}");
}

fn sample_tar() -> Vec<u8> {
    let mut specs = vec![Spec::dir("d")];
    for i in 0..50 {
        specs.push(Spec::file(
            format!("d/f{i}"),
            vec![i as u8; 10_000 + i * 100],
        ));
    }
    tar_of(&specs, LongNames::Pax)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[test]
fn truncated_compressed_streams_are_errors() {
    let tar = sample_tar();
    for compressed in [gzip(&tar), zstd::encode_all(&tar[..], 3).unwrap()] {
        for cut in [10, compressed.len() / 2, compressed.len() - 4] {
            let err = default_err(&compressed[..cut]);
            let message = err.to_string();
            assert!(
                matches!(
                    err,
                    ConvertError::Tar { .. }
                        | ConvertError::Entry { .. }
                        | ConvertError::Trailer(_)
                ),
                "cut at {cut}: {err:?}"
            );
            assert!(!message.is_empty());
        }
    }
}

#[test]
fn corrupt_compressed_streams_are_errors() {
    let tar = sample_tar();
    for mut compressed in [gzip(&tar), zstd::encode_all(&tar[..], 3).unwrap()] {
        let middle = compressed.len() / 2;
        for byte in &mut compressed[middle..middle + 16] {
            *byte ^= 0x5a;
        }
        let err = default_err(&compressed);
        assert!(
            matches!(
                err,
                ConvertError::Tar { .. } | ConvertError::Entry { .. } | ConvertError::Trailer(_)
            ),
            "{err:?}"
        );
    }
}

#[test]
fn decompression_bombs_hit_the_cap() {
    // 64 MiB of zeros in 1 MiB files compresses to a few KiB; each file is below the cap,
    // so only the running total can catch it.
    let mut writer = TarWriter::new(LongNames::Pax);
    for i in 0..64 {
        writer.add(&Spec::file(format!("bomb{i}"), vec![0u8; 1 << 20]));
    }
    let tar = writer.finish();
    let options = ConvertOptions {
        max_uncompressed_size: 8 << 20,
        ..ConvertOptions::default()
    };
    for compressed in [gzip(&tar), zstd::encode_all(&tar[..], 19).unwrap()] {
        assert!(compressed.len() < 1 << 20);
        let err = convert_err(&compressed, &options);
        assert!(matches!(err, ConvertError::SizeCap { .. }), "{err:?}");
        assert!(err.to_string().contains("bomb7"), "names the entry: {err}");
    }
    // A single entry larger than the cap is refused from its header alone.
    let mut writer = TarWriter::new(LongNames::Pax);
    writer.add(&Spec::file("big", vec![0u8; 9 << 20]));
    let err = convert_err(&gzip(&writer.finish()), &options);
    assert!(
        matches!(
            err,
            ConvertError::Entry {
                reason: EntryError::ImpossibleSize { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversized_pax_headers_are_refused_without_reading_them_into_memory() {
    let options = ConvertOptions {
        max_entry_metadata: 64 << 10,
        ..ConvertOptions::default()
    };
    let mut writer = TarWriter::new(LongNames::Pax);
    writer.add(&Spec::file("f", "x").xattr("user.big", vec![b'v'; 60_000]));
    writer.add(
        &Spec::file("g", "x")
            .xattr("user.a", vec![b'v'; 40_000])
            .xattr("user.b", vec![b'v'; 40_000]),
    );
    let err = convert_err(&writer.finish(), &options);
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                index: 1,
                source: TarError::MetadataTooLarge(_),
                ..
            }
        ),
        "{err:?}"
    );
    // A GNU long name of 10 MiB.
    let mut writer = TarWriter::new(LongNames::Gnu);
    writer.gnu_long(b'L', &vec![b'n'; 10 << 20]);
    writer.raw(&file_header(b"f", 1), b"x");
    let err = default_err(&writer.finish());
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::MetadataTooLarge(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn malformed_pax_records_are_refused() {
    let header = ustar_header(b"pax", b'x', 0o644, 0, 0, 10, 0, b"", (0, 0));
    let tar = tar_with_raw(&[
        (header, b"99 path=x\n".to_vec()),
        (file_header(b"f", 1), b"x".to_vec()),
    ]);
    let err = default_err(&tar);
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::Pax(_),
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn extension_headers_without_an_entry_are_refused() {
    let mut writer = TarWriter::new(LongNames::Pax);
    writer.pax(&[(b"path".to_vec(), b"x".to_vec())]);
    let err = default_err(&writer.finish());
    assert!(
        matches!(
            err,
            ConvertError::Tar {
                source: TarError::DanglingExtension,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn too_many_entries_are_refused() {
    let specs: Vec<Spec> = (0..20).map(|i| Spec::file(format!("f{i}"), "")).collect();
    let options = ConvertOptions {
        max_entries: 10,
        ..ConvertOptions::default()
    };
    let err = convert_err(&tar_of(&specs, LongNames::Pax), &options);
    assert!(matches!(err, ConvertError::TooManyEntries(10)), "{err:?}");
}

#[test]
fn out_of_range_ids_and_device_numbers_are_refused() {
    let header = ustar_header(b"f", b'0', 0o644, 1 << 33, 0, 0, 0, b"", (0, 0));
    let err = default_err(&tar_with_raw(&[(header, Vec::new())]));
    assert_entry_error(&err, 1, "f", |r| {
        matches!(r, EntryError::OutOfRange { field: "uid", .. })
    });
    let header = ustar_header(b"dev", b'3', 0o644, 0, 0, 0, 0, b"", (4096, 0));
    let err = default_err(&tar_with_raw(&[(header, Vec::new())]));
    assert_entry_error(&err, 1, "dev", |r| {
        matches!(r, EntryError::OutOfRange { .. })
    });
}

#[test]
fn bad_whiteouts_are_refused() {
    for name in [&b".wh."[..], b"d/.wh..", b"d/.wh..."] {
        let err = default_err(&tar_with_raw(&[(file_header(name, 0), Vec::new())]));
        assert!(
            matches!(
                err,
                ConvertError::Entry {
                    reason: EntryError::InvalidWhiteout,
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let err = default_err(&tar_with_raw(&[(file_header(b".wh.d/f", 0), Vec::new())]));
    assert!(
        matches!(
            err,
            ConvertError::Entry {
                reason: EntryError::InvalidWhiteout,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn the_output_directory_must_exist_and_nothing_is_written_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("missing/layer.erofs");
    let err = convert_layer(&sample_tar()[..], &output, &ConvertOptions::default()).unwrap_err();
    assert!(matches!(err, ConvertError::Output { .. }), "{err:?}");
    assert!(!Path::new(&output).exists());
}

/// Mutated archives (bit flips, truncation, duplicated ranges) either convert into an image
/// fsck.erofs accepts or fail with an error; they never panic.
#[test]
fn mutated_archives_never_panic() {
    let mut specs = vec![
        Spec::dir("d"),
        Spec::symlink("d/l", "x"),
        Spec::hardlink("d/h", "f"),
    ];
    specs.insert(0, Spec::file("f", vec![1u8; 5000]).xattr("user.a", "b"));
    let tar = tar_of(&specs, LongNames::Pax);
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x1234_5678u32;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut converted = 0;
    for round in 0..300 {
        let mut input = tar.clone();
        match round % 3 {
            0 => {
                for _ in 0..(1 + next() % 8) {
                    let at = next() as usize % input.len();
                    input[at] ^= 1 << (next() % 8);
                }
            }
            1 => input.truncate(next() as usize % input.len()),
            _ => {
                let at = next() as usize % input.len();
                let len = (next() as usize % 1024).min(input.len() - at);
                let chunk = input[at..at + len].to_vec();
                let to = next() as usize % input.len();
                input.splice(to..to, chunk);
            }
        }
        let output = dir.path().join(format!("m{round}.erofs"));
        if convert_layer(&input[..], &output, &ConvertOptions::default()).is_ok() {
            converted += 1;
            let (ok, log) = fsck_check(&output);
            assert!(ok, "round {round}: fsck.erofs rejects the image: {log}");
            let _ = read_with_erofs_rs(&output);
        }
    }
    eprintln!("{converted} of 300 mutated archives still converted");
}
