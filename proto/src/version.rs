//! Protocol versions and the `Hello` negotiation.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::messages::Hello;

/// A protocol version. Peers with different `major` refuse each other; `minor` only adds messages
/// that an older peer answers with `ErrorKind::Unsupported`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProtocolVersion {
    /// Incompatible changes bump this.
    pub major: u16,
    /// Compatible additions bump this.
    pub minor: u16,
}

/// The version this build speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why a peer's `Hello` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// The peers speak different major versions of the protocol.
    #[error(
        "protocol major version mismatch: this side speaks {local}, the peer ({peer_software}) speaks {peer}"
    )]
    MajorMismatch {
        /// Our version.
        local: ProtocolVersion,
        /// The peer's version.
        peer: ProtocolVersion,
        /// The peer's software version string, to help an operator find the stale side.
        peer_software: String,
    },
}

/// Checks a peer's `Hello` against the local protocol version.
pub fn negotiate(local: ProtocolVersion, peer: &Hello) -> Result<(), VersionError> {
    if local.major != peer.protocol_version.major {
        return Err(VersionError::MajorMismatch {
            local,
            peer: peer.protocol_version,
            peer_software: peer.software_version.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_major_is_accepted_whatever_the_minor() {
        let peer = Hello {
            protocol_version: ProtocolVersion { major: 1, minor: 7 },
            software_version: "x".into(),
            capabilities: vec![],
        };
        assert_eq!(
            negotiate(ProtocolVersion { major: 1, minor: 0 }, &peer),
            Ok(())
        );
    }

    #[test]
    fn major_mismatch_names_both_versions() {
        let peer = Hello {
            protocol_version: ProtocolVersion { major: 2, minor: 3 },
            software_version: "gantry-shim 9.9.9".into(),
            capabilities: vec![],
        };
        let err = negotiate(ProtocolVersion { major: 1, minor: 4 }, &peer).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("1.4"), "{text}");
        assert!(text.contains("2.3"), "{text}");
        assert!(text.contains("gantry-shim 9.9.9"), "{text}");
    }
}
