//! Round trips: a tar with everything a real layer holds, converted, then read back by three
//! independent readers (erofs-rs, `fsck.erofs --extract` from erofs-utils, the host kernel).

mod erofs_common;

use std::io::Write;

use erofs_common::*;
use gantry_oci::ConvertOptions;
use gantry_oci::compression::Compression;

fn convert_rich(
    dir: &std::path::Path,
    long_names: LongNames,
    options: &ConvertOptions,
) -> (Vec<Spec>, std::path::PathBuf) {
    let specs = rich_tree();
    let tar = tar_of(&specs, long_names);
    let (summary, image) = convert(&tar, dir, "rich", options);
    assert_eq!(summary.compression, Compression::None);
    assert_eq!(summary.size % 4096, 0);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), summary.size);
    (specs, image)
}

fn assert_no_diff(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn erofs_rs_reads_back_what_the_tar_says() {
    let dir = tempfile::tempdir().unwrap();
    let (specs, image) = convert_rich(dir.path(), LongNames::Pax, &ConvertOptions::default());
    let (expected, expected_links) = expected_listing(&specs);
    let (actual, links) = read_with_erofs_rs(&image);
    assert_no_diff(diff_listings(&expected, &actual, Check::ALL));
    assert_eq!(links, expected_links);
}

#[test]
fn gnu_long_names_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (specs, image) = convert_rich(dir.path(), LongNames::Gnu, &ConvertOptions::default());
    let (expected, expected_links) = expected_listing(&specs);
    let (actual, links) = read_with_erofs_rs(&image);
    assert_no_diff(diff_listings(&expected, &actual, Check::ALL));
    assert_eq!(links, expected_links);
}

#[test]
fn fsck_erofs_checks_the_image_with_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, image) = convert_rich(dir.path(), LongNames::Pax, &ConvertOptions::default());
    let (ok, output) = fsck_check(&image);
    assert!(ok, "fsck.erofs: {output}");
}

#[test]
fn fsck_erofs_extracts_what_the_tar_says() {
    let dir = tempfile::tempdir().unwrap();
    // erofs-utils 1.5 extracts chunk-based files by skipping holes without seeking over them
    // (fsck/main.c, erofs_verify_inode_data), which shortens them: extract an image without
    // holes. The kernel and erofs-rs tests cover holes.
    let options = ConvertOptions {
        detect_holes: false,
        ..ConvertOptions::default()
    };
    let (specs, image) = convert_rich(dir.path(), LongNames::Pax, &options);
    let (ok, output) = fsck_check(&image);
    assert!(ok, "fsck.erofs: {output}");
    let (expected, _) = expected_listing(&specs);
    let (actual, _) = read_with_fsck(&image, dir.path());
    // erofs-utils 1.5 chowns after chmod, which clears setuid and setgid, it does not extract
    // xattrs, and it does not recreate hard links (each name becomes a file of its own).
    let check = Check {
        perm: 0o1777,
        owner: true,
        mtime: true,
        symlink_mtime: true,
        xattrs: false,
    };
    assert_no_diff(diff_listings(&expected, &actual, check));
}

#[test]
fn host_kernel_mounts_what_the_tar_says() {
    let dir = tempfile::tempdir().unwrap();
    let (specs, image) = convert_rich(dir.path(), LongNames::Pax, &ConvertOptions::default());
    let Some(mount) = Mount::erofs(&image, &dir.path().join("mnt")) else {
        return;
    };
    let (expected, expected_links) = expected_listing(&specs);
    let (actual, links) = read_directory_tree(&mount.dir, true);
    assert_no_diff(diff_listings(&expected, &actual, Check::ALL));
    assert_eq!(links, expected_links);
}

#[test]
fn same_tar_gives_same_bytes_whatever_the_compression() {
    let dir = tempfile::tempdir().unwrap();
    let tar = tar_of(&rich_tree(), LongNames::Pax);
    let options = ConvertOptions::default();
    let (plain, plain_image) = convert(&tar, dir.path(), "plain", &options);
    let (again, again_image) = convert(&tar, dir.path(), "again", &options);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let (gzip, gzip_image) = convert(&gz.finish().unwrap(), dir.path(), "gzip", &options);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let (zstd, zstd_image) = convert(&zst, dir.path(), "zstd", &options);

    assert_eq!(gzip.compression, Compression::Gzip);
    assert_eq!(zstd.compression, Compression::Zstd);
    for summary in [&again, &gzip, &zstd] {
        assert_eq!(summary.digest, plain.digest);
        assert_eq!(summary.size, plain.size);
        assert_eq!(summary.uncompressed_size, tar.len() as u64);
    }
    let bytes = std::fs::read(&plain_image).unwrap();
    for image in [&again_image, &gzip_image, &zstd_image] {
        assert!(std::fs::read(image).unwrap() == bytes);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex, plain.digest,
        "the summary's digest is the image's SHA-256"
    );
}
