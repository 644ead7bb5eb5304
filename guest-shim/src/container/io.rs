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
//! the next agent once and in order. A 1.2 agent's `SubscribeEvents` forgets what was handed to
//! an earlier connection (output in flight is lost, as in 1.2) and gets what no connection took.
//!
//! Ordering. A chunk's handover (record it in the journal with its offset, offer it to the
//! newest connection) happens under two locks: the sink's `handover` lock, shared, and the
//! process's own `handover` lock, so that its two pumps and its exit reach a connection in
//! offset order. A subscription takes the sink's lock exclusively: no chunk of any process is
//! then between being recorded and being offered, so everything recorded is in a journal and
//! nothing can reach the new connection yet; it attaches the connection, resends, and lets go.
//! One shared lock rather than taking every process's lock in turn: a process started while a
//! subscription runs (its pumps run before the runtime lists it) would otherwise offer output
//! to the new connection before its older output was resent. Offering never waits for a
//! connection to appear (the chunk is kept, the next subscription resends it), so no lock is
//! held while there is none; and it stops waiting for room in a connection's queue once a
//! subscription waits (an old connection still open but no longer read must not hold up the
//! new agent's), the chunk again kept for the subscription to resend. A subscription's own
//! resend stops the same way for a later one, which resends everything anyway.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use gantry_proto::{ContainerId, Event, ExecId, ExitStatus, Message, OutputPosition, OutputStream};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{Notify, RwLock, mpsc, watch};

/// Bytes of output kept or in flight per process before the shim waits for the agent.
pub const OUTPUT_WINDOW: u64 = 1 << 20;
/// Largest output chunk in one event.
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// How a send to one connection went.
enum Delivery {
    /// In the connection's queue.
    Taken,
    /// The connection is gone.
    Closed,
    /// A subscription waits: given up, the event kept (or resent) for it.
    Preempted,
}

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
    /// Shared by a chunk's or an exit's handover, exclusive for a subscription (see the
    /// module's comment on ordering).
    handover: RwLock<()>,
    /// Subscriptions waiting for `handover`, and their signal to offers waiting for room.
    subscriptions_waiting: AtomicUsize,
    subscription_waits: Notify,
    /// Every process's window, for subscriptions to resend from. Registered when the window is
    /// made, before its pumps run, so that no output escapes a subscription.
    windows: Mutex<Vec<Weak<OutputWindow>>>,
}

impl Default for EventSink {
    fn default() -> Self {
        Self {
            connections: watch::channel(Vec::new()).0,
            handover: RwLock::new(()),
            subscriptions_waiting: AtomicUsize::new(0),
            subscription_waits: Notify::new(),
            windows: Mutex::new(Vec::new()),
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
    /// A new process's output window, registered for subscriptions to resend from.
    pub fn window(&self, key: ProcessKey) -> Arc<OutputWindow> {
        let window = Arc::new(OutputWindow::new(key));
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.retain(|w| w.strong_count() > 0);
        windows.push(Arc::downgrade(&window));
        window
    }

    /// The windows of processes still running or not yet deleted, oldest first.
    fn live_windows(&self) -> Vec<Arc<OutputWindow>> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.retain(|w| w.strong_count() > 0);
        windows
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|w| !w.is_discarded())
            .collect()
    }

    /// Makes `outgoing` the connection events go to; returns its generation for [`Self::detach`].
    /// A `resumable` connection gets output with its offsets (`OutputAt`).
    fn attach(&self, outgoing: mpsc::Sender<Message>, resumable: bool) -> u64 {
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

    /// Makes `outgoing` the connection events go to, resending what it must get first; returns
    /// its generation for [`Self::detach`].
    ///
    /// With `positions` (`SubscribeEventsFrom`), each process's kept output is resent as
    /// `OutputAt` from the position its agent holds (from the oldest byte kept for a process not
    /// listed), then its exit if it has ended: the exit may have gone to a dead connection, and
    /// the agent records an exit once. Without (`SubscribeEvents` of a 1.1 or 1.2 agent, which
    /// counts exits as often as it hears them), output handed to an earlier connection is
    /// forgotten and the rest, with the exits no connection took, is sent as `Output`.
    pub async fn subscribe(
        &self,
        outgoing: mpsc::Sender<Message>,
        positions: Option<Vec<OutputPosition>>,
    ) -> u64 {
        let resumable = positions.is_some();
        let positions: HashMap<(ContainerId, Option<ExecId>), u64> = positions
            .unwrap_or_default()
            .into_iter()
            .map(|p| ((p.container_id, p.exec_id), p.position))
            .collect();
        self.subscriptions_waiting.fetch_add(1, Ordering::SeqCst);
        self.subscription_waits.notify_waiters();
        let _exclusive = self.handover.write().await;
        self.subscriptions_waiting.fetch_sub(1, Ordering::SeqCst);
        let generation = self.attach(outgoing.clone(), resumable);
        let (mut resent_bytes, mut resent_exits) = (0u64, 0usize);
        'windows: for window in self.live_windows() {
            let key = &window.key;
            let chunks = if resumable {
                let position = positions
                    .get(&(key.container_id.clone(), key.exec_id.clone()))
                    .copied();
                window.kept_from(position)
            } else {
                window.kept_not_handed_over()
            };
            for chunk in chunks {
                let end = chunk.offset + chunk.data.len() as u64;
                resent_bytes += chunk.data.len() as u64;
                let event = Event::OutputAt {
                    container_id: key.container_id.clone(),
                    exec_id: key.exec_id.clone(),
                    stream: chunk.stream,
                    offset: chunk.offset,
                    data: chunk.data,
                };
                let message = Message::Event(for_subscriber(&event, resumable));
                if !matches!(self.send(&outgoing, message).await, Delivery::Taken) {
                    // Gone, or a later subscription takes over: what is kept stays for it.
                    break 'windows;
                }
                window.handed_over_until(end);
            }
            let Some(exit) = window.exit() else { continue };
            if resumable || !exit.handed_over {
                let event = Event::Exit {
                    container_id: key.container_id.clone(),
                    exec_id: key.exec_id.clone(),
                    status: exit.status,
                };
                if !matches!(
                    self.send(&outgoing, Message::Event(event)).await,
                    Delivery::Taken
                ) {
                    break;
                }
                window.exit_handed_over();
                resent_exits += 1;
            }
        }
        tracing::info!(
            generation,
            resumable,
            resent_bytes,
            resent_exits,
            "events subscribed"
        );
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

    /// Sends `event` to the newest open connection, waiting for one if there is none. For
    /// events no journal keeps (OOM kills).
    pub async fn send_waiting(&self, event: Event) {
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

    /// Sends `event` to the newest open connection, if there is one; whether it went. Gives up
    /// waiting for room in a connection's queue when a subscription waits.
    async fn offer(&self, event: &Event) -> bool {
        for subscriber in self.newest_first() {
            let message = Message::Event(for_subscriber(event, subscriber.resumable));
            match self.send(&subscriber.outgoing, message).await {
                Delivery::Taken => return true,
                Delivery::Closed => continue,
                Delivery::Preempted => return false,
            }
        }
        false
    }

    /// Sends `message` on `outgoing`, unless a subscription waits before there is room.
    async fn send(&self, outgoing: &mpsc::Sender<Message>, message: Message) -> Delivery {
        tokio::select! {
            room = outgoing.reserve() => match room {
                Ok(room) => {
                    room.send(message);
                    Delivery::Taken
                }
                Err(_) => Delivery::Closed,
            },
            () = self.subscription_waiting() => Delivery::Preempted,
        }
    }

    /// Returns once a subscription waits for the `handover` lock.
    async fn subscription_waiting(&self) {
        loop {
            let waits = self.subscription_waits.notified();
            tokio::pin!(waits);
            // Registered before the count is read, so a subscription arriving between the two
            // still wakes this one.
            waits.as_mut().enable();
            if self.subscriptions_waiting.load(Ordering::SeqCst) > 0 {
                return;
            }
            waits.await;
        }
    }

    /// Records one chunk of a process's output and offers it to the newest connection; its
    /// offset, or `None` if the process's output is discarded.
    async fn hand_over_output(
        &self,
        window: &OutputWindow,
        stream: OutputStream,
        data: &[u8],
    ) -> Option<u64> {
        let _shared = self.handover.read().await;
        let _in_order = window.handover.lock().await;
        let offset = window.record(stream, data)?;
        let event = Event::OutputAt {
            container_id: window.key.container_id.clone(),
            exec_id: window.key.exec_id.clone(),
            stream,
            offset,
            data: data.to_vec(),
        };
        // Kept whether or not a connection takes it: the next subscription resends it.
        if self.offer(&event).await {
            window.handed_over_until(offset + data.len() as u64);
        }
        Some(offset)
    }

    /// Offers a process's exit to the newest connection, after its output: call it once the
    /// pumps are done (or given up on). Remembered in the window, so that a subscription sends
    /// it again.
    pub async fn hand_over_exit(&self, window: &OutputWindow, status: ExitStatus) {
        let _shared = self.handover.read().await;
        let _in_order = window.handover.lock().await;
        let event = Event::Exit {
            container_id: window.key.container_id.clone(),
            exec_id: window.key.exec_id.clone(),
            status,
        };
        let handed_over = self.offer(&event).await;
        window.lock().exit = Some(ExitNotice {
            status,
            handed_over,
        });
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

/// A process's exit, once offered.
#[derive(Debug, Clone, Copy)]
struct ExitNotice {
    status: ExitStatus,
    /// A connection took it (which may have died since).
    handed_over: bool,
}

/// The window's accounting: `available` plus the bytes kept plus what a pump has taken and not
/// yet recorded is at most [`OUTPUT_WINDOW`].
#[derive(Debug)]
struct Journal {
    available: u64,
    /// The process's output so far (the offset of the next chunk).
    next_offset: u64,
    /// Output below this offset went to a connection: what a 1.2 agent's subscription forgets.
    handed_over: u64,
    kept: VecDeque<KeptChunk>,
    exit: Option<ExitNotice>,
    /// The process is gone from the runtime (its container deleted, its exec failed): nobody
    /// will take its output, so none is kept and its pumps end.
    discarded: bool,
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
    key: ProcessKey,
    journal: Mutex<Journal>,
    credited: Notify,
    /// Held while a chunk of this process is recorded and offered, or its exit offered (see
    /// the module's comment on ordering).
    handover: tokio::sync::Mutex<()>,
}

impl OutputWindow {
    fn new(key: ProcessKey) -> Self {
        Self {
            key,
            journal: Mutex::new(Journal {
                available: OUTPUT_WINDOW,
                next_offset: 0,
                handed_over: 0,
                kept: VecDeque::new(),
                exit: None,
                discarded: false,
            }),
            credited: Notify::new(),
            handover: tokio::sync::Mutex::new(()),
        }
    }

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
    /// position at or below an earlier one changes nothing; one past the output forgets all.
    pub fn received(&self, position: u64) {
        self.lock().forget_below(position);
        self.credited.notify_waiters();
    }

    /// The process is gone from the runtime: forget its output and end its pumps.
    pub fn discard(&self) {
        let mut journal = self.lock();
        journal.discarded = true;
        let next = journal.next_offset;
        journal.forget_below(next);
        drop(journal);
        self.credited.notify_waiters();
    }

    fn is_discarded(&self) -> bool {
        self.lock().discarded
    }

    /// What is kept from `position` on (from the oldest byte kept without one), oldest first;
    /// what is kept below `position` is forgotten.
    fn kept_from(&self, position: Option<u64>) -> Vec<KeptChunk> {
        let mut journal = self.lock();
        if let Some(position) = position {
            journal.forget_below(position);
        }
        let kept = journal.kept.iter().cloned().collect();
        drop(journal);
        self.credited.notify_waiters();
        kept
    }

    /// What is kept and no connection took, oldest first; what one took is forgotten (a 1.2
    /// agent's subscription: output in flight on an earlier connection is lost).
    fn kept_not_handed_over(&self) -> Vec<KeptChunk> {
        let mut journal = self.lock();
        let handed_over = journal.handed_over;
        journal.forget_below(handed_over);
        let kept = journal.kept.iter().cloned().collect();
        drop(journal);
        self.credited.notify_waiters();
        kept
    }

    /// A connection took the output below `end`.
    fn handed_over_until(&self, end: u64) {
        let mut journal = self.lock();
        journal.handed_over = journal.handed_over.max(end);
    }

    fn exit(&self) -> Option<ExitNotice> {
        self.lock().exit
    }

    fn exit_handed_over(&self) {
        if let Some(exit) = &mut self.lock().exit {
            exit.handed_over = true;
        }
    }

    /// Bytes kept now.
    #[cfg(test)]
    pub fn kept_bytes(&self) -> u64 {
        self.lock().kept.iter().map(|c| c.data.len() as u64).sum()
    }

    /// Takes up to `wanted` bytes of window, waiting while it is closed; 0 once the output is
    /// discarded.
    async fn take(&self, wanted: usize) -> usize {
        loop {
            let notified = self.credited.notified();
            {
                let mut journal = self.lock();
                if journal.discarded {
                    return 0;
                }
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

    /// Keeps a chunk read with window taken; its offset, or `None` if the output is discarded.
    fn record(&self, stream: OutputStream, data: &[u8]) -> Option<u64> {
        let mut journal = self.lock();
        if journal.discarded {
            return None;
        }
        let offset = journal.next_offset;
        journal.next_offset += data.len() as u64;
        journal.kept.push_back(KeptChunk {
            stream,
            offset,
            data: data.to_vec(),
        });
        Some(offset)
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
    window: Arc<OutputWindow>,
    sink: Arc<EventSink>,
) {
    match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
        Ok(pipe) => pump_reader(pipe, stream, window, sink).await,
        Err(error) => {
            tracing::error!(%error, container = %window.key.container_id, "cannot read process output");
        }
    }
}

/// Forwards a terminal's master to the agent until the terminal is gone: one `Stdout` stream.
pub async fn pump_tty(master: OwnedFd, window: Arc<OutputWindow>, sink: Arc<EventSink>) {
    match super::tty::MasterReader::new(master) {
        Ok(reader) => pump_reader(reader, OutputStream::Stdout, window, sink).await,
        Err(error) => {
            tracing::error!(%error, container = %window.key.container_id, "cannot read terminal output");
        }
    }
}

/// Forwards `pipe` to the agent until EOF (or the output is discarded), within the process's
/// output window.
async fn pump_reader<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: OutputStream,
    window: Arc<OutputWindow>,
    sink: Arc<EventSink>,
) {
    let mut buffer = vec![0u8; OUTPUT_CHUNK];
    loop {
        let granted = window.take(OUTPUT_CHUNK).await;
        if granted == 0 {
            return;
        }
        let read = match pipe.read(&mut buffer[..granted]).await {
            Ok(0) => {
                window.give_back(granted);
                return;
            }
            Ok(n) => n,
            Err(error) => {
                window.give_back(granted);
                tracing::warn!(%error, container = %window.key.container_id, "reading process output");
                return;
            }
        };
        window.give_back(granted - read);
        if sink
            .hand_over_output(&window, stream, &buffer[..read])
            .await
            .is_none()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn key(container_id: &str) -> ProcessKey {
        ProcessKey {
            container_id: container_id.into(),
            exec_id: None,
        }
    }

    /// A process's stdout pumped into `sink`: its window, the process's end of the pipe, the
    /// pump.
    fn spawn_pump(
        sink: &Arc<EventSink>,
        container_id: &str,
    ) -> (
        Arc<OutputWindow>,
        std::fs::File,
        tokio::task::JoinHandle<()>,
    ) {
        let (read, write) = crate::container::launch::pipe().unwrap();
        let window = sink.window(key(container_id));
        let pump = tokio::spawn(pump(
            read,
            OutputStream::Stdout,
            Arc::clone(&window),
            Arc::clone(sink),
        ));
        (window, std::fs::File::from(write), pump)
    }

    /// `len` bytes of a pattern that tells every offset's byte, from `from` on.
    fn pattern(from: usize, len: usize) -> Vec<u8> {
        (from..from + len).map(|i| (i % 251) as u8).collect()
    }

    /// `actual == expected`, without printing megabytes when not.
    #[track_caller]
    fn assert_bytes(actual: &[u8], expected: &[u8]) {
        let first_difference = actual.iter().zip(expected).position(|(a, e)| a != e);
        assert!(
            actual.len() == expected.len() && first_difference.is_none(),
            "{} bytes, {} expected, first difference at {first_difference:?}",
            actual.len(),
            expected.len()
        );
    }

    async fn next_event(events: &mut mpsc::Receiver<Message>) -> Event {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(Message::Event(event))) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Reads `OutputAt` events until the output reaches `end`, checking that they continue from
    /// `*next` without gap or overlap; the bytes.
    async fn output_until(
        events: &mut mpsc::Receiver<Message>,
        next: &mut u64,
        end: u64,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        while *next < end {
            match next_event(events).await {
                Event::OutputAt { offset, data, .. } => {
                    assert_eq!(offset, *next, "no gap, no overlap");
                    *next += data.len() as u64;
                    bytes.extend_from_slice(&data);
                }
                other => panic!("expected output, got {other:?}"),
            }
        }
        assert_eq!(*next, end, "not past the output written");
        bytes
    }

    async fn nothing_more(events: &mut mpsc::Receiver<Message>) {
        let more = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
        assert!(matches!(more, Err(_) | Ok(None)), "{more:?}");
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

    /// Writes `data` off the runtime's threads (the pipe holds less than that, and the pump
    /// must run meanwhile); the file back once written, to write more or to close.
    fn write_in_background(
        mut write: std::fs::File,
        data: Vec<u8>,
    ) -> tokio::task::JoinHandle<std::fs::File> {
        tokio::task::spawn_blocking(move || {
            write.write_all(&data).unwrap();
            write
        })
    }

    /// Writes `data` as the process's last output, closes its pipe and waits for its pump to end.
    async fn write_last(write: std::fs::File, data: Vec<u8>, pump: tokio::task::JoinHandle<()>) {
        drop(write_in_background(write, data).await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn output_stops_at_the_window_and_resumes_on_credit() {
        let sink = Arc::new(EventSink::default());
        let (outgoing, mut events) = mpsc::channel(1024);
        sink.subscribe(outgoing, None).await;
        let (window, write, pump) = spawn_pump(&sink, "c");

        // Twice the window (the writer blocks once the pipe is full).
        let writer = write_in_background(write, vec![7u8; 2 * OUTPUT_WINDOW as usize]);
        let mut received = 0usize;
        while received < OUTPUT_WINDOW as usize {
            match next_event(&mut events).await {
                Event::Output { data, .. } => received += data.len(),
                other => panic!("a 1.2 connection gets plain output: {other:?}"),
            }
        }
        assert_eq!(
            received, OUTPUT_WINDOW as usize,
            "never more than the window"
        );
        nothing_more(&mut events).await;
        window.credit(OUTPUT_WINDOW);
        while received < 2 * OUTPUT_WINDOW as usize {
            if let Event::Output { data, .. } = next_event(&mut events).await {
                received += data.len();
            }
        }
        drop(writer.await.unwrap());
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
                sink.send_waiting(Event::Oom {
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
        sink.send_waiting(Event::Oom {
            container_id: "d".into(),
        })
        .await;
        assert!(
            new_rx.try_recv().is_ok(),
            "later events go to the newest connection"
        );
    }

    #[tokio::test]
    async fn the_journal_forgets_below_the_agents_position_once_and_clamps() {
        let sink = Arc::new(EventSink::default());
        let (window, write, pump) = spawn_pump(&sink, "c");
        let data = pattern(0, 100_000);
        let writer = write_in_background(write, data.clone());
        kept_reaches(&window, 100_000).await;
        drop(writer.await.unwrap());
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
        assert_bytes(&bytes, &data[40_000..]);
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
        window.credit(u64::MAX);
        window.received(u64::MAX);
        assert_eq!(
            window.lock().available,
            OUTPUT_WINDOW,
            "never more than the window"
        );
    }

    #[tokio::test]
    async fn a_full_window_holds_the_process_until_the_agent_has_its_output() {
        let sink = Arc::new(EventSink::default());
        let (window, write, pump) = spawn_pump(&sink, "c");
        let writer = write_in_background(write, vec![1u8; 2 * OUTPUT_WINDOW as usize]);
        kept_reaches(&window, OUTPUT_WINDOW).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            window.kept_bytes(),
            OUTPUT_WINDOW,
            "never more kept than the window"
        );
        window.received(OUTPUT_WINDOW / 2);
        window.received(OUTPUT_WINDOW / 2); // said twice: no credit twice
        kept_reaches(&window, OUTPUT_WINDOW).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(window.kept_bytes(), OUTPUT_WINDOW);
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
        drop(writer.await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        agent.abort();
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

    #[tokio::test]
    async fn output_lost_with_a_connection_or_written_without_one_is_resent_from_the_agents_position()
     {
        let sink = Arc::new(EventSink::default());
        let (old, mut old_rx) = mpsc::channel(1024);
        sink.subscribe(old, Some(Vec::new())).await;
        let (window, write, pump) = spawn_pump(&sink, "c");

        let write = write_in_background(write, pattern(0, 100_000))
            .await
            .unwrap();
        let mut next = 0;
        assert_bytes(
            &output_until(&mut old_rx, &mut next, 100_000).await,
            &pattern(0, 100_000),
        );
        // The agent wrote 50 001 bytes to its log, then died with the rest in flight; the
        // process writes on without one.
        drop(old_rx);
        let write = write_in_background(write, pattern(100_000, 100_000))
            .await
            .unwrap();
        kept_reaches(&window, 200_000).await;

        let (new, mut new_rx) = mpsc::channel(1024);
        let held = vec![OutputPosition {
            container_id: "c".into(),
            exec_id: None,
            position: 50_001,
        }];
        sink.subscribe(new, Some(held)).await;
        let mut next = 50_001;
        let resent = output_until(&mut new_rx, &mut next, 200_000).await;
        assert_bytes(&resent, &pattern(50_001, 149_999));
        assert_eq!(
            window.kept_bytes(),
            149_999,
            "kept until the agent says it has it"
        );
        // Newer output follows.
        drop(
            write_in_background(write, pattern(200_000, 10_000))
                .await
                .unwrap(),
        );
        assert_bytes(
            &output_until(&mut new_rx, &mut next, 210_000).await,
            &pattern(200_000, 10_000),
        );
        nothing_more(&mut new_rx).await;
        window.received(u64::MAX);
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
    }

    /// The agent restarts again and again while a process writes without pause: whatever was
    /// in flight between the pump and the old connection, each new one gets the output from
    /// the old agent's position on, every byte once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscriptions_while_output_flows_neither_lose_nor_repeat_a_byte() {
        const TOTAL: usize = 6 << 20;
        const RESTARTS: u64 = 10;
        const BETWEEN_RESTARTS: u64 = 512 << 10;
        let sink = Arc::new(EventSink::default());
        let (first, mut events) = mpsc::channel(8);
        sink.subscribe(first, Some(Vec::new())).await;
        let (window, write, pump) = spawn_pump(&sink, "c");
        let writer = write_in_background(write, pattern(0, TOTAL));

        let mut held = 0;
        let mut bytes = Vec::new();
        let mut subscriptions = Vec::new();
        while held < TOTAL as u64 {
            match next_event(&mut events).await {
                Event::OutputAt { offset, data, .. } => {
                    assert_eq!(offset, held, "no gap, no overlap");
                    held += data.len() as u64;
                    bytes.extend_from_slice(&data);
                    window.received(held);
                }
                other => panic!("{other:?}"),
            }
            let restarts = subscriptions.len() as u64;
            if restarts < RESTARTS && held >= (restarts + 1) * BETWEEN_RESTARTS {
                // The agent dies with what is queued for it; the next one says what it holds.
                let (next, next_events) = mpsc::channel(8);
                events = next_events;
                let position = vec![OutputPosition {
                    container_id: "c".into(),
                    exec_id: None,
                    position: held,
                }];
                subscriptions.push(tokio::spawn({
                    let sink = Arc::clone(&sink);
                    async move { sink.subscribe(next, Some(position)).await }
                }));
            }
        }
        for subscription in subscriptions {
            subscription.await.unwrap();
        }
        assert_bytes(&bytes, &pattern(0, TOTAL));
        drop(writer.await.unwrap());
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
        nothing_more(&mut events).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_started_during_a_subscription_has_its_output_there_once_in_order() {
        let sink = Arc::new(EventSink::default());
        let (old_window, old_write, old_pump) = spawn_pump(&sink, "old");
        drop(
            write_in_background(old_write, pattern(0, 300_000))
                .await
                .unwrap(),
        );
        old_pump.await.unwrap();

        // The resend of 300 000 bytes through a queue of one, read slowly, takes a while;
        // meanwhile a new process writes.
        let (new, mut events) = mpsc::channel(1);
        let subscription = tokio::spawn({
            let sink = Arc::clone(&sink);
            async move { sink.subscribe(new, Some(Vec::new())).await }
        });
        let first = next_event(&mut events).await;
        let (young_window, young_write, young_pump) = spawn_pump(&sink, "young");
        let young_writer = write_in_background(young_write, pattern(0, 100_000));

        let mut next: HashMap<String, u64> = HashMap::new();
        let mut young_bytes = Vec::new();
        let mut event = first;
        loop {
            let Event::OutputAt {
                container_id,
                offset,
                data,
                ..
            } = event
            else {
                panic!("{event:?}");
            };
            let next = next.entry(container_id.clone()).or_default();
            assert_eq!(offset, *next, "{container_id}: no gap, no overlap");
            *next += data.len() as u64;
            if container_id == "young" {
                young_bytes.extend_from_slice(&data);
            }
            if young_bytes.len() == 100_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            event = next_event(&mut events).await;
        }
        assert_eq!(next.get("old"), Some(&300_000), "all resent first");
        assert_bytes(&young_bytes, &pattern(0, 100_000));
        subscription.await.unwrap();
        drop(young_writer.await.unwrap());
        young_pump.await.unwrap();
        nothing_more(&mut events).await;
        assert_eq!(old_window.kept_bytes() + young_window.kept_bytes(), 400_000);
    }

    #[tokio::test]
    async fn an_old_connection_still_open_but_not_read_does_not_hold_up_a_subscription() {
        let sink = Arc::new(EventSink::default());
        let (old, _old_rx) = mpsc::channel(1);
        sink.subscribe(old, Some(Vec::new())).await;
        let (window, write, pump) = spawn_pump(&sink, "c");
        // The first chunk fills the old queue; the pump then waits with the second.
        let writer = write_in_background(write, pattern(0, 3 * OUTPUT_CHUNK));
        kept_reaches(&window, 2 * OUTPUT_CHUNK as u64).await;

        let (new, mut new_rx) = mpsc::channel(1024);
        tokio::time::timeout(
            Duration::from_secs(5),
            sink.subscribe(new, Some(Vec::new())),
        )
        .await
        .expect("the subscription does not wait for the old connection");
        let mut next = 0;
        let bytes = output_until(&mut new_rx, &mut next, 3 * OUTPUT_CHUNK as u64).await;
        assert_bytes(&bytes, &pattern(0, 3 * OUTPUT_CHUNK));
        drop(writer.await.unwrap());
        window.received(u64::MAX);
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_subscription_whose_connection_is_not_read_does_not_hold_up_the_next() {
        let sink = Arc::new(EventSink::default());
        let (window, write, pump) = spawn_pump(&sink, "c");
        drop(
            write_in_background(write, pattern(0, 300_000))
                .await
                .unwrap(),
        );
        pump.await.unwrap();
        let (stuck, _stuck_rx) = mpsc::channel(1);
        let stuck_subscription = tokio::spawn({
            let sink = Arc::clone(&sink);
            async move { sink.subscribe(stuck, Some(Vec::new())).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;

        let (next, mut events) = mpsc::channel(1024);
        tokio::time::timeout(
            Duration::from_secs(5),
            sink.subscribe(next, Some(Vec::new())),
        )
        .await
        .expect("the subscription does not wait for the stuck one");
        let mut offset = 0;
        assert_bytes(
            &output_until(&mut events, &mut offset, 300_000).await,
            &pattern(0, 300_000),
        );
        stuck_subscription.await.unwrap();
        assert_eq!(window.kept_bytes(), 300_000);
    }

    #[tokio::test]
    async fn an_exit_comes_again_after_the_resent_output_on_every_resumable_subscription() {
        let sink = Arc::new(EventSink::default());
        let (old, old_rx) = mpsc::channel(1024);
        sink.subscribe(old, Some(Vec::new())).await;
        let (window, write, pump) = spawn_pump(&sink, "c");
        write_last(write, pattern(0, 70_000), pump).await;
        // The exit goes to a connection that dies before the agent reads it.
        sink.hand_over_exit(&window, ExitStatus::Code(3)).await;
        drop(old_rx);

        for _ in 0..2 {
            let (new, mut new_rx) = mpsc::channel(1024);
            let held = vec![OutputPosition {
                container_id: "c".into(),
                exec_id: None,
                position: 1000,
            }];
            sink.subscribe(new, Some(held)).await;
            let mut next = 1000;
            assert_bytes(
                &output_until(&mut new_rx, &mut next, 70_000).await,
                &pattern(1000, 69_000),
            );
            assert_eq!(
                next_event(&mut new_rx).await,
                Event::Exit {
                    container_id: "c".into(),
                    exec_id: None,
                    status: ExitStatus::Code(3),
                },
                "after the output"
            );
            nothing_more(&mut new_rx).await;
        }
    }

    #[tokio::test]
    async fn an_old_agents_subscription_loses_output_in_flight_and_gets_what_no_connection_took() {
        let sink = Arc::new(EventSink::default());
        let (old, mut old_rx) = mpsc::channel(1024);
        sink.subscribe(old, None).await;
        let (window, write, pump) = spawn_pump(&sink, "c");
        let write = write_in_background(write, pattern(0, 10_000))
            .await
            .unwrap();
        let mut received = Vec::new();
        while received.len() < 10_000 {
            match next_event(&mut old_rx).await {
                Event::Output { data, .. } => received.extend_from_slice(&data),
                other => panic!("{other:?}"),
            }
        }
        assert_bytes(&received, &pattern(0, 10_000));
        window.credit(4_000);
        assert_eq!(window.kept_bytes(), 6_000);
        // The 1.2 agent dies with 6 000 bytes uncredited; the process writes on, exits.
        drop(old_rx);
        write_last(write, pattern(10_000, 20_000), pump).await;
        sink.hand_over_exit(&window, ExitStatus::Code(0)).await;

        let (new, mut new_rx) = mpsc::channel(1024);
        sink.subscribe(new, None).await;
        let mut received = Vec::new();
        while received.len() < 20_000 {
            match next_event(&mut new_rx).await {
                Event::Output { data, .. } => received.extend_from_slice(&data),
                other => panic!("{other:?}"),
            }
        }
        assert_bytes(&received, &pattern(10_000, 20_000));
        assert!(matches!(next_event(&mut new_rx).await, Event::Exit { .. }));
        nothing_more(&mut new_rx).await;
        assert_eq!(window.kept_bytes(), 20_000, "kept until credited");
        window.credit(20_000);
        assert_eq!(window.kept_bytes(), 0);

        // A 1.2 agent counts every exit it hears: one a connection took is not said again.
        let (again, mut again_rx) = mpsc::channel(1024);
        sink.subscribe(again, None).await;
        nothing_more(&mut again_rx).await;
    }

    #[tokio::test]
    async fn a_discarded_process_stops_its_pump_and_is_not_resent() {
        let sink = Arc::new(EventSink::default());
        let (window, write, pump) = spawn_pump(&sink, "gone");
        // Its write fails once the pump lets go of the pipe.
        let writer = std::thread::spawn(move || {
            let mut write = write;
            write
                .write_all(&vec![0u8; 2 * OUTPUT_WINDOW as usize])
                .is_err()
        });
        kept_reaches(&window, OUTPUT_WINDOW).await;
        window.discard();
        tokio::time::timeout(Duration::from_secs(5), pump)
            .await
            .expect("a pump waiting for window ends")
            .unwrap();
        let (new, mut new_rx) = mpsc::channel(1024);
        sink.subscribe(new, Some(Vec::new())).await;
        nothing_more(&mut new_rx).await;
        assert!(writer.join().unwrap(), "the pipe is closed");
    }
}
