//! A `tokio_util` codec for frames, for async peers.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{
    FRAME_HEADER_LEN, FrameError, MAX_FRAME_LEN_CAP, decode_payload, encode_frame, parse_header,
};
use crate::messages::Message;

/// Splits a byte stream into [`Message`]s and back.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_len: u32,
}

impl FrameCodec {
    /// A codec refusing payloads over `max_len` bytes (clamped to 16 MiB).
    pub fn new(max_len: u32) -> Self {
        Self {
            max_len: max_len.min(MAX_FRAME_LEN_CAP),
        }
    }

    /// The payload limit in force.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(crate::frame::DEFAULT_MAX_FRAME_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        let Some(header) = src.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut header_bytes = [0u8; FRAME_HEADER_LEN];
        header_bytes.copy_from_slice(header);
        let len = parse_header(header_bytes, self.max_len)?;
        // Wait for the payload without reserving `len` up front: the framed reader grows the
        // buffer in its own small steps as bytes arrive.
        if src.len() - FRAME_HEADER_LEN < len {
            return Ok(None);
        }
        src.advance(FRAME_HEADER_LEN);
        let payload = src.split_to(len);
        decode_payload(&payload).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
        match self.decode(src)? {
            Some(message) => Ok(Some(message)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = match src.get(..FRAME_HEADER_LEN) {
                    Some(header) => {
                        let mut bytes = [0u8; FRAME_HEADER_LEN];
                        bytes.copy_from_slice(header);
                        FRAME_HEADER_LEN + u32::from_le_bytes(bytes) as usize
                    }
                    None => FRAME_HEADER_LEN,
                };
                let got = src.len();
                src.clear();
                Err(FrameError::Truncated { expected, got })
            }
        }
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&message, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, message: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
        let frame = encode_frame(message, self.max_len)?;
        dst.put_slice(&frame);
        Ok(())
    }
}
