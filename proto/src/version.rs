//! Protocol versions: what a build speaks. The negotiation that compares them is in `handshake`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A protocol version. Peers with different `major` refuse each other; `minor` only adds messages
/// that an older peer answers with `ErrorKind::Unsupported`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ProtocolVersion {
    /// Incompatible changes bump this.
    pub major: u16,
    /// Compatible additions bump this.
    pub minor: u16,
}

/// The version this build speaks.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };

/// The first minor version of major 1 with `Op::SubscribeEvents`.
pub const EVENTS_BY_SUBSCRIPTION: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

/// The first minor version of major 1 with terminals: `Op::CreateContainerTty`, `Op::ExecTty`
/// and `Op::ResizeTty`.
pub const TTY_OPERATIONS: ProtocolVersion = ProtocolVersion { major: 1, minor: 2 };

/// The first minor version of major 1 whose output survives a reconnection:
/// `Op::SubscribeEventsFrom`, `Op::OutputReceived` and `Event::OutputAt`.
pub const RESUMABLE_OUTPUT: ProtocolVersion = ProtocolVersion { major: 1, minor: 3 };

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}
