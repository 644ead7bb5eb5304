//! Round trips: a tar with everything a real layer holds, converted, then read back by three
//! independent readers (erofs-rs, `fsck.erofs --extract` from erofs-utils, the host kernel).

mod erofs_common;

use std::io::Write;

use erofs_common::*;
use gantry_agent::image::ConvertOptions;
use gantry_agent::image::compression::Compression;

/// Bytes that look like file content: not compressible into zeros, different per seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// A `security.capability` value (cap_dac_override + cap_fowner = 0x0a = '\n' in the mask).
fn capability_with_newline() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // VFS_CAP_REVISION_2, effective
    v.extend_from_slice(&0x0000_000au32.to_le_bytes()); // permitted (low)
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable (low)
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted (high)
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable (high)
    v
}

/// A tree with every kind of entry and attribute a layer can carry.
fn rich_tree() -> Vec<Spec> {
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "n".repeat(200));
    let mut holes = pattern(4096, 1);
    holes.extend_from_slice(&[0u8; 3 * 4096]);
    holes.extend_from_slice(&pattern(4096 * 2, 2));
    holes.extend_from_slice(&[0u8; 4096]);
    holes.extend_from_slice(&pattern(100, 3));
    let mut specs = vec![
        Spec::dir("./").mode(0o755).mtime(1_600_000_000),
        Spec::dir("./etc").mtime(1_600_000_001),
        Spec::file("./etc/hostname", "gantry\n").mtime(1_600_000_002),
        Spec::file("./etc/empty", ""),
        Spec::file("./etc/shadow", "root:*:19000::::::\n")
            .mode(0o640)
            .owner(0, 42),
        Spec::dir("./tmp").mode(0o1777),
        Spec::dir("./srv").mode(0o2775).owner(1000, 1000),
        Spec::dir("./usr"),
        Spec::dir("./usr/bin"),
        Spec::file("./usr/bin/sudo", pattern(10_000, 4))
            .mode(0o4755)
            .xattr("security.capability", capability_with_newline()),
        Spec::file("./usr/bin/ping", pattern(4096, 5))
            .mode(0o755)
            .xattr("security.capability", capability_with_newline()),
        Spec::file("./usr/bin/wall", pattern(4095, 6))
            .mode(0o2755)
            .owner(0, 5),
        Spec::file("./usr/bin/big", pattern(1 << 20 | 3, 7)),
        Spec::file("./usr/bin/exact", pattern(8192, 8)),
        Spec::file("./usr/bin/one", "x"),
        Spec::file("./usr/bin/4097", pattern(4097, 9)),
        Spec::hardlink("./usr/bin/sudoedit", "./usr/bin/sudo"),
        Spec::hardlink("./usr/bin/sudo2", "usr/bin/sudo"),
        Spec::symlink("./usr/bin/vi", "vim.basic"),
        Spec::symlink("./usr/bin/abs", "/usr/bin/vim.basic"),
        Spec::symlink("./usr/bin/longlink", "t/".repeat(1500)),
        Spec::dir("./dev"),
        Spec::new("./dev/null", SpecKind::Char(1, 3)).mode(0o666),
        Spec::new("./dev/sda", SpecKind::Block(8, 0))
            .mode(0o660)
            .owner(0, 6),
        Spec::new("./dev/big", SpecKind::Char(4095, 1_048_575)),
        Spec::new("./dev/fifo", SpecKind::Fifo).mode(0o600),
        Spec::dir("./home")
            .owner(70_000, 80_000)
            .mtime(1_500_000_000),
        Spec::file("./home/big-ids", "ids").owner(4_000_000_000, 70_000),
        Spec::file("./home/old", "before 1970").mtime(-86_400),
        Spec::file("./home/xattrs", "x")
            .xattr("user.empty", "")
            .xattr("user.mime_type", "text/plain")
            .xattr("trusted.md5", "0123")
            .xattr("security.selinux", "system_u:object_r:etc_t:s0\0")
            .xattr("user.big", vec![b'v'; 3000]),
        Spec::file("./home/big-xattr-tail", pattern(5000, 10)).xattr("user.big", vec![b'w'; 4000]),
        Spec::file("./home/shared1", "s1").xattr("user.shared", "same value"),
        Spec::file("./home/shared2", "s2").xattr("user.shared", "same value"),
        Spec::dir("./home/shared-dir").xattr("user.shared", "same value"),
        Spec::file("./home/holes", holes),
        Spec::file("./home/zeros", vec![0u8; 3 * 4096 + 10]),
        Spec::file(b"./home/latin1-\xe9t\xe9".as_slice(), "not utf-8"),
        Spec::dir(b"./home/\xff\xfe-dir".as_slice()),
        Spec::symlink(b"./home/\xff\xfe-dir/link".as_slice(), b"\xe9".as_slice()),
        Spec::dir(format!("./{long_dir}")),
        Spec::file(format!("./{long_name}"), "long name"),
        Spec::hardlink(format!("./{long_dir}/hl"), format!("./{long_name}")),
        Spec::file("./a/b/c/d/e/f/g/deep", "implicit parents"),
    ];
    specs.push(Spec::dir("./many"));
    for i in 0..600 {
        specs.push(Spec::file(
            format!("./many/file-{i:04}-{}", "p".repeat(i % 40)),
            format!("{i}"),
        ));
    }
    specs
}

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

#[test]
fn the_cli_entry_point_converts_a_file() {
    use gantry_agent::image::cli::{ConvertLayerArgs, run_convert_layer};
    let dir = tempfile::tempdir().unwrap();
    let tar = tar_of(&rich_tree(), LongNames::Pax);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    let input = dir.path().join("layer.tar.zst");
    std::fs::write(&input, zst).unwrap();
    let output = dir.path().join("layer.erofs");
    let args = ConvertLayerArgs {
        input: input.display().to_string(),
        output: output.clone(),
        max_uncompressed_size: 1 << 30,
        max_entries: 10_000,
        no_holes: false,
        sync: true,
        json: true,
    };
    run_convert_layer(&args).unwrap();
    let (library, _) = convert(&tar, dir.path(), "library", &ConvertOptions::default());
    use sha2::Digest;
    let digest = sha2::Sha256::digest(std::fs::read(&output).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, library.digest);

    let missing = ConvertLayerArgs {
        input: dir.path().join("missing").display().to_string(),
        ..args
    };
    let err = run_convert_layer(&missing).unwrap_err();
    assert!(format!("{err:#}").contains("missing"), "{err:#}");
}
