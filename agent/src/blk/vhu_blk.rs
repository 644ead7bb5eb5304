//! The vhost-user-blk transport: features, config space, and the request queues. What a request
//! does is in `execute`; this file only moves requests between the vrings and it.
//!
//! Each request queue has its own worker thread (`vhost-user-backend` runs one epoll loop per
//! entry of [`VhostUserBackend::queues_per_thread`]) and its own [`QueueWorker`] state, locked
//! only by that thread (and briefly by the frontend thread when it stops or resets the queue).
//! The extent table is read through a lock-free snapshot. So queues share no lock on the hot
//! path, and a queue parked on slow data never holds up another.
//!
//! A request whose data a source cannot give yet ([`Poll::Pending`]) is parked on its queue; the
//! source wakes the queue's wake eventfd (registered as [`WAKE_EVENT`] in that queue's thread)
//! and the worker polls its parked requests again, completing them out of order.
//!
//! With an inflight record (see `inflight`), every popped head is marked there and unmarked as
//! it is used, so a restarted agent executes again exactly the requests that were in flight: on
//! a queue's first event after a frontend attaches, the worker asks the record whether this is
//! the ring it tracked, and if so resubmits those heads (read again from the descriptor table)
//! and moves the queue's next available index past them.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Wake, Waker};
use std::time::Duration;

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::chain::descriptors_at;
use super::execute::{Completion, Memory, Parked, Progress, execute, finish};
use super::inflight::{InflightFile, QueueRecord, Resume, RingKey, complete};
use super::layer_store::LayerStore;
use super::offload::{Job, OFFLOAD_THRESHOLD, OffloadPool};
use super::virtio_blk::{BlkConfig, Request, RequestType, SEG_MAX, STATUS_IOERR};

/// How long stopping a queue waits for large reads being copied.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub use super::virtio_blk::MAX_QUEUE_SIZE;

/// The virtio features the device offers.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_MQ)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// Event id of a queue thread's wake eventfd (ids up to the queue count belong to the queues
/// and the exit event).
pub fn wake_event(num_queues: usize) -> u16 {
    // num_queues is bounded by the config (at most u16::MAX - 1).
    (num_queues as u16).saturating_add(1)
}

/// Wakes one queue thread: writes its wake eventfd.
#[derive(Debug)]
struct QueueWake {
    notifier: EventNotifier,
}

impl Wake for QueueWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Err(e) = self.notifier.notify() {
            warn!(error = %e, "layer store: cannot wake a queue");
        }
    }
}

/// State of one request queue, touched by its worker thread.
struct QueueWorker {
    mem: Option<Memory>,
    event_idx: bool,
    parked: Vec<Parked>,
    waker: Waker,
    /// The queue's vring, kept to complete parked requests when the frontend stops the queue.
    vring: Option<VringRwLock>,
    /// Helpers for large reads.
    offload: OffloadPool,
    /// Where popped heads are recorded until used, if the device keeps a record.
    record: Option<QueueRecord>,
    /// Whether this frontend session's first event has consulted the record yet.
    resumed: bool,
}

impl std::fmt::Debug for QueueWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueWorker")
            .field("event_idx", &self.event_idx)
            .field("parked", &self.parked)
            .finish_non_exhaustive()
    }
}

/// The vhost-user-blk backend of one device for one frontend session.
#[derive(Debug)]
pub struct BlkBackend {
    store: LayerStore,
    config: BlkConfig,
    queues: Vec<Mutex<QueueWorker>>,
    /// Read ends of the queues' wake eventfds, registered by the device with each queue's
    /// worker thread as [`wake_event`].
    wake_consumers: Vec<EventConsumer>,
}

impl BlkBackend {
    /// A backend serving `store` with `num_queues` request queues, logical block size
    /// `blk_size`, and `offload_threads` helper threads per queue for reads of at least
    /// [`OFFLOAD_THRESHOLD`] bytes (0: every read on the queue thread).
    pub fn new(
        store: LayerStore,
        num_queues: u16,
        blk_size: u32,
        offload_threads: usize,
    ) -> io::Result<BlkBackend> {
        Self::with_record(store, num_queues, blk_size, offload_threads, None)
    }

    /// The same, recording requests in flight in `inflight` (which must have `num_queues`
    /// queues) so that a backend of a later agent can resume them.
    pub fn with_record(
        store: LayerStore,
        num_queues: u16,
        blk_size: u32,
        offload_threads: usize,
        inflight: Option<Arc<InflightFile>>,
    ) -> io::Result<BlkBackend> {
        let config = BlkConfig {
            capacity_sectors: store.capacity() >> super::virtio_blk::SECTOR_SHIFT,
            seg_max: SEG_MAX,
            blk_size,
            num_queues,
        };
        let mut queues = Vec::with_capacity(num_queues.into());
        let mut wake_consumers = Vec::with_capacity(num_queues.into());
        for index in 0..usize::from(num_queues) {
            let (consumer, notifier) =
                new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
            queues.push(Mutex::new(QueueWorker {
                mem: None,
                event_idx: false,
                parked: Vec::new(),
                waker: Waker::from(Arc::new(QueueWake { notifier })),
                vring: None,
                offload: OffloadPool::new(offload_threads, index)?,
                record: inflight
                    .clone()
                    .and_then(|file| QueueRecord::new(file, index)),
                resumed: false,
            }));
            wake_consumers.push(consumer);
        }
        Ok(BlkBackend {
            store,
            config,
            queues,
            wake_consumers,
        })
    }

    /// The wake eventfd of queue `index`, to register with that queue's worker thread.
    pub fn wake_consumer(&self, index: usize) -> Option<&EventConsumer> {
        self.wake_consumers.get(index)
    }

    /// The config space this backend exposes.
    pub fn config(&self) -> BlkConfig {
        self.config
    }

    fn queue(&self, index: usize) -> Option<MutexGuard<'_, QueueWorker>> {
        self.queues
            .get(index)
            .map(|queue| queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Number of requests parked on queue `index` (for tests and metrics).
    pub fn parked_requests(&self, index: usize) -> usize {
        self.queue(index).map_or(0, |worker| worker.parked.len())
    }

    /// Fails every parked request of every queue (the session ends or the device resets); the
    /// record then holds nothing to resume.
    pub(crate) fn fail_all_parked(&self) {
        for index in 0..self.queues.len() {
            if let Some(mut worker) = self.queue(index) {
                worker.fail_parked();
                worker.forget();
            }
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: the frontend reads capacity, seg_max, blk_size and num_queues from us.
        // MQ: the frontend asks how many queues we have.
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.fail_all_parked();
    }

    fn set_event_idx(&self, enabled: bool) {
        for index in 0..self.queues.len() {
            if let Some(mut worker) = self.queue(index) {
                worker.event_idx = enabled;
            }
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config.read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in virtio-blk's config is writable without VIRTIO_BLK_F_CONFIG_WCE.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "layer store config space is read-only",
        ))
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        for index in 0..self.queues.len() {
            if let Some(mut worker) = self.queue(index) {
                worker.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.queues.len()).map(|index| 1u64 << index).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stops the queue (guest reset, VM stop): requests parked on a source
        // cannot outlive it, so they fail now rather than vanish.
        // Large reads still being copied finish first: the frontend expects no more writes to
        // guest memory for this queue once it is stopped.
        if let Some(mut worker) = self.queue(queue_index as usize) {
            worker.offload.wait_idle(STOP_TIMEOUT);
            worker.collect_offloaded();
            worker.fail_parked();
            worker.forget();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread: the thread's only vring is queue `thread_id`.
        let (Some(vring), Some(mut worker)) = (vrings.first(), self.queue(thread_id)) else {
            return Ok(());
        };
        if worker.vring.is_none() {
            worker.vring = Some(vring.clone());
        }
        worker.resume(vring, &self.store);
        if device_event == wake_event(self.queues.len()) {
            if let Some(consumer) = self.wake_consumers.get(thread_id) {
                // Non-blocking: EAGAIN only means another wake already drained it.
                let _ = consumer.consume();
            }
            worker.collect_offloaded();
            worker.retry_parked(vring, &self.store);
        } else {
            worker.process_queue(vring, &self.store);
        }
        // Errors are never returned: an error would stop the worker thread for good, and
        // nothing the guest does may do that.
        Ok(())
    }
}

impl QueueWorker {
    /// Serves every request the driver queued.
    fn process_queue(&mut self, vring: &VringRwLock, store: &LayerStore) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        let capacity = store.capacity();
        let mut used_any = false;
        let mut idle_rounds = 0u32;
        loop {
            if self.event_idx {
                let _ = state.disable_notification();
            }
            let mut popped = false;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
                popped = true;
                let head = chain.head_index();
                if let Some(record) = &self.record {
                    record.get().begin(head);
                }
                let parsed = Request::parse(chain, &*mem, capacity);
                let Some(used_len) = self.serve(head, parsed, &atomic, vring, store) else {
                    continue;
                };
                if let Err(e) = complete(&mut state, self.record.as_ref(), head, used_len) {
                    warn!(error = %e, "layer store: cannot return a request");
                }
                used_any = true;
            }
            if !self.event_idx {
                break;
            }
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            match state.enable_notification() {
                // A driver whose available index runs more than a queue size ahead makes this
                // true forever while nothing can be popped: give up after a round without
                // progress instead of spinning (the driver's next kick tries again).
                Ok(true) if idle_rounds < 2 => continue,
                Ok(true) => {
                    warn!("layer store: available index out of range; queue left as is");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    warn!(error = %e, "layer store: cannot enable notifications");
                    break;
                }
            }
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
    }

    /// Serves one popped (or resubmitted) request: returns its used length to complete now, or
    /// `None` when it was parked or handed to a helper (which completes it).
    fn serve(
        &mut self,
        head: u16,
        parsed: Result<Request, super::virtio_blk::Rejected>,
        atomic: &Memory,
        vring: &VringRwLock,
        store: &LayerStore,
    ) -> Option<u32> {
        let mem = atomic.memory();
        match parsed {
            Ok(request) if is_large_read(&request) => {
                let job = Job {
                    head,
                    request,
                    mem: atomic.clone(),
                    store: store.clone(),
                    waker: self.waker.clone(),
                    vring: vring.clone(),
                    record: self.record.clone(),
                };
                match self.offload.submit(job) {
                    Ok(()) => None,
                    Err(job) => self.execute_here(job.head, job.request, &mem, store),
                }
            }
            Ok(request) => self.execute_here(head, request, &mem, store),
            Err(rejected) => {
                debug!(head, error = %rejected.error, "layer store: malformed request");
                store.metrics().malformed();
                Some(match rejected.status {
                    Some(status) => finish(&*mem, status, Completion::status_only(STATUS_IOERR)),
                    None => 0,
                })
            }
        }
    }

    /// On the first event of a frontend session: asks the record whether this ring is the one
    /// a previous agent served, and if so executes again what was in flight then.
    fn resume(&mut self, vring: &VringRwLock, store: &LayerStore) {
        if self.resumed {
            return;
        }
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let queue = state.get_queue();
        if !queue.ready() || !state.is_enabled() {
            return;
        }
        self.resumed = true;
        let Some(record) = self.record.clone() else {
            return;
        };
        let Some(memory) = memory_identity(&mem) else {
            // Anonymous guest memory: no later session could prove it is the same guest.
            record.get().clear();
            return;
        };
        let key = RingKey {
            memory,
            rings: (queue.desc_table(), queue.avail_ring(), queue.used_ring()),
            size: queue.size(),
        };
        let Ok(ring_used) = queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire) else {
            record.get().clear();
            return;
        };
        let Resume::Resubmit { heads, next_avail } = record.get().resume(key, ring_used.0) else {
            return;
        };
        tracing::info!(
            heads = heads.len(),
            used = ring_used.0,
            "layer store: resuming the requests in flight before the restart"
        );
        state.get_queue_mut().set_next_avail(next_avail);
        state.get_queue_mut().set_next_used(ring_used.0);
        let (desc_table, size) = (GuestAddress(key.rings.0), key.size);
        let capacity = store.capacity();
        let mut used_any = false;
        for head in heads {
            let parsed = match descriptors_at(&*mem, desc_table, size, head) {
                Some(chain) => Request::parse(chain, &*mem, capacity),
                None => {
                    // The table no longer holds a chain there: nothing to answer it with, so it
                    // is returned unused, as a malformed chain is.
                    warn!(head, "layer store: a resubmitted head has no valid chain");
                    Err(super::virtio_blk::Rejected {
                        error: super::virtio_blk::ParseError::Empty,
                        status: None,
                    })
                }
            };
            drop(state);
            let served = self.serve(head, parsed, &atomic, vring, store);
            state = vring.get_mut();
            if let Some(used_len) = served {
                if let Err(e) = complete(&mut state, Some(&record), head, used_len) {
                    warn!(error = %e, "layer store: cannot return a resubmitted request");
                }
                used_any = true;
            }
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
    }

    /// The record holds nothing to resume any more; the next session decides afresh.
    fn forget(&mut self) {
        if let Some(record) = &self.record {
            record.get().clear();
        }
        self.resumed = false;
    }

    /// Executes a request on the queue thread: returns the used length, or `None` if it was
    /// parked.
    fn execute_here(
        &mut self,
        head: u16,
        request: Request,
        mem: &GuestMemoryMmap,
        store: &LayerStore,
    ) -> Option<u32> {
        let mut completed = Progress::new();
        match execute(&request, mem, store, &mut completed, &self.waker) {
            Poll::Ready(completion) => Some(finish(mem, request.status, completion)),
            Poll::Pending => self
                .park(Parked {
                    head,
                    request,
                    completed,
                })
                .map(|refused| {
                    finish(
                        mem,
                        refused.request.status,
                        Completion::status_only(STATUS_IOERR),
                    )
                }),
        }
    }

    /// Parks a request; a request beyond the queue's bound is handed back to be failed.
    ///
    /// The avail ring is the guest's: it may publish a head that is parked already. Answering it
    /// would complete that head twice, and keeping it would let the list grow without end, so
    /// such a chain is dropped (its first instance completes as usual). With duplicates gone,
    /// a queue cannot park more heads than it has, [`MAX_QUEUE_SIZE`].
    fn park(&mut self, parked: Parked) -> Option<Parked> {
        if self.parked.iter().any(|p| p.head == parked.head) {
            warn!(
                head = parked.head,
                "layer store: the guest reused a parked request's head; dropped"
            );
            return None;
        }
        if self.parked.len() >= MAX_QUEUE_SIZE {
            warn!(
                head = parked.head,
                "layer store: too many parked requests; failing one"
            );
            return Some(parked);
        }
        debug!(
            head = parked.head,
            sector = parked.request.sector,
            "layer store: request parked"
        );
        self.parked.push(parked);
        None
    }

    /// Parks the large reads a source was not ready for when a helper tried them.
    fn collect_offloaded(&mut self) {
        let refused: Vec<Parked> = self
            .offload
            .take_parked()
            .into_iter()
            .filter_map(|parked| self.park(parked))
            .collect();
        self.fail(refused);
    }

    /// Polls the parked requests again; completes those whose data is now there.
    fn retry_parked(&mut self, vring: &VringRwLock, store: &LayerStore) {
        if self.parked.is_empty() {
            return;
        }
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        let mut used_any = false;
        let mut index = 0;
        while let Some(parked) = self.parked.get_mut(index) {
            match execute(
                &parked.request,
                &mem,
                store,
                &mut parked.completed,
                &self.waker,
            ) {
                Poll::Pending => index += 1,
                Poll::Ready(completion) => {
                    let parked = self.parked.swap_remove(index);
                    let used_len = finish(&*mem, parked.request.status, completion);
                    if let Err(e) =
                        complete(&mut state, self.record.as_ref(), parked.head, used_len)
                    {
                        warn!(error = %e, "layer store: cannot return a parked request");
                    }
                    used_any = true;
                }
            }
        }
        if used_any && state.needs_notification().unwrap_or(true) {
            let _ = state.signal_used_queue();
        }
    }

    /// Completes every parked request with `VIRTIO_BLK_S_IOERR`.
    fn fail_parked(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        self.fail(parked);
    }

    /// Completes `parked` requests with `VIRTIO_BLK_S_IOERR`.
    fn fail(&mut self, parked: Vec<Parked>) {
        if parked.is_empty() {
            return;
        }
        let (Some(atomic), Some(vring)) = (self.mem.clone(), self.vring.clone()) else {
            return;
        };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        for request in parked {
            let used_len = finish(
                &*mem,
                request.request.status,
                Completion::status_only(STATUS_IOERR),
            );
            if let Err(e) = complete(&mut state, self.record.as_ref(), request.head, used_len) {
                debug!(error = %e, "layer store: cannot fail a parked request");
            }
        }
        let _ = state.signal_used_queue();
    }
}

/// Whether a request is a read large enough for the helpers.
fn is_large_read(request: &Request) -> bool {
    request.request_type == RequestType::In && request.data_len >= OFFLOAD_THRESHOLD
}

/// Device and inode of the file behind the guest memory's first region (QEMU's memfd): what
/// tells one QEMU's guest from another's.
fn memory_identity(mem: &GuestMemoryMmap) -> Option<(u64, u64)> {
    use vm_memory::GuestMemoryBackend;
    let region = mem.iter().next()?;
    let file = region.file_offset()?.file();
    RingKey::memory_of(file).ok()
}
