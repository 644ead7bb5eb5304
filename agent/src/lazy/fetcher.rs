//! The fetcher: one tokio task that decides what to fetch next, and a task per fetch.
//!
//! - **Priorities**: a guest's read (a foreground [`Want`]) goes before read-ahead and
//!   background fill; `connections` fetches run at once, of which `foreground_reserved` are
//!   never used by background work, so a guest's read never waits behind a fill.
//! - **Single flight**: a chunk is in at most one fetch; a want for a chunk in flight waits
//!   for that fetch.
//! - **Coalescing**: a foreground fetch takes the following chunks the guest also wants, a
//!   read-ahead or trace prefetch the following chunks its queue also names, a fill the
//!   following missing chunks; each up to `coalesce_bytes` of blob, in one `Range` request.
//! - **Read-ahead**: after a foreground fetch that continues a sequential read (the chunk before
//!   it is present or in flight), the next `read_ahead_chunks` chunks are queued at background
//!   priority. A read elsewhere (a program importing modules from across a layer) gets none:
//!   what it would bring is mostly never read, and it costs the start its bytes.
//! - **Fill**: a layer handed to [`Fetcher::fill`] is completed chunk by chunk in order at
//!   background priority, under the agent's background bandwidth limit.
//! - **Verification and durability** are the layer's ([`LazyLayer::store_chunks`]): nothing
//!   unverified is written, and a bit is set only over synced data.
//! - **Peers** (DESIGN §6): every fetch asks the live peer agents first, the one that owns
//!   the fetch's first chunk by rendezvous hashing of its checksum first, then the layer's own
//!   origins. A transfer that fails part way resumes from the next source at the byte it
//!   reached. A fill fetches first the chunks this agent owns, then waits
//!   [`PEER_WAIT_PASSES`] passes for the peers to bring theirs before it asks the registry
//!   for what is still missing (the owner may be down, or not prefetching this image).
//! - **Failure**: each origin is tried in order, `retries` extra rounds; a foreground fetch
//!   gives up after `park_timeout` at the latest. The layer then fails the waiting reads.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use gantry_api::{LazyStats, OriginStats};

use super::LazyConfig;
use super::layer::{LazyLayer, StoreError, Want};
use super::origin::{BlobOrigin, OriginError, PeerRoutes, StreamReceiver};
use crate::metrics::Metrics;
use crate::sync::lock;

/// Counters of the fetcher, for the operator.
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Chunks stored after a guest asked for them (coalesced neighbours included).
    pub foreground_chunks: AtomicU64,
    /// Chunks stored by read-ahead and fill.
    pub background_chunks: AtomicU64,
    /// Blob bytes received.
    pub bytes: AtomicU64,
    /// Range requests sent.
    pub requests: AtomicU64,
    /// Chunks whose bytes failed verification (each such response is discarded).
    pub verification_failures: AtomicU64,
    /// Fetches that gave up (the waiting reads failed).
    pub failed_fetches: AtomicU64,
    /// Foreground wait (first want to stored) histogram: counts per bucket of
    /// [`PARK_BUCKETS_MS`], then the overflow bucket.
    pub park_time_buckets: [AtomicU64; PARK_BUCKETS_MS.len() + 1],
    /// Per origin name: what it delivered.
    pub per_origin: Mutex<BTreeMap<String, OriginStats>>,
    /// The agent's metrics, where each request counts for its registry or peer (unset: no
    /// metrics, as in tests).
    pub metrics: OnceLock<Metrics>,
}

/// Upper bounds (ms) of the park time histogram's buckets.
pub const PARK_BUCKETS_MS: [u64; 8] = [1, 5, 20, 50, 200, 1000, 5000, 30000];

impl FetchCounters {
    fn per_origin(&self, origin: &str, update: impl FnOnce(&mut OriginStats)) {
        let mut map = lock(&self.per_origin);
        let entry = map
            .entry(origin.to_string())
            .or_insert_with(|| OriginStats {
                origin: origin.to_string(),
                ..OriginStats::default()
            });
        update(entry);
    }

    /// The counters as the API reports them (without the layers).
    pub fn snapshot(&self) -> LazyStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        LazyStats {
            foreground_chunks: load(&self.foreground_chunks),
            background_chunks: load(&self.background_chunks),
            bytes: load(&self.bytes),
            requests: load(&self.requests),
            verification_failures: load(&self.verification_failures),
            failed_fetches: load(&self.failed_fetches),
            park_time_ms_buckets: self
                .park_time_buckets
                .iter()
                .enumerate()
                .map(|(i, count)| (PARK_BUCKETS_MS.get(i).copied(), load(count)))
                .collect(),
            origins: lock(&self.per_origin).values().cloned().collect(),
            layers: Vec::new(),
            peers: Default::default(),
        }
    }

    /// Counts one request to `origin` that brought `bytes`, and `failed` (or not), for its
    /// registry or peer.
    fn count_request(&self, origin: &dyn BlobOrigin, bytes: u64, failed: bool) {
        if let (Some(metrics), Some((kind, name))) = (self.metrics.get(), origin.counted_as()) {
            metrics.source(kind, name).request(bytes, failed);
        }
    }

    /// Counts bytes from `origin` that failed verification, for its registry or peer.
    fn count_bad_bytes(&self, origin: &dyn BlobOrigin) {
        if let (Some(metrics), Some((kind, name))) = (self.metrics.get(), origin.counted_as()) {
            metrics.source(kind, name).bad_bytes();
        }
    }

    /// Counts `count` chunks stored by a job of `priority`.
    fn count_stored(&self, priority: Priority, count: u64) {
        let counter = match priority {
            Priority::Foreground => &self.foreground_chunks,
            Priority::Background => &self.background_chunks,
        };
        counter.fetch_add(count, Ordering::Relaxed);
    }

    fn record_park(&self, waited: Duration) {
        let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let bucket = PARK_BUCKETS_MS
            .iter()
            .position(|&bound| ms <= bound)
            .unwrap_or(PARK_BUCKETS_MS.len());
        if let Some(counter) = self.park_time_buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Priority of a fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Priority {
    Foreground,
    Background,
}

/// One range request's worth of chunks.
#[derive(Debug)]
struct Job {
    layer: Arc<LazyLayer>,
    chunks: Range<usize>,
    priority: Priority,
    /// For foreground jobs: when the guest first asked.
    since: Option<Instant>,
    /// Whether the background bandwidth limit applies (fill).
    limited: bool,
    /// The registry a fill job counts against (a registry with a limit only).
    registry: Option<String>,
    /// The peers to ask first (set when the job starts).
    peers: Option<Arc<dyn PeerRoutes>>,
    /// Ask only the peers (a fill waiting for the owners of these chunks to bring them).
    peers_only: bool,
}

impl Job {
    fn background(layer: Arc<LazyLayer>, chunks: Range<usize>, limited: bool) -> Job {
        Job {
            layer,
            chunks,
            priority: Priority::Background,
            since: None,
            limited,
            registry: None,
            peers: None,
            peers_only: false,
        }
    }
}

enum Control {
    Fill(Arc<LazyLayer>),
    /// Chunks to fetch in this order ahead of read-ahead and fill (a startup trace).
    Prefetch(Arc<LazyLayer>, Vec<usize>),
    /// Another pass over a layer whose previous fill pass left chunks missing.
    Refill {
        layer: Arc<LazyLayer>,
        pass: u32,
    },
    Finished {
        layer: Arc<LazyLayer>,
        chunks: Range<usize>,
        priority: Priority,
        registry: Option<String>,
    },
    /// The fill's bandwidth from now on (bytes per second; 0: unlimited).
    SetFillLimit(u64),
    /// Fill fetches in flight per registry from now on (registries not named: no limit).
    SetRegistryLimits(HashMap<String, usize>),
}

/// The peer agents, set from outside at any time and read by the scheduler as it starts jobs
/// (a message could arrive after the first wants).
type SharedPeers = Arc<Mutex<Option<Arc<dyn PeerRoutes>>>>;

/// A handle to the fetcher task.
#[derive(Debug, Clone)]
pub struct Fetcher {
    peers: SharedPeers,
    wants: mpsc::UnboundedSender<Want>,
    control: mpsc::UnboundedSender<ControlMessage>,
    counters: Arc<FetchCounters>,
}

/// Wrapper so the enum stays private while the channel type is named in [`Fetcher`].
pub struct ControlMessage(Control);

impl std::fmt::Debug for ControlMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMessage")
    }
}

/// Whether `chunk` exists, is missing and is in no fetch.
fn chunk_is_free(
    in_flight: &HashSet<(usize, usize)>,
    layer: &Arc<LazyLayer>,
    chunk: usize,
) -> bool {
    chunk < layer.index().len()
        && !layer.is_present(chunk)
        && !in_flight.contains(&(layer_id(layer), chunk))
}

fn layer_id(layer: &Arc<LazyLayer>) -> usize {
    Arc::as_ptr(layer) as usize
}

impl Fetcher {
    /// Starts the fetcher task on the current runtime.
    pub fn start(config: LazyConfig) -> Fetcher {
        let (wants, want_rx) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        let counters = Arc::new(FetchCounters::default());
        let peers = SharedPeers::default();
        let scheduler = Scheduler {
            config,
            counters: Arc::clone(&counters),
            control: control.clone(),
            foreground: VecDeque::new(),
            prefetch: VecDeque::new(),
            background: VecDeque::new(),
            fills: VecDeque::new(),
            in_flight: HashSet::new(),
            running_foreground: 0,
            running_background: 0,
            background_allowed_at: Instant::now(),
            fill_quiet_until: Instant::now(),
            registry_limits: HashMap::new(),
            fills_per_registry: HashMap::new(),
            peers: Arc::clone(&peers),
        };
        tokio::spawn(scheduler.run(want_rx, control_rx));
        Fetcher {
            peers,
            wants,
            control,
            counters,
        }
    }

    /// Where the data path sends its wants.
    pub fn wants(&self) -> mpsc::UnboundedSender<Want> {
        self.wants.clone()
    }

    /// Completes `layer` in the background.
    pub fn fill(&self, layer: Arc<LazyLayer>) {
        let _ = self.control.send(ControlMessage(Control::Fill(layer)));
    }

    /// Fetches `chunks` of `layer` in this order, before read-ahead and fill (but after every
    /// guest read), outside the background bandwidth limit: a startup trace.
    pub fn prefetch(&self, layer: Arc<LazyLayer>, chunks: Vec<usize>) {
        let _ = self
            .control
            .send(ControlMessage(Control::Prefetch(layer, chunks)));
    }

    /// Sets the fill's bandwidth limit (bytes per second, 0 for none), in place of
    /// `lazy.background_bytes_per_sec` (a cluster manifest's `budget.bandwidth`).
    pub fn set_fill_limit(&self, bytes_per_sec: u64) {
        let _ = self
            .control
            .send(ControlMessage(Control::SetFillLimit(bytes_per_sec)));
    }

    /// Sets how many fill fetches may be in flight to each registry named (a cluster
    /// manifest's `[[registry]] max_fills`); other registries have no limit of their own.
    pub fn set_registry_limits(&self, limits: HashMap<String, usize>) {
        let _ = self
            .control
            .send(ControlMessage(Control::SetRegistryLimits(limits)));
    }

    /// Asks `peers` before each layer's own origins from now on.
    pub fn set_peers(&self, peers: Arc<dyn PeerRoutes>) {
        *lock(&self.peers) = Some(peers);
    }

    /// Counts each request for its registry or peer in `metrics` from now on (once: a second
    /// call changes nothing).
    pub fn count_sources_into(&self, metrics: Metrics) {
        let _ = self.counters.metrics.set(metrics);
    }

    /// The fetcher's counters.
    pub fn counters(&self) -> &FetchCounters {
        &self.counters
    }
}

/// A layer being filled: the next chunk to look at.
struct FillCursor {
    layer: Arc<LazyLayer>,
    next: usize,
    pass: u32,
}

/// Passes a fill makes over a layer before it leaves the rest to the guest's reads.
const FILL_PASSES: u32 = 5;
/// Pause between fill passes (a failing origin is not hammered).
const FILL_PASS_PAUSE: Duration = Duration::from_secs(10);
/// With peers, the fill passes before [`FILL_PASSES`] more over any source: the first takes
/// the chunks this agent owns, the others also ask peers (only) for the rest.
pub const PEER_WAIT_PASSES: u32 = 6;
/// Pause between those passes: about the time an owner needs to bring its share.
const PEER_WAIT_PAUSE: Duration = Duration::from_secs(3);

/// What a fill pass does with a missing chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FillTake {
    /// Leave it to its owner for now.
    Skip,
    /// Ask the peers only.
    PeersOnly,
    /// Fetch it from any source.
    Any,
}

/// The key rendezvous hashing places a chunk by: its checksum (the same on every card), or,
/// in an index without checksums, the layer and the chunk's number.
fn chunk_key(layer: &LazyLayer, chunk: usize) -> Vec<u8> {
    match layer.index().chunk_checksum(chunk) {
        Some(checksum) => checksum.to_vec(),
        None => format!("{}#{chunk}", layer.digest()).into_bytes(),
    }
}

/// What fill pass `pass` does with missing `chunk` (the prefetch split of DESIGN §6), and
/// the chunk's owner: the live peer that fetches it from the registry (`None`: this agent,
/// or no peers).
fn fill_plan(
    peers: Option<&dyn PeerRoutes>,
    layer: &LazyLayer,
    chunk: usize,
    pass: u32,
) -> (FillTake, Option<String>) {
    let Some(peers) = peers else {
        return (FillTake::Any, None);
    };
    let owner = peers.owner(&chunk_key(layer, chunk));
    let take = match (&owner, pass) {
        (_, pass) if pass >= PEER_WAIT_PASSES => FillTake::Any,
        (None, _) => FillTake::Any,
        (Some(_), 0) => FillTake::Skip,
        (Some(_), _) => FillTake::PeersOnly,
    };
    (take, owner)
}

struct Scheduler {
    config: LazyConfig,
    counters: Arc<FetchCounters>,
    control: mpsc::UnboundedSender<ControlMessage>,
    foreground: VecDeque<Want>,
    /// Trace chunks, in recorded order.
    prefetch: VecDeque<(Arc<LazyLayer>, usize)>,
    /// Read-ahead chunks.
    background: VecDeque<(Arc<LazyLayer>, usize)>,
    fills: VecDeque<FillCursor>,
    in_flight: HashSet<(usize, usize)>,
    running_foreground: usize,
    running_background: usize,
    /// The background bandwidth limit: no background fetch starts before this.
    background_allowed_at: Instant,
    /// No fill fetch starts before this (a guest's fetch was running until `fill_yield_ms`
    /// ago).
    fill_quiet_until: Instant,
    /// Fill fetches allowed in flight per registry.
    registry_limits: HashMap<String, usize>,
    /// Fill fetches in flight per limited registry.
    fills_per_registry: HashMap<String, usize>,
    /// The peer agents, if any are configured.
    peers: SharedPeers,
}

impl Scheduler {
    async fn run(
        mut self,
        mut wants: mpsc::UnboundedReceiver<Want>,
        mut control: mpsc::UnboundedReceiver<ControlMessage>,
    ) {
        loop {
            self.dispatch();
            // Only a fill waits for time (the bandwidth limit, a guest's fetch); anything
            // else waiting waits for a fetch to finish, which sends a message.
            let fill_wake = self.fill_wake();
            let wake_for_background =
                tokio::time::sleep_until(fill_wake.unwrap_or_else(Instant::now).into());
            tokio::select! {
                biased;
                want = wants.recv() => match want {
                    Some(want) => self.foreground.push_back(want),
                    None => return,
                },
                message = control.recv() => match message {
                    Some(ControlMessage(message)) => self.handle(message),
                    None => return,
                },
                () = wake_for_background, if fill_wake.is_some() => {}
            }
        }
    }

    fn running(&self) -> usize {
        self.running_foreground + self.running_background
    }

    fn background_slots(&self) -> usize {
        let connections = self.config.connections.max(1);
        connections
            .saturating_sub(self.config.foreground_reserved)
            .max(1)
    }

    /// When a fill that could start but for time may start: `None` if no fill waits for time.
    fn fill_wake(&self) -> Option<Instant> {
        let at = self.background_allowed_at.max(self.fill_quiet_until);
        (!self.fills.is_empty()
            && self.running_foreground == 0
            && at > Instant::now()
            && self.running_background < self.background_slots()
            && self.running() < self.config.connections.max(1))
        .then_some(at)
    }

    /// A guest's fetch ended: fills keep quiet for `fill_yield_ms` from now (while one runs,
    /// they wait anyway).
    fn yield_fills(&mut self) {
        let quiet = Instant::now() + Duration::from_millis(self.config.fill_yield_ms);
        self.fill_quiet_until = self.fill_quiet_until.max(quiet);
    }

    fn handle(&mut self, message: Control) {
        match message {
            Control::Fill(layer) => self.add_fill(layer, 0),
            Control::Prefetch(layer, chunks) => {
                info!(layer = %layer.digest(), chunks = chunks.len(), "prefetching a startup trace");
                self.prefetch
                    .extend(chunks.into_iter().map(|chunk| (Arc::clone(&layer), chunk)));
            }
            Control::Refill { layer, pass } => self.add_fill(layer, pass),
            Control::SetFillLimit(bytes_per_sec) => {
                info!(bytes_per_sec, "fill bandwidth limit");
                self.config.background_bytes_per_sec = bytes_per_sec;
            }
            Control::SetRegistryLimits(limits) => {
                info!(?limits, "fill fetches per registry");
                self.registry_limits = limits;
            }
            Control::Finished {
                layer,
                chunks,
                priority,
                registry,
            } => {
                if let Some(registry) = registry
                    && let Some(running) = self.fills_per_registry.get_mut(&registry)
                {
                    *running = running.saturating_sub(1);
                }
                let id = layer_id(&layer);
                for chunk in chunks.clone() {
                    self.in_flight.remove(&(id, chunk));
                }
                // Wants that arrived while these chunks were in flight were set aside for this
                // fetch; if it did not bring them (a background fetch that failed), they are
                // asked for again, at foreground priority.
                for chunk in chunks {
                    if !layer.is_present(chunk) && layer.is_requested(chunk) {
                        self.foreground.push_back(Want {
                            layer: Arc::clone(&layer),
                            chunk,
                            since: Instant::now(),
                        });
                    }
                }
                match priority {
                    Priority::Foreground => {
                        self.running_foreground -= 1;
                        self.yield_fills();
                    }
                    Priority::Background => self.running_background -= 1,
                }
            }
        }
    }

    fn add_fill(&mut self, layer: Arc<LazyLayer>, pass: u32) {
        if layer.is_complete()
            || self
                .fills
                .iter()
                .any(|fill| Arc::ptr_eq(&fill.layer, &layer))
        {
            return;
        }
        info!(layer = %layer.digest(), pass, "background fill started");
        self.fills.push_back(FillCursor {
            layer,
            next: 0,
            pass,
        });
    }

    fn dispatch(&mut self) {
        let connections = self.config.connections.max(1);
        while self.running() < connections {
            if let Some(job) = self.next_foreground() {
                self.start(job);
                continue;
            }
            if self.running_background < self.background_slots()
                && let Some(job) = self.next_background()
            {
                self.start(job);
                continue;
            }
            break;
        }
    }

    fn is_free(&self, layer: &Arc<LazyLayer>, chunk: usize) -> bool {
        chunk_is_free(&self.in_flight, layer, chunk)
    }

    /// The peers, when any are configured.
    fn peers(&self) -> Option<Arc<dyn PeerRoutes>> {
        lock(&self.peers).clone().filter(|peers| !peers.is_empty())
    }

    fn next_foreground(&mut self) -> Option<Job> {
        while let Some(want) = self.foreground.pop_front() {
            let layer = want.layer;
            if layer.is_present(want.chunk) {
                layer.clear_request(want.chunk);
                continue;
            }
            if !self.is_free(&layer, want.chunk) {
                // In flight: that fetch answers this want too (or, if it fails in the
                // background, the want is queued again when it finishes).
                continue;
            }
            let end = self.extend(&layer, want.chunk, |layer, chunk| layer.is_requested(chunk));
            return Some(Job {
                layer,
                chunks: want.chunk..end,
                priority: Priority::Foreground,
                since: Some(want.since),
                limited: false,
                registry: None,
                peers: None,
                peers_only: false,
            });
        }
        None
    }

    /// The next trace prefetch, read-ahead or (within the bandwidth limit) fill job.
    fn next_background(&mut self) -> Option<Job> {
        let in_flight = &self.in_flight;
        let free = |layer: &Arc<LazyLayer>, chunk| chunk_is_free(in_flight, layer, chunk);
        if let Some(job) = Self::next_queued(&mut self.prefetch, free) {
            return Some(job);
        }
        if let Some(job) = Self::next_queued(&mut self.background, free) {
            return Some(job);
        }
        // A guest's fetch in flight, or one a moment ago: the fill waits (DESIGN §5:
        // foreground always wins, the link included).
        if self.running_foreground > 0
            || Instant::now() < self.background_allowed_at.max(self.fill_quiet_until)
        {
            return None;
        }
        // Each fill is looked at once at most: those whose registry is at its limit wait
        // their turn at the back.
        for _ in 0..self.fills.len() {
            let Some(mut fill) = self.fills.pop_front() else {
                break;
            };
            let registry = fill
                .layer
                .registry()
                .filter(|registry| self.registry_limits.contains_key(registry));
            if let Some(registry) = &registry
                && self.fills_per_registry.get(registry).copied().unwrap_or(0)
                    >= self.registry_limits[registry]
            {
                self.fills.push_back(fill);
                continue;
            }
            let peers = self.peers();
            let plan =
                |layer: &LazyLayer, chunk| fill_plan(peers.as_deref(), layer, chunk, fill.pass);
            let chunks = fill.layer.index().len();
            while fill.next < chunks
                && (!self.is_free(&fill.layer, fill.next)
                    || plan(&fill.layer, fill.next).0 == FillTake::Skip)
            {
                fill.next += 1;
            }
            if fill.next >= chunks {
                // Chunks still in flight finish on their own; failed ones get another pass.
                debug!(layer = %fill.layer.digest(), pass = fill.pass, "background fill pass queued every chunk");
                let waiting_for_peers = peers.is_some() && fill.pass < PEER_WAIT_PASSES;
                let passes = if peers.is_some() {
                    PEER_WAIT_PASSES + FILL_PASSES
                } else {
                    FILL_PASSES
                };
                if fill.pass + 1 < passes {
                    let control = self.control.clone();
                    let (layer, pass) = (fill.layer, fill.pass + 1);
                    let pause = if waiting_for_peers {
                        PEER_WAIT_PAUSE
                    } else {
                        FILL_PASS_PAUSE
                    };
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        if !layer.is_complete() {
                            let _ = control.send(ControlMessage(Control::Refill { layer, pass }));
                        }
                    });
                }
                continue;
            }
            let start = fill.next;
            let (take, owner) = plan(&fill.layer, start);
            // With peers, one fetch holds chunks of one owner only: a peer asked for a span
            // holds all of it or answers 404.
            let end = self.extend(&fill.layer, start, |layer, chunk| {
                if peers.is_none() {
                    return true;
                }
                let (chunk_take, chunk_owner) = plan(layer, chunk);
                chunk_take == take && chunk_owner == owner
            });
            fill.next = end;
            let layer = Arc::clone(&fill.layer);
            // Round robin between the layers being filled.
            self.fills.push_back(fill);
            let mut job = Job::background(layer, start..end, true);
            if take == FillTake::PeersOnly {
                // Nothing goes to the registry: its limit does not apply.
                job.peers_only = true;
            } else {
                job.registry = registry;
            }
            return Some(job);
        }
        None
    }

    /// The next job from a queue of chunks (trace prefetch, read-ahead): its first free chunk,
    /// with the following chunks the queue also names taken along, never others: the queue's
    /// own order and extent decide what is fetched (read-ahead of two chunks stays two chunks).
    fn next_queued(
        queue: &mut VecDeque<(Arc<LazyLayer>, usize)>,
        is_free: impl Fn(&Arc<LazyLayer>, usize) -> bool,
    ) -> Option<Job> {
        while let Some((layer, chunk)) = queue.pop_front() {
            if !is_free(&layer, chunk) {
                continue;
            }
            let mut end = chunk + 1;
            while is_free(&layer, end) {
                let Some(position) = queue
                    .iter()
                    .take(64)
                    .position(|(other, queued)| Arc::ptr_eq(other, &layer) && *queued == end)
                else {
                    break;
                };
                queue.remove(position);
                end += 1;
            }
            return Some(Job::background(layer, chunk..end, false));
        }
        None
    }

    /// The end of a job starting at `first`: following chunks that are free and pass `take`,
    /// while the blob span stays within `coalesce_bytes` (at least one chunk).
    fn extend(
        &self,
        layer: &Arc<LazyLayer>,
        first: usize,
        take: impl Fn(&LazyLayer, usize) -> bool,
    ) -> usize {
        let mut end = first + 1;
        // An origin that ignores `Range` sends the blob from its start whatever is asked: one
        // download then brings every chunk after this one too.
        let streaming = layer.ignores_ranges();
        while self.is_free(layer, end) {
            if !streaming {
                let span = layer.blob_span(first..end + 1);
                if !take(layer, end) || span.end - span.start > self.config.coalesce_bytes {
                    break;
                }
            }
            end += 1;
        }
        end
    }

    fn start(&mut self, mut job: Job) {
        job.peers = self.peers();
        let id = layer_id(&job.layer);
        for chunk in job.chunks.clone() {
            self.in_flight.insert((id, chunk));
        }
        match job.priority {
            Priority::Foreground => {
                self.running_foreground += 1;
                let sequential = job.chunks.start.checked_sub(1).is_some_and(|before| {
                    job.layer.is_present(before) || self.in_flight.contains(&(id, before))
                });
                if sequential {
                    for ahead in job.chunks.end..job.chunks.end + self.config.read_ahead_chunks {
                        self.background.push_back((Arc::clone(&job.layer), ahead));
                    }
                }
            }
            Priority::Background => {
                self.running_background += 1;
                if let Some(registry) = &job.registry {
                    *self.fills_per_registry.entry(registry.clone()).or_default() += 1;
                }
                if job.limited && self.config.background_bytes_per_sec > 0 {
                    let span = job.layer.blob_span(job.chunks.clone());
                    let seconds = (span.end - span.start) as f64
                        / self.config.background_bytes_per_sec as f64;
                    self.background_allowed_at = self.background_allowed_at.max(Instant::now())
                        + Duration::from_secs_f64(seconds);
                }
            }
        }
        let config = self.config.clone();
        let counters = Arc::clone(&self.counters);
        let control = self.control.clone();
        tokio::spawn(async move {
            let (layer, chunks, priority, registry) = (
                Arc::clone(&job.layer),
                job.chunks.clone(),
                job.priority,
                job.registry.clone(),
            );
            run_job(job, &config, &counters).await;
            let _ = control.send(ControlMessage(Control::Finished {
                layer,
                chunks,
                priority,
                registry,
            }));
        });
    }
}

/// The sources of a job, in the order asked: the live peers (the first chunk's owner first),
/// then the layer's own origins (none for a fill that waits for peers).
fn job_sources(job: &Job) -> Vec<Arc<dyn BlobOrigin>> {
    let mut sources = match &job.peers {
        Some(peers) => peers.origins(job.layer.digest(), &chunk_key(&job.layer, job.chunks.start)),
        None => Vec::new(),
    };
    if !job.peers_only {
        sources.extend(job.layer.origins());
    }
    sources
}

/// The bytes of a job's span received so far, and which source sent which part.
#[derive(Default)]
struct Received {
    bytes: Vec<u8>,
    /// Each source's first byte (an offset into `bytes`), in order.
    parts: Vec<(usize, Arc<dyn BlobOrigin>)>,
}

impl Received {
    fn clear(&mut self) {
        self.bytes.clear();
        self.parts.clear();
    }

    /// The sources that sent any of the span's bytes `range` (offsets into `bytes`).
    fn senders(&self, range: Range<usize>) -> Vec<Arc<dyn BlobOrigin>> {
        let total = self.bytes.len();
        self.parts
            .iter()
            .enumerate()
            .filter(|(i, (start, _))| {
                let end = self.parts.get(i + 1).map_or(total, |(next, _)| *next);
                *start < range.end && range.start < end
            })
            .map(|(_, (_, origin))| Arc::clone(origin))
            .collect()
    }

    /// Bytes each source sent.
    fn sent(&self) -> Vec<(String, u64)> {
        let total = self.bytes.len();
        self.parts
            .iter()
            .enumerate()
            .map(|(i, (start, origin))| {
                let end = self.parts.get(i + 1).map_or(total, |(next, _)| *next);
                (origin.describe(), (end - start) as u64)
            })
            .collect()
    }
}

/// Fetches one job's chunks from its sources and stores them, or fails them.
async fn run_job(job: Job, config: &LazyConfig, counters: &FetchCounters) {
    let layer = &job.layer;
    let span = layer.blob_span(job.chunks.clone());
    let deadline = Instant::now() + config.park_timeout();
    let mut last_error = String::from("no origin is known for this layer");
    // A fill waiting for peers asks them once a pass: the next pass asks again.
    let rounds = if job.peers_only { 0 } else { config.retries };
    for round in 0..=rounds {
        if round > 0 {
            let backoff = Duration::from_millis(200 << round.min(5));
            if Instant::now() + backoff >= deadline && job.priority == Priority::Foreground {
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        let mut received = Received::default();
        for origin in job_sources(&job) {
            if origin.ignores_ranges() {
                received.clear();
                match stream_job(&job, origin.as_ref(), counters).await {
                    Ok(()) => return,
                    Err(error) => {
                        last_error = format!("{}: {error}", origin.describe());
                        continue;
                    }
                }
            }
            // Resume at the byte the previous source reached.
            let from = span.start + received.bytes.len() as u64;
            let before = received.bytes.len();
            received.parts.push((before, Arc::clone(&origin)));
            let attempt = origin.read_range_into(from..span.end, &mut received.bytes);
            // A background attempt gets as long as a foreground fetch in all: a hung origin
            // must not hold a connection slot forever.
            let attempt_deadline = match job.priority {
                Priority::Foreground => deadline,
                Priority::Background => Instant::now() + config.park_timeout(),
            };
            let outcome = tokio::time::timeout_at(attempt_deadline.into(), attempt).await;
            let arrived = (received.bytes.len() - before) as u64;
            counters.requests.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(arrived, Ordering::Relaxed);
            // A peer's 404 is an answer, not a failure.
            let failed = !matches!(outcome, Ok(Ok(()) | Err(OriginError::NotHeld(_))));
            counters.count_request(origin.as_ref(), arrived, failed);
            match outcome {
                Err(_) => {
                    last_error = format!(
                        "{} did not deliver within {:?}",
                        origin.describe(),
                        config.park_timeout()
                    );
                    if job.priority == Priority::Foreground {
                        give_up(&job, counters, &last_error);
                        return;
                    }
                    continue;
                }
                Ok(Err(error @ OriginError::NotHeld(_))) => {
                    // Nothing arrived: the next source starts where this one would have.
                    received.parts.pop();
                    debug!(layer = %layer.digest(), %error, "peer miss");
                    last_error = error.to_string();
                    continue;
                }
                Ok(Err(error)) => {
                    last_error = format!("{}: {error}", origin.describe());
                    debug!(layer = %layer.digest(), error = %last_error, "range read failed");
                    if received.bytes.len() == before {
                        received.parts.pop();
                    }
                    continue;
                }
                Ok(Ok(())) => {}
            }
            let sent = received.sent();
            let bytes = std::mem::take(&mut received.bytes);
            let store_layer = Arc::clone(layer);
            let chunks = job.chunks.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let stored = store_layer.store_chunks(chunks, &bytes);
                (stored, bytes)
            })
            .await;
            match stored {
                Ok((Ok(()), _)) => {
                    let count = job.chunks.len() as u64;
                    // The chunks count for the source that completed them.
                    let last = sent.len().saturating_sub(1);
                    for (i, (name, bytes)) in sent.into_iter().enumerate() {
                        counters.per_origin(&name, |stats| {
                            if i == last {
                                stats.chunks += count;
                            }
                            stats.bytes += bytes;
                        });
                    }
                    counters.count_stored(job.priority, count);
                    if let Some(since) = job.since {
                        counters.record_park(since.elapsed());
                    }
                    if layer.is_complete() && job.priority == Priority::Background {
                        info!(layer = %layer.digest(), "layer complete");
                    }
                    return;
                }
                Ok((Err(error @ StoreError::Verify { .. }), bytes)) => {
                    counters
                        .verification_failures
                        .fetch_add(1, Ordering::Relaxed);
                    received.bytes = bytes;
                    // Blame whoever sent the bad chunk's bytes (a peer goes on backoff).
                    let bad = match &error {
                        StoreError::Verify { chunk, .. } if *chunk < layer.index().len() => {
                            let range = layer.index().blob_range(*chunk);
                            let offset = |at: u64| {
                                usize::try_from(at.saturating_sub(span.start)).unwrap_or(usize::MAX)
                            };
                            received.senders(offset(range.start)..offset(range.end))
                        }
                        _ => received.parts.iter().map(|(_, o)| Arc::clone(o)).collect(),
                    };
                    for (name, bytes) in sent {
                        counters.per_origin(&name, |stats| stats.bytes += bytes);
                    }
                    for sender in &bad {
                        counters.per_origin(&sender.describe(), |stats| {
                            stats.verification_failures += 1;
                        });
                        sender.delivered_bad_bytes();
                        counters.count_bad_bytes(sender.as_ref());
                        warn!(origin = %sender.describe(), %error, "bytes failed verification; discarded");
                    }
                    last_error = format!("{error} (from {})", origin.describe());
                    received.clear();
                }
                Ok((Err(error), _)) => {
                    // The card's own disk failed: another origin would not help.
                    give_up(&job, counters, &error.to_string());
                    return;
                }
                Err(error) => {
                    give_up(&job, counters, &format!("store task: {error}"));
                    return;
                }
            }
        }
        if job.priority == Priority::Foreground && Instant::now() >= deadline {
            break;
        }
    }
    if job.peers_only {
        debug!(layer = %layer.digest(), chunks = ?job.chunks, reason = %last_error, "no peer holds these chunks yet");
        return;
    }
    give_up(&job, counters, &last_error);
}

/// Stores a job's chunks from one streamed download of the whole blob (an origin that ignores
/// `Range`): each chunk verified and stored as soon as its bytes are in, so the reads waiting
/// for early chunks go on before the download ends. Chunks stored before a failure stay.
async fn stream_job(
    job: &Job,
    origin: &dyn BlobOrigin,
    counters: &FetchCounters,
) -> Result<(), String> {
    let mut receiver = ChunkStream {
        layer: Arc::clone(&job.layer),
        chunks: job.chunks.clone(),
        next: job.chunks.start,
        received: 0,
        pending: Vec::new(),
        pending_start: 0,
    };
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let result = origin.stream_blob(&mut receiver).await;
    counters.count_stored(job.priority, (receiver.next - job.chunks.start) as u64);
    counters
        .bytes
        .fetch_add(receiver.received, Ordering::Relaxed);
    counters.count_request(origin, receiver.received, result.is_err());
    match result {
        // Done once every chunk of the job is in (the download may have been cut short).
        _ if receiver.next >= job.chunks.end => Ok(()),
        Ok(()) => Err("the blob ended before its last chunk".into()),
        Err(error) => Err(error.to_string()),
    }
}

/// Cuts a streamed blob into the job's chunks and stores each.
struct ChunkStream {
    layer: Arc<LazyLayer>,
    chunks: Range<usize>,
    /// The next chunk to complete.
    next: usize,
    /// Blob bytes seen in this download.
    received: u64,
    /// Blob bytes from `pending_start` to `received`: those of chunk `next` so far (and of the
    /// chunk before it that the next one shares).
    pending: Vec<u8>,
    pending_start: u64,
}

/// What ends a stream early once the job's chunks are in (not an error).
const STREAM_DONE: &str = "the job's chunks are stored";

impl StreamReceiver for ChunkStream {
    fn receive(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        loop {
            if self.next >= self.chunks.end {
                return if bytes.is_empty() {
                    Ok(())
                } else {
                    Err(STREAM_DONE.into())
                };
            }
            let range = self.layer.index().blob_range(self.next);
            // Bytes before the chunk go (the chunk before may have shared some of what is kept).
            if self.pending_start < range.start {
                let drop = usize::try_from(range.start - self.pending_start)
                    .map_or(self.pending.len(), |drop| drop.min(self.pending.len()));
                self.pending.drain(..drop);
                self.pending_start += drop as u64;
            }
            if self.received >= range.end {
                // Every byte of the chunk is in: `pending` starts at or before it.
                let from = (range.start - self.pending_start) as usize;
                let to = (range.end - self.pending_start) as usize;
                let layer = Arc::clone(&self.layer);
                let chunk = self.next;
                let stored = &self.pending[from..to];
                // The download runs on the runtime: the store (a sync and a bitmap write) is
                // blocking work.
                tokio::task::block_in_place(|| layer.store_chunks(chunk..chunk + 1, stored))
                    .map_err(|error| error.to_string())?;
                self.next += 1;
                continue;
            }
            if bytes.is_empty() {
                return Ok(());
            }
            if self.received < range.start {
                // Before the chunk: skipped (present, or before the job).
                let skip = usize::try_from(range.start - self.received)
                    .map_or(bytes.len(), |skip| skip.min(bytes.len()));
                bytes = bytes.get(skip..).unwrap_or_default();
                self.received += skip as u64;
                self.pending_start = self.received;
                continue;
            }
            let want = usize::try_from(range.end - self.received).unwrap_or(usize::MAX);
            let take = want.min(bytes.len());
            let (head, rest) = bytes.split_at(take);
            self.pending.extend_from_slice(head);
            self.received += take as u64;
            bytes = rest;
        }
    }

    fn reset(&mut self) {
        self.received = 0;
        self.pending.clear();
        self.pending_start = 0;
    }
}

/// Ends a job that could not store its chunks. A foreground job fails the reads waiting for
/// them. A background job fails nobody: the guest did not ask for these chunks, and reads that
/// came to wait on this fetch are asked for again, at foreground priority, when the scheduler
/// hears the job finished.
fn give_up(job: &Job, counters: &FetchCounters, reason: &str) {
    counters.failed_fetches.fetch_add(1, Ordering::Relaxed);
    match job.priority {
        Priority::Foreground => job.layer.fail_chunks(job.chunks.clone(), reason),
        Priority::Background => {
            warn!(layer = %job.layer.digest(), chunks = ?job.chunks, reason, "background fetch failed");
        }
    }
}
