//! The `gzip_index` fuzz target's check: arbitrary bytes as a gzip tar layer through
//! [`ztoc::toc::build`] (the gzip index and the file table in one pass), then every span
//! extracted on its own and compared with a plain decompression, and a span with one byte
//! flipped refused before it is inflated.
//!
//! Input: the blob itself (seeds are real gzip tar layers, so the fuzzer starts inside the
//! format).

use std::io::{Read as _, Write as _};

use crate::ztoc::toc;

/// The span the check indexes with: small, so that small inputs have several.
const SPAN: u64 = 32 << 10;
/// Inputs that decompress to more than this are not indexed (the check decompresses them
/// whole as its oracle).
const MAX_OUTPUT: u64 = 8 << 20;

/// What [`check_gzip_index`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipIndexOutcome {
    /// The build: `Ok((checkpoints, members of the tar))` or the error's text.
    pub built: Result<(usize, usize), String>,
    /// Spans that extracted equal to the plain decompression.
    pub spans_equal: usize,
    /// Spans with a flipped byte that were refused.
    pub tampered_refused: usize,
}

/// Builds the index of `data`, extracts each span, and checks tampering is caught. Panics
/// (the fuzzer's finding) when a span extracts differently from the plain decompression or a
/// tampered span is accepted.
pub fn check_gzip_index(data: &[u8]) -> GzipIndexOutcome {
    let mut plain = Vec::new();
    let oracle = flate2::read::GzDecoder::new(data)
        .take(MAX_OUTPUT + 1)
        .read_to_end(&mut plain);
    if oracle.is_err() || plain.len() as u64 > MAX_OUTPUT {
        // Still must not panic on it.
        let built = toc::build(data.take(1 << 20), SPAN)
            .map(|z| (z.gzip.checkpoints.len(), z.entries.len()));
        return GzipIndexOutcome {
            built: built.map_err(|e| e.to_string()),
            spans_equal: 0,
            tampered_refused: 0,
        };
    }
    let ztoc = match toc::build(data, SPAN) {
        Ok(ztoc) => ztoc,
        Err(error) => {
            return GzipIndexOutcome {
                built: Err(error.to_string()),
                spans_equal: 0,
                tampered_refused: 0,
            };
        }
    };
    let index = &ztoc.gzip;
    let mut outcome = GzipIndexOutcome {
        built: Ok((index.checkpoints.len(), ztoc.entries.len())),
        spans_equal: 0,
        tampered_refused: 0,
    };
    for number in 0..index.checkpoints.len() {
        let span = index.span(number).expect("a span per checkpoint");
        if span.uncompressed.is_empty() {
            continue;
        }
        let got = index
            .read_range(span.uncompressed.clone(), |bytes| {
                Ok(data[bytes.start as usize..bytes.end as usize].to_vec())
            })
            .expect("a span of an index built here extracts");
        let bytes = &data[span.compressed.start as usize..span.compressed.end as usize];
        assert_eq!(
            got,
            plain[span.uncompressed.start as usize..span.uncompressed.end as usize],
            "span {number} extracts as the whole stream decompresses"
        );
        outcome.spans_equal += 1;
        let mut tampered = bytes.to_vec();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x01;
        assert!(
            index
                .extract(number..number + 1, &tampered, span.uncompressed.clone())
                .is_err(),
            "span {number} with a flipped byte is refused"
        );
        outcome.tampered_refused += 1;
    }
    outcome
}

/// Seeds of the `gzip_index` target.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        encoder.write_all(bytes).expect("in memory");
        encoder.finish().expect("in memory")
    };
    let layer = super::seeds::small_layer();
    let mut big = Vec::new();
    let mut state = 5u64;
    for i in 0..40_000u64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        big.extend_from_slice(format!("{i} {}\n", state % 9973).as_bytes());
    }
    let mut big_layer = Vec::new();
    {
        let mut builder = tar::Builder::new(&mut big_layer);
        let mut header = tar::Header::new_gnu();
        header.set_size(big.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, "data/big.txt", big.as_slice())
            .expect("in memory");
        builder.finish().expect("in memory");
    }
    let valid = gzip(&layer);
    let mut two_members = valid.clone();
    two_members.extend_from_slice(&gzip(b"more"));
    vec![
        ("valid-small-layer".into(), valid.clone()),
        ("valid-spans".into(), gzip(&big_layer)),
        ("truncated".into(), valid[..valid.len() / 2].to_vec()),
        ("two-members".into(), two_members),
        ("not-a-tar".into(), gzip(&[9u8; 3000])),
        ("not-gzip".into(), layer),
    ]
}
