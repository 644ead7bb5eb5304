//! Frames: a `u32` little-endian payload length, then a bincode 2 payload.
//!
//! Decoding never trusts the claimed length: a length over the limit is refused before anything is
//! read, and a payload is read incrementally, so memory grows with bytes that actually arrived.

use std::io::{self, Read, Write};

use bincode::config::{self, Configuration, Fixint, LittleEndian, NoLimit};

use crate::messages::Message;

/// Bytes in a frame header (the payload length).
pub const FRAME_HEADER_LEN: usize = 4;

/// The default limit on a frame's payload.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 4 << 20;

/// The largest payload limit a codec accepts; larger requested limits are clamped to it.
pub const MAX_FRAME_LEN_CAP: u32 = 16 << 20;

/// Errors reading, writing or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(#[from] io::Error),
    /// The header claims a payload larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Claimed payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needed (header or payload).
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The payload is not a valid message.
    #[error("payload does not decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The payload decoded but bytes were left over.
    #[error("payload has {extra} trailing bytes after the message")]
    TrailingBytes {
        /// Bytes after the message.
        extra: usize,
    },
    /// The message could not be encoded.
    #[error("message does not encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn base_config() -> Configuration<LittleEndian, Fixint, NoLimit> {
    config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Decodes with a bincode claim limit of `LIMIT` bytes: no string or vector inside may claim more.
fn decode_limited<const LIMIT: usize>(
    payload: &[u8],
) -> Result<(Message, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(payload, base_config().with_limit::<LIMIT>())
}

/// Decodes one payload (without its header) into a message.
///
/// A payload of `n` bytes can legitimately hold at most `n` bytes of strings and vectors, so the
/// claim limit is the smallest bucket that holds `n`: a hostile inner length cannot make the decoder
/// allocate much more than the payload itself.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    let (message, used) = match payload.len() {
        0..=4096 => decode_limited::<4096>(payload)?,
        4097..=65536 => decode_limited::<65536>(payload)?,
        65537..=1048576 => decode_limited::<1048576>(payload)?,
        _ => decode_limited::<{ MAX_FRAME_LEN_CAP as usize }>(payload)?,
    };
    if used != payload.len() {
        return Err(FrameError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(message)
}

/// Encodes a message as a complete frame (header and payload).
pub fn encode_frame(message: &Message, max_len: u32) -> Result<Vec<u8>, FrameError> {
    let max_len = max_len.min(MAX_FRAME_LEN_CAP);
    let mut frame = vec![0u8; FRAME_HEADER_LEN];
    bincode::serde::encode_into_std_write(message, &mut frame, base_config())?;
    let payload_len = frame.len() - FRAME_HEADER_LEN;
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|len| *len <= max_len)
        .ok_or(FrameError::TooLarge {
            len: payload_len as u64,
            max: max_len,
        })?;
    frame[..FRAME_HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Parses a frame header, refusing a length over `max_len`.
pub(crate) fn parse_header(
    header: [u8; FRAME_HEADER_LEN],
    max_len: u32,
) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    let max = max_len.min(MAX_FRAME_LEN_CAP);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    // A u32 always fits in usize on the 32- and 64-bit targets Gantry builds for.
    Ok(len as usize)
}

/// Reads one frame from a blocking reader. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<R: Read>(reader: &mut R, max_len: u32) -> Result<Option<Message>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut filled = 0;
    while filled < FRAME_HEADER_LEN {
        match reader.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    expected: FRAME_HEADER_LEN,
                    got: filled,
                });
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = parse_header(header, max_len)?;
    // `take` + `read_to_end` grows the buffer as bytes arrive instead of trusting `len` up front.
    let mut payload = Vec::new();
    reader.take(len as u64).read_to_end(&mut payload)?;
    if payload.len() != len {
        return Err(FrameError::Truncated {
            expected: len,
            got: payload.len(),
        });
    }
    decode_payload(&payload).map(Some)
}

/// Writes one frame to a blocking writer and flushes it.
pub fn write_frame<W: Write>(
    writer: &mut W,
    message: &Message,
    max_len: u32,
) -> Result<(), FrameError> {
    let frame = encode_frame(message, max_len)?;
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}
