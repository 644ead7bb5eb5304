//! The property the frame-decoding fuzz target checks, shared with the corpus regression test.
//!
//! For any bytes: the blocking reader and the tokio codec agree frame by frame, neither panics, and
//! every message that decodes re-encodes to exactly the payload it came from (the encoding is
//! canonical, so a frame has one meaning).

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

/// Decodes `data` with both decoders, panicking only if they disagree or the encoding is not
/// canonical. Returns the (common) outcome.
pub fn check_frame_bytes(data: &[u8]) -> Outcome {
    let blocking = decode_blocking(data);
    let framed = decode_codec(data);
    assert_eq!(blocking, framed, "blocking reader and tokio codec disagree");
    let mut offset = 0;
    for message in &blocking.messages {
        let frame =
            encode_frame(message, DEFAULT_MAX_FRAME_LEN).expect("a decoded message encodes");
        let original = &data[offset..offset + frame.len()];
        assert_eq!(frame, original, "re-encoding changed the frame");
        offset += frame.len();
    }
    assert!(offset <= data.len());
    blocking
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
