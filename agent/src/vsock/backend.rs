//! The vhost-user glue: moves packets between the virtqueues and the connection table.
//!
//! One backend exists per frontend session of one device. A single worker thread (owned by
//! `vhost-user-backend`) runs everything: the rx and tx queues and the host streams, which the
//! muxer watches with its own epoll, registered with the worker as [`BACKEND_EVENT`].
//! The event queue is not ours: QEMU's vhost-vsock code keeps it and only hands us rx and tx.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::VsockError;
use super::muxer::Muxer;
use super::packet::{GuestOp, HEADER_SIZE, Header, MAX_PAYLOAD, PacketError, parse_guest_header};
use super::requests::RequestQueue;
use crate::metrics::VsockMetrics;

/// Queues the device has (rx, tx, event).
pub const NUM_QUEUES: usize = 3;
/// Index of the receive queue (device to guest).
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue (guest to device).
pub const TX_QUEUE: u16 = 1;
/// Event id of the muxer's epoll fd; ids up to `NUM_QUEUES` belong to the queues and the exit
/// event.
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Largest queue the frontend may configure (QEMU uses 128 for vsock).
const MAX_QUEUE_SIZE: usize = 1024;
/// The worker thread handles rx and tx (queue bit mask).
const WORKER_QUEUES: u64 = 0b11;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// State touched by the worker thread (and, briefly, by the frontend thread on reset).
#[derive(Debug)]
struct Worker {
    guest_cid: u64,
    muxer: Muxer,
    mem: Option<Memory>,
    event_idx: bool,
    /// Staging buffer for one payload, either direction.
    scratch: Vec<u8>,
    requests: Arc<RequestQueue>,
}

/// The vhost-user-vsock backend of one device for one frontend session.
#[derive(Debug)]
pub struct VsockBackend {
    guest_cid: u64,
    worker: Mutex<Worker>,
    requests: Arc<RequestQueue>,
    muxer_fd: RawFd,
}

impl VsockBackend {
    /// A backend for the guest `guest_cid`, advertising `buf_alloc` per connection and keeping
    /// at most `max_connections`.
    pub fn new(guest_cid: u64, buf_alloc: u32, max_connections: usize) -> io::Result<Self> {
        let muxer = Muxer::new(guest_cid, buf_alloc, max_connections)?;
        let requests = Arc::new(RequestQueue::new(max_connections.saturating_mul(2).max(1))?);
        muxer.watch_control_fd(requests.as_raw_fd())?;
        let muxer_fd = muxer.as_raw_fd();
        Ok(VsockBackend {
            guest_cid,
            worker: Mutex::new(Worker {
                guest_cid,
                muxer,
                mem: None,
                event_idx: false,
                scratch: vec![0u8; MAX_PAYLOAD as usize],
                requests: requests.clone(),
            }),
            requests,
            muxer_fd,
        })
    }

    /// The queue through which connectors reach this session's worker.
    pub fn requests(&self) -> Arc<RequestQueue> {
        self.requests.clone()
    }

    /// The fd to register with the worker's epoll as [`BACKEND_EVENT`] (readable).
    pub fn host_events_fd(&self) -> RawFd {
        self.muxer_fd
    }

    fn worker(&self) -> MutexGuard<'_, Worker> {
        crate::sync::lock(&self.worker)
    }

    /// Counts this session's connections and bytes into `metrics`.
    pub fn count_into(&self, metrics: VsockMetrics) {
        self.worker().muxer.count_into(metrics);
    }

    /// The session ends: fail pending connects, close every host stream.
    pub fn disconnect(&self) {
        self.requests.close();
        self.worker().muxer.reset_all();
    }

    #[cfg(test)]
    pub(crate) fn with_muxer<R>(&self, f: impl FnOnce(&Muxer) -> R) -> R {
        f(&self.worker().muxer)
    }
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads guest_cid from the backend. MQ: QEMU may ask the queue count.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.worker().muxer.reset_all();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.worker().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let config = self.guest_cid.to_le_bytes();
        let start = offset as usize;
        start
            .checked_add(size as usize)
            .and_then(|end| config.get(start..end))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        self.worker().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![WORKER_QUEUES]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stops the device (guest reset, VM stop): connections do not survive it.
        debug!(queue_index, "vsock: vring stopped; closing connections");
        self.worker().muxer.reset_all();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE as usize), vrings.get(TX_QUEUE as usize))
        else {
            return Ok(());
        };
        let mut worker = self.worker();
        match device_event {
            RX_QUEUE => {}
            TX_QUEUE => worker.process_tx(tx),
            BACKEND_EVENT => worker.process_host_events(rx, tx),
            other => debug!(event = other, "vsock: unexpected event"),
        }
        worker.process_rx(rx);
        // Errors are never returned: an error would stop the worker thread for good, and
        // nothing the guest does may do that.
        Ok(())
    }
}

/// Whether the driver has set the queue up and the frontend enabled it.
fn queue_active(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// Reads the header from the chain's first descriptor without consuming the caller's chain.
fn read_tx_header(
    mut chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Option<Header> {
    let descriptor = chain.next()?;
    if descriptor.is_write_only() || (descriptor.len() as usize) < HEADER_SIZE {
        return None;
    }
    let mut bytes = [0u8; HEADER_SIZE];
    mem.read_slice(&mut bytes, descriptor.addr()).ok()?;
    Some(Header::from_bytes(&bytes))
}

impl Worker {
    /// Handles every packet the guest queued for transmission.
    fn process_tx(&mut self, vring: &VringRwLock) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let mut used_any = false;
        let mut idle_rounds = 0u32;
        loop {
            if self.event_idx {
                let _ = state.disable_notification();
            }
            let mut popped = false;
            while let Some(mut chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                self.handle_tx_chain(&mem, &mut chain);
                if let Err(e) = state.add_used(head, 0) {
                    warn!(error = %e, "vsock: cannot return a tx buffer");
                }
                used_any = true;
            }
            if !self.event_idx {
                break;
            }
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            match state.enable_notification() {
                // An available index more than a queue size ahead keeps this true while
                // nothing can be popped: stop after a round without progress, never spin.
                Ok(true) if idle_rounds < 2 => continue,
                Ok(true) => {
                    warn!("vsock: tx available index out of range; queue left as is");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "vsock: cannot enable tx notifications");
                    break;
                }
            }
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
    }

    /// Parses one tx chain and hands the packet to the muxer. Never fails: a malformed packet
    /// is dropped, and resets its flow when the header names one.
    fn handle_tx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &mut DescriptorChain<&GuestMemoryMmap>,
    ) {
        let Some(header) = read_tx_header(chain.clone(), mem) else {
            debug!("vsock: tx chain without a readable header; dropped");
            return;
        };
        let packet = match parse_guest_header(&header, self.guest_cid) {
            Ok(packet) => packet,
            Err(error) => {
                self.muxer.handle_invalid_packet(&header, error);
                return;
            }
        };
        let len = match packet.op {
            GuestOp::Rw { len } => len as usize,
            _ => 0,
        };
        let Some(payload) = self.scratch.get_mut(..len) else {
            // parse_guest_header bounds len by MAX_PAYLOAD, the scratch size.
            self.muxer
                .handle_invalid_packet(&header, PacketError::Descriptors("payload too large"));
            return;
        };
        if len > 0 {
            let copied = match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PAYLOAD) {
                Ok(vsock_packet) => vsock_packet
                    .data_slice()
                    .map_or(0, |data| data.copy_to(payload)),
                Err(e) => {
                    debug!(error = %e, "vsock: tx payload unreadable");
                    0
                }
            };
            if copied != len {
                self.muxer.handle_invalid_packet(
                    &header,
                    PacketError::Descriptors("payload does not match the header's length"),
                );
                return;
            }
        }
        let payload = self.scratch.get(..len).unwrap_or_default();
        self.muxer.handle_guest_packet(packet, payload);
    }

    /// Host streams changed, or connectors asked for something.
    fn process_host_events(&mut self, rx: &VringRwLock, tx: &VringRwLock) {
        if !self.muxer.handle_host_events() {
            return;
        }
        let requests = self.requests.take_all();
        let driver_ready = self.mem.is_some() && queue_active(rx) && queue_active(tx);
        for request in requests {
            if driver_ready {
                self.muxer.connect(request.port, request.reply);
            } else {
                let _ = request.reply.send(Err(VsockError::NotReady));
            }
        }
        self.muxer.sweep_abandoned();
    }

    /// Fills the guest's receive buffers with whatever the muxer has for it.
    fn process_rx(&mut self, vring: &VringRwLock) {
        if !self.muxer.has_rx_work() {
            return;
        }
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let mut used_any = false;
        let mut idle_rounds = 0u32;
        loop {
            if self.event_idx {
                let _ = state.disable_notification();
            }
            let mut out_of_buffers = false;
            let mut popped = false;
            while self.muxer.has_rx_work() {
                let Some(mut chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    out_of_buffers = true;
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let used_len =
                    match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PAYLOAD) {
                        Ok(mut packet) => self.fill_rx_packet(&mut packet),
                        Err(e) => {
                            // Unusable buffer: hand it back empty rather than stall on it.
                            debug!(error = %e, "vsock: malformed rx buffer");
                            Some(0)
                        }
                    };
                let Some(used_len) = used_len else {
                    // Nothing to send after all: leave the buffer to the guest.
                    state.get_queue_mut().go_to_previous_position();
                    break;
                };
                if let Err(e) = state.add_used(head, used_len) {
                    warn!(error = %e, "vsock: cannot return an rx buffer");
                }
                used_any = true;
            }
            if !self.event_idx {
                break;
            }
            // Re-arm notifications; if buffers arrived meanwhile and work remains, go on.
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            match state.enable_notification() {
                // Not after a round without progress: an available index more than a queue
                // size ahead keeps this true while nothing can be popped.
                Ok(true) if out_of_buffers && idle_rounds < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "vsock: cannot enable rx notifications");
                    break;
                }
            }
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
    }

    /// Writes the muxer's next packet into `packet`; returns the used length, or `None` if the
    /// muxer had nothing to send.
    fn fill_rx_packet(&mut self, packet: &mut VsockPacket<'_, ()>) -> Option<u32> {
        let capacity = packet
            .data_slice()
            .map_or(0, |data| data.len())
            .min(MAX_PAYLOAD as usize);
        let buffer = self.scratch.get_mut(..capacity)?;
        let header = self.muxer.next_rx_packet(buffer)?;
        let len = header.len as usize;
        if len > 0 {
            let (Some(data), Some(payload)) = (packet.data_slice(), self.scratch.get(..len)) else {
                return Some(0);
            };
            data.copy_from(payload);
        }
        if let Err(e) = packet.set_header_from_raw(&header.to_bytes()) {
            warn!(error = %e, "vsock: cannot write an rx header; packet lost");
            return Some(0);
        }
        Some(HEADER_SIZE as u32 + header.len)
    }
}
