//! Random access into a gzip stream: checkpoints where inflating can start (the compressed
//! position to the bit, the uncompressed offset, and the 32 KiB of output before it), one per
//! span of uncompressed bytes, and each span's compressed bytes' SHA-256 so that a span fetched
//! alone can be verified before a byte of it is inflated. The idea is zlib's `zran.c` and
//! SOCI's zinfo; the index is built in one streaming pass over the blob.

use std::io::Read;
use std::ops::Range;

use sha2::{Digest as _, Sha256};

use super::inflate::{Format, InflateError, Inflater, Progress};

/// The window a checkpoint keeps: deflate refers at most this far back.
pub const WINDOW: usize = 32 << 10;
/// SOCI's default span (uncompressed bytes between checkpoints).
pub const DEFAULT_SPAN: u64 = 4 << 20;

/// Errors building or using an index.
#[derive(Debug, thiserror::Error)]
pub enum ZinfoError {
    /// Reading the blob failed.
    #[error("reading the gzip blob: {0}")]
    Read(#[from] std::io::Error),
    /// The blob is not gzip, or is corrupt.
    #[error(transparent)]
    Inflate(#[from] InflateError),
    /// The blob ended inside the gzip stream.
    #[error("the gzip blob ends inside its stream (after {0} compressed bytes)")]
    Truncated(u64),
    /// More than one gzip member.
    #[error(
        "the gzip blob has bytes after its first member (at {0}): concatenated members are not \
         indexed"
    )]
    MultipleMembers(u64),
    /// A span's bytes are not what the index says.
    #[error("span {span}: compressed bytes with digest {actual}, the index says {expected}")]
    SpanDigest {
        /// The span.
        span: usize,
        /// What the index says.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A request outside the index.
    #[error("{0}")]
    OutOfRange(String),
    /// The bytes asked for end in the last bits of a span, which lie in the next span's first
    /// byte: extract again with the next span too (its digest then covers that byte).
    #[error("the range ends in span {0}'s last bits, which are in span {next}'s first byte", next = .0 + 1)]
    NeedsNextSpan(usize),
}

/// Where inflating can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The compressed byte offset just after the checkpoint's position; with `bits` > 0 the
    /// position is `bits` bits before it, inside byte `compressed - 1` (whose other bits end
    /// the previous block).
    pub compressed: u64,
    /// The bits of byte `compressed - 1` that belong to the block starting here (0–7).
    pub bits: u8,
    /// The uncompressed offset.
    pub uncompressed: u64,
    /// The output before `uncompressed`, at most [`WINDOW`] bytes (fewer at the start).
    pub window: Vec<u8>,
}

impl Checkpoint {
    /// The first compressed byte inflating from here reads.
    pub fn first_byte(&self) -> u64 {
        self.compressed.saturating_sub(u64::from(self.bits > 0))
    }
}

/// A gzip blob's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipIndex {
    /// The span the checkpoints were placed for (uncompressed bytes).
    pub span_size: u64,
    /// The checkpoints, by offset; the first is at uncompressed offset 0.
    pub checkpoints: Vec<Checkpoint>,
    /// The SHA-256 of each span's compressed bytes (`span_range`), one per checkpoint.
    pub span_digests: Vec<[u8; 32]>,
    /// The blob's compressed size.
    pub compressed_size: u64,
    /// Its uncompressed size.
    pub uncompressed_size: u64,
}

/// A span: the compressed and uncompressed bytes from one checkpoint to the next. When the next
/// checkpoint starts inside a byte, that byte is the next span's (SOCI's cut), and the last
/// bits of this span's output are only known with it: see [`ZinfoError::NeedsNextSpan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Its number.
    pub index: usize,
    /// The compressed bytes to fetch (the first may be shared with the previous span).
    pub compressed: Range<u64>,
    /// The uncompressed bytes it yields.
    pub uncompressed: Range<u64>,
}

/// Hashes compressed bytes into the spans they belong to, as the builder meets checkpoints.
/// Spans are cut as SOCI cuts them: span *i* is the bytes from its checkpoint's first byte to
/// the next checkpoint's first byte, so a byte shared by two blocks is the next span's. The
/// last byte seen is held back until it is known whose it is.
#[derive(Debug)]
struct SpanHasher {
    current: Sha256,
    digests: Vec<[u8; 32]>,
    pending: Option<u8>,
}

impl SpanHasher {
    fn new() -> Self {
        Self {
            current: Sha256::new(),
            digests: Vec::new(),
            pending: None,
        }
    }

    /// Hashes the next `bytes` of the blob (all but the last, which is held back).
    fn feed(&mut self, bytes: &[u8]) {
        let Some((last, rest)) = bytes.split_last() else {
            return;
        };
        if let Some(pending) = self.pending.take() {
            self.current.update([pending]);
        }
        self.current.update(rest);
        self.pending = Some(*last);
    }

    /// A checkpoint after every byte fed: closes the span before it (unless this is the first
    /// checkpoint, which only starts one) and opens its own, which owns the held-back byte when
    /// the checkpoint starts inside it.
    fn cut(&mut self, checkpoint: &Checkpoint, first: bool) {
        let pending = self.pending.take();
        if checkpoint.bits == 0
            && let Some(byte) = pending
        {
            self.current.update([byte]);
        }
        let previous = std::mem::replace(&mut self.current, Sha256::new());
        if !first {
            self.digests.push(previous.finalize().into());
        }
        if checkpoint.bits > 0
            && let Some(byte) = pending
        {
            self.current.update([byte]);
        }
    }

    fn finish(mut self) -> Vec<[u8; 32]> {
        if let Some(byte) = self.pending.take() {
            self.current.update([byte]);
        }
        self.digests.push(self.current.finalize().into());
        self.digests
    }
}

/// Builds the index of the gzip blob `blob` in one pass, with a checkpoint at the first deflate
/// block boundary past each `span_size` uncompressed bytes. `on_output` sees every
/// uncompressed byte in order (a tar reader builds the file table from them in the same pass).
pub fn build(
    mut blob: impl Read,
    span_size: u64,
    mut on_output: impl FnMut(&[u8]),
) -> Result<GzipIndex, ZinfoError> {
    let span_size = span_size.max(WINDOW as u64);
    let mut inflater = Inflater::new(Format::Gzip)?;
    let mut input = vec![0u8; 64 << 10];
    // The last WINDOW bytes of output, as a ring: `ring_at` is where the next byte goes.
    let mut ring = vec![0u8; WINDOW];
    let mut ring_at = 0usize;
    let mut output = vec![0u8; WINDOW];
    let mut compressed = 0u64;
    let mut uncompressed = 0u64;
    let mut last_checkpoint: Option<u64> = None;
    let mut checkpoints = Vec::new();
    let mut hasher = SpanHasher::new();
    let mut ended = false;
    while !ended {
        let read = blob.read(&mut input)?;
        if read == 0 {
            return Err(ZinfoError::Truncated(compressed));
        }
        let mut chunk = &input[..read];
        while !chunk.is_empty() || !ended {
            let (used_in, used_out, progress) = inflater.inflate(chunk, &mut output, true)?;
            hasher.feed(&chunk[..used_in]);
            chunk = &chunk[used_in..];
            compressed += used_in as u64;
            let produced = &output[..used_out];
            on_output(produced);
            uncompressed += used_out as u64;
            push_ring(&mut ring, &mut ring_at, produced);
            if progress == Progress::StreamEnd {
                ended = true;
                if !chunk.is_empty() {
                    return Err(ZinfoError::MultipleMembers(compressed));
                }
                break;
            }
            let due = last_checkpoint.is_none_or(|last| uncompressed - last >= span_size);
            if inflater.at_block_boundary() && due {
                let checkpoint = Checkpoint {
                    compressed,
                    bits: inflater.pending_bits(),
                    uncompressed,
                    window: ring_window(&ring, ring_at, uncompressed),
                };
                hasher.cut(&checkpoint, checkpoints.is_empty());
                last_checkpoint = Some(uncompressed);
                checkpoints.push(checkpoint);
            }
            if used_in == 0 && used_out == 0 {
                // It needs more input.
                break;
            }
        }
    }
    // Whatever follows the member in the blob must be nothing.
    let mut rest = [0u8; 1];
    if blob.read(&mut rest)? > 0 {
        return Err(ZinfoError::MultipleMembers(compressed));
    }
    if checkpoints.is_empty() {
        return Err(ZinfoError::Truncated(compressed));
    }
    Ok(GzipIndex {
        span_size,
        checkpoints,
        span_digests: hasher.finish(),
        compressed_size: compressed,
        uncompressed_size: uncompressed,
    })
}

fn push_ring(ring: &mut [u8], at: &mut usize, bytes: &[u8]) {
    let bytes = &bytes[bytes.len().saturating_sub(ring.len())..];
    let first = bytes.len().min(ring.len() - *at);
    ring[*at..*at + first].copy_from_slice(&bytes[..first]);
    ring[..bytes.len() - first].copy_from_slice(&bytes[first..]);
    *at = (*at + bytes.len()) % ring.len();
}

/// The ring's bytes in order, at most `produced` of them (the output so far).
fn ring_window(ring: &[u8], at: usize, produced: u64) -> Vec<u8> {
    let mut window = Vec::with_capacity(ring.len());
    window.extend_from_slice(&ring[at..]);
    window.extend_from_slice(&ring[..at]);
    let keep = (produced.min(ring.len() as u64)) as usize;
    window.split_off(window.len() - keep)
}

impl GzipIndex {
    /// Span `index`.
    pub fn span(&self, index: usize) -> Option<Span> {
        let start = self.checkpoints.get(index)?;
        let next = self.checkpoints.get(index + 1);
        Some(Span {
            index,
            compressed: start.first_byte()
                ..next.map_or(self.compressed_size, Checkpoint::first_byte),
            uncompressed: start.uncompressed
                ..next.map_or(self.uncompressed_size, |n| n.uncompressed),
        })
    }

    /// The spans holding uncompressed bytes `range`.
    pub fn spans_for(&self, range: Range<u64>) -> Result<Range<usize>, ZinfoError> {
        if range.start >= range.end || range.end > self.uncompressed_size {
            return Err(ZinfoError::OutOfRange(format!(
                "uncompressed bytes {range:?} of a {}-byte stream",
                self.uncompressed_size
            )));
        }
        let no_checkpoint =
            || ZinfoError::OutOfRange(format!("no checkpoint at or before offset {}", range.start));
        let first = self
            .checkpoints
            .partition_point(|c| c.uncompressed <= range.start)
            .checked_sub(1)
            .ok_or_else(no_checkpoint)?;
        let last = self
            .checkpoints
            .partition_point(|c| c.uncompressed < range.end)
            .checked_sub(1)
            .ok_or_else(no_checkpoint)?;
        Ok(first..last + 1)
    }

    /// Checks span `index`'s compressed bytes against its digest.
    pub fn verify_span(&self, index: usize, bytes: &[u8]) -> Result<(), ZinfoError> {
        let expected = self
            .span_digests
            .get(index)
            .ok_or_else(|| ZinfoError::OutOfRange(format!("no span {index}")))?;
        let actual: [u8; 32] = Sha256::digest(bytes).into();
        if &actual != expected {
            return Err(ZinfoError::SpanDigest {
                span: index,
                expected: hex(expected),
                actual: hex(&actual),
            });
        }
        Ok(())
    }

    /// Inflates uncompressed bytes `range` from `compressed`, the compressed bytes of spans
    /// `spans` (as [`Self::spans_for`] gave, fetched from the first span's start through the
    /// last's end), after checking each span's digest. Nothing unverified is inflated.
    pub fn extract(
        &self,
        spans: Range<usize>,
        compressed: &[u8],
        range: Range<u64>,
    ) -> Result<Vec<u8>, ZinfoError> {
        let fetched = self.compressed_range(spans.clone())?;
        let uncompressed = |index: usize| self.span(index).expect("in range").uncompressed;
        let (first, last) = (uncompressed(spans.start), uncompressed(spans.end - 1));
        if compressed.len() as u64 != fetched.end - fetched.start {
            return Err(ZinfoError::OutOfRange(format!(
                "{} compressed bytes given for spans {spans:?}, which are {fetched:?}",
                compressed.len()
            )));
        }
        if range.start < first.start || range.end > last.end {
            return Err(ZinfoError::OutOfRange(format!(
                "uncompressed bytes {range:?} are not in spans {spans:?}"
            )));
        }
        for index in spans.clone() {
            let span = self.span(index).expect("in range");
            let at = (span.compressed.start - fetched.start) as usize;
            let end = (span.compressed.end - fetched.start) as usize;
            self.verify_span(index, &compressed[at..end])?;
        }
        let checkpoint = &self.checkpoints[spans.start];
        let mut inflater = Inflater::new(Format::Raw)?;
        let mut input = compressed;
        if checkpoint.bits > 0 {
            let shared = input[0];
            inflater.prime(checkpoint.bits, shared >> (8 - checkpoint.bits))?;
            input = &input[1..];
        }
        inflater.set_dictionary(&checkpoint.window)?;
        let mut skip = range.start - checkpoint.uncompressed;
        let wanted = (range.end - range.start) as usize;
        let mut out = Vec::with_capacity(wanted);
        let mut buffer = vec![0u8; WINDOW];
        while out.len() < wanted {
            let (used_in, used_out, progress) = inflater.inflate(input, &mut buffer, false)?;
            input = &input[used_in..];
            let mut produced = &buffer[..used_out];
            let skipped = (skip as usize).min(produced.len());
            produced = &produced[skipped..];
            skip -= skipped as u64;
            let take = produced.len().min(wanted - out.len());
            out.extend_from_slice(&produced[..take]);
            if progress == Progress::StreamEnd || (used_in == 0 && used_out == 0) {
                break;
            }
        }
        if out.len() < wanted && spans.end < self.checkpoints.len() {
            return Err(ZinfoError::NeedsNextSpan(spans.end - 1));
        }
        if out.len() < wanted {
            return Err(ZinfoError::OutOfRange(format!(
                "the spans yielded {} of the {wanted} bytes asked for",
                out.len()
            )));
        }
        Ok(out)
    }
}

impl GzipIndex {
    /// The compressed bytes spans `spans` are fetched as.
    pub fn compressed_range(&self, spans: Range<usize>) -> Result<Range<u64>, ZinfoError> {
        let missing = || ZinfoError::OutOfRange(format!("no spans {spans:?}"));
        if spans.is_empty() {
            return Err(missing());
        }
        let first = self.span(spans.start).ok_or_else(missing)?;
        let last = self.span(spans.end.wrapping_sub(1)).ok_or_else(missing)?;
        Ok(first.compressed.start..last.compressed.end)
    }

    /// Uncompressed bytes `range`, fetching the compressed bytes of the spans that hold them
    /// with `fetch` (a range of the blob): once, or twice when the range ends in bits its last
    /// span shares with the next one. Every span is verified before it is inflated.
    pub fn read_range(
        &self,
        range: Range<u64>,
        mut fetch: impl FnMut(Range<u64>) -> std::io::Result<Vec<u8>>,
    ) -> Result<Vec<u8>, ZinfoError> {
        let spans = self.spans_for(range.clone())?;
        let bytes = fetch(self.compressed_range(spans.clone())?)?;
        match self.extract(spans.clone(), &bytes, range.clone()) {
            Err(ZinfoError::NeedsNextSpan(_)) => {
                let wider = spans.start..spans.end + 1;
                let bytes = fetch(self.compressed_range(wider.clone())?)?;
                self.extract(wider, &bytes, range)
            }
            other => other,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    /// Compressible but varied bytes: many deflate blocks, matches reaching back far.
    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if state.is_multiple_of(3) && out.len() > 1000 {
                // Repeat something from up to 30 KiB back.
                let back = (state as usize >> 8) % out.len().min(30_000) + 1;
                let from = out.len() - back;
                for i in 0..64 {
                    let byte = out[from + i % back];
                    out.push(byte);
                }
            } else {
                out.extend_from_slice(format!("line {} of {seed}\n", state % 1000).as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    fn gzip(bytes: &[u8], level: u32) -> Vec<u8> {
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// Extracts `range` as a lazy reader would, from the blob's bytes.
    fn fetch(index: &GzipIndex, blob: &[u8], range: Range<u64>) -> Vec<u8> {
        index
            .read_range(range.clone(), |bytes| {
                Ok(blob[bytes.start as usize..bytes.end as usize].to_vec())
            })
            .unwrap_or_else(|error| panic!("{range:?}: {error}"))
    }

    #[test]
    fn any_range_inflates_from_its_checkpoint_alone() {
        let mut primed = 0;
        for (level, seed) in [(1, 7), (6, 8), (9, 9)] {
            let original = data(3 << 20, seed);
            let blob = gzip(&original, level);
            let mut seen = Vec::new();
            let index =
                build(blob.as_slice(), 64 << 10, |out| seen.extend_from_slice(out)).unwrap();
            assert_eq!(seen, original, "the pass sees every byte in order");
            assert_eq!(index.uncompressed_size, original.len() as u64);
            assert_eq!(index.compressed_size, blob.len() as u64);
            // Checkpoints sit on block boundaries: as many as the encoder's blocks allow.
            assert!(
                index.checkpoints.len() >= 4,
                "level {level}: {} checkpoints",
                index.checkpoints.len()
            );
            primed += index.checkpoints.iter().filter(|c| c.bits > 0).count();
            assert_eq!(index.span_digests.len(), index.checkpoints.len());
            let len = original.len() as u64;
            let ranges = [
                0..1,
                0..4096,
                len - 1..len,
                len / 3..len / 3 + 200_000,
                100_000..2_900_000,
            ];
            for range in ranges {
                assert_eq!(
                    fetch(&index, &blob, range.clone()),
                    original[range.start as usize..range.end as usize],
                    "level {level}, range {range:?}"
                );
            }
            // Every checkpoint's span, on its own.
            for span in (0..index.checkpoints.len()).map(|i| index.span(i).unwrap()) {
                let got = fetch(&index, &blob, span.uncompressed.clone());
                assert_eq!(
                    got,
                    original[span.uncompressed.start as usize..span.uncompressed.end as usize]
                );
            }
        }
        assert!(
            primed > 0,
            "some blocks start mid-byte (priming is exercised)"
        );
    }

    #[test]
    fn gzip_from_the_gzip_tool_and_tiny_streams_index() {
        // Another encoder than flate2's: the system's gzip, when there is one.
        let original = data(1 << 20, 3);
        if let Ok(mut child) = std::process::Command::new("gzip")
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        {
            let mut stdin = child.stdin.take().unwrap();
            let input = original.clone();
            let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
            let output = child.wait_with_output().unwrap();
            writer.join().unwrap();
            let index = build(output.stdout.as_slice(), 64 << 10, |_| {}).unwrap();
            assert_eq!(
                fetch(&index, &output.stdout, 500_000..700_000),
                original[500_000..700_000]
            );
        }
        let tiny = gzip(b"x", 6);
        let index = build(tiny.as_slice(), DEFAULT_SPAN, |_| {}).unwrap();
        assert_eq!(index.checkpoints.len(), 1);
        assert_eq!(fetch(&index, &tiny, 0..1), b"x");
    }

    #[test]
    fn a_span_with_a_wrong_byte_is_refused_before_inflating() {
        let original = data(1 << 20, 5);
        let blob = gzip(&original, 6);
        let index = build(blob.as_slice(), 64 << 10, |_| {}).unwrap();
        let range = 300_000..300_100;
        let spans = index.spans_for(range.clone()).unwrap();
        let first = index.span(spans.start).unwrap();
        let last = index.span(spans.end - 1).unwrap();
        let mut bytes =
            blob[first.compressed.start as usize..last.compressed.end as usize].to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        let error = index
            .extract(spans.clone(), &bytes, range.clone())
            .unwrap_err();
        assert!(matches!(error, ZinfoError::SpanDigest { .. }), "{error}");
        // Too few bytes, and ranges outside the spans, are refused too.
        assert!(index.extract(spans.clone(), &bytes[1..], range).is_err());
        assert!(index.spans_for(0..index.uncompressed_size + 1).is_err());
        assert!(index.spans_for(5..5).is_err());
    }

    #[test]
    fn bad_blobs_are_errors_not_panics() {
        let blob = gzip(&data(200_000, 1), 6);
        assert!(matches!(
            build(&blob[..blob.len() / 2], DEFAULT_SPAN, |_| {}),
            Err(ZinfoError::Truncated(_))
        ));
        let mut two = blob.clone();
        two.extend_from_slice(&gzip(b"second", 6));
        assert!(matches!(
            build(two.as_slice(), DEFAULT_SPAN, |_| {}),
            Err(ZinfoError::MultipleMembers(_))
        ));
        let mut corrupt = blob.clone();
        corrupt[100] ^= 0xff;
        assert!(build(corrupt.as_slice(), DEFAULT_SPAN, |_| {}).is_err());
        assert!(build(&b"not gzip at all"[..], DEFAULT_SPAN, |_| {}).is_err());
        assert!(build(&b""[..], DEFAULT_SPAN, |_| {}).is_err());
    }
}
