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
