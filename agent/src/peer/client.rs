//! One range request to a peer agent. Timeouts are short (DESIGN §6): a peer is one more
//! mirror, and a slow one must cost a guest's read little before the next source is asked.

use std::ops::Range;
use std::time::Duration;

use gantry_oci::Digest;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_RANGE, RANGE};

use super::{PEER_HEADER, PEER_REPOSITORY, PeerError, PeerToken};

/// Longest wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest wait for a peer's response headers.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest pause inside a response body before the transfer counts as stalled.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(1);

/// How a range request to a peer ended, when it did not deliver every byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The peer does not hold the bytes (404): not the peer's fault.
    #[error("not held")]
    NotHeld,
    /// The peer failed; bytes that arrived before stay in the buffer.
    #[error("{0}")]
    Failed(String),
}

/// An HTTP client for peers, with the shared token.
#[derive(Debug, Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    token: Option<PeerToken>,
}

impl PeerClient {
    /// A client presenting `token`.
    pub fn new(token: Option<PeerToken>) -> Result<PeerClient, PeerError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|error| PeerError::Client(error.to_string()))?;
        Ok(PeerClient { http, token })
    }

    /// The URL of blob `digest` at the peer `base`.
    pub fn blob_url(base: &str, digest: &Digest) -> String {
        format!("{base}/v2/{PEER_REPOSITORY}/blobs/{digest}")
    }

    /// Reads `range` of blob `digest` from the peer at `base`, appending to `into` as bytes
    /// arrive (unverified). On failure what arrived stays appended.
    pub async fn read_range(
        &self,
        base: &str,
        digest: &Digest,
        range: Range<u64>,
        into: &mut Vec<u8>,
    ) -> Result<(), ReadError> {
        let expected = range.end.saturating_sub(range.start);
        if expected == 0 {
            return Ok(());
        }
        let mut request = self
            .http
            .get(Self::blob_url(base, digest))
            .header(RANGE, format!("bytes={}-{}", range.start, range.end - 1))
            .header(PEER_HEADER, "1");
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, token.header_value());
        }
        let mut response = match tokio::time::timeout(FIRST_BYTE_TIMEOUT, request.send()).await {
            Err(_) => {
                return Err(ReadError::Failed(format!(
                    "no response within {FIRST_BYTE_TIMEOUT:?}"
                )));
            }
            Ok(Err(error)) if error.is_connect() => {
                return Err(ReadError::Failed(format!("cannot connect: {error}")));
            }
            Ok(Err(error)) => return Err(ReadError::Failed(error.to_string())),
            Ok(Ok(response)) => response,
        };
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::NOT_FOUND => return Err(ReadError::NotHeld),
            StatusCode::UNAUTHORIZED => {
                return Err(ReadError::Failed("the peer refused our token (401)".into()));
            }
            status => return Err(ReadError::Failed(format!("answered {status}"))),
        }
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if !content_range_matches(content_range, &range) {
            return Err(ReadError::Failed(format!(
                "answered Content-Range {content_range:?} for bytes {}..{}",
                range.start, range.end
            )));
        }
        let mut got = 0u64;
        loop {
            let piece = match tokio::time::timeout(STALL_TIMEOUT, response.chunk()).await {
                Err(_) => {
                    return Err(ReadError::Failed(format!(
                        "stalled after {got} of {expected} bytes"
                    )));
                }
                Ok(Err(error)) => {
                    return Err(ReadError::Failed(format!(
                        "broke off after {got} of {expected} bytes: {error}"
                    )));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(piece))) => piece,
            };
            let room = usize::try_from(expected - got).unwrap_or(usize::MAX);
            if piece.len() > room {
                into.extend_from_slice(&piece[..room]);
                return Err(ReadError::Failed(format!(
                    "sent more than the {expected} bytes asked for"
                )));
            }
            into.extend_from_slice(&piece);
            got += piece.len() as u64;
        }
        if got != expected {
            return Err(ReadError::Failed(format!(
                "ended after {got} of {expected} bytes"
            )));
        }
        Ok(())
    }
}

/// Whether `value` (`bytes S-E/N`) names exactly `range`.
fn content_range_matches(value: &str, range: &Range<u64>) -> bool {
    let Some(spec) = value.strip_prefix("bytes ") else {
        return false;
    };
    let Some((span, _total)) = spec.split_once('/') else {
        return false;
    };
    let Some((start, end)) = span.split_once('-') else {
        return false;
    };
    start.parse::<u64>().ok() == Some(range.start) && end.parse::<u64>().ok() == Some(range.end - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_must_name_the_bytes_asked_for() {
        assert!(content_range_matches("bytes 10-19/100", &(10..20)));
        assert!(content_range_matches("bytes 10-19/*", &(10..20)));
        assert!(!content_range_matches("bytes 0-19/100", &(10..20)));
        assert!(!content_range_matches("bytes 10-20/100", &(10..20)));
        assert!(!content_range_matches("10-19/100", &(10..20)));
        assert!(!content_range_matches("", &(10..20)));
    }
}
