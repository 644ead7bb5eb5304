//! Lazy loading (DESIGN §4–5): layers in the chunked EROFS format are mapped before they are
//! downloaded, and their chunks are fetched when the guest reads them.
//!
//! - `origin`: where a layer blob's byte ranges come from (a registry, a local file);
//! - `layer`: one lazily fetched layer, the [`BlockSource`](crate::blk::BlockSource) the layer
//!   store reads (present chunks straight from the cache file, missing ones parked);
//! - `fetcher`: priorities, single flight, coalescing, read-ahead, fill, verification;
//! - this module: the settings and [`LazyLayers`], the agent's table of open lazy layers (one
//!   per layer, shared by every VM that maps it).
//!
//! Imports point one way: `fetcher` → `layer` → `origin`.

pub mod fetcher;
pub mod layer;
pub mod origin;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use std::sync::atomic::Ordering;

use gantry_api::{LazyLayerStats, LazyStats, PullMode};
use gantry_oci::Digest;
use serde::{Deserialize, Serialize};

use self::fetcher::{FetchCounters, Fetcher};
use self::layer::{LazyLayer, StoreError};
use crate::cache::{Cache, CacheError, LayerRecord};
use crate::sync::lock;

/// Settings of lazy loading (`[lazy]` in `agent.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LazyConfig {
    /// How lazy-format layers are brought in when `run` does not say.
    pub mode: PullMode,
    /// How long a guest's read may wait for a chunk before it fails with an I/O error.
    pub park_timeout_secs: f64,
    /// How long reads of a chunk keep failing after its fetch failed, before one tries again.
    pub failure_hold_ms: u64,
    /// Fetches running at once (range requests in flight).
    pub connections: usize,
    /// Of those, how many background work (read-ahead, fill) never uses.
    pub foreground_reserved: usize,
    /// Largest blob span of one range request made of adjacent chunks.
    pub coalesce_bytes: u64,
    /// Chunks after a guest's sequential read (one continuing the chunk before) fetched in the
    /// background.
    pub read_ahead_chunks: usize,
    /// Bandwidth of background fetching in bytes per second; 0 means unlimited.
    pub background_bytes_per_sec: u64,
    /// While a guest's fetch runs, and for this long after it ends, no fill fetch starts: a cold start
    /// gets the link to itself (trace prefetch and read-ahead go on: they serve the start).
    pub fill_yield_ms: u64,
    /// Extra rounds over a layer's origins before a fetch gives up.
    pub retries: u32,
    /// How long a cold start's reads are recorded as the image's startup trace; 0 disables
    /// recording (traces already in the cache are still replayed).
    pub trace_seconds: f64,
    /// On a cold start of a registry image without a trace in the cache, look for one stored
    /// beside the image as an OCI referrer (`image trace --push` on another card).
    pub remote_traces: bool,
}

impl Default for LazyConfig {
    fn default() -> Self {
        LazyConfig {
            mode: PullMode::Fill,
            park_timeout_secs: 30.0,
            failure_hold_ms: 1000,
            connections: 8,
            foreground_reserved: 2,
            coalesce_bytes: 4 << 20,
            read_ahead_chunks: 2,
            background_bytes_per_sec: 0,
            fill_yield_ms: 500,
            retries: 2,
            trace_seconds: 10.0,
            remote_traces: true,
        }
    }
}

impl LazyConfig {
    /// [`Self::park_timeout_secs`] as a duration (at least 1 ms).
    pub fn park_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.park_timeout_secs)
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_millis(1))
    }

    /// Checks the settings make sense.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.park_timeout_secs > 0.0 && self.park_timeout_secs <= 3600.0) {
            return Err("lazy.park_timeout_secs must be in (0, 3600]".into());
        }
        if self.connections == 0 || self.connections > 256 {
            return Err("lazy.connections must be between 1 and 256".into());
        }
        if !(0.0..=600.0).contains(&self.trace_seconds) {
            return Err("lazy.trace_seconds must be in [0, 600]".into());
        }
        if self.fill_yield_ms > 60_000 {
            return Err("lazy.fill_yield_ms must be at most 60000".into());
        }
        if self.foreground_reserved >= self.connections {
            return Err("lazy.foreground_reserved must be less than lazy.connections".into());
        }
        Ok(())
    }
}

/// Errors opening a lazy layer.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The cache failed or holds no such layer.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The layer's files are unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Opens the lazy layer `record` names from the cache, pinned: its verified chunk index, its
/// image, bitmap and blob copy. Its reads' wants go to `wants`.
pub fn open_cached(
    cache: &Cache,
    record: &LayerRecord,
    failure_hold: Duration,
    wants: tokio::sync::mpsc::UnboundedSender<layer::Want>,
) -> Result<Arc<LazyLayer>, LazyError> {
    let index = cache.lazy_index(&record.blob_digest)?;
    let pin = cache.pin(record)?;
    let blob = cache.lazy_blob_path(&record.blob_digest)?;
    Ok(LazyLayer::open(
        record.blob_digest.clone(),
        index,
        &record.erofs_path,
        &record.bitmap_path,
        blob.as_deref(),
        pin,
        failure_hold,
        wants,
    )?)
}

/// Checks `layer`'s whole blob against its digest once every chunk is in (at once if it is
/// already), without keeping the layer open: the watcher ends when the layer is dropped.
fn check_blob_when_complete(runtime: &tokio::runtime::Handle, layer: &Arc<LazyLayer>) {
    let mut completion = layer.completion();
    let weak = Arc::downgrade(layer);
    runtime.spawn(async move {
        if completion.wait_for(|complete| *complete).await.is_err() {
            return;
        }
        drop(completion);
        let Some(layer) = weak.upgrade() else {
            return;
        };
        let checked = tokio::task::spawn_blocking(move || layer.check_blob()).await;
        match checked {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "lazy layer quarantined"),
            Err(error) => tracing::warn!(%error, "the blob check stopped"),
        }
    });
}

/// The agent's open lazy layers and their fetcher.
#[derive(Debug)]
pub struct LazyLayers {
    config: LazyConfig,
    fetcher: Fetcher,
    open: Mutex<HashMap<Digest, Weak<LazyLayer>>>,
    /// The runtime the fetcher runs on (layers are opened from blocking threads too).
    runtime: tokio::runtime::Handle,
}

impl LazyLayers {
    /// Starts the fetcher (on the current tokio runtime).
    pub fn new(config: LazyConfig) -> LazyLayers {
        LazyLayers {
            fetcher: Fetcher::start(config.clone()),
            config,
            runtime: tokio::runtime::Handle::current(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn config(&self) -> &LazyConfig {
        &self.config
    }

    /// The lazy layer `record` names, opened from the cache unless it is open already (every
    /// user of a layer shares one: one fetch per chunk whatever the number of VMs).
    pub fn open(&self, cache: &Cache, record: &LayerRecord) -> Result<Arc<LazyLayer>, LazyError> {
        let mut open = lock(&self.open);
        open.retain(|_, layer| layer.strong_count() > 0);
        if let Some(layer) = open.get(&record.blob_digest).and_then(Weak::upgrade) {
            return Ok(layer);
        }
        let layer = open_cached(
            cache,
            record,
            Duration::from_millis(self.config.failure_hold_ms),
            self.fetcher.wants(),
        )?;
        open.insert(record.blob_digest.clone(), Arc::downgrade(&layer));
        if layer.needs_blob_check() {
            check_blob_when_complete(&self.runtime, &layer);
        }
        Ok(layer)
    }

    /// The open lazy layer of blob `digest`, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<LazyLayer>> {
        lock(&self.open).get(digest).and_then(Weak::upgrade)
    }

    /// Completes `layer` in the background.
    pub fn fill(&self, layer: Arc<LazyLayer>) {
        self.fetcher.fill(layer);
    }

    /// A handle to the fetcher, for work that outlives the caller (a trace that arrives later).
    pub fn fetcher(&self) -> Fetcher {
        self.fetcher.clone()
    }

    /// Fetches `chunks` of `layer` first, in this order (a startup trace).
    pub fn prefetch(&self, layer: Arc<LazyLayer>, chunks: Vec<usize>) {
        self.fetcher.prefetch(layer, chunks);
    }

    /// The fetcher's counters.
    pub fn counters(&self) -> &FetchCounters {
        self.fetcher.counters()
    }

    /// The counters and the open layers, as `GET /v1/lazy` reports them.
    pub fn stats(&self) -> LazyStats {
        let mut stats = self.counters().snapshot();
        let open: Vec<Arc<LazyLayer>> = lock(&self.open)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        stats.layers = open
            .iter()
            .map(|layer| LazyLayerStats {
                digest: layer.digest().to_string(),
                chunks: layer.index().len() as u64,
                present_chunks: layer.present_chunks(),
                fetched_bytes: layer.counters.bytes_fetched.load(Ordering::Relaxed),
                blob_bytes: layer.index().blob_data_size(),
            })
            .collect();
        stats.layers.sort_by(|a, b| a.digest.cmp(&b.digest));
        stats
    }
}

#[cfg(test)]
pub(crate) mod tests;
