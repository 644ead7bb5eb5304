//! virtio-vsock wire format: the packet header, and the validation of a header received from the
//! guest into a typed [`GuestPacket`].
//!
//! This module only parses and builds headers; it never acts on them. Everything in a header that
//! comes from the guest is untrusted: parsing checks addresses, type, operation and length before
//! any other module sees the packet.

use thiserror::Error;

/// CID of the host: the only destination this device accepts from the guest.
pub const HOST_CID: u64 = 2;
/// Size in bytes of the virtio-vsock packet header (`struct virtio_vsock_hdr`).
pub const HEADER_SIZE: usize = 44;
/// Largest payload of one packet, in either direction (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type` of a stream socket; the only type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Operation codes (`op` field) of the virtio-vsock header.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset.
    pub const RST: u16 = 3;
    /// Shutdown of one or both directions.
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// Credit information, unsolicited or as an answer to `CREDIT_REQUEST`.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Request for a `CREDIT_UPDATE`.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of an `OP_SHUTDOWN`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of an `OP_SHUTDOWN`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags: the sender is closing the connection.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded virtio-vsock header, fields in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length (only `OP_RW` carries a payload).
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (`OP_SHUTDOWN`).
    pub flags: u32,
    /// Receive buffer space of the sender, for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, for this connection.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a little-endian wire header.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header in wire format (little endian).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// Builds a header sent by the host to the guest on `flow`.
    pub fn to_guest(flow: FlowKey, guest_cid: u64, op: u16, credit: Credit) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: flow.local_port,
            dst_port: flow.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: credit.buf_alloc,
            fwd_cnt: credit.fwd_cnt,
        }
    }
}

/// Identifies a connection: the host-side port and the guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Port on the host (CID 2) side.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Credit information carried by every header: the sender's receive buffer size and how many
/// bytes it has consumed from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// Receive buffer space (`buf_alloc`).
    pub buf_alloc: u32,
    /// Bytes consumed so far (`fwd_cnt`), wrapping.
    pub fwd_cnt: u32,
}

/// A validated operation from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// The guest connects to a host port.
    Request,
    /// The guest accepts a connection the host requested.
    Response,
    /// The guest resets the connection.
    Rst,
    /// The guest shuts down one or both directions.
    Shutdown {
        /// The guest will receive no more data.
        no_more_rx: bool,
        /// The guest will send no more data.
        no_more_tx: bool,
    },
    /// Payload of `len` bytes (1..=[`MAX_PAYLOAD`]) follows the header.
    Rw {
        /// Payload length.
        len: u32,
    },
    /// The guest tells us its credit.
    CreditUpdate,
    /// The guest asks for our credit.
    CreditRequest,
}

/// A header from the guest that passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPacket {
    /// The connection this packet belongs to, seen from the host.
    pub flow: FlowKey,
    /// The guest's credit for this connection.
    pub credit: Credit,
    /// What the guest asks for.
    pub op: GuestOp,
}

/// Why a header from the guest was rejected.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum PacketError {
    /// The source CID is not the guest's own CID (spoofing).
    #[error("source CID {got} is not the guest's CID {expected}")]
    WrongSourceCid {
        /// CID in the header.
        got: u64,
        /// The guest's CID.
        expected: u64,
    },
    /// The destination is not the host.
    #[error("destination CID {0} is not the host")]
    WrongDestinationCid(u64),
    /// Only stream sockets are supported.
    #[error("unsupported socket type {0}")]
    UnsupportedType(u16),
    /// The operation code is unknown.
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    /// An `OP_RW` payload is larger than one packet may carry.
    #[error("payload length {len} exceeds the maximum {max}")]
    PayloadTooLarge {
        /// Length in the header.
        len: u32,
        /// Largest length accepted.
        max: u32,
    },
    /// A control packet claims a payload.
    #[error("operation {op} carries a payload of {len} bytes")]
    PayloadOnControlPacket {
        /// Operation.
        op: u16,
        /// Length in the header.
        len: u32,
    },
    /// An `OP_RW` without payload.
    #[error("data packet without payload")]
    EmptyPayload,
    /// The descriptor chain does not hold the header and payload the header describes.
    #[error("malformed descriptor chain: {0}")]
    Descriptors(&'static str),
}

impl PacketError {
    /// Whether the guest should get an `OP_RST` for the flow named in the header.
    ///
    /// A header with forged addresses is dropped silently: answering it would let the guest make
    /// the device send packets on flows that are not its own. Every other malformed packet resets
    /// its flow, so the guest's socket fails instead of silently losing bytes.
    pub fn resets_flow(&self) -> bool {
        !matches!(
            self,
            PacketError::WrongSourceCid { .. } | PacketError::WrongDestinationCid(_)
        )
    }
}

/// Validates a header received from the guest with CID `guest_cid`.
pub fn parse_guest_header(header: &Header, guest_cid: u64) -> Result<GuestPacket, PacketError> {
    if header.src_cid != guest_cid {
        return Err(PacketError::WrongSourceCid {
            got: header.src_cid,
            expected: guest_cid,
        });
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::WrongDestinationCid(header.dst_cid));
    }
    if header.type_ != TYPE_STREAM {
        return Err(PacketError::UnsupportedType(header.type_));
    }
    let op = match header.op {
        op::REQUEST => GuestOp::Request,
        op::RESPONSE => GuestOp::Response,
        op::RST => GuestOp::Rst,
        op::SHUTDOWN => GuestOp::Shutdown {
            no_more_rx: header.flags & SHUTDOWN_RCV != 0,
            no_more_tx: header.flags & SHUTDOWN_SEND != 0,
        },
        op::RW => GuestOp::Rw { len: header.len },
        op::CREDIT_UPDATE => GuestOp::CreditUpdate,
        op::CREDIT_REQUEST => GuestOp::CreditRequest,
        other => return Err(PacketError::UnknownOp(other)),
    };
    match op {
        GuestOp::Rw { len: 0 } => return Err(PacketError::EmptyPayload),
        GuestOp::Rw { len } if len > MAX_PAYLOAD => {
            return Err(PacketError::PayloadTooLarge {
                len,
                max: MAX_PAYLOAD,
            });
        }
        GuestOp::Rw { .. } => {}
        _ if header.len != 0 => {
            return Err(PacketError::PayloadOnControlPacket {
                op: header.op,
                len: header.len,
            });
        }
        _ => {}
    }
    Ok(GuestPacket {
        flow: FlowKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        },
        credit: Credit {
            buf_alloc: header.buf_alloc,
            fwd_cnt: header.fwd_cnt,
        },
        op,
    })
}

/// The flow a (possibly invalid) guest header names, as seen from the host.
pub fn flow_of(header: &Header) -> FlowKey {
    FlowKey {
        local_port: header.dst_port,
        peer_port: header.src_port,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest_header(op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 10240,
            dst_port: 50000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_wire_format() {
        let header = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 10240,
            len: 12,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 262_144,
            fwd_cnt: 99,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
    }

    #[test]
    fn valid_data_packet_parses() {
        let packet = parse_guest_header(&guest_header(op::RW, 100), GUEST_CID).unwrap();
        assert_eq!(packet.op, GuestOp::Rw { len: 100 });
        assert_eq!(
            packet.flow,
            FlowKey {
                local_port: 50000,
                peer_port: 10240
            }
        );
        assert_eq!(
            packet.credit,
            Credit {
                buf_alloc: 4096,
                fwd_cnt: 7
            }
        );
    }

    #[test]
    fn shutdown_flags_are_decoded() {
        let mut header = guest_header(op::SHUTDOWN, 0);
        header.flags = SHUTDOWN_SEND;
        let packet = parse_guest_header(&header, GUEST_CID).unwrap();
        assert_eq!(
            packet.op,
            GuestOp::Shutdown {
                no_more_rx: false,
                no_more_tx: true
            }
        );
    }

    #[test]
    fn spoofed_source_cid_is_rejected_without_reset() {
        let mut header = guest_header(op::REQUEST, 0);
        header.src_cid = 4;
        let err = parse_guest_header(&header, GUEST_CID).unwrap_err();
        assert_eq!(
            err,
            PacketError::WrongSourceCid {
                got: 4,
                expected: GUEST_CID
            }
        );
        assert!(!err.resets_flow());
    }

    #[test]
    fn destination_other_than_host_is_rejected() {
        let mut header = guest_header(op::REQUEST, 0);
        header.dst_cid = 1;
        let err = parse_guest_header(&header, GUEST_CID).unwrap_err();
        assert_eq!(err, PacketError::WrongDestinationCid(1));
        assert!(!err.resets_flow());
    }

    #[test]
    fn seqpacket_type_is_rejected_with_reset() {
        let mut header = guest_header(op::REQUEST, 0);
        header.type_ = 2;
        let err = parse_guest_header(&header, GUEST_CID).unwrap_err();
        assert_eq!(err, PacketError::UnsupportedType(2));
        assert!(err.resets_flow());
    }

    #[test]
    fn unknown_op_and_bad_lengths_are_rejected() {
        assert_eq!(
            parse_guest_header(&guest_header(0, 0), GUEST_CID),
            Err(PacketError::UnknownOp(0))
        );
        assert_eq!(
            parse_guest_header(&guest_header(8, 0), GUEST_CID),
            Err(PacketError::UnknownOp(8))
        );
        assert_eq!(
            parse_guest_header(&guest_header(op::RW, MAX_PAYLOAD + 1), GUEST_CID),
            Err(PacketError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(
            parse_guest_header(&guest_header(op::RW, u32::MAX), GUEST_CID),
            Err(PacketError::PayloadTooLarge {
                len: u32::MAX,
                max: MAX_PAYLOAD
            })
        );
        assert_eq!(
            parse_guest_header(&guest_header(op::RW, 0), GUEST_CID),
            Err(PacketError::EmptyPayload)
        );
        assert_eq!(
            parse_guest_header(&guest_header(op::CREDIT_UPDATE, 5), GUEST_CID),
            Err(PacketError::PayloadOnControlPacket {
                op: op::CREDIT_UPDATE,
                len: 5
            })
        );
    }
}
