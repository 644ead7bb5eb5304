//! virtio-blk on the wire: constants, the config space, and [`Request::parse`], which turns a
//! descriptor chain into a typed request. Parsing only: nothing here touches a layer's bytes.
//!
//! The parser trusts nothing in the chain. Every descriptor's direction and length is checked,
//! the chain's length is bounded, data lengths must be whole 512-byte sectors, and sector
//! arithmetic is checked. What cannot be parsed is a [`ParseError`]; if the chain still has a
//! place for the status byte the caller reports `VIRTIO_BLK_S_IOERR` there, otherwise it hands the
//! chain back unused (the spec's "drop").

use thiserror::Error;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Bytes in a virtio-blk sector: the unit of `sector` fields and of capacity, whatever the
/// device's block size.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the request header (`struct virtio_blk_outhdr`: type, ioprio, sector).
pub const HEADER_SIZE: usize = 16;
/// Most data segments in one request, advertised as `seg_max`. It is the default queue size
/// (128) minus the header and status descriptors, so a driver that does not use indirect
/// descriptors can still fit its largest request in the ring.
pub const SEG_MAX: u32 = 126;
/// Largest queue the frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Most descriptors in one chain: `SEG_MAX` data segments, plus header and status.
pub const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The device id returned by `VIRTIO_BLK_T_GET_ID` (the guest's `/sys/block/vdX/serial`).
pub const DEVICE_ID: &[u8] = b"gantry-layers";
/// Length of the `GET_ID` answer.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Request completed.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// Request failed (unmapped range, refused write, malformed chain).
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// Request type not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Size of `struct virtio_blk_config` up to and including `num_queues`: the fields this device
/// fills in. Reads beyond it (newer fields: discard, write zeroes, secure erase) return zeros.
const CONFIG_FILLED_LEN: usize = 36;
/// The vhost-user protocol's largest config space.
pub const MAX_CONFIG_LEN: usize = 256;

/// The device's config space (`struct virtio_blk_config`), little-endian on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Largest number of data segments in a request.
    pub seg_max: u32,
    /// Block size the driver should use (its logical block size): 512 or 4096.
    pub blk_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
}

impl BlkConfig {
    /// The config space bytes: the fields above at their offsets, everything else zero, padded
    /// to [`MAX_CONFIG_LEN`].
    pub fn to_bytes(&self) -> [u8; MAX_CONFIG_LEN] {
        let mut bytes = [0u8; MAX_CONFIG_LEN];
        let mut put = |offset: usize, field: &[u8]| {
            if let Some(dst) = bytes.get_mut(offset..offset + field.len()) {
                dst.copy_from_slice(field);
            }
        };
        put(0, &self.capacity_sectors.to_le_bytes()); // capacity
        put(8, &0u32.to_le_bytes()); // size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
        put(12, &self.seg_max.to_le_bytes()); // seg_max
        put(20, &self.blk_size.to_le_bytes()); // blk_size
        put(34, &self.num_queues.to_le_bytes()); // num_queues
        const { assert!(34 + 2 <= CONFIG_FILLED_LEN) };
        bytes
    }

    /// The `size` bytes at `offset` of the config space; empty if the range is outside it.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let start = offset as usize;
        start
            .checked_add(size as usize)
            .and_then(|end| bytes.get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }
}

/// What a request asks for. Only `In`, `GetId` and `Flush` are served; the executor refuses
/// every other type explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors (`VIRTIO_BLK_T_IN`).
    In,
    /// Write sectors (`VIRTIO_BLK_T_OUT`): refused, the device is read-only.
    Out,
    /// Flush the write cache (`VIRTIO_BLK_T_FLUSH`): nothing to flush, succeeds.
    Flush,
    /// The device id (`VIRTIO_BLK_T_GET_ID`).
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: refused (feature not offered).
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: refused (feature not offered).
    WriteZeroes,
    /// Any other type value.
    Unsupported(u32),
}

impl RequestType {
    fn from_wire(value: u32) -> RequestType {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A piece of guest memory the device writes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A parsed request, ready to execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub request_type: RequestType,
    /// First sector (for `In`; as sent for the others).
    pub sector: u64,
    /// Device-writable data buffers in order (for `In` and `GetId`; empty for the others,
    /// whose data, if any, the device never reads).
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// For an `In` request, the device byte range `[start, end)` it reads. Parsing checked that
    /// it does not overflow.
    pub fn byte_range(&self) -> (u64, u64) {
        let start = self.sector << SECTOR_SHIFT;
        (start, start.saturating_add(self.data_len))
    }
}

/// Why a chain is not a request.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// No descriptor at all (an empty or unreadable chain).
    #[error("empty descriptor chain")]
    Empty,
    /// More than [`MAX_CHAIN_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS}")]
    TooManyDescriptors,
    /// The chain ended on a descriptor that still points to a next one: a loop, a `next` index
    /// outside the table, a bad indirect table, or more than 4 GiB in total.
    #[error("descriptor chain is truncated (loop, bad next index or bad indirect table)")]
    Truncated,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// The last descriptor is not device-writable, or is empty: no place for the status byte.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header shorter than {HEADER_SIZE} bytes")]
    ShortHeader,
    /// A descriptor's address range is not in guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// A read carries device-readable bytes beyond its header.
    #[error("read request with device-readable data")]
    UnexpectedReadable,
    /// The data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// The sector range overflows or passes the end of the device.
    #[error("sector range outside the device")]
    OutOfRange,
}

/// A chain that could not be parsed: the reason, and where to report it if possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub error: ParseError,
    /// The status byte's address, if the chain has one; otherwise the chain is returned unused.
    pub status: Option<GuestAddress>,
}

/// One descriptor's fields, as the parser sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawSegment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
    /// Has `VRING_DESC_F_NEXT`: if the chain ends on such a descriptor, it was cut short.
    pub has_next: bool,
}

impl From<Descriptor> for RawSegment {
    fn from(descriptor: Descriptor) -> RawSegment {
        RawSegment {
            addr: descriptor.addr().raw_value(),
            len: descriptor.len(),
            writable: descriptor.is_write_only(),
            has_next: descriptor.has_next(),
        }
    }
}

impl Request {
    /// Parses a descriptor chain (from `DescriptorChain`'s iterator, or any sequence of
    /// descriptors) against guest memory `mem`, for a device of `capacity` bytes.
    ///
    /// Reads only the 16-byte header from guest memory; checks that every data buffer lies in
    /// guest memory.
    pub fn parse<M, I>(descriptors: I, mem: &M, capacity: u64) -> Result<Request, Rejected>
    where
        M: GuestMemoryBackend + ?Sized,
        I: IntoIterator,
        I::Item: Into<RawSegment>,
    {
        // A status byte outside guest memory cannot be written: nothing can be reported.
        let reachable = |status: GuestAddress| mem.check_range(status, 1);
        let layout = ChainLayout::collect(descriptors).map_err(|rejected| Rejected {
            error: rejected.error,
            status: rejected.status.filter(|status| reachable(*status)),
        })?;
        let status = layout.status;
        if !reachable(status) {
            return Err(Rejected {
                error: ParseError::OutsideMemory,
                status: None,
            });
        }
        let reject = |error| Rejected {
            error,
            status: Some(status),
        };

        let header = layout.read_header(mem).map_err(reject)?;
        let request_type = RequestType::from_wire(u32::from_le_bytes([
            header[0], header[1], header[2], header[3],
        ]));
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);

        let mut request = Request {
            request_type,
            sector,
            data: Vec::new(),
            data_len: 0,
            status,
        };
        match request_type {
            RequestType::In => {
                if layout.readable_len != HEADER_SIZE as u64 {
                    return Err(reject(ParseError::UnexpectedReadable));
                }
                let (data, data_len) = layout.writable_data(mem).map_err(reject)?;
                if data_len % SECTOR_SIZE != 0 {
                    return Err(reject(ParseError::UnalignedLength(data_len)));
                }
                let end = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|start| start.checked_add(data_len))
                    .ok_or(reject(ParseError::OutOfRange))?;
                if end > capacity {
                    return Err(reject(ParseError::OutOfRange));
                }
                request.data = data;
                request.data_len = data_len;
            }
            RequestType::GetId => {
                let (data, data_len) = layout.writable_data(mem).map_err(reject)?;
                request.data = data;
                request.data_len = data_len;
            }
            // Refused or trivially served: their data (if any) is never touched.
            RequestType::Out
            | RequestType::Flush
            | RequestType::Discard
            | RequestType::WriteZeroes
            | RequestType::Unsupported(_) => {}
        }
        Ok(request)
    }
}

/// The chain's descriptors split by direction, with the status byte located.
#[derive(Debug)]
struct ChainLayout {
    /// Device-readable descriptors, in order.
    readable: Vec<RawSegment>,
    /// Device-writable descriptors, in order; the last byte of the last one is the status.
    writable: Vec<RawSegment>,
    readable_len: u64,
    status: GuestAddress,
}

impl ChainLayout {
    fn collect<I>(descriptors: I) -> Result<ChainLayout, Rejected>
    where
        I: IntoIterator,
        I::Item: Into<RawSegment>,
    {
        let unreportable = |error| Rejected {
            error,
            status: None,
        };
        let mut readable = Vec::new();
        let mut writable: Vec<RawSegment> = Vec::with_capacity(4);
        let mut readable_len = 0u64;
        let mut count = 0usize;
        let mut last: Option<RawSegment> = None;
        let mut order_error = None;
        for descriptor in descriptors {
            let descriptor: RawSegment = descriptor.into();
            count += 1;
            if count > MAX_CHAIN_DESCRIPTORS {
                return Err(unreportable(ParseError::TooManyDescriptors));
            }
            if descriptor.writable {
                writable.push(descriptor);
            } else {
                if !writable.is_empty() {
                    order_error = Some(ParseError::ReadableAfterWritable);
                }
                // Cannot overflow: at most MAX_CHAIN_DESCRIPTORS lengths below 2^32.
                readable_len += u64::from(descriptor.len);
                readable.push(descriptor);
            }
            last = Some(descriptor);
        }
        let last = last.ok_or(unreportable(ParseError::Empty))?;
        if last.has_next {
            return Err(unreportable(ParseError::Truncated));
        }
        if !last.writable || last.len == 0 {
            return Err(unreportable(ParseError::NoStatus));
        }
        let status = GuestAddress(last.addr)
            .checked_add(u64::from(last.len) - 1)
            .ok_or(unreportable(ParseError::OutsideMemory))?;
        if let Some(error) = order_error {
            return Err(Rejected {
                error,
                status: Some(status),
            });
        }
        Ok(ChainLayout {
            readable,
            writable,
            readable_len,
            status,
        })
    }

    /// Gathers the first 16 device-readable bytes, whatever the framing.
    fn read_header<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<[u8; HEADER_SIZE], ParseError> {
        if self.readable_len < HEADER_SIZE as u64 {
            return Err(ParseError::ShortHeader);
        }
        let mut header = [0u8; HEADER_SIZE];
        let mut filled = 0usize;
        for segment in &self.readable {
            if filled == HEADER_SIZE {
                break;
            }
            let take = (HEADER_SIZE - filled).min(segment.len as usize);
            let dst = header
                .get_mut(filled..filled + take)
                .ok_or(ParseError::ShortHeader)?;
            mem.read_slice(dst, GuestAddress(segment.addr))
                .map_err(|_| ParseError::OutsideMemory)?;
            filled += take;
        }
        Ok(header)
    }

    /// The device-writable buffers without the status byte, each checked to lie in guest
    /// memory, and their total length.
    fn writable_data<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
    ) -> Result<(Vec<Segment>, u64), ParseError> {
        let mut data = Vec::with_capacity(self.writable.len());
        let mut total = 0u64;
        let last_index = self.writable.len().saturating_sub(1);
        for (index, segment) in self.writable.iter().enumerate() {
            // The status byte is the last byte of the last writable descriptor.
            let len = if index == last_index {
                segment.len.saturating_sub(1)
            } else {
                segment.len
            };
            if len == 0 {
                continue;
            }
            let addr = GuestAddress(segment.addr);
            if !mem.check_range(addr, len as usize) {
                return Err(ParseError::OutsideMemory);
            }
            // Cannot overflow: at most MAX_CHAIN_DESCRIPTORS lengths below 2^32.
            total += u64::from(len);
            data.push(Segment { addr, len });
        }
        Ok((data, total))
    }
}

/// The `GET_ID` answer: the device id, NUL-padded to [`ID_BYTES`].
pub fn device_id_bytes() -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let len = DEVICE_ID.len().min(ID_BYTES);
    if let (Some(dst), Some(src)) = (id.get_mut(..len), DEVICE_ID.get(..len)) {
        dst.copy_from_slice(src);
    }
    id
}
