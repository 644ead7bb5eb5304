//! Layer stream decompression: detect the format by its magic bytes, decode, and cap the
//! decoded size so a decompression bomb ends in an error instead of filling the disk.

use std::cell::Cell;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::rc::Rc;

/// Compression of a layer stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`).
    Gzip,
    /// Zstandard (`application/vnd.oci.image.layer.v1.tar+zstd`).
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "tar",
            Compression::Gzip => "tar+gzip",
            Compression::Zstd => "tar+zstd",
        })
    }
}

/// Errors before any tar entry is read.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    /// Reading the first bytes failed.
    #[error("reading the layer's first bytes: {0}")]
    Io(#[from] io::Error),
    /// A compression Gantry does not decode.
    #[error("unsupported layer compression: {0} (expected tar, gzip or zstd)")]
    Unsupported(&'static str),
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
const BZIP2_MAGIC: [u8; 3] = *b"BZh";

/// Largest zstd window accepted (128 MiB, zstd's default limit): it bounds decoder memory.
const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Identifies the compression from the first bytes of a stream.
pub fn detect(prefix: &[u8]) -> Result<Compression, CompressionError> {
    if prefix.starts_with(&GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else if prefix.starts_with(&ZSTD_MAGIC) || is_zstd_skippable(prefix) {
        Ok(Compression::Zstd)
    } else if prefix.starts_with(&XZ_MAGIC) {
        Err(CompressionError::Unsupported("xz"))
    } else if prefix.starts_with(&BZIP2_MAGIC) {
        Err(CompressionError::Unsupported("bzip2"))
    } else {
        Ok(Compression::None)
    }
}

/// Zstd skippable frames (magic 0x184D2A50..=0x184D2A5F) may precede data frames.
fn is_zstd_skippable(prefix: &[u8]) -> bool {
    prefix.len() >= 4 && prefix[0] & 0xf0 == 0x50 && prefix[1..4] == [0x2a, 0x4d, 0x18]
}

/// Opens a decoder for `input` after sniffing its magic bytes.
pub fn decoder<'a>(
    input: impl Read + 'a,
) -> Result<(Compression, Box<dyn Read + 'a>), CompressionError> {
    let mut input = BufReader::with_capacity(1 << 16, input);
    // fill_buf may return fewer bytes than a magic number from a pipe; pull until we have 8
    // bytes or the stream ends, without consuming them.
    let mut prefix = Vec::with_capacity(8);
    loop {
        let available = input.fill_buf()?;
        if available.is_empty() {
            break;
        }
        let take = available.len().min(8 - prefix.len());
        prefix.extend_from_slice(&available[..take]);
        input.consume(take);
        if prefix.len() == 8 {
            break;
        }
    }
    let compression = detect(&prefix)?;
    let stream = io::Cursor::new(prefix).chain(input);
    let reader: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(stream),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Compression::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(stream)?;
            decoder.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(decoder)
        }
    };
    Ok((compression, reader))
}

/// The decoded stream grew past the configured cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the uncompressed layer exceeds the cap of {cap} bytes")]
pub struct SizeCapExceeded {
    /// The cap.
    pub cap: u64,
}

/// Counters shared between a [`CappedReader`] and whoever reports progress.
#[derive(Debug)]
pub struct ReadLimits {
    total: Cell<u64>,
    cap: u64,
}

impl ReadLimits {
    /// Bytes read so far.
    pub fn total(&self) -> u64 {
        self.total.get()
    }

    /// The size cap.
    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// A reader that fails once more than `cap` bytes went through it.
#[derive(Debug)]
pub struct CappedReader<R> {
    inner: R,
    limits: Rc<ReadLimits>,
}

impl<R: Read> CappedReader<R> {
    /// Wraps `inner`; the returned limits are shared with the reader.
    pub fn new(inner: R, cap: u64) -> (Self, Rc<ReadLimits>) {
        let limits = Rc::new(ReadLimits {
            total: Cell::new(0),
            cap,
        });
        (
            CappedReader {
                inner,
                limits: Rc::clone(&limits),
            },
            limits,
        )
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limits = &self.limits;
        // Read at most one byte past the cap, to tell "exactly at the cap" from "over it".
        let room = limits
            .cap
            .saturating_sub(limits.total.get())
            .saturating_add(1);
        let len = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        let total = limits.total.get() + n as u64;
        limits.total.set(total);
        if total > limits.cap {
            return Err(io::Error::other(SizeCapExceeded { cap: limits.cap }));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn decode_all(bytes: &[u8]) -> (Compression, Vec<u8>) {
        let (compression, mut reader) = decoder(bytes).expect("decoder");
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("decode");
        (compression, out)
    }

    #[test]
    fn detects_and_decodes_each_format() {
        let data = b"hello layer".repeat(100);
        assert_eq!(decode_all(&data), (Compression::None, data.clone()));

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        assert_eq!(
            decode_all(&gz.finish().unwrap()),
            (Compression::Gzip, data.clone())
        );

        let zst = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(decode_all(&zst), (Compression::Zstd, data.clone()));

        assert_eq!(decode_all(b""), (Compression::None, Vec::new()));
        assert_eq!(decode_all(b"\x1f"), (Compression::None, b"\x1f".to_vec()));
    }

    #[test]
    fn rejects_xz_and_bzip2() {
        assert!(matches!(
            detect(&XZ_MAGIC),
            Err(CompressionError::Unsupported("xz"))
        ));
        assert!(matches!(
            detect(b"BZh91AY"),
            Err(CompressionError::Unsupported("bzip2"))
        ));
    }

    #[test]
    fn truncated_gzip_is_an_error() {
        let data = vec![7u8; 100_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&data).unwrap();
        let bytes = gz.finish().unwrap();
        let (_, mut reader) = decoder(&bytes[..bytes.len() / 2]).unwrap();
        assert!(reader.read_to_end(&mut Vec::new()).is_err());
    }

    #[test]
    fn cap_allows_exactly_cap_bytes() {
        let data = vec![1u8; 1000];
        let (mut reader, limits) = CappedReader::new(&data[..], 1000);
        assert_eq!(reader.read_to_end(&mut Vec::new()).unwrap(), 1000);
        assert_eq!(limits.total(), 1000);

        let (mut reader, _) = CappedReader::new(&data[..], 999);
        let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.get_ref().unwrap().is::<SizeCapExceeded>());
    }
}
