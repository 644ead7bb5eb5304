//! Decoding: one chunk from its stored bytes (the lazy path, §3.4.4 step 5), or a whole layer
//! blob read front to back (the eager path, §3.1).

use std::cell::RefCell;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};
use zstd::zstd_safe::{self, DCtx, zstd_sys::ZSTD_ErrorCode};

use super::error::ChunkedError;
use super::frame::{self, DATA_MAGIC};
use super::hashing::HashingWriter;
use super::index::ChunkIndex;
use super::media::ChunkCompression;
use crate::reference::Digest;

/// Largest zstd window the eager decoder accepts (128 MiB, zstd's default limit): a frame header
/// asking for more would make the streaming decoder allocate it.
const WINDOW_LOG_MAX: u32 = 27;
/// Read size of the eager decoder.
const COPY_BUFFER: usize = 64 << 10;

impl ChunkIndex {
    /// Verifies `stored` (the chunk's bytes exactly as in the blob) against the entry's
    /// checksum, then decodes it into `out`, whose length must equal the chunk's uncompressed
    /// length. Refuses: checksum mismatch, wrong stored length, a frame that decodes to more or
    /// fewer bytes, more than one frame / trailing bytes, any zstd error. Never allocates more
    /// than out.len() for the decoded data (a lying frame must not make it allocate gigabytes).
    ///
    /// Only the last chunk's frame may be followed by skippable frames: its stored bytes run to
    /// the index section, and producers may pad there (§3.4.3).
    ///
    /// The checksum is checked before anything is written to `out`; after any other error `out`
    /// may hold part of the chunk and must not be used.
    pub fn decode_chunk_into(
        &self,
        chunk: usize,
        stored: &[u8],
        out: &mut [u8],
    ) -> Result<(), ChunkedError> {
        if chunk >= self.len() {
            return Err(ChunkedError::NoSuchChunk {
                chunk,
                count: self.len(),
            });
        }
        let data = self.uncompressed_range(chunk);
        let expected = data.end - data.start;
        if out.len() as u64 != expected {
            return Err(ChunkedError::OutputLength {
                chunk,
                expected,
                actual: out.len() as u64,
            });
        }
        let blob = self.blob_range(chunk);
        if stored.len() as u64 != blob.end - blob.start {
            return Err(ChunkedError::StoredLength {
                chunk,
                expected: blob.end - blob.start,
                actual: stored.len() as u64,
            });
        }
        if let Some(checksum) = &self.entries()[chunk].checksum
            && Sha256::digest(stored).as_slice() != checksum
        {
            return Err(ChunkedError::ChecksumMismatch(chunk));
        }
        match self.compression() {
            // A raw chunk's stored length is its uncompressed length (checked at parse).
            ChunkCompression::None => out.copy_from_slice(stored),
            ChunkCompression::Zstd => decode_frame(chunk, stored, out, chunk + 1 == self.len())?,
        }
        Ok(())
    }
}

/// Decodes the single data frame `stored` holds into `out`, which must come out exactly full.
/// The one-shot decoder writes straight into `out` and keeps no window of its own, so what a
/// frame header claims cannot make it allocate.
fn decode_frame(
    chunk: usize,
    stored: &[u8],
    out: &mut [u8],
    last: bool,
) -> Result<(), ChunkedError> {
    let zstd_error = |code| ChunkedError::Zstd {
        chunk,
        reason: zstd_safe::get_error_name(code),
    };
    match frame::le_u32(stored, 0) {
        Some(DATA_MAGIC) => {}
        Some(magic) => return Err(ChunkedError::NotADataFrame { chunk, magic }),
        None => {
            return Err(ChunkedError::Zstd {
                chunk,
                reason: "shorter than a frame's magic number",
            });
        }
    }
    let frame_len = zstd_safe::find_frame_compressed_size(stored).map_err(zstd_error)?;
    let (frame, rest) = stored.split_at(frame_len.min(stored.len()));
    let only_padding_after = rest.is_empty() || (last && frame::only_skippable_frames(rest));
    if !only_padding_after {
        return Err(ChunkedError::TrailingBytes {
            chunk,
            extra: rest.len() as u64,
        });
    }
    let expected = out.len() as u64;
    match zstd_safe::get_frame_content_size(frame) {
        Ok(Some(declared)) if declared != expected => {
            return Err(ChunkedError::FrameContentSize {
                chunk,
                declared,
                expected,
            });
        }
        Ok(_) => {}
        Err(_) => {
            return Err(ChunkedError::Zstd {
                chunk,
                reason: "corrupt frame header",
            });
        }
    }
    // A context per thread: creating one costs more than decoding a small chunk.
    thread_local! {
        static DECODER: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
    }
    let dst_too_small = (ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall as usize).wrapping_neg();
    let decoded = DECODER.with_borrow_mut(|decoder| {
        if decoder.is_none() {
            *decoder = DCtx::try_create();
        }
        let Some(decoder) = decoder.as_mut() else {
            return Err(ChunkedError::Zstd {
                chunk,
                reason: "cannot allocate a decoder",
            });
        };
        decoder.decompress(out, frame).map_err(|code| {
            if code == dst_too_small {
                ChunkedError::ChunkTooLong { chunk, expected }
            } else {
                zstd_error(code)
            }
        })
    })?;
    if decoded as u64 != expected {
        return Err(ChunkedError::ChunkTooShort {
            chunk,
            decoded: decoded as u64,
            expected,
        });
    }
    Ok(())
}

/// Counts the bytes read and remembers whether the source itself failed, so a failure can be
/// blamed on the input or on the stream's content.
struct SourceReader<R> {
    inner: R,
    read: u64,
    failed: bool,
}

impl<R: Read> Read for SourceReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.read += n as u64;
                Ok(n)
            }
            Err(error) => {
                self.failed = error.kind() != io::ErrorKind::Interrupted;
                Err(error)
            }
        }
    }
}

/// Why a capped copy stopped.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
    Cap,
}

/// Copies `from` to `to` until end of stream; fails rather than write more than `cap` bytes.
fn copy_capped(from: &mut dyn Read, to: &mut dyn Write, cap: u64) -> Result<u64, CopyError> {
    let mut buffer = vec![0u8; COPY_BUFFER];
    let mut copied = 0u64;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(CopyError::Read(error)),
        };
        if copied + n as u64 > cap {
            return Err(CopyError::Cap);
        }
        to.write_all(&buffer[..n]).map_err(CopyError::Write)?;
        copied += n as u64;
    }
}

/// Decodes a whole layer blob read sequentially (the eager path): the zstd frames in order
/// (skippable frames skipped) into `out`, with a cap on the output size; returns bytes written
/// and the SHA-256 of the output. For raw layers, the image is the bytes before the index
/// section (callers pass the index location when known).
///
/// `image_len` is the blob offset where the image data ends, i.e. the index section's start
/// when the layer has one: a raw image is that many bytes, a zstd image the frames before it
/// (which must end there). The blob is read to its end either way, so a reader wrapped around
/// `blob` to check the layer's digest sees every byte. The returned digest is the DiffID of a
/// zstd layer; a raw layer's DiffID is the digest of the whole blob (§5.2), which is the
/// returned one only when the blob has no index.
pub fn decode_whole_layer<R: Read, W: Write>(
    blob: R,
    out: W,
    kind: ChunkCompression,
    image_len: Option<u64>,
    max_output: u64,
) -> Result<(u64, Digest), ChunkedError> {
    let mut source = SourceReader {
        inner: blob,
        read: 0,
        failed: false,
    };
    let mut sink = HashingWriter::new(out);
    let limit = image_len.unwrap_or(u64::MAX);
    let copy = match kind {
        ChunkCompression::None => {
            if limit != u64::MAX && limit > max_output {
                return Err(ChunkedError::OutputTooLarge(max_output));
            }
            copy_capped(&mut (&mut source).take(limit), &mut sink, max_output)
        }
        // No frames before the index: the zstd decoder would call nothing at all an incomplete
        // frame.
        ChunkCompression::Zstd if limit == 0 => Ok(0),
        ChunkCompression::Zstd => {
            let stream = |source| ChunkedError::Stream { offset: 0, source };
            let mut decoder =
                zstd::stream::read::Decoder::new((&mut source).take(limit)).map_err(stream)?;
            decoder.window_log_max(WINDOW_LOG_MAX).map_err(stream)?;
            copy_capped(&mut decoder, &mut sink, max_output)
        }
    };
    copy.map_err(|error| match error {
        CopyError::Read(error) if source.failed || kind == ChunkCompression::None => {
            ChunkedError::Input(error)
        }
        CopyError::Read(error) => ChunkedError::Stream {
            offset: source.read,
            source: error,
        },
        CopyError::Write(error) => ChunkedError::Output(error),
        CopyError::Cap => ChunkedError::OutputTooLarge(max_output),
    })?;
    if image_len.is_some_and(|len| source.read < len) {
        return Err(ChunkedError::TruncatedBlob {
            read: source.read,
            expected: limit,
        });
    }
    io::copy(&mut source, &mut io::sink()).map_err(ChunkedError::Input)?;
    let (digest, written) = sink.finish().map_err(ChunkedError::Output)?;
    Ok((written, digest))
}
