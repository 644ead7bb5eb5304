//! Reading the API's streamed answers: NDJSON lines (`run`) and log records (`logs`).

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::records::{LogItem, MAX_RECORD, decode_record};

/// Errors reading a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection failed.
    #[error("reading the agent's answer: {0}")]
    Http(#[from] hyper::Error),
    /// The bytes are not what the API sends.
    #[error("malformed answer from the agent: {0}")]
    Malformed(String),
}

/// Buffers a streamed body and cuts it into lines or records.
#[derive(Debug)]
pub struct BodyStream {
    body: Incoming,
    buffer: BytesMut,
    ended: bool,
}

impl BodyStream {
    /// Reads `body`.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            buffer: BytesMut::new(),
            ended: false,
        }
    }

    /// Reads more bytes; false at the end of the body.
    async fn fill(&mut self) -> Result<bool, StreamError> {
        while !self.ended {
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buffer.extend_from_slice(&data);
                        return Ok(true);
                    }
                }
                None => self.ended = true,
            }
        }
        Ok(false)
    }

    /// The next line (without its newline), or `None` at the end.
    pub async fn line(&mut self) -> Result<Option<Vec<u8>>, StreamError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                return Ok(Some(line[..end].to_vec()));
            }
            if !self.fill().await? {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Ok(Some(self.buffer.split().to_vec()));
            }
        }
    }

    /// The next log record, or `None` at the end.
    pub async fn record(&mut self) -> Result<Option<LogItem>, StreamError> {
        loop {
            if self.buffer.len() >= 5 {
                let len = u32::from_le_bytes([
                    self.buffer[1],
                    self.buffer[2],
                    self.buffer[3],
                    self.buffer[4],
                ]);
                if len > MAX_RECORD {
                    return Err(StreamError::Malformed(format!("record of {len} bytes")));
                }
                if self.buffer.len() >= 5 + len as usize {
                    let kind = self.buffer[0];
                    self.buffer.advance(5);
                    let data = self.buffer.split_to(len as usize).to_vec();
                    return decode_record(kind, data)
                        .map(Some)
                        .map_err(|err| StreamError::Malformed(err.to_string()));
                }
            }
            if !self.fill().await? {
                if self.buffer.is_empty() {
                    return Ok(None);
                }
                return Err(StreamError::Malformed(
                    "the stream ended inside a record".into(),
                ));
            }
        }
    }
}
