//! The layer-store block device: a read-only vhost-user-blk backend, one per VM, whose address
//! space is an extent table of the layers mapped for that VM (see `shared/DESIGN.md` §3).
//!
//! Behaviour worth knowing (decisions, not accidents):
//! - Features: `VERSION_1`, `RO`, `BLK_SIZE`, `SEG_MAX`, `MQ`, `EVENT_IDX`, `INDIRECT_DESC`.
//!   Only `IN`, `GET_ID` (`gantry-layers`) and `FLUSH` (a no-op) are served; `OUT` gets
//!   `IOERR` (the spec's answer for a read-only device), `DISCARD`, `WRITE_ZEROES` and unknown
//!   types get `UNSUPP`.
//! - A malformed chain never stops a queue: if it has a status byte it gets `IOERR`, otherwise it
//!   is returned unused (used length 0). See [`virtio_blk::Request::parse`].
//! - The table ([`LayerStore`]) is per VM: a VM reads only layers mapped for it, anything
//!   unmapped fails with `IOERR`. Offsets are 1 MiB-aligned and never reused. The first 4 KiB
//!   and the last 1 MiB read as zeros, so partition probes at boot find nothing and log no error.
//!   The header format is documented in [`layer_store`].
//! - Every queue has its own worker thread; the table is read through a lock-free snapshot, so
//!   mapping and unmapping never stop the queues and queues share no lock. Reads of 128 KiB or
//!   more are copied by the queue's own helper threads (two by default), so large sequential
//!   reads use several cores and never hold up that queue's small reads.
//! - A [`BlockSource`] may answer "not yet": the request is parked on its queue and completed
//!   (out of order) when the source wakes it; other requests go on meanwhile. Stopping a queue
//!   (guest reset, frontend gone) fails its parked requests with `IOERR`.
//! - When the frontend disconnects, the device listens again with the same table. With an inflight
//!   record, the next agent's device resumes exactly the requests in flight when the previous one
//!   stopped (see `inflight`).
//!
//! Modules, one concern each:
//! - `virtio_blk`: wire constants, config space, `Request::parse` (parsing only);
//! - `source`: the `BlockSource` trait and the file-backed source;
//! - `layer_store`: the per-VM extent table, its header, and reads through it;
//! - `execute`: what a parsed request does (reads into guest memory, `GET_ID`, refusals),
//!   independent of the transport;
//! - `vhu_blk`: the vhost-user transport: features, config, queue threads, parking;
//! - `offload`: each queue's helper threads for large reads;
//! - `inflight`: requests in flight, recorded for the next agent (restarts);
//! - `chain`: a descriptor chain read again by its head (resubmission after a restart);
//! - `device`: the listening socket and the frontend reconnect loop.

mod chain;
mod device;
mod execute;
#[doc(hidden)]
pub mod fuzzing;
pub mod inflight;
pub mod layer_store;
mod offload;
pub mod source;
mod vhu_blk;
pub mod virtio_blk;

#[cfg(test)]
mod tests;

pub use device::{
    DEFAULT_BLOCK_SIZE, DEFAULT_NUM_QUEUES, LayerStoreConfig, LayerStoreDevice,
    LayerStoreDeviceError, MAX_NUM_QUEUES,
};
pub use layer_store::{Extent, LayerStore, LayerStoreError, MappedLayer};
pub use offload::{DEFAULT_OFFLOAD_THREADS, OFFLOAD_THRESHOLD};
pub use source::{BlockSource, FileSource};
pub use vhu_blk::{BlkBackend, DEVICE_FEATURES, MAX_QUEUE_SIZE};
