//! The `Hello` negotiation: a peer's version against the local one.

use crate::messages::Hello;
use crate::version::ProtocolVersion;

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
