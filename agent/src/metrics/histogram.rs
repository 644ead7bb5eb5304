//! [`AtomicHistogram`]: a histogram of durations with fixed buckets whose `observe` takes no
//! lock, for the layer store's queue threads.
//!
//! `prometheus-client`'s own `Histogram` keeps its buckets behind a mutex; the layer store's
//! queues share no lock on the hot path (DESIGN §3), and one VM's queues observe into one
//! histogram, so this one is a row of atomic counters instead. It encodes exactly as a
//! histogram does (`_sum`, `_count`, cumulative `_bucket{le=…}`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds (seconds) of a layer-store request's buckets: a cached read takes tens of
/// microseconds, a parked one as long as a fetch (up to the park timeout, 30 s by default).
pub const REQUEST_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Upper bounds (seconds) of a container start's buckets: a warm start under TCG takes a few
/// hundred milliseconds, a cold pull of a large image minutes.
pub const START_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Debug)]
struct Buckets {
    bounds: &'static [f64],
    /// One counter per bound, then the overflow (`+Inf`) bucket; not cumulative.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

/// A histogram of durations over fixed `bounds`. Cheap to clone; every clone is the same
/// histogram.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    buckets: Arc<Buckets>,
}

impl AtomicHistogram {
    /// An empty histogram with these upper bounds (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            buckets: Arc::new(Buckets {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    /// A histogram for layer-store requests ([`REQUEST_BUCKETS`]).
    pub fn for_requests() -> Self {
        Self::new(REQUEST_BUCKETS)
    }

    /// A histogram for container starts ([`START_BUCKETS`]).
    pub fn for_starts() -> Self {
        Self::new(START_BUCKETS)
    }

    /// Counts one observation of `elapsed`.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .buckets
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.buckets.bounds.len());
        if let Some(count) = self.buckets.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.buckets.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets
            .counts
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// The buckets as the exposition has them: (upper bound, observations in this bucket),
    /// the last bound `+Inf`.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.buckets
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.counts.iter())
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// The sum of the observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        Duration::from_nanos(self.buckets.sum_nanos.load(Ordering::Relaxed)).as_secs_f64()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The count is the sum of the buckets read, so `_count` always equals the `+Inf`
        // bucket even while other threads observe.
        let buckets = self.buckets();
        let count = buckets.iter().map(|(_, count)| count).sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum_seconds(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}
