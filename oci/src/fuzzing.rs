//! The properties the `gantry-oci` fuzz targets check (`oci/fuzz/`), shared with the corpus
//! regression test (`oci/tests/fuzz_corpus.rs`), so a crash the fuzzer finds replays in the
//! normal test suite.
//!
//! - [`check_tar_layer`]: a layer's bytes (plain, or gzip / zstd when the input asks for it) go
//!   through compression detection, the hardened tar reader ([`TarStream`]) and the tar → EROFS
//!   conversion ([`convert_layer`]) with small caps. Neither may panic; each answer must be
//!   consistent with the others and with the caps; a failed conversion leaves no file behind.
//! - [`check_manifest`]: a registry's manifest bytes go through [`ManifestDocument::parse`] with
//!   the media type the registry announced, then platform selection and re-serialization.
//! - [`check_chunk_index`]: an EROFS layer blob and its chunk-index section through the lazy
//!   format's parser, chunk decoder and whole-blob decoder ([`chunk_index`]).
//!
//! Not part of the crate's API (`#[doc(hidden)]`): only the fuzz targets and tests call it.

use std::cell::RefCell;
use std::io::{self, Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::compression::{self, CappedReader, Compression};
use crate::convert::{ConvertOptions, convert_layer};
use crate::manifest::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Descriptor, ImageConfiguration, ImageIndex,
    ManifestDocument, OCI_INDEX, OCI_MANIFEST, Platform,
};
use crate::tar_stream::{TarError, TarStream};

pub mod chunk_index;
pub mod gzip_index;
pub use chunk_index::{ChunkIndexOutcome, check_chunk_index};

/// First input byte asking [`check_tar_layer`] to gzip the rest before reading it.
pub const TAR_MODE_GZIP: u8 = 0x01;
/// First input byte asking [`check_tar_layer`] to zstd-compress the rest before reading it.
pub const TAR_MODE_ZSTD: u8 = 0x02;
/// The decompression cap of the fuzzed conversions.
pub const MAX_UNCOMPRESSED: u64 = 1 << 20;
/// Most entries of a fuzzed conversion.
pub const MAX_ENTRIES: u64 = 64;
/// Per-entry metadata cap (long names, pax records, sparse maps) of the fuzzed readers.
pub const MAX_METADATA: u64 = 4096;

/// The caps every fuzzed conversion runs with: small, so a hostile layer hits them quickly.
pub fn fuzz_convert_options() -> ConvertOptions {
    ConvertOptions {
        max_uncompressed_size: MAX_UNCOMPRESSED,
        max_entries: MAX_ENTRIES,
        max_entry_metadata: MAX_METADATA,
        detect_holes: true,
        sync: false,
        lowest_layer: false,
    }
}

/// What [`check_tar_layer`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarOutcome {
    /// The compression detected from the layer's first bytes (`None`: unsupported).
    pub compression: Option<Compression>,
    /// Entries the tar reader returned.
    pub entries: u64,
    /// Whether the tar reader reached the end-of-archive marker without an error.
    pub reader_ok: bool,
    /// The conversion's result: `Ok(image size)` or the error's text.
    pub converted: Result<u64, String>,
}

/// The layer bytes an input stands for: the input itself, or its tail compressed when the first
/// byte is [`TAR_MODE_GZIP`] or [`TAR_MODE_ZSTD`] (so the fuzzer explores tar structure behind
/// each decoder without having to forge checksums).
pub fn layer_bytes(data: &[u8]) -> Vec<u8> {
    // The compressors are kept per thread: creating one costs more than a whole conversion.
    thread_local! {
        static DEFLATE: RefCell<flate2::Compress> =
            RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
        static ZSTD: RefCell<zstd::bulk::Compressor<'static>> =
            RefCell::new(zstd::bulk::Compressor::new(1).expect("a zstd compressor"));
    }
    match data.split_first() {
        Some((&TAR_MODE_GZIP, rest)) => DEFLATE.with_borrow_mut(|deflate| {
            deflate.reset();
            // A gzip member: header, raw deflate, CRC-32 and length.
            let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
            let mut body = Vec::with_capacity(rest.len() + rest.len() / 8 + 64);
            deflate
                .compress_vec(rest, &mut body, flate2::FlushCompress::Finish)
                .expect("deflate compresses");
            out.extend_from_slice(&body);
            let mut crc = flate2::Crc::new();
            crc.update(rest);
            out.extend_from_slice(&crc.sum().to_le_bytes());
            out.extend_from_slice(&(rest.len() as u32).to_le_bytes());
            out
        }),
        Some((&TAR_MODE_ZSTD, rest)) => {
            ZSTD.with_borrow_mut(|zstd| zstd.compress(rest).expect("zstd compresses"))
        }
        _ => data.to_vec(),
    }
}

/// Where conversions write: a directory per process and thread (tests run in parallel), on
/// tmpfs when there is one.
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    /// Removes the directory when the thread ends (test threads; a fuzzer exits without it).
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    thread_local! {
        static DIR: Scratch = {
            let base = std::env::var_os("GANTRY_FUZZ_DIR")
                .map(PathBuf::from)
                .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
                .unwrap_or_else(std::env::temp_dir);
            let unique = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir = base.join(format!("gantry-oci-fuzz-{}-{unique}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
            Scratch(dir)
        };
    }
    DIR.with(|dir| dir.0.clone())
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("reading the scratch directory")
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    files
}

/// Reads the layer with the tar reader alone: returns (entries, reached the end cleanly).
fn read_entries(layer: &[u8]) -> (u64, bool) {
    let Ok((_, decoded)) = compression::decoder(Cursor::new(layer)) else {
        return (0, false);
    };
    let (capped, limits) = CappedReader::new(decoded, MAX_UNCOMPRESSED);
    let mut tar = TarStream::new(capped, MAX_METADATA);
    let mut entries = 0u64;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let entry = match tar.next_entry() {
            Ok(Some(entry)) => entry,
            Ok(None) => break,
            Err(TarError::Io(_)) | Err(_) => return (entries, false),
        };
        entries += 1;
        // Names come from the 100 + 155 byte ustar fields, or from extensions bounded by the
        // metadata cap.
        let name_bound = MAX_METADATA.max(256);
        assert!(entry.path.len() as u64 <= name_bound, "path beyond the cap");
        assert!(
            entry.link_name.len() as u64 <= name_bound,
            "link beyond the cap"
        );
        let xattr_bytes: u64 = entry
            .xattrs
            .iter()
            .map(|(name, value)| (name.len() + value.len()) as u64)
            .sum();
        assert!(xattr_bytes <= MAX_METADATA, "xattrs beyond the cap");
        // The data reader yields exactly `size` bytes, or fails.
        let mut data = tar.data();
        let mut read = 0u64;
        loop {
            match data.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => read += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return (entries, false),
            }
            assert!(read <= entry.size, "entry data longer than its size");
        }
        assert_eq!(read, entry.size, "entry data shorter than its size");
        if entries > MAX_ENTRIES * 4 {
            // Enough: the conversion stops at MAX_ENTRIES anyway.
            return (entries, false);
        }
    }
    // Like the conversion, read to the end so a corrupt compressed trailer is noticed.
    let mut rest = tar.into_inner();
    if io::copy(&mut rest, &mut io::sink()).is_err() {
        return (entries, false);
    }
    assert!(
        limits.total() <= MAX_UNCOMPRESSED + 1,
        "the cap let more through"
    );
    (entries, true)
}

/// Checks one layer input (see [`layer_bytes`]): detection, the tar reader and the conversion
/// agree, stay within their caps, and never panic; a conversion leaves exactly its image, or
/// nothing when it fails.
///
/// For speed (a conversion costs ten times the reader), a layer the tar reader rejects is also
/// converted for one input in eight only (chosen by a hash of the input, so replays repeat);
/// [`check_tar_layer_always`] converts every input.
pub fn check_tar_layer(data: &[u8]) -> TarOutcome {
    let sampled = data
        .iter()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)))
        % 8
        == 0;
    check(data, sampled)
}

/// [`check_tar_layer`], converting every input (the corpus test).
pub fn check_tar_layer_always(data: &[u8]) -> TarOutcome {
    check(data, true)
}

fn check(data: &[u8], convert_rejected: bool) -> TarOutcome {
    let layer = layer_bytes(data);
    let prefix = layer.get(..8).unwrap_or(&layer);
    let compression = compression::detect(prefix).ok();

    let (entries, reader_ok) = read_entries(&layer);
    if !reader_ok && !convert_rejected {
        return TarOutcome {
            compression,
            entries,
            reader_ok,
            converted: Err("not converted (sampled out)".to_string()),
        };
    }

    let dir = &scratch_dir();
    let output = dir.join("layer.erofs");
    let converted = convert_layer(Cursor::new(&layer[..]), &output, &fuzz_convert_options());
    let left = files_in(dir);
    let converted = match converted {
        Ok(summary) => {
            assert_eq!(left, vec![output.clone()], "conversion left other files");
            let image = std::fs::File::open(&output).expect("opening the image");
            let len = image.metadata().expect("the image's metadata").len();
            assert_eq!(len, summary.size, "summary size");
            assert_eq!(summary.size % 4096, 0, "image not in whole blocks");
            let mut magic = [0u8; 4];
            image
                .read_exact_at(&mut magic, 1024)
                .expect("reading the superblock");
            assert_eq!(magic, 0xE0F5_E1E2u32.to_le_bytes(), "no EROFS superblock");
            assert!(summary.entries <= MAX_ENTRIES, "entry cap");
            assert!(summary.uncompressed_size <= MAX_UNCOMPRESSED, "size cap");
            assert_eq!(Some(summary.compression), compression, "compression");
            assert!(reader_ok, "converted a layer the tar reader rejects");
            assert_eq!(summary.entries, entries, "entry counts differ");
            std::fs::remove_file(&output).expect("removing the image");
            Ok(summary.size)
        }
        Err(error) => {
            assert!(left.is_empty(), "a failed conversion left {left:?}");
            Err(error.to_string())
        }
    };
    TarOutcome {
        compression,
        entries,
        reader_ok,
        converted,
    }
}

/// The media types the first input byte of [`check_manifest`] selects (as a registry's
/// `Content-Type`), when that byte is below `0x20` (the document itself starts after it).
pub const SERVED_MEDIA_TYPES: [&str; 8] = [
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    "application/json",
    "application/vnd.oci.image.index.v1+json; charset=utf-8",
    "text/plain",
    "",
];

/// What [`check_manifest`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestOutcome {
    /// The document is not a manifest Gantry accepts.
    Rejected,
    /// An image manifest with this many layers.
    Image {
        /// Layers listed.
        layers: usize,
    },
    /// An index, and for each of [`fuzz_platforms`] the position of the selected entry.
    Index {
        /// Entries listed.
        manifests: usize,
        /// Selection per wanted platform.
        selected: Vec<Option<usize>>,
    },
}

/// The platforms every index is asked for.
pub fn fuzz_platforms() -> Vec<Platform> {
    [
        "linux/amd64",
        "linux/arm64",
        "linux/arm64/v8",
        "linux/arm/v7",
        "windows/amd64",
    ]
    .iter()
    .map(|p| Platform::from_str(p).expect("a valid platform"))
    .collect()
}

/// Splits an input into (served media type, document bytes).
pub fn split_manifest_input(data: &[u8]) -> (Option<&'static str>, &[u8]) {
    match data.split_first() {
        Some((&selector, rest)) if selector < 0x20 && !selector.is_ascii_whitespace() => {
            let served = SERVED_MEDIA_TYPES[usize::from(selector) % SERVED_MEDIA_TYPES.len()];
            (Some(served), rest)
        }
        _ => (None, data),
    }
}

/// The selection rule, written independently: an exact variant match first, then (if the wanted
/// platform has no variant) any entry of that os/arch, else an entry without variant.
fn expected_selection(index: &ImageIndex, wanted: &Platform) -> Option<usize> {
    let same = |d: &Descriptor| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == wanted.os && p.architecture == wanted.architecture)
    };
    let variant = |d: &Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    index
        .manifests
        .iter()
        .position(|d| same(d) && variant(d) == wanted.variant)
        .or_else(|| {
            index
                .manifests
                .iter()
                .position(|d| same(d) && (wanted.variant.is_none() || variant(d).is_none()))
        })
}

/// A platform read from a document round-trips through its text form when its fields are
/// what `Platform::from_str` accepts. (Fields from JSON are not validated: an `os` holding a
/// `/` displays ambiguously, which only error messages show.)
fn check_platform_text(platform: &Platform) {
    let valid =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !(valid(&platform.os)
        && valid(&platform.architecture)
        && platform.variant.as_deref().is_none_or(valid))
    {
        return;
    }
    let text = platform.to_string();
    let parsed = Platform::from_str(&text).expect("a valid platform's text parses");
    assert_eq!(&parsed, platform, "platform {text:?} does not round-trip");
}

/// Checks one manifest input (see [`split_manifest_input`]): parsing never panics; an accepted
/// document re-serializes to one that parses the same; index selection follows the documented
/// rule; platform strings round-trip.
pub fn check_manifest(data: &[u8]) -> ManifestOutcome {
    let (served, document) = split_manifest_input(data);
    // Config blobs are untrusted JSON too.
    let _ = ImageConfiguration::parse(document);
    if let Ok(text) = std::str::from_utf8(document)
        && let Ok(platform) = Platform::from_str(text)
    {
        assert_eq!(platform.to_string(), text, "platform text changed");
    }
    let Ok(parsed) = ManifestDocument::parse(document, served) else {
        return ManifestOutcome::Rejected;
    };
    let again = match &parsed {
        ManifestDocument::Image(manifest) => serde_json::to_vec(manifest),
        ManifestDocument::Index(index) => serde_json::to_vec(index),
    }
    .expect("a parsed document serializes");
    let reparsed =
        ManifestDocument::parse(&again, served).expect("a re-serialized document parses");
    assert_eq!(reparsed, parsed, "re-serializing changed the document");
    match parsed {
        ManifestDocument::Image(manifest) => {
            assert_eq!(manifest.schema_version, 2);
            ManifestOutcome::Image {
                layers: manifest.layers.len(),
            }
        }
        ManifestDocument::Index(index) => {
            assert_eq!(index.schema_version, 2);
            let mut selected = Vec::new();
            let mut wanted_list = fuzz_platforms();
            wanted_list.extend(index.manifests.iter().filter_map(|d| d.platform.clone()));
            for wanted in wanted_list.iter().take(16) {
                check_platform_text(wanted);
                let chosen = index.select(wanted).ok().map(|chosen| {
                    index
                        .manifests
                        .iter()
                        .position(|d| std::ptr::eq(d, chosen))
                        .expect("select returns an entry of the index")
                });
                assert_eq!(
                    chosen,
                    expected_selection(&index, wanted),
                    "selection for {wanted}"
                );
                if selected.len() < fuzz_platforms().len() {
                    selected.push(chosen);
                }
            }
            ManifestOutcome::Index {
                manifests: index.manifests.len(),
                selected,
            }
        }
    }
}

/// Named seed inputs for both targets, written into `oci/fuzz/corpus/` by the corpus test's
/// `write_seeds` (run with `--ignored`). Names starting with `valid-` must convert (tar) or parse
/// (manifest); the corpus test checks it.
pub mod seeds {
    use super::{TAR_MODE_GZIP, TAR_MODE_ZSTD};

    fn header(path: &str, type_flag: u8, size: u64, link: &str) -> [u8; 512] {
        let mut block = [0u8; 512];
        block[..path.len()].copy_from_slice(path.as_bytes());
        let mode = if type_flag == b'5' {
            "0000755\0"
        } else {
            "0000644\0"
        };
        block[100..108].copy_from_slice(mode.as_bytes());
        block[108..116].copy_from_slice(b"0000000\0");
        block[116..124].copy_from_slice(b"0000000\0");
        block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        block[136..148].copy_from_slice(b"14500000000\0");
        block[156] = type_flag;
        block[157..157 + link.len()].copy_from_slice(link.as_bytes());
        block[257..263].copy_from_slice(b"ustar\0");
        block[263..265].copy_from_slice(b"00");
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        block
    }

    fn member(out: &mut Vec<u8>, path: &str, type_flag: u8, data: &[u8], link: &str) {
        out.extend_from_slice(&header(path, type_flag, data.len() as u64, link));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    fn pax(out: &mut Vec<u8>, records: &[(&str, &[u8])]) {
        let mut body = Vec::new();
        for (key, value) in records {
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while format!("{len}").len() + rest != len {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        member(out, "PaxHeaders/x", b'x', &body, "");
    }

    fn end(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0u8; 1024]);
    }

    /// A small layer: directories, files, a symlink, a hard link, whiteouts.
    pub fn small_layer() -> Vec<u8> {
        let mut out = Vec::new();
        member(&mut out, "etc/", b'5', b"", "");
        member(&mut out, "etc/hostname", b'0', b"gantry\n", "");
        member(&mut out, "etc/zeros", b'0', &[0u8; 8192], "");
        member(&mut out, "bin/", b'5', b"", "");
        member(&mut out, "bin/sh", b'0', &[0x7f; 700], "");
        member(&mut out, "bin/ash", b'2', b"", "sh");
        member(&mut out, "bin/busybox", b'1', b"", "bin/sh");
        member(&mut out, "var/.wh..wh..opq", b'0', b"", "");
        member(&mut out, "var/.wh.old", b'0', b"", "");
        end(&mut out);
        out
    }

    /// Seeds of the `tar_convert` target.
    pub fn tar() -> Vec<(String, Vec<u8>)> {
        let mut seeds = Vec::new();
        let small = small_layer();
        seeds.push(("valid-small".to_string(), small.clone()));
        let mut gz = vec![TAR_MODE_GZIP];
        gz.extend_from_slice(&small);
        seeds.push(("valid-small-gzip".to_string(), gz));
        let mut zst = vec![TAR_MODE_ZSTD];
        zst.extend_from_slice(&small);
        seeds.push(("valid-small-zstd".to_string(), zst));

        let mut empty = Vec::new();
        end(&mut empty);
        seeds.push(("valid-empty".to_string(), empty));

        let mut pax_layer = Vec::new();
        pax(
            &mut pax_layer,
            &[
                ("path", b"a/very/long/name/that/pax/carries"),
                ("SCHILY.xattr.user.test", b"value\nwith newline"),
                ("mtime", b"1700000000.5"),
            ],
        );
        member(&mut pax_layer, "placeholder", b'0', b"content", "");
        end(&mut pax_layer);
        seeds.push(("valid-pax".to_string(), pax_layer));

        let mut gnu_long = Vec::new();
        let long_name = format!("{}/file\0", "d".repeat(150));
        member(
            &mut gnu_long,
            "././@LongLink",
            b'L',
            long_name.as_bytes(),
            "",
        );
        member(&mut gnu_long, "short", b'0', b"long-named", "");
        end(&mut gnu_long);
        seeds.push(("valid-gnu-longname".to_string(), gnu_long));

        let mut truncated = small_layer();
        truncated.truncate(1300);
        seeds.push(("truncated".to_string(), truncated));
        let mut no_end = Vec::new();
        member(&mut no_end, "file", b'0', b"x", "");
        seeds.push(("missing-end-marker".to_string(), no_end));
        let mut escape = Vec::new();
        member(&mut escape, "../escape", b'0', b"x", "");
        member(&mut escape, "/abs/../../x", b'0', b"x", "");
        end(&mut escape);
        seeds.push(("path-escape".to_string(), escape));
        let mut bad_sum = small_layer();
        bad_sum[148] = b'7';
        seeds.push(("bad-checksum".to_string(), bad_sum));
        let mut huge = Vec::new();
        let mut block = header("huge", b'0', 0, "");
        // A base-256 size of 2^64 - 1.
        block[124..136].copy_from_slice(&[
            0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ]);
        block[148..156].copy_from_slice(b"        ");
        let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        huge.extend_from_slice(&block);
        end(&mut huge);
        seeds.push(("huge-size".to_string(), huge));
        // Stored compressed (detected by its magic), so the seed stays small.
        let mut bomb = Vec::new();
        member(&mut bomb, "zeros", b'0', &vec![0u8; 2 << 20], "");
        end(&mut bomb);
        let bomb = zstd::bulk::compress(&bomb, 19).expect("zstd compresses");
        seeds.push(("over-size-cap-zstd".to_string(), bomb));
        let mut many = Vec::new();
        for i in 0..70 {
            member(&mut many, &format!("f{i}"), b'0', b"", "");
        }
        end(&mut many);
        seeds.push(("too-many-entries".to_string(), many));
        let mut sparse_pax = Vec::new();
        pax(
            &mut sparse_pax,
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"sparse"),
                ("GNU.sparse.realsize", b"20480"),
            ],
        );
        let mut map = b"1\n8192\n512\n".to_vec();
        map.resize(512, 0);
        map.extend_from_slice(&[b's'; 512]);
        member(&mut sparse_pax, "GNUSparseFile.0/sparse", b'0', &map, "");
        end(&mut sparse_pax);
        seeds.push(("valid-pax-sparse".to_string(), sparse_pax));
        seeds.push(("xz-magic".to_string(), b"\xfd7zXZ\0rest".to_vec()));
        seeds
    }

    /// Seeds of the `manifest_parse` target.
    pub fn manifest() -> Vec<(String, Vec<u8>)> {
        let digest = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let descriptor = |media: &str, c: char| {
            format!(
                r#"{{"mediaType":"{media}","digest":"{}","size":{}}}"#,
                digest(c),
                1000 + c as u32
            )
        };
        let image = |media: Option<&str>, layer_type: &str| {
            let media = media
                .map(|m| format!(r#""mediaType":"{m}","#))
                .unwrap_or_default();
            format!(
                r#"{{"schemaVersion":2,{media}"config":{},"layers":[{},{}],"annotations":{{"org.opencontainers.image.ref.name":"v1"}}}}"#,
                descriptor("application/vnd.oci.image.config.v1+json", 'c'),
                descriptor(layer_type, 'a'),
                descriptor(layer_type, 'b'),
            )
        };
        let entry = |c: char, platform: &str| {
            format!(
                r#"{{"mediaType":"{}","digest":"{}","size":500,"platform":{platform}}}"#,
                super::OCI_MANIFEST,
                digest(c)
            )
        };
        let index = |media: Option<&str>| {
            let media = media
                .map(|m| format!(r#""mediaType":"{m}","#))
                .unwrap_or_default();
            format!(
                r#"{{"schemaVersion":2,{media}"manifests":[{},{},{},{}]}}"#,
                entry('1', r#"{"architecture":"amd64","os":"linux"}"#),
                entry(
                    '2',
                    r#"{"architecture":"arm64","os":"linux","variant":"v8"}"#
                ),
                entry('3', r#"{"architecture":"arm","os":"linux","variant":"v7"}"#),
                entry('4', r#"{"architecture":"arm64","os":"linux"}"#),
            )
        };
        let served = |selector: u8, body: String| {
            let mut bytes = vec![selector];
            bytes.extend_from_slice(body.as_bytes());
            bytes
        };
        let oci_gzip = "application/vnd.oci.image.layer.v1.tar+gzip";
        let docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip";
        let mut seeds = vec![
            (
                "valid-oci-manifest",
                image(Some(super::OCI_MANIFEST), oci_gzip).into_bytes(),
            ),
            (
                "valid-docker-manifest",
                image(Some(super::DOCKER_MANIFEST), docker_gzip).into_bytes(),
            ),
            (
                "valid-manifest-by-shape",
                image(None, oci_gzip).into_bytes(),
            ),
            (
                "valid-manifest-served-type",
                served(
                    0,
                    image(None, "application/vnd.oci.image.layer.v1.tar+zstd"),
                ),
            ),
            (
                "valid-oci-index",
                index(Some(super::OCI_INDEX)).into_bytes(),
            ),
            (
                "valid-docker-list",
                index(Some(super::DOCKER_MANIFEST_LIST)).into_bytes(),
            ),
            ("valid-index-by-shape", index(None).into_bytes()),
            ("valid-index-served-charset", served(5, index(None))),
            ("valid-index-served-json", served(4, index(None))),
        ]
        .into_iter()
        .map(|(name, bytes)| (name.to_string(), bytes))
        .collect::<Vec<_>>();
        let rejected = [
            (
                "schema-1",
                r#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_string(),
            ),
            (
                "foreign-layer",
                image(
                    Some(super::OCI_MANIFEST),
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                ),
            ),
            (
                "unknown-media-type",
                image(Some("application/vnd.example+json"), oci_gzip),
            ),
            (
                "bad-digest",
                image(None, oci_gzip).replace("sha256:c", "sha256:C"),
            ),
            ("not-json", "{\"schemaVersion\":2,".to_string()),
            ("platform-only", "linux/arm64/v8".to_string()),
        ];
        seeds.extend(
            rejected
                .into_iter()
                .map(|(n, b)| (n.to_string(), b.into_bytes())),
        );
        seeds.push(("served-text-plain".to_string(), served(6, index(None))));
        seeds
    }
}
