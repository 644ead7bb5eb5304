//! Helper threads for large reads, one small pool per queue.
//!
//! Copying a 1 MiB read from the page cache into guest memory takes tens of microseconds of one
//! core's memory bandwidth. Done on the queue thread, large reads are copied one after the other
//! and small reads wait behind them. So a queue hands reads of at least
//! [`OFFLOAD_THRESHOLD`] bytes to its own helpers, which copy in parallel, and keeps serving
//! small reads itself. A helper writes the status byte and returns the request on the used ring
//! itself (under that queue's vring lock), saving a thread hop; a read a source cannot serve yet
//! goes back to the queue thread, woken through the same waker a source uses, to be parked.
//!
//! Each pool belongs to one queue: its channel and outcome list are never touched by another
//! queue, and 4 KiB reads never go through it.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::GuestAddressSpace;

use super::execute::{Memory, Parked, Progress, execute, finish};
use super::inflight::{QueueRecord, complete};
use super::layer_store::LayerStore;
use super::virtio_blk::Request;

/// Reads of at least this many bytes go to the helpers.
pub const OFFLOAD_THRESHOLD: u64 = 128 * 1024;
/// Helper threads per queue when none is configured.
pub const DEFAULT_OFFLOAD_THREADS: usize = 2;

/// A large read handed to a helper.
pub(super) struct Job {
    pub(super) head: u16,
    pub(super) request: Request,
    pub(super) mem: Memory,
    pub(super) store: LayerStore,
    pub(super) waker: Waker,
    pub(super) vring: VringRwLock,
    /// The queue's inflight record, if the device keeps one.
    pub(super) record: Option<QueueRecord>,
}

#[derive(Debug, Default)]
struct Finished {
    /// Jobs a source was not ready for: the queue thread parks them.
    parked: Vec<Parked>,
    in_flight: usize,
}

#[derive(Debug, Default)]
struct Shared {
    finished: Mutex<Finished>,
    idle: Condvar,
}

impl Shared {
    fn finished(&self) -> MutexGuard<'_, Finished> {
        crate::sync::lock(&self.finished)
    }
}

/// One queue's helpers.
#[derive(Debug)]
pub(super) struct OffloadPool {
    sender: Option<Sender<Job>>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl OffloadPool {
    /// A pool of `threads` helpers (none if 0: every read stays on the queue thread).
    pub(super) fn new(threads: usize, queue: usize) -> std::io::Result<OffloadPool> {
        let shared = Arc::new(Shared::default());
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let receiver = receiver.clone();
            let shared = shared.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("layer-store-q{queue}-io{index}"))
                    .spawn(move || helper(&receiver, &shared))?,
            );
        }
        Ok(OffloadPool {
            sender: (threads > 0).then_some(sender),
            shared,
            threads: handles,
        })
    }

    /// Hands `job` to a helper; gives it back if the pool has no helper.
    pub(super) fn submit(&self, job: Job) -> Result<(), Job> {
        let Some(sender) = &self.sender else {
            return Err(job);
        };
        self.shared.finished().in_flight += 1;
        sender.send(job).map_err(|error| {
            self.shared.finished().in_flight -= 1;
            error.0
        })
    }

    /// The jobs helpers could not complete since the last call, to park.
    pub(super) fn take_parked(&self) -> Vec<Parked> {
        std::mem::take(&mut self.shared.finished().parked)
    }

    /// Waits (at most `timeout`) until no job is running or queued.
    pub(super) fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut finished = self.shared.finished();
        while finished.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    in_flight = finished.in_flight,
                    "layer store: large reads still running"
                );
                return;
            }
            finished = match self.shared.idle.wait_timeout(finished, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for OffloadPool {
    fn drop(&mut self) {
        // Closing the channel ends the helpers once the queued jobs are done.
        drop(self.sender.take());
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                warn!("layer store: a large-read helper panicked");
            }
        }
    }
}

fn helper(receiver: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        let job = {
            let receiver = crate::sync::lock(receiver);
            match receiver.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let mem = job.mem.memory();
        let mut completed = Progress::new();
        let parked = match execute(&job.request, &mem, &job.store, &mut completed, &job.waker) {
            Poll::Ready(completion) => {
                let used_len = finish(&*mem, job.request.status, completion);
                let mut state = job.vring.get_mut();
                if let Err(e) = complete(&mut state, job.record.as_ref(), job.head, used_len) {
                    warn!(error = %e, "layer store: cannot return a large read");
                }
                if state.needs_notification().unwrap_or(true) {
                    let _ = state.signal_used_queue();
                }
                None
            }
            Poll::Pending => Some(Parked {
                head: job.head,
                request: job.request,
                completed,
            }),
        };
        {
            let mut finished = shared.finished();
            finished.in_flight = finished.in_flight.saturating_sub(1);
            if let Some(parked) = parked {
                finished.parked.push(parked);
                job.waker.wake_by_ref();
            }
        }
        shared.idle.notify_all();
    }
}
