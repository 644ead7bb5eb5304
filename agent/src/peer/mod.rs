//! The peer cache (DESIGN §6): agents on other cards serve each other verified chunks before
//! the remote registry.
//!
//! - `server`: this agent's peer endpoint, a read-only subset of the OCI distribution API over
//!   what its cache holds durably (a chunk's bytes once its bit is set; manifests and configs
//!   by digest). Anything else is a 404 at once: it never waits, never asks upstream.
//! - `client`: one range request to a peer, with short timeouts, keeping what arrived when the
//!   transfer breaks (the fetcher resumes from the next source at that byte).
//! - `routes`: the peers as the fetcher sees them ([`PeerRoutes`](crate::lazy::origin::PeerRoutes)):
//!   health and backoff, and rendezvous hashing of a chunk's checksum to pick who is asked
//!   first and who fetches it from the registry.
//! - this module: the settings and the shared token.
//!
//! Imports point one way: `server` → `routes` → `client` → this module.

pub mod client;
pub mod routes;
pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The header every peer request carries: a peer never forwards a request, and one carrying
/// it is known to come from an agent (for logs; the token is what authenticates).
pub const PEER_HEADER: &str = "x-gantry-peer";
/// The repository name peer requests use: peers serve by digest alone (the cache is
/// content-addressed; which tenant may use an image is checked on the VM side).
pub const PEER_REPOSITORY: &str = "gantry/cache";
/// Shortest token accepted.
const MIN_TOKEN_LEN: usize = 16;
/// Longest token file read.
const MAX_TOKEN_LEN: usize = 4096;

/// Errors of the peer settings and endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The token file could not be read.
    #[error("peer token file {path}: {source}")]
    TokenRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token file's content is unusable.
    #[error("peer token file {path}: {reason}")]
    TokenInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The settings contradict each other.
    #[error("peer settings: {0}")]
    Invalid(String),
    /// The endpoint's address could not be bound.
    #[error("peer endpoint {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("peer client: {0}")]
    Client(String),
}

/// The shared secret agents present to each other (`Authorization: Bearer …`).
#[derive(Clone)]
pub struct PeerToken(String);

impl std::fmt::Debug for PeerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerToken(…)")
    }
}

impl PeerToken {
    /// Reads the token from `path`: one line of at least 16 visible ASCII characters (what
    /// fits an HTTP header unescaped), surrounding whitespace ignored.
    pub fn load(path: &Path) -> Result<PeerToken, PeerError> {
        let read_error = |source| PeerError::TokenRead {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        if metadata.len() > MAX_TOKEN_LEN as u64 {
            return Err(PeerError::TokenInvalid {
                path: path.to_owned(),
                reason: format!("longer than {MAX_TOKEN_LEN} bytes"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        PeerToken::parse(&text).map_err(|reason| PeerError::TokenInvalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Checks a token's text.
    pub fn parse(text: &str) -> Result<PeerToken, String> {
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!("a token has at least {MIN_TOKEN_LEN} characters"));
        }
        if !token.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err("a token is visible ASCII characters only".into());
        }
        Ok(PeerToken(token.to_string()))
    }

    /// The `Authorization` header value.
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether `header` (an `Authorization` value) carries this token. Compares in time that
    /// does not depend on where the first difference is.
    pub fn accepts(&self, header: &[u8]) -> bool {
        let Some(presented) = header.strip_prefix(b"Bearer ") else {
            return false;
        };
        let expected = self.0.as_bytes();
        presented.len() == expected.len()
            && presented
                .iter()
                .zip(expected)
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    }
}

/// A peer's base URL, normalized (no trailing `/`), checked to be `http://` or `https://`.
pub fn normalize_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("peer URL {url:?} is not http:// or https://"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "peer URL {url:?} is not a scheme and a host[:port]"
        ));
    }
    Ok(url.to_string())
}

/// The peer settings of `agent.toml`, checked: the endpoint, this agent's own URL (how the
/// others name it), the token and the peers.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// Where this agent's peer endpoint listens, if it serves.
    pub listen: Option<SocketAddr>,
    /// This agent's URL as peers list it (it is left out of its own peer list, and takes part
    /// in rendezvous hashing as itself).
    pub own_url: Option<String>,
    /// The shared token.
    pub token: Option<PeerToken>,
    /// The peers `agent.toml` lists.
    pub peers: Vec<String>,
}

impl PeerSettings {
    /// Checks the raw settings and reads the token.
    pub fn new(
        listen: Option<SocketAddr>,
        own_url: Option<&str>,
        token_file: Option<&Path>,
        peers: &[String],
    ) -> Result<PeerSettings, PeerError> {
        let token = token_file.map(PeerToken::load).transpose()?;
        if token.is_none() && (listen.is_some() || !peers.is_empty()) {
            return Err(PeerError::Invalid(
                "peer_listen and [[peer]] need peer_token_file (peers authenticate each other)"
                    .into(),
            ));
        }
        let own_url = match (own_url, listen) {
            (Some(url), Some(_)) => Some(normalize_url(url).map_err(PeerError::Invalid)?),
            // A card that does not serve owns no chunks: naming it would hand it some.
            (Some(_), None) => {
                return Err(PeerError::Invalid(
                    "peer_url names this agent's endpoint: it needs peer_listen".into(),
                ));
            }
            (None, Some(addr)) if !addr.ip().is_unspecified() => Some(format!("http://{addr}")),
            (None, Some(addr)) => {
                return Err(PeerError::Invalid(format!(
                    "peer_listen {addr} names no one address: set peer_url to how peers reach this agent"
                )));
            }
            (None, None) => None,
        };
        let peers = peers
            .iter()
            .map(|url| normalize_url(url))
            .collect::<Result<Vec<_>, _>>()
            .map_err(PeerError::Invalid)?;
        Ok(PeerSettings {
            listen,
            own_url,
            token,
            peers,
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn a_token_is_compared_whole() {
        let token = PeerToken::parse("  0123456789abcdef\n").unwrap();
        assert!(token.accepts(b"Bearer 0123456789abcdef"));
        assert!(!token.accepts(b"Bearer 0123456789abcdeX"));
        assert!(!token.accepts(b"Bearer 0123456789abcde"));
        assert!(!token.accepts(b"Bearer 0123456789abcdef0"));
        assert!(!token.accepts(b"0123456789abcdef"));
        assert!(!token.accepts(b"Basic 0123456789abcdef"));
        assert!(PeerToken::parse("short").is_err());
        assert!(PeerToken::parse("0123456789 abcdef").is_err());
    }

    #[test]
    fn peer_urls_are_checked_and_normalized() {
        assert_eq!(
            normalize_url("http://10.0.0.2:7420/").unwrap(),
            "http://10.0.0.2:7420"
        );
        for bad in [
            "10.0.0.2:7420",
            "ftp://x",
            "http://",
            "http://a/b",
            "http://u@h",
        ] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn serving_needs_a_token_and_an_own_url() {
        let listen: SocketAddr = "127.0.0.1:7420".parse().unwrap();
        assert!(PeerSettings::new(Some(listen), None, None, &[]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        let settings = PeerSettings::new(Some(listen), None, Some(&token), &[]).unwrap();
        assert_eq!(settings.own_url.as_deref(), Some("http://127.0.0.1:7420"));
        let any: SocketAddr = "0.0.0.0:7420".parse().unwrap();
        assert!(PeerSettings::new(Some(any), None, Some(&token), &[]).is_err());
        let named =
            PeerSettings::new(Some(any), Some("http://card1:7420/"), Some(&token), &[]).unwrap();
        assert_eq!(named.own_url.as_deref(), Some("http://card1:7420"));
        // Named but not serving: it would own chunks nobody can fetch from it.
        assert!(PeerSettings::new(None, Some("http://card1:7420"), Some(&token), &[]).is_err());
    }
}
