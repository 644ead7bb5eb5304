//! Executing a parsed virtio-blk request against the layer store: reads (piece by piece through
//! the extent table, straight into guest memory), `GET_ID`, `FLUSH`, and the refusals of a
//! read-only device. Independent of the transport: the vhost-user queue threads and the offload
//! helpers both call [`execute`] and [`finish`], and a future VFIO transport would too.

use std::task::{Poll, Waker};
use std::time::Instant;

use tracing::debug;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    VolatileSlice,
};

use super::layer_store::{LayerStore, ReadError};
use super::virtio_blk::{
    ID_BYTES, Request, RequestType, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP, Segment,
    device_id_bytes,
};
use crate::metrics::BlkOp;

/// The guest's memory as the vhost-user frontend shares it.
pub(super) type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// How a finished request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Completion {
    pub(super) status: u8,
    /// Bytes written into device-writable buffers, status byte included.
    pub(super) used_len: u32,
}

impl Completion {
    pub(super) fn status_only(status: u8) -> Completion {
        Completion {
            status,
            used_len: 1,
        }
    }
}

/// A request waiting for a source's data.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) head: u16,
    pub(super) request: Request,
    /// How far it got (pieces before the one that was not ready).
    pub(super) completed: Progress,
}

/// A request's progress across polls, and what its metrics need.
#[derive(Debug)]
pub(super) struct Progress {
    /// Bytes of the data already filled.
    bytes: u64,
    /// The first attempt: the request's latency counts from here.
    started: Instant,
    /// Whether it was parked already (counted once).
    parked: bool,
}

impl Progress {
    /// A request about to be tried for the first time.
    pub(super) fn new() -> Self {
        Self {
            bytes: 0,
            started: Instant::now(),
            parked: false,
        }
    }
}

/// Writes the status byte; returns the used length to report (0 if the status byte could not
/// be written, so the driver sees nothing was written).
pub(super) fn finish<M: GuestMemoryBackend>(
    mem: &M,
    status: GuestAddress,
    completion: Completion,
) -> u32 {
    match mem.write_obj(completion.status, status) {
        Ok(()) => completion.used_len,
        Err(e) => {
            debug!(error = %e, "layer store: cannot write a status byte");
            0
        }
    }
}

/// Executes a parsed request and counts it in the store's metrics. `progress` carries a read's
/// progress across polls. Returns [`Poll::Pending`] if a source has not got the data yet.
pub(super) fn execute(
    request: &Request,
    mem: &GuestMemoryMmap,
    store: &LayerStore,
    progress: &mut Progress,
    waker: &Waker,
) -> Poll<Completion> {
    let outcome = execute_request(request, mem, store, &mut progress.bytes, waker);
    let metrics = store.metrics();
    match outcome {
        Poll::Pending if !progress.parked => {
            progress.parked = true;
            metrics.parked();
        }
        Poll::Pending => {}
        Poll::Ready(completion) => {
            let ok = completion.status == STATUS_OK;
            let op = blk_op(request.request_type);
            let read_bytes = if ok && op == BlkOp::Read {
                request.data_len
            } else {
                0
            };
            metrics.completed(op, ok, read_bytes, progress.started.elapsed());
        }
    }
    outcome
}

/// The metrics' name of a request type.
fn blk_op(request_type: RequestType) -> BlkOp {
    match request_type {
        RequestType::In => BlkOp::Read,
        RequestType::GetId => BlkOp::GetId,
        RequestType::Flush => BlkOp::Flush,
        RequestType::Out => BlkOp::Write,
        RequestType::Discard | RequestType::WriteZeroes | RequestType::Unsupported(_) => {
            BlkOp::Unsupported
        }
    }
}

/// [`execute`] without the counting. `completed`: the bytes of a read's data already filled.
fn execute_request(
    request: &Request,
    mem: &GuestMemoryMmap,
    store: &LayerStore,
    completed: &mut u64,
    waker: &Waker,
) -> Poll<Completion> {
    match request.request_type {
        RequestType::In => match read(request, mem, store, completed, waker) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                // data_len is bounded by MAX_CHAIN_DESCRIPTORS u32 lengths, and the used length
                // of a valid chain fits u32 (virtio bounds chains to 4 GiB).
                let used_len =
                    u32::try_from(request.data_len.saturating_add(1)).unwrap_or(u32::MAX);
                Poll::Ready(Completion {
                    status: STATUS_OK,
                    used_len,
                })
            }
            Poll::Ready(Err(error)) => {
                debug!(sector = request.sector, error = %error, "layer store: read failed");
                Poll::Ready(Completion::status_only(STATUS_IOERR))
            }
        },
        RequestType::GetId => Poll::Ready(get_id(request, mem)),
        // Nothing is ever cached for writing: a flush has nothing to do.
        RequestType::Flush => Poll::Ready(Completion::status_only(STATUS_OK)),
        // Read-only device: the spec asks for IOERR on writes when VIRTIO_BLK_F_RO is offered.
        RequestType::Out => Poll::Ready(Completion::status_only(STATUS_IOERR)),
        // Features not offered: refused explicitly.
        RequestType::Discard | RequestType::WriteZeroes | RequestType::Unsupported(_) => {
            Poll::Ready(Completion::status_only(STATUS_UNSUPP))
        }
    }
}

fn get_id<M: GuestMemoryBackend>(request: &Request, mem: &M) -> Completion {
    let id = device_id_bytes();
    let mut written = 0usize;
    for segment in &request.data {
        let Some(bytes) = id.get(written..) else {
            break;
        };
        let take = bytes.len().min(segment.len as usize);
        let Some(part) = bytes.get(..take) else {
            break;
        };
        if mem.write_slice(part, segment.addr).is_err() {
            return Completion::status_only(STATUS_IOERR);
        }
        written += take;
        if written >= ID_BYTES {
            break;
        }
    }
    Completion {
        status: STATUS_OK,
        // written <= ID_BYTES.
        used_len: written as u32 + 1,
    }
}

/// Fills an `In` request's buffers from the extent table, piece by piece (a piece is the part
/// of the range inside one region of the table), resuming after `completed` bytes.
fn read(
    request: &Request,
    mem: &GuestMemoryMmap,
    store: &LayerStore,
    completed: &mut u64,
    waker: &Waker,
) -> Poll<Result<(), ReadError>> {
    // A fresh snapshot on every poll: a layer unmapped while a request was parked is no
    // longer readable.
    let snapshot = store.snapshot();
    let (start, end) = request.byte_range();
    while *completed < request.data_len {
        let offset = start + *completed;
        let piece = match snapshot.piece_len(offset, end - offset) {
            Ok(piece) => piece,
            Err(error) => return Poll::Ready(Err(error)),
        };
        let Some(bufs) = guest_slices(mem, &request.data, *completed, piece) else {
            return Poll::Ready(Err(ReadError::GuestMemory));
        };
        match snapshot.read_piece(offset, &bufs, waker) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Ready(Ok(())) => *completed += piece,
        }
    }
    Poll::Ready(Ok(()))
}

/// The guest memory for bytes `[skip, skip + len)` of the request's data, as slices.
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    data: &[Segment],
    skip: u64,
    len: u64,
) -> Option<Vec<VolatileSlice<'m>>> {
    let mut slices = Vec::with_capacity(data.len().min(8));
    let mut position = 0u64;
    let mut wanted = len;
    for segment in data {
        if wanted == 0 {
            break;
        }
        let segment_len = u64::from(segment.len);
        let segment_end = position + segment_len;
        if segment_end <= skip {
            position = segment_end;
            continue;
        }
        let within = skip.saturating_sub(position);
        let take = (segment_len - within).min(wanted);
        let addr = segment.addr.checked_add(within)?;
        for slice in mem.get_slices(addr, usize::try_from(take).ok()?) {
            slices.push(slice.ok()?);
        }
        wanted -= take;
        position = segment_end;
    }
    (wanted == 0).then_some(slices)
}
