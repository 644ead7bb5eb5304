//! The agent's Prometheus metrics: one [`Metrics`] owns the registry and every metric family;
//! the parts of the agent count into typed handles resolved from it once ([`VmMetrics`] per
//! VM, [`CacheMetrics`], [`SourceCounters`] per registry or peer), and state that exists anyway
//! (parked requests, cache size) is read at scrape time through [`Metrics::observe_state`].
//!
//! Label sets are bounded: `vm` takes only configured VM names; `source` registry hosts and
//! peer URLs, at most [`MAX_SOURCES`] of them (later ones count as `other`); `op` and
//! `direction` are fixed sets. No container name, image or digest is ever a label.
//!
//! Every handle has a `Default` that counts into metrics no registry exports, so the code that
//! counts (the layer store, the vsock device, the cache, …) needs no agent to run in tests.
//!
//! - [`histogram`]: [`AtomicHistogram`], the lock-free histogram the handles use.
//! - [`endpoint`]: `GET /metrics` (the API socket's route and the `metrics_listen` listener).
//! - [`metered`]: an image source that counts its registry requests.
//!
//! The metric names are listed in the README.

pub mod endpoint;
pub mod histogram;
pub mod metered;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

pub use histogram::AtomicHistogram;

use crate::sync::lock;

/// Most distinct `source` label values; sources beyond them are counted as [`OTHER_SOURCE`].
pub const MAX_SOURCES: usize = 64;
/// The `source` label of sources beyond [`MAX_SOURCES`].
pub const OTHER_SOURCE: &str = "other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlkRequestLabels {
    vm: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VsockBytesLabels {
    vm: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    kind: &'static str,
    source: String,
}

type HistogramFamily<L> = Family<L, AtomicHistogram, fn() -> AtomicHistogram>;

/// What a layer-store request asked, as the `op` label says it. The discriminants index
/// [`BlkOp::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_GET_ID`.
    GetId,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_OUT` (refused: the device is read-only).
    Write,
    /// `DISCARD`, `WRITE_ZEROES` or an unknown type (refused: not offered).
    Unsupported,
    /// A chain that did not parse as a request.
    Malformed,
}

impl BlkOp {
    /// Every operation, in label order.
    pub const ALL: [BlkOp; 6] = [
        BlkOp::Read,
        BlkOp::GetId,
        BlkOp::Flush,
        BlkOp::Write,
        BlkOp::Unsupported,
        BlkOp::Malformed,
    ];

    /// The `op` label's value.
    pub fn label(self) -> &'static str {
        match self {
            BlkOp::Read => "read",
            BlkOp::GetId => "get_id",
            BlkOp::Flush => "flush",
            BlkOp::Write => "write",
            BlkOp::Unsupported => "unsupported",
            BlkOp::Malformed => "malformed",
        }
    }
}

/// Where bytes came from, as the `kind` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SourceKind {
    /// A registry (its mirrors included), named by its host as references name it.
    Registry,
    /// A peer agent, named by its URL.
    Peer,
}

impl SourceKind {
    /// The `kind` label's value.
    pub fn label(self) -> &'static str {
        match self {
            SourceKind::Registry => "registry",
            SourceKind::Peer => "peer",
        }
    }
}

/// State read at scrape time rather than counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateGauges {
    /// Per VM: layer-store requests parked now.
    pub parked_requests: Vec<(String, u64)>,
    /// Bytes the cached layers take (`None`: the cache could not be scanned).
    pub cache_bytes: Option<u64>,
    /// The cache's budget in bytes (0: unlimited).
    pub cache_budget_bytes: u64,
}

type StateProbe = Box<dyn Fn() -> Option<StateGauges> + Send + Sync>;

/// The collector of [`StateGauges`]: asks the probe the daemon set, if any, at each scrape.
/// (Its help texts end with a full stop themselves: the registry adds one only to metrics
/// registered with it.)
#[derive(Default)]
struct StateCollector {
    probe: Mutex<Option<StateProbe>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("probe", &lock(&self.probe).is_some())
            .finish()
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(state) = lock(&self.probe).as_ref().and_then(|probe| probe()) else {
            return Ok(());
        };
        let mut parked = encoder.encode_descriptor(
            "gantry_blk_parked_requests",
            "Layer-store requests waiting for data now.",
            None,
            MetricType::Gauge,
        )?;
        for (vm, count) in state.parked_requests {
            let labels = VmLabels { vm };
            ConstGauge::new(count).encode(parked.encode_family(&labels)?)?;
        }
        if let Some(bytes) = state.cache_bytes {
            let gauge = encoder.encode_descriptor(
                "gantry_cache_bytes",
                "Bytes the cached layers take on disk.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(bytes).encode(gauge)?;
        }
        let budget = encoder.encode_descriptor(
            "gantry_cache_budget_bytes",
            "The cache's size budget in bytes (0: unlimited).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(state.cache_budget_bytes).encode(budget)
    }
}

#[derive(Debug)]
struct Families {
    blk_requests: Family<BlkRequestLabels, Counter>,
    blk_read_bytes: Family<VmLabels, Counter>,
    blk_errors: Family<VmLabels, Counter>,
    blk_parked: Family<VmLabels, Counter>,
    blk_duration: HistogramFamily<VmLabels>,
    vsock_connections: Family<VmLabels, Counter>,
    vsock_bytes: Family<VsockBytesLabels, Counter>,
    vsock_credit_stalls: Family<VmLabels, Counter>,
    container_starts: Family<VmLabels, Counter>,
    container_start_failures: Family<VmLabels, Counter>,
    container_exits: Family<VmLabels, Counter>,
    container_ooms: Family<VmLabels, Counter>,
    container_start_duration: HistogramFamily<VmLabels>,
    container_first_output: HistogramFamily<VmLabels>,
    source_requests: Family<SourceLabels, Counter>,
    source_bytes: Family<SourceLabels, Counter>,
    source_errors: Family<SourceLabels, Counter>,
}

impl Families {
    fn new() -> Self {
        Self {
            blk_requests: Family::default(),
            blk_read_bytes: Family::default(),
            blk_errors: Family::default(),
            blk_parked: Family::default(),
            blk_duration: Family::new_with_constructor(AtomicHistogram::for_requests),
            vsock_connections: Family::default(),
            vsock_bytes: Family::default(),
            vsock_credit_stalls: Family::default(),
            container_starts: Family::default(),
            container_start_failures: Family::default(),
            container_exits: Family::default(),
            container_ooms: Family::default(),
            container_start_duration: Family::new_with_constructor(AtomicHistogram::for_starts),
            container_first_output: Family::new_with_constructor(AtomicHistogram::for_starts),
            source_requests: Family::default(),
            source_bytes: Family::default(),
            source_errors: Family::default(),
        }
    }

    /// Registers every family (clones share their series) with `registry`.
    fn register(&self, registry: &mut Registry) {
        let families: [(&str, &str, &dyn Registrable, Option<Unit>); 17] = [
            (
                "gantry_blk_requests",
                "Layer-store requests completed, by operation (malformed: a chain that did not parse)",
                &self.blk_requests,
                None,
            ),
            (
                "gantry_blk_read",
                "Bytes the layer store read into guest memory",
                &self.blk_read_bytes,
                Some(Unit::Bytes),
            ),
            (
                "gantry_blk_errors",
                "Layer-store requests answered with an error status, or malformed",
                &self.blk_errors,
                None,
            ),
            (
                "gantry_blk_parked",
                "Layer-store requests that had to wait (park) for data not in the cache yet",
                &self.blk_parked,
                None,
            ),
            (
                "gantry_blk_request_duration",
                "Time from a layer-store request's first attempt to its completion",
                &self.blk_duration,
                Some(Unit::Seconds),
            ),
            (
                "gantry_vsock_connections",
                "Control-channel connections the guest accepted",
                &self.vsock_connections,
                None,
            ),
            (
                "gantry_vsock",
                "Control-channel payload bytes, by direction",
                &self.vsock_bytes,
                Some(Unit::Bytes),
            ),
            (
                "gantry_vsock_credit_stalls",
                "Times data to the guest used up the guest's receive credit, so that the \
                 agent's stream waited for the guest's credit update",
                &self.vsock_credit_stalls,
                None,
            ),
            (
                "gantry_container_starts",
                "Containers started by run",
                &self.container_starts,
                None,
            ),
            (
                "gantry_container_start_failures",
                "Runs that failed before their container started",
                &self.container_start_failures,
                None,
            ),
            (
                "gantry_container_exits",
                "Containers whose main process exited",
                &self.container_exits,
                None,
            ),
            (
                "gantry_container_ooms",
                "OOM kills the guest reported",
                &self.container_ooms,
                None,
            ),
            (
                "gantry_container_start_duration",
                "Time from a run request to its container started (pull, map, create, start)",
                &self.container_start_duration,
                Some(Unit::Seconds),
            ),
            (
                "gantry_container_first_output_duration",
                "Time from a run request to its container's first output",
                &self.container_first_output,
                Some(Unit::Seconds),
            ),
            (
                "gantry_registry_requests",
                "Requests to registries and peers for manifests, blobs and blob ranges",
                &self.source_requests,
                None,
            ),
            (
                "gantry_registry",
                "Bytes received from registries and peers",
                &self.source_bytes,
                Some(Unit::Bytes),
            ),
            (
                "gantry_registry_errors",
                "Requests to registries and peers that failed, or whose bytes failed verification",
                &self.source_errors,
                None,
            ),
        ];
        for (name, help, family, unit) in families {
            family.register_in(registry, name, help, unit);
        }
    }
}

/// A family that registers a clone of itself (clones share their series).
trait Registrable {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>);
}

impl<M> Registrable for M
where
    M: prometheus_client::registry::Metric + Clone,
{
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) {
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, self.clone()),
            None => registry.register(name, help, self.clone()),
        }
    }
}

struct Inner {
    registry: Registry,
    families: Families,
    cache: CacheMetrics,
    state: Arc<StateCollector>,
    /// The `source` label values handed out so far, at most [`MAX_SOURCES`].
    sources: Mutex<HashSet<(SourceKind, String)>>,
}

/// The agent's metrics. Cheap to clone; every clone is the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family registered and no series yet.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let families = Families::new();
        families.register(&mut registry);
        let cache = CacheMetrics::default();
        cache.register(&mut registry);
        let state = Arc::new(StateCollector::default());
        registry.register_collector(Box::new(Arc::clone(&state)));
        Self {
            inner: Arc::new(Inner {
                registry,
                families,
                cache,
                state,
                sources: Mutex::default(),
            }),
        }
    }

    /// The handles of the VM `name` (a configured VM: names are the `vm` label).
    pub fn vm(&self, name: &str) -> VmMetrics {
        let families = &self.inner.families;
        let vm = VmLabels {
            vm: name.to_owned(),
        };
        let direction = |direction| VsockBytesLabels {
            vm: name.to_owned(),
            direction,
        };
        VmMetrics {
            blk: BlkMetrics {
                counters: Arc::new(BlkCounters {
                    requests: BlkOp::ALL.map(|op| {
                        families
                            .blk_requests
                            .get_or_create_owned(&BlkRequestLabels {
                                vm: name.to_owned(),
                                op: op.label(),
                            })
                    }),
                    read_bytes: families.blk_read_bytes.get_or_create_owned(&vm),
                    errors: families.blk_errors.get_or_create_owned(&vm),
                    parked: families.blk_parked.get_or_create_owned(&vm),
                    duration: families.blk_duration.get_or_create_owned(&vm),
                }),
            },
            vsock: VsockMetrics {
                counters: Arc::new(VsockCounters {
                    connections: families.vsock_connections.get_or_create_owned(&vm),
                    to_guest: families
                        .vsock_bytes
                        .get_or_create_owned(&direction("to_guest")),
                    from_guest: families
                        .vsock_bytes
                        .get_or_create_owned(&direction("from_guest")),
                    credit_stalls: families.vsock_credit_stalls.get_or_create_owned(&vm),
                }),
            },
            containers: ContainerMetrics {
                counters: Arc::new(ContainerCounters {
                    starts: families.container_starts.get_or_create_owned(&vm),
                    start_failures: families.container_start_failures.get_or_create_owned(&vm),
                    exits: families.container_exits.get_or_create_owned(&vm),
                    ooms: families.container_ooms.get_or_create_owned(&vm),
                    start_duration: families.container_start_duration.get_or_create_owned(&vm),
                    first_output: families.container_first_output.get_or_create_owned(&vm),
                }),
            },
        }
    }

    /// Drops every series of the VM `name` (detached: a VM attached and detached per pod must
    /// not grow the exposition without bound). Handles still held count into nothing.
    pub fn forget_vm(&self, name: &str) {
        let families = &self.inner.families;
        let vm = VmLabels {
            vm: name.to_owned(),
        };
        for op in BlkOp::ALL {
            families.blk_requests.remove(&BlkRequestLabels {
                vm: name.to_owned(),
                op: op.label(),
            });
        }
        for direction in ["to_guest", "from_guest"] {
            families.vsock_bytes.remove(&VsockBytesLabels {
                vm: name.to_owned(),
                direction,
            });
        }
        for family in [
            &families.blk_read_bytes,
            &families.blk_errors,
            &families.blk_parked,
            &families.vsock_connections,
            &families.vsock_credit_stalls,
            &families.container_starts,
            &families.container_start_failures,
            &families.container_exits,
            &families.container_ooms,
        ] {
            family.remove(&vm);
        }
        for family in [
            &families.blk_duration,
            &families.container_start_duration,
            &families.container_first_output,
        ] {
            family.remove(&vm);
        }
    }

    /// The cache's handle.
    pub fn cache(&self) -> CacheMetrics {
        self.inner.cache.clone()
    }

    /// The counters of one registry (`name`: its host as references name it) or peer (its
    /// URL). Past [`MAX_SOURCES`] distinct names, new ones share the [`OTHER_SOURCE`] series.
    pub fn source(&self, kind: SourceKind, name: &str) -> SourceCounters {
        let name = {
            let mut seen = lock(&self.inner.sources);
            let key = (kind, name.to_owned());
            if seen.contains(&key) {
                key.1
            } else if seen.len() < MAX_SOURCES {
                seen.insert(key.clone());
                key.1
            } else {
                OTHER_SOURCE.to_owned()
            }
        };
        let labels = SourceLabels {
            kind: kind.label(),
            source: name,
        };
        let families = &self.inner.families;
        SourceCounters {
            requests: families.source_requests.get_or_create_owned(&labels),
            bytes: families.source_bytes.get_or_create_owned(&labels),
            errors: families.source_errors.get_or_create_owned(&labels),
        }
    }

    /// Reads state gauges from `probe` at each scrape from now on (`None` from it: none this
    /// time, e.g. while the agent shuts down).
    pub fn observe_state(&self, probe: impl Fn() -> Option<StateGauges> + Send + Sync + 'static) {
        *lock(&self.inner.state.probe) = Some(Box::new(probe));
    }

    /// The OpenMetrics text exposition of every metric, `# EOF` included. It may block on the
    /// state probe (the cache scan): call it off the async runtime.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)?;
        Ok(text)
    }
}

/// One VM's handles.
#[derive(Clone, Debug, Default)]
pub struct VmMetrics {
    /// Its layer store's.
    pub blk: BlkMetrics,
    /// Its control channel's.
    pub vsock: VsockMetrics,
    /// Its containers'.
    pub containers: ContainerMetrics,
}

#[derive(Debug)]
struct BlkCounters {
    requests: [Counter; BlkOp::ALL.len()],
    read_bytes: Counter,
    errors: Counter,
    parked: Counter,
    duration: AtomicHistogram,
}

impl Default for BlkCounters {
    fn default() -> Self {
        Self {
            requests: Default::default(),
            read_bytes: Counter::default(),
            errors: Counter::default(),
            parked: Counter::default(),
            duration: AtomicHistogram::for_requests(),
        }
    }
}

/// A layer store's counters (one VM). Counting takes no lock: atomics only.
#[derive(Clone, Debug, Default)]
pub struct BlkMetrics {
    counters: Arc<BlkCounters>,
}

/// Two handles are equal when one is a clone of the other (so a device configuration holding
/// one still compares as a value).
impl PartialEq for BlkMetrics {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.counters, &other.counters)
    }
}

impl Eq for BlkMetrics {}

impl BlkMetrics {
    /// A request of `op` completed, `ok` or with an error status, after `elapsed` since its
    /// first attempt, having read `read_bytes` into guest memory.
    pub fn completed(&self, op: BlkOp, ok: bool, read_bytes: u64, elapsed: Duration) {
        let counters = &self.counters;
        if let Some(requests) = counters.requests.get(op as usize) {
            requests.inc();
        }
        if !ok {
            counters.errors.inc();
        }
        if read_bytes > 0 {
            counters.read_bytes.inc_by(read_bytes);
        }
        counters.duration.observe(elapsed);
    }

    /// A chain that did not parse was answered (or returned unused).
    pub fn malformed(&self) {
        let counters = &self.counters;
        if let Some(requests) = counters.requests.get(BlkOp::Malformed as usize) {
            requests.inc();
        }
        counters.errors.inc();
    }

    /// A request had to wait for data (counted once per request).
    pub fn parked(&self) {
        self.counters.parked.inc();
    }

    /// Requests completed so far of `op`.
    pub fn requests(&self, op: BlkOp) -> u64 {
        self.counters
            .requests
            .get(op as usize)
            .map_or(0, Counter::get)
    }
}

#[derive(Debug, Default)]
struct VsockCounters {
    connections: Counter,
    to_guest: Counter,
    from_guest: Counter,
    credit_stalls: Counter,
}

/// A vsock device's counters (one VM).
#[derive(Clone, Debug, Default)]
pub struct VsockMetrics {
    counters: Arc<VsockCounters>,
}

impl VsockMetrics {
    /// A packet from the guest with `payload_bytes` of data; `opened`: it accepted a
    /// connection.
    pub fn guest_packet(&self, opened: bool, payload_bytes: usize) {
        if opened {
            self.counters.connections.inc();
        }
        if payload_bytes > 0 {
            self.counters.from_guest.inc_by(payload_bytes as u64);
        }
    }

    /// `bytes` of data went to the guest; `credit_used_up`: they took the last of its credit.
    pub fn data_to_guest(&self, bytes: u32, credit_used_up: bool) {
        self.counters.to_guest.inc_by(u64::from(bytes));
        if credit_used_up {
            self.counters.credit_stalls.inc();
        }
    }

    /// Connections the guest accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.connections.get()
    }

    /// The counters' values now (what a VM's keeper, which runs the device, reports).
    pub fn totals(&self) -> VsockTotals {
        VsockTotals {
            connections: self.counters.connections.get(),
            from_guest: self.counters.from_guest.get(),
            to_guest: self.counters.to_guest.get(),
            credit_stalls: self.counters.credit_stalls.get(),
        }
    }

    /// Adds what a device elsewhere counted between `last` and `now`. A counter below its last
    /// value means the device started again (a new keeper): all of `now` is new.
    pub fn absorb(&self, last: &VsockTotals, now: &VsockTotals) {
        let restarted = now.connections < last.connections
            || now.from_guest < last.from_guest
            || now.to_guest < last.to_guest
            || now.credit_stalls < last.credit_stalls;
        let base = if restarted {
            VsockTotals::default()
        } else {
            *last
        };
        let c = &self.counters;
        c.connections.inc_by(now.connections - base.connections);
        c.from_guest.inc_by(now.from_guest - base.from_guest);
        c.to_guest.inc_by(now.to_guest - base.to_guest);
        c.credit_stalls
            .inc_by(now.credit_stalls - base.credit_stalls);
    }
}

/// A vsock device's counter values, as a keeper reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockTotals {
    /// Connections the guest accepted.
    pub connections: u64,
    /// Payload bytes from the guest.
    pub from_guest: u64,
    /// Payload bytes to the guest.
    pub to_guest: u64,
    /// Times data to the guest used up its credit.
    pub credit_stalls: u64,
}

#[derive(Debug)]
struct ContainerCounters {
    starts: Counter,
    start_failures: Counter,
    exits: Counter,
    ooms: Counter,
    start_duration: AtomicHistogram,
    first_output: AtomicHistogram,
}

impl Default for ContainerCounters {
    fn default() -> Self {
        Self {
            starts: Counter::default(),
            start_failures: Counter::default(),
            exits: Counter::default(),
            ooms: Counter::default(),
            start_duration: AtomicHistogram::for_starts(),
            first_output: AtomicHistogram::for_starts(),
        }
    }
}

/// One VM's container counters.
#[derive(Clone, Debug, Default)]
pub struct ContainerMetrics {
    counters: Arc<ContainerCounters>,
}

impl ContainerMetrics {
    /// A run started its container `elapsed` after the request.
    pub fn started(&self, elapsed: Duration) {
        self.counters.starts.inc();
        self.counters.start_duration.observe(elapsed);
    }

    /// A run failed before its container started.
    pub fn start_failed(&self) {
        self.counters.start_failures.inc();
    }

    /// A container's main process exited.
    pub fn exited(&self) {
        self.counters.exits.inc();
    }

    /// The guest reported an OOM kill.
    pub fn oom_killed(&self) {
        self.counters.ooms.inc();
    }

    /// A container's first output came `elapsed` after its run request.
    pub fn first_output(&self, elapsed: Duration) {
        self.counters.first_output.observe(elapsed);
    }
}

#[derive(Debug, Default)]
struct CacheCounters {
    hits: Counter,
    misses: Counter,
    evictions: Counter,
    evicted_bytes: Counter,
}

/// The layer cache's counters.
#[derive(Clone, Debug, Default)]
pub struct CacheMetrics {
    counters: Arc<CacheCounters>,
}

impl CacheMetrics {
    fn register(&self, registry: &mut Registry) {
        let counters = &self.counters;
        registry.register(
            "gantry_cache_hits",
            "Layers a pull found in the cache",
            counters.hits.clone(),
        );
        registry.register(
            "gantry_cache_misses",
            "Layers a pull had to fetch",
            counters.misses.clone(),
        );
        registry.register(
            "gantry_cache_evictions",
            "Layers evicted to keep the cache within its budget",
            counters.evictions.clone(),
        );
        registry.register_with_unit(
            "gantry_cache_evicted",
            "Bytes of the layers evicted",
            Unit::Bytes,
            counters.evicted_bytes.clone(),
        );
    }

    /// A pull found a layer in the cache.
    pub fn hit(&self) {
        self.counters.hits.inc();
    }

    /// A pull had to fetch a layer.
    pub fn miss(&self) {
        self.counters.misses.inc();
    }

    /// Layers of these sizes were evicted.
    pub fn evicted(&self, sizes: impl IntoIterator<Item = u64>) {
        for bytes in sizes {
            self.counters.evictions.inc();
            self.counters.evicted_bytes.inc_by(bytes);
        }
    }
}

/// One registry's or peer's counters.
#[derive(Clone, Debug, Default)]
pub struct SourceCounters {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
}

impl SourceCounters {
    /// One request that brought `bytes`, and `failed` (or not).
    pub fn request(&self, bytes: u64, failed: bool) {
        self.requests.inc();
        self.bytes.inc_by(bytes);
        if failed {
            self.errors.inc();
        }
    }

    /// Bytes from this source failed verification.
    pub fn bad_bytes(&self) {
        self.errors.inc();
    }
}

#[cfg(test)]
pub(crate) mod tests;
