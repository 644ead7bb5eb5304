//! SOCI's serialized forms of a gzip index: the zinfo checkpoint blob that a SOCI zTOC carries
//! in its `compression_info.checkpoints` (version 2: every checkpoint stored; version 1: the
//! first one implied), so that an index built here can be stored beside SOCI's and SOCI's can
//! be read.
//!
//! Layout, little-endian and packed: `u32` checkpoint count, `u64` span size, then per
//! checkpoint `u64` compressed offset, `u64` uncompressed offset, `u8` bits, and a
//! [`WINDOW`]-byte window (the output before the checkpoint, zero-padded at the front when
//! there was less).

use super::zinfo::{Checkpoint, GzipIndex, WINDOW, ZinfoError};

const HEADER: usize = 4 + 8;
const PACKED_CHECKPOINT: usize = 8 + 8 + 1 + WINDOW;
/// Where version 1 blobs imply their first checkpoint: after a 10-byte gzip header.
const V1_FIRST_COMPRESSED: u64 = 10;

/// Writes `index`'s checkpoints as a version 2 zinfo blob.
pub fn encode_zinfo(index: &GzipIndex) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER + PACKED_CHECKPOINT * index.checkpoints.len());
    blob.extend_from_slice(&(index.checkpoints.len() as u32).to_le_bytes());
    blob.extend_from_slice(&index.span_size.to_le_bytes());
    for checkpoint in &index.checkpoints {
        blob.extend_from_slice(&checkpoint.compressed.to_le_bytes());
        blob.extend_from_slice(&checkpoint.uncompressed.to_le_bytes());
        blob.push(checkpoint.bits);
        let window = &checkpoint.window[checkpoint.window.len().saturating_sub(WINDOW)..];
        blob.resize(blob.len() + WINDOW - window.len(), 0);
        blob.extend_from_slice(window);
    }
    blob
}

/// The checkpoints of a zinfo blob (version 1 or 2) and its span size. Everything is checked
/// before use: the sizes agree with the count, offsets increase, bits are 0–7, and the first
/// checkpoint is at uncompressed offset 0.
pub fn decode_zinfo(blob: &[u8]) -> Result<(u64, Vec<Checkpoint>), ZinfoError> {
    let bad = |what: String| ZinfoError::OutOfRange(format!("zinfo blob: {what}"));
    if blob.len() < HEADER {
        return Err(bad(format!(
            "{} bytes, shorter than its header",
            blob.len()
        )));
    }
    let count = u32::from_le_bytes(blob[0..4].try_into().expect("4 bytes")) as usize;
    let span_size = u64::from_le_bytes(blob[4..12].try_into().expect("8 bytes"));
    let body = &blob[HEADER..];
    let stored = body.len() / PACKED_CHECKPOINT;
    if !body.len().is_multiple_of(PACKED_CHECKPOINT) || !(stored == count || stored + 1 == count) {
        return Err(bad(format!(
            "{} bytes of checkpoints for a count of {count}",
            body.len()
        )));
    }
    let mut checkpoints = Vec::with_capacity(count);
    if stored + 1 == count {
        checkpoints.push(Checkpoint {
            compressed: V1_FIRST_COMPRESSED,
            bits: 0,
            uncompressed: 0,
            window: Vec::new(),
        });
    }
    for packed in body.chunks_exact(PACKED_CHECKPOINT) {
        let compressed = u64::from_le_bytes(packed[0..8].try_into().expect("8 bytes"));
        let uncompressed = u64::from_le_bytes(packed[8..16].try_into().expect("8 bytes"));
        let bits = packed[16];
        let mut window = packed[17..].to_vec();
        // The zero padding before an early checkpoint is not output.
        if uncompressed < WINDOW as u64 {
            window.drain(..WINDOW - uncompressed as usize);
        }
        checkpoints.push(Checkpoint {
            compressed,
            bits,
            uncompressed,
            window,
        });
    }
    if checkpoints.first().is_some_and(|c| c.uncompressed != 0) {
        return Err(bad("the first checkpoint is not at offset 0".into()));
    }
    for pair in checkpoints.windows(2) {
        if pair[1].compressed <= pair[0].compressed || pair[1].uncompressed <= pair[0].uncompressed
        {
            return Err(bad("checkpoint offsets do not increase".into()));
        }
    }
    if let Some(checkpoint) = checkpoints
        .iter()
        .find(|c| c.bits > 7 || (c.bits > 0 && c.compressed == 0))
    {
        return Err(bad(format!(
            "{} bits at compressed offset {}",
            checkpoint.bits, checkpoint.compressed
        )));
    }
    Ok((span_size, checkpoints))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::ztoc::zinfo::build;

    fn blob() -> (Vec<u8>, Vec<u8>) {
        let mut original = Vec::new();
        for i in 0..60_000u32 {
            original.extend_from_slice(
                format!("{i} {}\n", i.wrapping_mul(2_654_435_761) % 977).as_bytes(),
            );
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(&original).unwrap();
        (encoder.finish().unwrap(), original)
    }

    #[test]
    fn the_zinfo_blob_round_trips_and_still_extracts() {
        let (gzip, original) = blob();
        let index = build(gzip.as_slice(), 32 << 10, |_| {}).unwrap();
        assert!(index.checkpoints.len() > 2);
        let encoded = encode_zinfo(&index);
        assert_eq!(
            encoded.len(),
            HEADER + PACKED_CHECKPOINT * index.checkpoints.len()
        );
        assert_eq!(
            &encoded[..4],
            &(index.checkpoints.len() as u32).to_le_bytes()
        );
        assert_eq!(&encoded[4..12], &index.span_size.to_le_bytes());
        // The first checkpoint's window is all padding.
        assert!(
            encoded[HEADER + 17..HEADER + PACKED_CHECKPOINT]
                .iter()
                .all(|b| *b == 0)
        );
        let (span_size, checkpoints) = decode_zinfo(&encoded).unwrap();
        assert_eq!(span_size, index.span_size);
        assert_eq!(checkpoints, index.checkpoints);
        let decoded = GzipIndex {
            checkpoints,
            ..index.clone()
        };
        let range = 100_000..180_000;
        let spans = decoded.spans_for(range.clone()).unwrap();
        let first = decoded.span(spans.start).unwrap();
        let last = decoded.span(spans.end - 1).unwrap();
        let bytes = &gzip[first.compressed.start as usize..last.compressed.end as usize];
        assert_eq!(
            decoded.extract(spans, bytes, range.clone()).unwrap(),
            original[100_000..180_000]
        );
    }

    #[test]
    fn version_one_blobs_imply_their_first_checkpoint_and_bad_blobs_are_refused() {
        let (gzip, _) = blob();
        let index = build(gzip.as_slice(), 32 << 10, |_| {}).unwrap();
        let encoded = encode_zinfo(&index);
        // Version 1: the count includes a first checkpoint that is not stored.
        let mut v1 = encoded[..HEADER].to_vec();
        v1.extend_from_slice(&encoded[HEADER + PACKED_CHECKPOINT..]);
        let (_, checkpoints) = decode_zinfo(&v1).unwrap();
        assert_eq!(checkpoints.len(), index.checkpoints.len());
        assert_eq!(checkpoints[0].compressed, V1_FIRST_COMPRESSED);
        assert_eq!(checkpoints[1..], index.checkpoints[1..]);

        assert!(decode_zinfo(&encoded[..5]).is_err());
        assert!(decode_zinfo(&encoded[..encoded.len() - 1]).is_err());
        let mut lying_count = encoded.clone();
        lying_count[0] = 200;
        assert!(decode_zinfo(&lying_count).is_err());
        let mut bad_bits = encoded.clone();
        bad_bits[HEADER + PACKED_CHECKPOINT + 16] = 9;
        assert!(decode_zinfo(&bad_bits).is_err());
        let mut backwards = encoded;
        backwards[HEADER + PACKED_CHECKPOINT..HEADER + PACKED_CHECKPOINT + 8]
            .copy_from_slice(&0u64.to_le_bytes());
        assert!(decode_zinfo(&backwards).is_err());
    }
}

/// The zTOC version this writes (SOCI v2 indexes carry 0.9 zTOCs).
pub const ZTOC_VERSION: &str = "0.9";
/// The PAX record prefix of extended attributes.
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Errors mapping between a zTOC document and Gantry's zTOC.
#[derive(Debug, thiserror::Error)]
pub enum SociError {
    /// The checkpoint blob or the spans.
    #[error(transparent)]
    Zinfo(#[from] ZinfoError),
    /// A field's value cannot be right.
    #[error("zTOC: {0}")]
    Invalid(String),
}

/// SOCI's name of a tar member type.
fn type_name(type_flag: u8) -> Option<&'static str> {
    Some(match type_flag {
        b'0' | 0 | b'7' => "reg",
        b'1' => "hardlink",
        b'2' => "symlink",
        b'3' => "char",
        b'4' => "block",
        b'5' => "dir",
        b'6' => "fifo",
        _ => return None,
    })
}

fn type_flag(name: &[u8]) -> Option<u8> {
    Some(match name {
        b"reg" => b'0',
        b"hardlink" => b'1',
        b"symlink" => b'2',
        b"char" => b'3',
        b"block" => b'4',
        b"dir" => b'5',
        b"fifo" => b'6',
        _ => return None,
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// RFC 3339 in UTC with the nanoseconds Go's `RFC3339Nano` prints (trailing zeros dropped).
pub fn format_time(seconds: i64, nanos: u32) -> String {
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let in_day = seconds.rem_euclid(86_400);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    );
    if nanos > 0 {
        let fraction = format!("{nanos:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    text
}

/// Parses RFC 3339 (`Z` or a `±hh:mm` offset, optional fraction) into Unix seconds and
/// nanoseconds.
pub fn parse_time(text: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(text).ok()?;
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if text.len() < 20
        || &text[4..5] != "-"
        || &text[7..8] != "-"
        || !matches!(&text[10..11], "T" | "t")
    {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = format!("{:0<9}", &fraction[..digits]).parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[0..1], "+" | "-") && &rest[3..4] == ":" => {
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            let offset = hours * 3600 + minutes * 60;
            if &rest[0..1] == "-" { -offset } else { offset }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month as u32, day as u32);
    Some((
        days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    ))
}

fn digest_text(digest: &[u8; 32]) -> Vec<u8> {
    let mut text = b"sha256:".to_vec();
    text.extend(digest.iter().flat_map(|b| format!("{b:02x}").into_bytes()));
    text
}

fn parse_digest(text: &[u8]) -> Option<[u8; 32]> {
    let hex = text.strip_prefix(b"sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

/// Gantry's zTOC as SOCI's document (to encode with [`super::fbs::encode`]).
pub fn to_document(
    ztoc: &super::toc::Ztoc,
    build_tool: &str,
) -> Result<super::fbs::ZtocDocument, SociError> {
    let index = &ztoc.gzip;
    let signed = |value: u64, what: &str| {
        i64::try_from(value).map_err(|_| SociError::Invalid(format!("{what} {value} is too large")))
    };
    let mut metadata = Vec::with_capacity(ztoc.entries.len());
    for member in &ztoc.entries {
        let entry = &member.entry;
        let kind = type_name(entry.type_flag).ok_or_else(|| {
            SociError::Invalid(format!(
                "{}: tar type {:?} has no zTOC name",
                String::from_utf8_lossy(&entry.path),
                entry.type_flag as char
            ))
        })?;
        if entry.sparse {
            return Err(SociError::Invalid(format!(
                "{}: sparse files have no zTOC form",
                String::from_utf8_lossy(&entry.path)
            )));
        }
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = entry
            .xattrs
            .iter()
            .map(|(name, value)| ([XATTR_PREFIX, name].concat(), value.clone()))
            .collect();
        xattrs.sort();
        metadata.push(super::fbs::FileMetadata {
            name: entry.path.clone(),
            kind: kind.as_bytes().to_vec(),
            uncompressed_offset: signed(member.offset, "offset")?,
            uncompressed_size: signed(entry.size, "size")?,
            linkname: entry.link_name.clone(),
            mode: i64::from(entry.mode),
            uid: u32::try_from(entry.uid)
                .map_err(|_| SociError::Invalid(format!("uid {}", entry.uid)))?,
            gid: u32::try_from(entry.gid)
                .map_err(|_| SociError::Invalid(format!("gid {}", entry.gid)))?,
            mod_time: format_time(entry.mtime, entry.mtime_nsec).into_bytes(),
            devmajor: signed(entry.dev_major, "device major")?,
            devminor: signed(entry.dev_minor, "device minor")?,
            xattrs,
            ..super::fbs::FileMetadata::default()
        });
    }
    Ok(super::fbs::ZtocDocument {
        version: ZTOC_VERSION.as_bytes().to_vec(),
        build_tool_identifier: build_tool.as_bytes().to_vec(),
        compressed_archive_size: signed(index.compressed_size, "compressed size")?,
        uncompressed_archive_size: signed(index.uncompressed_size, "uncompressed size")?,
        metadata,
        compression_algorithm: super::fbs::ALGORITHM_GZIP,
        max_span_id: i32::try_from(index.checkpoints.len().saturating_sub(1))
            .map_err(|_| SociError::Invalid("too many spans".into()))?,
        span_digests: index.span_digests.iter().map(digest_text).collect(),
        checkpoints: encode_zinfo(index),
    })
}

/// SOCI's document as Gantry's zTOC, every field checked (a zTOC comes from a registry).
pub fn from_document(document: &super::fbs::ZtocDocument) -> Result<super::toc::Ztoc, SociError> {
    let invalid = |what: String| SociError::Invalid(what);
    if document.compression_algorithm != super::fbs::ALGORITHM_GZIP {
        return Err(invalid(format!(
            "compression algorithm {} is not gzip",
            document.compression_algorithm
        )));
    }
    let unsigned = |value: i64, what: &str| {
        u64::try_from(value).map_err(|_| SociError::Invalid(format!("{what} {value} is negative")))
    };
    let compressed_size = unsigned(document.compressed_archive_size, "compressed size")?;
    let uncompressed_size = unsigned(document.uncompressed_archive_size, "uncompressed size")?;
    let (span_size, checkpoints) = decode_zinfo(&document.checkpoints)?;
    let spans = usize::try_from(document.max_span_id)
        .ok()
        .and_then(|max| max.checked_add(1))
        .ok_or_else(|| invalid(format!("max span id {}", document.max_span_id)))?;
    if spans != checkpoints.len() || spans != document.span_digests.len() {
        return Err(invalid(format!(
            "{spans} spans, {} checkpoints, {} span digests",
            checkpoints.len(),
            document.span_digests.len()
        )));
    }
    if checkpoints
        .last()
        .is_some_and(|c| c.compressed > compressed_size)
    {
        return Err(invalid("a checkpoint lies past the blob's end".into()));
    }
    let span_digests = document
        .span_digests
        .iter()
        .map(|text| {
            parse_digest(text)
                .ok_or_else(|| invalid(format!("span digest {:?}", String::from_utf8_lossy(text))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut entries = Vec::with_capacity(document.metadata.len());
    for file in &document.metadata {
        let name = String::from_utf8_lossy(&file.name).into_owned();
        let type_flag = type_flag(&file.kind).ok_or_else(|| {
            invalid(format!(
                "{name}: type {:?}",
                String::from_utf8_lossy(&file.kind)
            ))
        })?;
        let offset = unsigned(file.uncompressed_offset, "offset")?;
        let size = unsigned(file.uncompressed_size, "size")?;
        if offset
            .checked_add(size)
            .is_none_or(|end| end > uncompressed_size)
        {
            return Err(invalid(format!("{name}: its data lies past the tar's end")));
        }
        let (mtime, mtime_nsec) = if file.mod_time.is_empty() {
            (0, 0)
        } else {
            parse_time(&file.mod_time).ok_or_else(|| {
                invalid(format!(
                    "{name}: time {:?}",
                    String::from_utf8_lossy(&file.mod_time)
                ))
            })?
        };
        let mode =
            u32::try_from(file.mode).map_err(|_| invalid(format!("{name}: mode {}", file.mode)))?;
        entries.push(super::toc::TocEntry {
            entry: crate::tar_stream::TarEntry {
                path: file.name.clone(),
                link_name: file.linkname.clone(),
                type_flag,
                mode,
                uid: u64::from(file.uid),
                gid: u64::from(file.gid),
                mtime,
                mtime_nsec,
                size,
                dev_major: unsigned(file.devmajor, "device major")?,
                dev_minor: unsigned(file.devminor, "device minor")?,
                xattrs: file
                    .xattrs
                    .iter()
                    .filter_map(|(key, value)| {
                        key.strip_prefix(XATTR_PREFIX)
                            .map(|name| (name.to_vec(), value.clone()))
                    })
                    .collect(),
                sparse: false,
            },
            offset,
        });
    }
    Ok(super::toc::Ztoc {
        entries,
        gzip: GzipIndex {
            span_size,
            checkpoints,
            span_digests,
            compressed_size,
            uncompressed_size,
        },
    })
}

#[cfg(test)]
mod document_tests {
    use std::io::Write as _;

    use super::*;
    use crate::ztoc::{fbs, toc};

    #[test]
    fn times_format_as_go_prints_them_and_parse_back() {
        assert_eq!(format_time(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(
            format_time(1_700_000_000, 500_000_000),
            "2023-11-14T22:13:20.5Z"
        );
        assert_eq!(format_time(-1, 0), "1969-12-31T23:59:59Z");
        assert_eq!(format_time(951_782_400, 0), "2000-02-29T00:00:00Z");
        for (seconds, nanos) in [
            (0, 0),
            (1_700_000_000, 123_456_789),
            (-86_401, 5),
            (4_102_444_800, 0),
        ] {
            assert_eq!(
                parse_time(format_time(seconds, nanos).as_bytes()),
                Some((seconds, nanos))
            );
        }
        assert_eq!(
            parse_time(b"2023-11-14T23:13:20+01:00"),
            Some((1_700_000_000, 0))
        );
        for bad in [
            &b"2023-13-01T00:00:00Z"[..],
            b"yesterday",
            b"2023-11-14T22:13:20",
            b"2023-11-14T22:13:20.Z",
        ] {
            assert_eq!(parse_time(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    fn layer() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut data = Vec::new();
        for i in 0..20_000u32 {
            data.extend_from_slice(format!("{i}:{}\n", i.wrapping_mul(40_503) % 1009).as_bytes());
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o640);
        header.set_uid(7);
        header.set_mtime(1_700_000_000);
        builder
            .append_data(&mut header, "srv/data.txt", data.as_slice())
            .unwrap();
        builder
            .append_pax_extensions([("SCHILY.xattr.user.tag", b"v".as_slice())])
            .unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder
            .append_link(&mut link, "srv/link", "data.txt")
            .unwrap();
        let tar = builder.into_inner().unwrap();
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(&tar).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn a_ztoc_built_here_survives_the_soci_format() {
        let blob = layer();
        let built = toc::build(blob.as_slice(), 32 << 10).unwrap();
        let document = to_document(&built, "gantry test").unwrap();
        // Field by field, as ztoc.fbs and SOCI's builder define them.
        assert_eq!(document.version, b"0.9");
        assert_eq!(
            document.max_span_id as usize + 1,
            built.gzip.checkpoints.len()
        );
        let data = &document.metadata[0];
        assert_eq!(data.name, b"srv/data.txt");
        assert_eq!(data.kind, b"reg");
        assert_eq!(data.mode, 0o640);
        assert_eq!(data.uid, 7);
        assert_eq!(data.mod_time, b"2023-11-14T22:13:20Z");
        assert_eq!(data.uncompressed_offset, 512, "after its one header block");
        let link = document
            .metadata
            .iter()
            .find(|f| f.name == b"srv/link")
            .unwrap();
        assert_eq!(
            (link.kind.as_slice(), link.linkname.as_slice()),
            (&b"symlink"[..], &b"data.txt"[..])
        );
        assert!(
            document
                .span_digests
                .iter()
                .all(|d| d.starts_with(b"sha256:") && d.len() == 71)
        );

        let decoded =
            from_document(&fbs::decode(&fbs::encode(&document), 10_000).unwrap()).unwrap();
        assert_eq!(decoded.gzip, built.gzip);
        assert_eq!(decoded.entries.len(), built.entries.len());
        for (got, want) in decoded.entries.iter().zip(&built.entries) {
            assert_eq!(got.offset, want.offset);
            assert_eq!(got.entry.path, want.entry.path);
            // Old-style regular files ('\0') come back as '0', as SOCI names both "reg".
            let normalized = if want.entry.type_flag == 0 {
                b'0'
            } else {
                want.entry.type_flag
            };
            assert_eq!(got.entry.type_flag, normalized);
            assert_eq!(got.entry.size, want.entry.size);
            assert_eq!(got.entry.mtime, want.entry.mtime);
            assert_eq!(got.entry.xattrs, want.entry.xattrs);
        }
    }

    #[test]
    fn lying_documents_are_refused() {
        let blob = layer();
        let built = toc::build(blob.as_slice(), 32 << 10).unwrap();
        let document = to_document(&built, "t").unwrap();
        let mut past_end = document.clone();
        past_end.metadata[0].uncompressed_size = i64::MAX;
        assert!(from_document(&past_end).is_err());
        let mut few_digests = document.clone();
        few_digests.span_digests.pop();
        assert!(from_document(&few_digests).is_err());
        let mut bad_digest = document.clone();
        bad_digest.span_digests[0] = b"sha256:zz".to_vec();
        assert!(from_document(&bad_digest).is_err());
        let mut zstd = document.clone();
        zstd.compression_algorithm = 2;
        assert!(from_document(&zstd).is_err());
        let mut negative = document;
        negative.metadata[0].uncompressed_offset = -1;
        assert!(from_document(&negative).is_err());
    }
}
