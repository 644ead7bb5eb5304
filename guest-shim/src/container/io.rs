//! Process output to the agent, with back-pressure, and the sink that events go to.
//!
//! Each process has an output window: the shim keeps at most that many bytes the agent does not
//! hold yet. While the window is closed the shim stops reading the process's pipes, so a slow
//! or absent agent slows the process's writes instead of growing memory.
//!
//! Every chunk read is kept ([`OutputWindow`]'s journal) until the agent says it holds it
//! (`Op::OutputReceived`, protocol 1.3) or credits it (`Op::OutputCredit`, 1.2). A connection
//! subscribed with `SubscribeEventsFrom` gets the chunks still kept resent from the position its
//! agent gives, so output written while no agent ran, or sent on a connection that died, reaches
//! the next agent once and in order. A 1.2 agent's `SubscribeEvents` forgets what was kept, as
//! 1.2 did.
//!
//! Ordering: a pump records a chunk and offers it to the sink under its process's `sending`
//! lock, and never waits there for a connection (the chunk is kept either way). A subscription
//! takes the `sending` lock of every process, attaches its connection, and resends under them,
//! so no chunk of a process reaches the new connection before the older chunks resent to it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use gantry_proto::{ContainerId, Event, ExecId, Message, OutputStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, mpsc, watch};

/// Bytes of output kept or in flight per process before the shim waits for the agent.
pub const OUTPUT_WINDOW: u64 = 1 << 20;
/// Largest output chunk in one event.
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// One connection events may go to.
#[derive(Debug, Clone)]
struct Subscriber {
    generation: u64,
    outgoing: mpsc::Sender<Message>,
    /// Subscribed with `SubscribeEventsFrom`: gets output as `OutputAt`.
    resumable: bool,
}

/// Where events go: the newest agent connection still open. A second, short-lived connection
/// (an operator's probe) must not strand events when it closes, so every attached connection is
/// kept and events fall back to the next newest.
#[derive(Debug)]
pub struct EventSink {
    connections: watch::Sender<Vec<Subscriber>>,
}

impl Default for EventSink {
    fn default() -> Self {
        Self {
            connections: watch::channel(Vec::new()).0,
        }
    }
}

/// `event` as a connection of that kind reads it: a 1.2 agent knows no `OutputAt`.
fn for_subscriber(event: &Event, resumable: bool) -> Event {
    match event {
        Event::OutputAt {
            container_id,
            exec_id,
            stream,
            data,
            ..
        } if !resumable => Event::Output {
            container_id: container_id.clone(),
            exec_id: exec_id.clone(),
            stream: *stream,
            data: data.clone(),
        },
        other => other.clone(),
    }
}

impl EventSink {
    /// Makes `outgoing` the connection events go to; returns its generation for [`Self::detach`].
    /// A `resumable` connection gets output with its offsets (`OutputAt`).
    pub fn attach(&self, outgoing: mpsc::Sender<Message>, resumable: bool) -> u64 {
        let mut generation = 0;
        self.connections.send_modify(|connections| {
            generation = connections.last().map_or(1, |c| c.generation + 1);
            connections.push(Subscriber {
                generation,
                outgoing,
                resumable,
            });
        });
        generation
    }

    /// Forgets the connection of `generation`.
    pub fn detach(&self, generation: u64) {
        self.connections.send_if_modified(|connections| {
            let before = connections.len();
            connections.retain(|c| c.generation != generation);
            connections.len() != before
        });
    }

    fn newest_first(&self) -> Vec<Subscriber> {
        self.connections.borrow().iter().rev().cloned().collect()
    }

    /// Sends `event` to the newest open connection, waiting for one if there is none.
    pub async fn send(&self, event: Event) {
        let mut connections = self.connections.subscribe();
        loop {
            connections.borrow_and_update();
            if self.offer(&event).await {
                return;
            }
            if connections.changed().await.is_err() {
                return;
            }
        }
    }

    /// Sends `event` to the newest open connection, if there is one; whether it went. For what
    /// a subscription resends when it did not (output kept in a journal, exits).
    pub async fn offer(&self, event: &Event) -> bool {
        for subscriber in self.newest_first() {
            let message = Message::Event(for_subscriber(event, subscriber.resumable));
            if subscriber.outgoing.send(message).await.is_ok() {
                return true;
            }
        }
        false
    }
}

/// A chunk of output kept until the agent holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptChunk {
    /// Which stream.
    pub stream: OutputStream,
    /// The offset of its first byte in the process's output.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The window's accounting: `available` plus the bytes kept plus what a pump has taken and not
/// yet recorded is at most [`OUTPUT_WINDOW`].
#[derive(Debug)]
struct Journal {
    available: u64,
    /// The process's output so far (the offset of the next chunk).
    next_offset: u64,
    kept: VecDeque<KeptChunk>,
}

impl Journal {
    /// Forgets kept bytes below `position`; how many.
    fn forget_below(&mut self, position: u64) -> u64 {
        let mut forgotten = 0;
        while let Some(front) = self.kept.front_mut() {
            let end = front.offset + front.data.len() as u64;
            if end <= position {
                forgotten += front.data.len() as u64;
                self.kept.pop_front();
            } else {
                if front.offset < position {
                    // `position - offset < len`: the chunk goes on past the position.
                    let cut = (position - front.offset) as usize;
                    front.data.drain(..cut);
                    front.offset = position;
                    forgotten += cut as u64;
                }
                break;
            }
        }
        self.available = (self.available + forgotten).min(OUTPUT_WINDOW);
        forgotten
    }

    /// The offset of the oldest byte kept.
    fn kept_from(&self) -> u64 {
        self.kept
            .front()
            .map_or(self.next_offset, |chunk| chunk.offset)
    }
}

/// A process's output window and the output kept in it.
#[derive(Debug)]
pub struct OutputWindow {
    journal: Mutex<Journal>,
    credited: Notify,
    /// Held while a chunk is recorded and offered, or exits are sent, and while a subscription
    /// resends (see the module's comment on ordering).
    sending: Arc<tokio::sync::Mutex<()>>,
}

impl Default for OutputWindow {
    fn default() -> Self {
        Self {
            journal: Mutex::new(Journal {
                available: OUTPUT_WINDOW,
                next_offset: 0,
                kept: VecDeque::new(),
            }),
            credited: Notify::new(),
            sending: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

impl OutputWindow {
    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent consumed `bytes` (a 1.2 agent's credit): the oldest kept bytes are forgotten.
    pub fn credit(&self, bytes: u64) {
        let mut journal = self.lock();
        let position = journal.kept_from().saturating_add(bytes);
        journal.forget_below(position);
        drop(journal);
        self.credited.notify_waiters();
    }

    /// The agent holds the output up to `position`: what is kept below it is forgotten. A
    /// position at or below an earlier one changes nothing.
    pub fn received(&self, position: u64) {
        self.lock().forget_below(position);
        self.credited.notify_waiters();
    }

    /// A 1.2 agent's new connection: what was kept is forgotten, the window opens.
    pub fn reset(&self) {
        let mut journal = self.lock();
        let next = journal.next_offset;
        journal.forget_below(next);
        drop(journal);
        self.credited.notify_waiters();
    }

    /// What is kept from `position` on (from the oldest byte kept without one), oldest first;
    /// what is kept below `position` is forgotten.
    pub fn kept_from(&self, position: Option<u64>) -> Vec<KeptChunk> {
        let mut journal = self.lock();
        if let Some(position) = position {
            journal.forget_below(position);
        }
        let kept = journal.kept.iter().cloned().collect();
        drop(journal);
        self.credited.notify_waiters();
        kept
    }

    /// Bytes kept now.
    #[cfg(test)]
    pub fn kept_bytes(&self) -> u64 {
        self.lock().kept.iter().map(|c| c.data.len() as u64).sum()
    }

    /// The ordering lock (see the module's comment).
    pub async fn sending(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.sending).lock_owned().await
    }

    /// Takes up to `wanted` bytes of window, waiting while it is closed.
    async fn take(&self, wanted: usize) -> usize {
        loop {
            let notified = self.credited.notified();
            {
                let mut journal = self.lock();
                if journal.available > 0 {
                    let granted = journal.available.min(wanted as u64);
                    journal.available -= granted;
                    return granted as usize;
                }
            }
            notified.await;
        }
    }

    /// Gives back window taken but not used.
    fn give_back(&self, bytes: usize) {
        let mut journal = self.lock();
        journal.available = (journal.available + bytes as u64).min(OUTPUT_WINDOW);
        drop(journal);
        self.credited.notify_waiters();
    }

    /// Keeps a chunk read with window taken; returns its offset.
    fn record(&self, stream: OutputStream, data: &[u8]) -> u64 {
        let mut journal = self.lock();
        let offset = journal.next_offset;
        journal.next_offset += data.len() as u64;
        journal.kept.push_back(KeptChunk {
            stream,
            offset,
            data: data.to_vec(),
        });
        offset
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
        let _sending = window.sending().await;
        let offset = window.record(stream, &buffer[..read]);
        // Kept whether or not a connection takes it: the next subscription resends it.
        sink.offer(&Event::OutputAt {
            container_id: key.container_id.clone(),
            exec_id: key.exec_id.clone(),
            stream,
            offset,
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
        sink.attach(outgoing, false);
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
        let old_generation = sink.attach(old, false);
        let (new, mut new_rx) = mpsc::channel(1);
        sink.attach(new, false);
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

    /// Waits until `window` keeps `bytes`.
    async fn kept_reaches(window: &OutputWindow, bytes: u64) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while window.kept_bytes() < bytes {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("kept {} of {bytes}", window.kept_bytes()));
    }

    fn spawn_pump_without_agent() -> (
        Arc<OutputWindow>,
        std::fs::File,
        tokio::task::JoinHandle<()>,
    ) {
        let (read, write) = crate::container::launch::pipe().unwrap();
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
            Arc::new(EventSink::default()),
        ));
        (window, std::fs::File::from(write), pump)
    }

    #[tokio::test]
    async fn output_without_an_agent_is_kept_and_resent_from_the_agents_position() {
        let (window, mut write, pump) = spawn_pump_without_agent();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        // From a thread: the pipe holds less than that, and the pump runs on this one.
        let writer = std::thread::spawn({
            let data = data.clone();
            move || write.write_all(&data).unwrap()
        });
        kept_reaches(&window, 100_000).await;
        writer.join().unwrap();
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();

        // The agent holds 40 000 bytes: the rest comes again, contiguous, from there.
        let resent = window.kept_from(Some(40_000));
        assert_eq!(resent[0].offset, 40_000);
        let mut next = 40_000;
        let mut bytes = Vec::new();
        for chunk in &resent {
            assert_eq!(chunk.offset, next, "no gap, no overlap");
            next += chunk.data.len() as u64;
            bytes.extend_from_slice(&chunk.data);
        }
        assert_eq!(bytes, data[40_000..]);
        assert_eq!(window.kept_bytes(), 60_000);
        // A position said again, or an older one, frees nothing more.
        window.received(40_000);
        window.received(10);
        assert_eq!(window.kept_bytes(), 60_000);
        // Without a position everything kept comes again.
        assert_eq!(window.kept_from(None).len(), resent.len());
        // A 1.2 credit forgets the oldest bytes; a position past the end is clamped.
        window.credit(10_000);
        assert_eq!(window.kept_from(None)[0].offset, 50_000);
        window.received(u64::MAX);
        assert_eq!(window.kept_bytes(), 0);
    }

    #[tokio::test]
    async fn a_full_window_holds_the_process_until_the_agent_has_its_output() {
        let (window, mut write, pump) = spawn_pump_without_agent();
        let writer = std::thread::spawn(move || {
            write
                .write_all(&vec![1u8; 2 * OUTPUT_WINDOW as usize])
                .unwrap();
        });
        kept_reaches(&window, OUTPUT_WINDOW).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            window.kept_bytes(),
            OUTPUT_WINDOW,
            "never more kept than the window"
        );
        window.received(OUTPUT_WINDOW / 2);
        kept_reaches(&window, OUTPUT_WINDOW).await;
        let kept = window.kept_from(None);
        assert_eq!(kept[0].offset, OUTPUT_WINDOW / 2, "the pump read on");
        // The agent takes everything from now on: the writer finishes, the pump ends.
        let agent = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                loop {
                    window.received(u64::MAX);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        agent.abort();
        writer.join().unwrap();
    }

    #[tokio::test]
    async fn a_resumable_connection_gets_offsets_and_an_old_one_plain_output() {
        let sink = EventSink::default();
        let (old, mut old_rx) = mpsc::channel(4);
        sink.attach(old, false);
        let event = Event::OutputAt {
            container_id: "c".into(),
            exec_id: None,
            stream: OutputStream::Stderr,
            offset: 7,
            data: b"x".to_vec(),
        };
        assert!(sink.offer(&event).await);
        assert!(matches!(
            old_rx.try_recv(),
            Ok(Message::Event(Event::Output {
                stream: OutputStream::Stderr,
                ..
            }))
        ));
        let (new, mut new_rx) = mpsc::channel(4);
        sink.attach(new, true);
        assert!(sink.offer(&event).await);
        assert_eq!(new_rx.try_recv().unwrap(), Message::Event(event.clone()));
        drop(new_rx);
        drop(old_rx);
        assert!(!sink.offer(&event).await, "no open connection: not sent");
    }
}
