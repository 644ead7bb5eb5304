//! The two zstd frame kinds a layer blob holds (RFC 8878 §3.1): data frames (one per chunk) and
//! skippable frames (the chunk index, alignment padding), which every zstd decoder passes over.

/// Magic number of a zstd data frame, as a little-endian `u32`.
pub(crate) const DATA_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames have any magic from this one …
pub(crate) const SKIPPABLE_MAGIC_FIRST: u32 = 0x184D_2A50;
/// … to this one.
pub(crate) const SKIPPABLE_MAGIC_LAST: u32 = 0x184D_2A5F;
/// Magic (4 bytes) and payload length (4 bytes).
pub(crate) const SKIPPABLE_HEADER_LEN: usize = 8;

/// The little-endian `u32` at `at`, if `bytes` holds it.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(field.try_into().ok()?))
}

/// Whether `magic` is one of the sixteen skippable-frame magic numbers.
pub(crate) fn is_skippable_magic(magic: u32) -> bool {
    (SKIPPABLE_MAGIC_FIRST..=SKIPPABLE_MAGIC_LAST).contains(&magic)
}

/// The header of a skippable frame carrying `payload_len` bytes (Gantry always uses the first
/// magic).
pub(crate) fn skippable_header(payload_len: u32) -> [u8; SKIPPABLE_HEADER_LEN] {
    let mut header = [0u8; SKIPPABLE_HEADER_LEN];
    header[..4].copy_from_slice(&SKIPPABLE_MAGIC_FIRST.to_le_bytes());
    header[4..].copy_from_slice(&payload_len.to_le_bytes());
    header
}

/// Whether `bytes` is nothing but complete skippable frames (or empty).
pub(crate) fn only_skippable_frames(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        let (Some(magic), Some(len)) = (le_u32(bytes, 0), le_u32(bytes, 4)) else {
            return false;
        };
        let Some(frame_len) = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(SKIPPABLE_HEADER_LEN))
        else {
            return false;
        };
        if !is_skippable_magic(magic) || frame_len > bytes.len() {
            return false;
        }
        bytes = &bytes[frame_len..];
    }
    true
}

/// A zero-filled skippable frame that brings `offset` to a multiple of 4 (§3.4.3 lets producers
/// put one before the index frame); `None` when `offset` is aligned already. A frame is at least
/// 8 bytes, so the padding is 9, 10 or 11 bytes.
pub(crate) fn padding_frame(offset: u64) -> Option<Vec<u8>> {
    let missing = (4 - offset % 4) % 4;
    if missing == 0 {
        return None;
    }
    // `missing` is 1..=3, so the payload length fits any integer type.
    let payload_len = missing as u32;
    let mut frame = skippable_header(payload_len).to_vec();
    frame.resize(SKIPPABLE_HEADER_LEN + payload_len as usize, 0);
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_aligns_every_offset() {
        for offset in 0..64u64 {
            let len = padding_frame(offset).map_or(0, |f| {
                assert!(only_skippable_frames(&f), "padding at {offset} is a frame");
                f.len() as u64
            });
            assert_eq!((offset + len) % 4, 0, "offset {offset}");
            assert!(
                len == 0 || (9..=11).contains(&len),
                "offset {offset}: {len}"
            );
        }
    }

    #[test]
    fn skippable_sequences_are_recognised_exactly() {
        let mut two = skippable_header(3).to_vec();
        two.extend_from_slice(&[1, 2, 3]);
        two.extend_from_slice(&skippable_header(0));
        assert!(only_skippable_frames(&two));
        assert!(only_skippable_frames(&[]));
        // Cut short, a byte too many, a data frame's magic, a magic past the range.
        assert!(!only_skippable_frames(&two[..two.len() - 1]));
        let mut longer = two.clone();
        longer.push(0);
        assert!(!only_skippable_frames(&longer));
        let mut data = two.clone();
        data[..4].copy_from_slice(&DATA_MAGIC.to_le_bytes());
        assert!(!only_skippable_frames(&data));
        let mut past = two;
        past[..4].copy_from_slice(&(SKIPPABLE_MAGIC_LAST + 1).to_le_bytes());
        assert!(!only_skippable_frames(&past));
        assert!(is_skippable_magic(SKIPPABLE_MAGIC_LAST));
        assert!(!is_skippable_magic(SKIPPABLE_MAGIC_FIRST - 1));
    }
}
