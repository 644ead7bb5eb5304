//! The property the frame-decoding fuzz target checks, shared with the corpus regression test.
//!
//! For any bytes: the blocking reader and the tokio codec agree frame by frame, neither panics, and
//! every message that decodes re-encodes to exactly the payload it came from (the encoding is
//! canonical, so a frame has one meaning). The check reports a violation as a value; only the
//! fuzz target panics on it.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

use crate::codec::FrameCodec;
use crate::frame::{DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, encode_frame, read_frame};
use crate::messages::Message;

/// How a stream of bytes decoded: the messages, then how it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Messages decoded before the end or the first error.
    pub messages: Vec<Message>,
    /// True when the stream ended cleanly between frames.
    pub clean_end: bool,
}

/// A violated property: the fuzz target turns it into a crash, tests into a failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

/// Decodes `data` with both decoders; returns the (common) outcome, or the [`Violation`] if
/// they disagree or the encoding is not canonical. Never panics, whatever `data` is: the
/// caller decides what a violation means.
pub fn check_frame_bytes(data: &[u8]) -> Result<Outcome, Violation> {
    let blocking = decode_blocking(data);
    let framed = decode_codec(data);
    if blocking != framed {
        return Err(Violation(format!(
            "blocking reader and tokio codec disagree: {blocking:?} vs {framed:?}"
        )));
    }
    let mut offset = 0;
    for message in &blocking.messages {
        let frame = encode_frame(message, DEFAULT_MAX_FRAME_LEN)
            .map_err(|err| Violation(format!("a decoded message does not encode: {err}")))?;
        let original = data.get(offset..offset + frame.len());
        if original != Some(&frame[..]) {
            return Err(Violation(format!(
                "re-encoding changed the frame at byte {offset}"
            )));
        }
        offset += frame.len();
    }
    Ok(blocking)
}

fn decode_blocking(data: &[u8]) -> Outcome {
    let mut cursor = std::io::Cursor::new(data);
    let mut messages = Vec::new();
    loop {
        match read_frame(&mut cursor, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some(message)) => messages.push(message),
            Ok(None) => {
                return Outcome {
                    messages,
                    clean_end: true,
                };
            }
            Err(_) => {
                return Outcome {
                    messages,
                    clean_end: false,
                };
            }
        }
    }
}

fn decode_codec(data: &[u8]) -> Outcome {
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
    let mut messages = Vec::new();
    // Feed in small pieces, as a socket would, to exercise partial frames.
    let mut buffer = BytesMut::new();
    for piece in data.chunks(FRAME_HEADER_LEN + 3) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(message)) => messages.push(message),
                Ok(None) => break,
                Err(_) => {
                    return Outcome {
                        messages,
                        clean_end: false,
                    };
                }
            }
        }
    }
    match codec.decode_eof(&mut buffer) {
        Ok(None) => Outcome {
            messages,
            clean_end: true,
        },
        Ok(Some(_)) | Err(_) => Outcome {
            messages,
            clean_end: false,
        },
    }
}
