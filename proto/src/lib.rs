//! The protocol between Gantry's agent (on the offload card) and the shim (in the guest).
//!
//! A connection is a vsock stream carrying frames: a `u32` little-endian payload length followed by a
//! bincode 2 payload (fixed-int encoding). The first frame each way is a [`Hello`]; after that the agent
//! sends [`Request`]s, the shim answers [`Response`]s in any order and sends unsolicited [`Event`]s.
//!
//! Evolution rule: enum variants are only ever appended, never reordered or removed, because bincode
//! encodes a variant by its index. A change in a frame's meaning bumps [`PROTOCOL_VERSION`].

mod codec;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod messages;
mod names;
mod version;

pub use codec::FrameCodec;
pub use frame::{
    DEFAULT_MAX_FRAME_LEN, FRAME_HEADER_LEN, FrameError, MAX_FRAME_LEN_CAP, decode_payload,
    encode_frame, read_frame, write_frame,
};
pub use handshake::{VersionError, negotiate};
pub use messages::{
    ContainerId, ContainerSpec, ContainerState, ContainerStats, ContainerSummary, ErrorKind,
    ErrorReply, Event, ExecId, ExitStatus, GuestInfo, GuestResources, Hello,
    IDLE_LAYER_MOUNTS_KEPT, LayerExtent, LayerMountInfo, Message, Op, OutputPosition, OutputStream,
    ProcessSpec, Reply, Request, RequestId, Resources, Response, TtySize,
};
pub use names::{IdError, MAX_ID_LEN, validate_id};
pub use version::{
    EVENTS_BY_SUBSCRIPTION, PROTOCOL_VERSION, ProtocolVersion, RESUMABLE_OUTPUT, TTY_OPERATIONS,
};

/// The vsock port the shim listens on inside the guest.
pub const SHIM_VSOCK_PORT: u32 = 10240;

#[cfg(test)]
mod tests;
