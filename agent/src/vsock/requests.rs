//! The channel from a device's connectors (any thread, async) to its worker thread.
//!
//! Requests wait in a bounded queue; an eventfd wakes the worker. One queue exists per frontend
//! session of one device, so devices never share it.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use super::VsockError;

/// Where the worker sends the outcome of a connect: the agent's end of the stream, or why not.
pub type ConnectReply = oneshot::Sender<Result<UnixStream, VsockError>>;

/// A connector asks for a stream to `port` in the guest.
#[derive(Debug)]
pub struct ConnectRequest {
    /// Guest port.
    pub port: u32,
    /// Outcome.
    pub reply: ConnectReply,
}

#[derive(Debug, Default)]
struct Pending {
    requests: VecDeque<ConnectRequest>,
    /// The session ended: no worker will read the queue any more.
    closed: bool,
}

/// Bounded queue of connect requests plus the eventfd that wakes the worker.
#[derive(Debug)]
pub struct RequestQueue {
    pending: Mutex<Pending>,
    capacity: usize,
    consumer: EventConsumer,
    notifier: EventNotifier,
}

impl RequestQueue {
    /// A queue holding at most `capacity` unprocessed requests.
    pub fn new(capacity: usize) -> io::Result<RequestQueue> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(RequestQueue {
            pending: Mutex::new(Pending::default()),
            capacity,
            consumer,
            notifier,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        crate::sync::lock(&self.pending)
    }

    /// Queues a request and wakes the worker.
    pub fn submit(&self, request: ConnectRequest) -> Result<(), VsockError> {
        {
            let mut pending = self.lock();
            if pending.closed {
                return Err(VsockError::NotReady);
            }
            if pending.requests.len() >= self.capacity {
                return Err(VsockError::TooManyConnections);
            }
            pending.requests.push_back(request);
        }
        self.wake();
        Ok(())
    }

    /// Wakes the worker (e.g. so that it notices an abandoned connect).
    pub fn wake(&self) {
        let _ = self.notifier.notify();
    }

    /// Worker side: clears the wake-up and takes every queued request.
    pub fn take_all(&self) -> VecDeque<ConnectRequest> {
        let _ = self.consumer.consume();
        std::mem::take(&mut self.lock().requests)
    }

    /// Ends the session: queued and future requests fail with `NotReady`.
    pub fn close(&self) {
        let requests = {
            let mut pending = self.lock();
            pending.closed = true;
            std::mem::take(&mut pending.requests)
        };
        for request in requests {
            let _ = request.reply.send(Err(VsockError::NotReady));
        }
    }
}

impl AsRawFd for RequestQueue {
    /// The eventfd the worker polls.
    fn as_raw_fd(&self) -> RawFd {
        self.consumer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_bounded_and_close_fails_waiters() {
        let queue = RequestQueue::new(2).unwrap();
        let mut receivers = Vec::new();
        for port in 0..2 {
            let (reply, rx) = oneshot::channel();
            queue.submit(ConnectRequest { port, reply }).unwrap();
            receivers.push(rx);
        }
        let (reply, _rx) = oneshot::channel();
        assert!(matches!(
            queue.submit(ConnectRequest { port: 9, reply }),
            Err(VsockError::TooManyConnections)
        ));
        queue.close();
        for mut rx in receivers {
            assert!(matches!(rx.try_recv(), Ok(Err(VsockError::NotReady))));
        }
        let (reply, _rx) = oneshot::channel();
        assert!(matches!(
            queue.submit(ConnectRequest { port: 1, reply }),
            Err(VsockError::NotReady)
        ));
    }
}
