//! Process output to the agent, with back-pressure, and the sink that events go to.
//!
//! Each process has an output window: the shim sends at most that many bytes the agent has not yet
//! credited back (`Op::OutputCredit`). While the window is closed the shim stops reading the
//! process's pipes, so a slow agent slows the process's writes instead of growing memory.
//!
//! Events go to the most recent agent connection. When the agent reconnects, bytes in flight on
//! the old connection are lost with it and every window opens fully again.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use gantry_proto::{ContainerId, Event, ExecId, Message, OutputStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, mpsc, watch};

/// Bytes of output in flight per process before the shim waits for credit.
pub const OUTPUT_WINDOW: u64 = 1 << 20;
/// Largest output chunk in one event.
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// Where events go: the newest agent connection still open. A second, short-lived connection
/// (an operator's probe) must not strand events when it closes, so every attached connection is
/// kept and events fall back to the next newest.
#[derive(Debug)]
pub struct EventSink {
    connections: watch::Sender<Vec<(u64, mpsc::Sender<Message>)>>,
}

impl Default for EventSink {
    fn default() -> Self {
        Self {
            connections: watch::channel(Vec::new()).0,
        }
    }
}

impl EventSink {
    /// Makes `outgoing` the connection events go to; returns its generation for [`Self::detach`].
    pub fn attach(&self, outgoing: mpsc::Sender<Message>) -> u64 {
        let mut generation = 0;
        self.connections.send_modify(|connections| {
            generation = connections.last().map_or(1, |(g, _)| g + 1);
            connections.push((generation, outgoing));
        });
        generation
    }

    /// Forgets the connection of `generation`.
    pub fn detach(&self, generation: u64) {
        self.connections.send_if_modified(|connections| {
            let before = connections.len();
            connections.retain(|(g, _)| *g != generation);
            connections.len() != before
        });
    }

    /// Sends `event` to the newest open connection, waiting for one if there is none.
    pub async fn send(&self, event: Event) {
        let mut connections = self.connections.subscribe();
        loop {
            let newest_first: Vec<mpsc::Sender<Message>> = connections
                .borrow_and_update()
                .iter()
                .rev()
                .map(|(_, outgoing)| outgoing.clone())
                .collect();
            for outgoing in newest_first {
                if outgoing.send(Message::Event(event.clone())).await.is_ok() {
                    return;
                }
            }
            if connections.changed().await.is_err() {
                return;
            }
        }
    }
}

/// A process's output window.
#[derive(Debug)]
pub struct OutputWindow {
    available: Mutex<u64>,
    credited: Notify,
}

impl Default for OutputWindow {
    fn default() -> Self {
        Self {
            available: Mutex::new(OUTPUT_WINDOW),
            credited: Notify::new(),
        }
    }
}

impl OutputWindow {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.available.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent consumed `bytes`.
    pub fn credit(&self, bytes: u64) {
        let mut available = self.lock();
        *available = available.saturating_add(bytes).min(OUTPUT_WINDOW);
        drop(available);
        self.credited.notify_waiters();
    }

    /// A new agent connection: nothing is in flight any more.
    pub fn reset(&self) {
        *self.lock() = OUTPUT_WINDOW;
        self.credited.notify_waiters();
    }

    /// Takes up to `wanted` bytes of window, waiting while it is closed.
    async fn take(&self, wanted: usize) -> usize {
        loop {
            let notified = self.credited.notified();
            {
                let mut available = self.lock();
                if *available > 0 {
                    let granted = (*available).min(wanted as u64);
                    *available -= granted;
                    return granted as usize;
                }
            }
            notified.await;
        }
    }

    /// Gives back window taken but not used.
    fn give_back(&self, bytes: usize) {
        self.credit(bytes as u64);
    }
}

/// Which process an output belongs to.
#[derive(Debug, Clone)]
pub struct ProcessKey {
    /// The container.
    pub container_id: ContainerId,
    /// `None` for the main process.
    pub exec_id: Option<ExecId>,
}

/// Forwards one pipe to the agent until EOF.
pub async fn pump(
    pipe: OwnedFd,
    stream: OutputStream,
    key: ProcessKey,
    window: Arc<OutputWindow>,
    sink: Arc<EventSink>,
) {
    match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        Ok(pipe) => pump_reader(pipe, stream, key, window, sink).await,
        Err(error) => {
            tracing::error!(%error, container = %key.container_id, "cannot read process output");
        }
    }
}

/// Forwards a terminal's master to the agent until the terminal is gone: one `Stdout` stream.
pub async fn pump_tty(
    master: OwnedFd,
    key: ProcessKey,
    window: Arc<OutputWindow>,
    sink: Arc<EventSink>,
) {
    match super::tty::MasterReader::new(master) {
        Ok(reader) => pump_reader(reader, OutputStream::Stdout, key, window, sink).await,
        Err(error) => {
            tracing::error!(%error, container = %key.container_id, "cannot read terminal output");
        }
    }
}

/// Forwards `pipe` to the agent until EOF, within the process's output window.
async fn pump_reader<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: OutputStream,
    key: ProcessKey,
    window: Arc<OutputWindow>,
    sink: Arc<EventSink>,
) {
    let mut buffer = vec![0u8; OUTPUT_CHUNK];
    loop {
        let granted = window.take(OUTPUT_CHUNK).await;
        let read = match pipe.read(&mut buffer[..granted]).await {
            Ok(0) => {
                window.give_back(granted);
                return;
            }
            Ok(n) => n,
            Err(error) => {
                window.give_back(granted);
                tracing::warn!(%error, container = %key.container_id, "reading process output");
                return;
            }
        };
        window.give_back(granted - read);
        sink.send(Event::Output {
            container_id: key.container_id.clone(),
            exec_id: key.exec_id.clone(),
            stream,
            data: buffer[..read].to_vec(),
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[tokio::test]
    async fn output_stops_at_the_window_and_resumes_on_credit() {
        let (read, write) = crate::container::launch::pipe().unwrap();
        let sink = Arc::new(EventSink::default());
        let (outgoing, mut events) = mpsc::channel(1024);
        sink.attach(outgoing);
        let window = Arc::new(OutputWindow::default());
        let key = ProcessKey {
            container_id: "c".into(),
            exec_id: None,
        };
        let pump = tokio::spawn(pump(
            read,
            OutputStream::Stdout,
            key,
            Arc::clone(&window),
            Arc::clone(&sink),
        ));

        // Write twice the window from a thread (it blocks once the pipe is full).
        let writer = std::thread::spawn(move || {
            let mut write = std::fs::File::from(write);
            let data = vec![7u8; 2 * OUTPUT_WINDOW as usize];
            write.write_all(&data).unwrap();
        });
        let mut received = 0usize;
        while received < OUTPUT_WINDOW as usize {
            match tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .unwrap()
            {
                Some(Message::Event(Event::Output { data, .. })) => received += data.len(),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            received, OUTPUT_WINDOW as usize,
            "never more than the window"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(200), events.recv())
                .await
                .is_err(),
            "nothing more without credit"
        );
        window.credit(OUTPUT_WINDOW);
        while received < 2 * OUTPUT_WINDOW as usize {
            if let Some(Message::Event(Event::Output { data, .. })) =
                tokio::time::timeout(Duration::from_secs(5), events.recv())
                    .await
                    .unwrap()
            {
                received += data.len();
            }
        }
        writer.join().unwrap();
        // The pump reads EOF only once it has window to read with, as the agent's credit gives.
        window.credit(OUTPUT_WINDOW);
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(received, 2 * OUTPUT_WINDOW as usize);
    }

    #[tokio::test]
    async fn events_wait_for_a_connection_and_follow_the_newest() {
        let sink = Arc::new(EventSink::default());
        let send = tokio::spawn({
            let sink = Arc::clone(&sink);
            async move {
                sink.send(Event::Oom {
                    container_id: "c".into(),
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (old, mut old_rx) = mpsc::channel(1);
        let old_generation = sink.attach(old);
        let (new, mut new_rx) = mpsc::channel(1);
        sink.attach(new);
        sink.detach(old_generation); // a stale detach must not remove the newer connection
        send.await.unwrap();
        let delivered = old_rx.try_recv().is_ok() as u8 + new_rx.try_recv().is_ok() as u8;
        assert_eq!(delivered, 1);
        sink.send(Event::Oom {
            container_id: "d".into(),
        })
        .await;
        assert!(
            new_rx.try_recv().is_ok(),
            "later events go to the newest connection"
        );
    }
}
