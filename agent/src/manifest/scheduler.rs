//! Prefetch of what the cluster manifest names: one task works through the images, highest
//! priority first, in two passes — every image's metadata (manifest, config, chunk indexes;
//! the startup trace's chunks are queued by the pull itself), then the data of the images
//! whose level is `all` — all at the fetcher's background priority, so a guest's own reads
//! always go first.
//!
//! Applying a manifest diff-applies it: an entry with the same reference and platform as one
//! in force keeps what was done for it (its resolution, its state, its pins); a new entry is
//! queued; a dropped entry releases its pins (its layers become evictable) and its work stops.
//! A tag is resolved to a digest when its entry first appears and recorded, so what is fetched
//! does not change under a moved tag while the entry stands.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use gantry_api::{
    ManifestImageStatus, ManifestLayerStatus, ManifestStatus, PrefetchLevel, PrefetchState,
    PullMode,
};
use gantry_oci::Reference;
use gantry_oci::manifest::Platform;
use tokio::sync::watch;
use tracing::{info, warn};

use super::document::{ClusterManifest, ImageEntry};
use crate::cache::PinGuard;
use crate::images::ImageService;
use crate::images::pull::no_progress;
use crate::lazy::layer::LazyLayer;
use crate::sync::lock;

/// What the scheduler knows about one image of the manifest in force.
#[derive(Debug)]
struct Tracked {
    entry: ImageEntry,
    resolved: Option<String>,
    state: PrefetchState,
    error: Option<String>,
    started_unix_ms: Option<u64>,
    completed_unix_ms: Option<u64>,
    /// Held while the entry asks for `pin`.
    pins: Vec<PinGuard>,
    /// The metadata pass is done (the image is in the cache, its layers open).
    metadata_done: bool,
    /// Its lazy layers, held open while their data is fetched.
    layers: Vec<Arc<LazyLayer>>,
    /// When its data pass started, and the bytes its layers lacked then (for the ETA).
    data_started: Option<(Instant, u64)>,
}

impl Tracked {
    fn new(entry: ImageEntry) -> Tracked {
        Tracked {
            entry,
            resolved: None,
            state: PrefetchState::Queued,
            error: None,
            started_unix_ms: None,
            completed_unix_ms: None,
            pins: Vec::new(),
            metadata_done: false,
            layers: Vec::new(),
            data_started: None,
        }
    }

    /// Milliseconds until its data is in, at the rate since its data pass started.
    fn eta_ms(&self) -> Option<u64> {
        let (started, missing_then) = self.data_started?;
        if self.state != PrefetchState::Fetching {
            return None;
        }
        let missing: u64 = self.layers.iter().map(|layer| layer.missing_bytes()).sum();
        let elapsed = started.elapsed().as_secs_f64();
        let rate = missing_then.saturating_sub(missing) as f64 / elapsed.max(1e-3);
        (rate > 0.0).then(|| (missing as f64 / rate * 1000.0) as u64)
    }
}

#[derive(Debug, Default)]
struct Applied {
    generation: u64,
    applied_unix_ms: u64,
    manifest: Option<ClusterManifest>,
    images: Vec<Tracked>,
}

/// The cluster manifest in force and its prefetch.
#[derive(Debug)]
pub struct ManifestScheduler {
    applied: Arc<Mutex<Applied>>,
    generation: watch::Sender<u64>,
}

impl Default for ManifestScheduler {
    fn default() -> Self {
        ManifestScheduler {
            applied: Arc::default(),
            generation: watch::channel(0).0,
        }
    }
}

impl ManifestScheduler {
    /// Starts the prefetch task over the agent's `images` (it ends with them). It holds the
    /// image service, never the agent: a shutdown waits for nothing here.
    pub fn start(&self, images: Weak<ImageService>) {
        let applied = Arc::clone(&self.applied);
        let mut generation = self.generation.subscribe();
        tokio::spawn(async move {
            loop {
                let current = *generation.borrow_and_update();
                if current > 0 {
                    work(&images, &applied, current, &mut generation).await;
                }
                if generation.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Puts `manifest` in force (see the module docs); returns the new generation.
    pub fn apply(&self, manifest: ClusterManifest) -> u64 {
        let generation = {
            let mut applied = lock(&self.applied);
            let mut previous: Vec<Tracked> = std::mem::take(&mut applied.images);
            let mut images = Vec::with_capacity(manifest.images.len());
            for entry in &manifest.images {
                let kept = previous
                    .iter()
                    .position(|tracked| tracked.entry.key() == entry.key())
                    .map(|index| previous.swap_remove(index));
                let tracked = match kept {
                    Some(mut tracked) => {
                        let level_raised = entry.prefetch > tracked.entry.prefetch;
                        if !entry.pin {
                            tracked.pins.clear();
                        }
                        let repin = entry.pin && tracked.pins.is_empty();
                        tracked.entry = entry.clone();
                        let unfinished = matches!(
                            tracked.state,
                            PrefetchState::Failed | PrefetchState::Partial
                        );
                        if level_raised || repin || unfinished {
                            // Pulled again (cheap: the cache has it) for its pins and layers.
                            tracked.state = PrefetchState::Queued;
                            tracked.metadata_done = false;
                            tracked.completed_unix_ms = None;
                        }
                        tracked
                    }
                    None => Tracked::new(entry.clone()),
                };
                images.push(tracked);
            }
            for dropped in &previous {
                info!(image = %dropped.entry.reference, "dropped from the cluster manifest: unpinned");
            }
            drop(previous);
            applied.generation += 1;
            applied.applied_unix_ms = now_ms();
            applied.manifest = Some(manifest);
            applied.images = images;
            applied.generation
        };
        self.generation.send_replace(generation);
        generation
    }

    /// The status of the manifest in force; `presence` gives an image's layers (by the name
    /// it was pulled as).
    pub fn status(&self, presence: impl Fn(&str) -> Vec<ManifestLayerStatus>) -> ManifestStatus {
        let applied = lock(&self.applied);
        let mut images: Vec<&Tracked> = applied.images.iter().collect();
        images.sort_by_key(|tracked| std::cmp::Reverse(tracked.entry.priority));
        ManifestStatus {
            generation: applied.generation,
            applied_unix_ms: applied.applied_unix_ms,
            // Every section is acted on (peers by the agent, beside this scheduler).
            not_applied: Vec::new(),
            images: images
                .into_iter()
                .map(|tracked| ManifestImageStatus {
                    reference: tracked.entry.reference.clone(),
                    platform: tracked.entry.platform.clone(),
                    priority: tracked.entry.priority,
                    pin: tracked.entry.pin,
                    prefetch: tracked.entry.prefetch,
                    resolved: tracked.resolved.clone(),
                    state: tracked.state,
                    error: tracked.error.clone(),
                    started_unix_ms: tracked.started_unix_ms,
                    completed_unix_ms: tracked.completed_unix_ms,
                    eta_ms: tracked.eta_ms(),
                    layers: tracked
                        .resolved
                        .as_deref()
                        .map(&presence)
                        .unwrap_or_default(),
                })
                .collect(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One pass over the images of `generation`: metadata of all, then data of `all` ones. Stops
/// when another manifest is applied (the loop starts over with it).
async fn work(
    images: &Weak<ImageService>,
    applied: &Arc<Mutex<Applied>>,
    generation: u64,
    changed: &mut watch::Receiver<u64>,
) {
    for data_pass in [false, true] {
        loop {
            let Some(images) = images.upgrade() else {
                return;
            };
            let Some(job) = next_job(applied, generation, data_pass) else {
                break;
            };
            let outcome = if data_pass {
                if let Some(reason) = over_budget(&images, job.disk_budget, job.missing).await {
                    record(applied, generation, &job.key, Ok(Step::Partial(reason)));
                    continue;
                }
                for layer in &job.layers {
                    if !layer.is_complete() {
                        images.lazy.fill(Arc::clone(layer));
                    }
                }
                tokio::select! {
                    () = wait_all(&job.layers) => Ok(Step::Data),
                    _ = changed.changed() => return,
                }
            } else {
                metadata(&images, &job.entry, job.resolved).await
            };
            record(applied, generation, &job.key, outcome);
        }
    }
}

/// What one step did.
enum Step {
    /// The image is in the cache: its resolution, pins and lazy layers.
    Metadata {
        resolved: String,
        pins: Vec<PinGuard>,
        layers: Vec<Arc<LazyLayer>>,
    },
    /// Every chunk is present.
    Data,
    /// The data would not fit the disk budget: why.
    Partial(String),
}

/// An image to work on in one pass.
struct Job {
    key: (String, Option<String>),
    entry: ImageEntry,
    resolved: Option<String>,
    /// Its open lazy layers (data pass).
    layers: Vec<Arc<LazyLayer>>,
    /// The bytes they lack (data pass; 0 otherwise).
    missing: u64,
    /// The manifest's disk budget (0: none).
    disk_budget: u64,
}

/// The highest-priority image with work left in this pass, marked as fetching.
fn next_job(applied: &Arc<Mutex<Applied>>, generation: u64, data_pass: bool) -> Option<Job> {
    let mut applied = lock(applied);
    if applied.generation != generation {
        return None;
    }
    let disk_budget = applied
        .manifest
        .as_ref()
        .map_or(0, ClusterManifest::disk_budget);
    let tracked = applied
        .images
        .iter_mut()
        .filter(|tracked| {
            !matches!(
                tracked.state,
                PrefetchState::Complete | PrefetchState::Failed | PrefetchState::Partial
            )
        })
        .filter(|tracked| {
            if data_pass {
                tracked.metadata_done && tracked.entry.prefetch == PrefetchLevel::All
            } else {
                !tracked.metadata_done
            }
        })
        // The first of the highest priority: the manifest's order among equals.
        .min_by_key(|tracked| std::cmp::Reverse(tracked.entry.priority))?;
    tracked.state = PrefetchState::Fetching;
    tracked.started_unix_ms.get_or_insert_with(now_ms);
    let mut missing = 0;
    if data_pass {
        missing = tracked
            .layers
            .iter()
            .map(|layer| layer.missing_bytes())
            .sum();
        tracked.data_started = Some((Instant::now(), missing));
    }
    Some(Job {
        key: tracked.entry.key(),
        entry: tracked.entry.clone(),
        resolved: tracked.resolved.clone(),
        layers: tracked.layers.clone(),
        missing,
        disk_budget,
    })
}

/// Why adding `missing` bytes (what an image's layers lack) to the cache's layers would not
/// fit `budget`, or `None` when it fits or there is no budget.
async fn over_budget(images: &Arc<ImageService>, budget: u64, missing: u64) -> Option<String> {
    if budget == 0 {
        return None;
    }
    let images = Arc::clone(images);
    let used = match tokio::task::spawn_blocking(move || images.cache.layers_bytes()).await {
        Ok(Ok(used)) => used,
        Ok(Err(error)) => return Some(format!("cannot measure the cache: {error}")),
        Err(error) => return Some(format!("cannot measure the cache: {error}")),
    };
    let mib = |bytes: u64| bytes as f64 / 1048576.0;
    (used.saturating_add(missing) > budget).then(|| {
        format!(
            "disk budget: its data needs {:.1} MiB more, the cache holds {:.1} MiB of {:.1} MiB",
            mib(missing),
            mib(used),
            mib(budget)
        )
    })
}

/// Resolves the entry (unless it was) and pulls its metadata, lazily.
async fn metadata(
    images: &ImageService,
    entry: &ImageEntry,
    resolved: Option<String>,
) -> Result<Step, String> {
    if let Some(platform) = &entry.platform {
        let wanted: Platform = platform
            .parse()
            .map_err(|error: gantry_oci::manifest::ManifestError| error.to_string())?;
        let registry = images.registry();
        let own = registry.platform();
        if wanted != *own {
            return Err(format!(
                "platform {wanted}: this agent prefetches its own platform ({own}) only"
            ));
        }
    }
    let resolved = match resolved {
        Some(resolved) => resolved,
        None => resolve(images, &entry.reference).await?,
    };
    let pulled = images
        .pull(&resolved, Some(PullMode::Lazy), &no_progress)
        .await
        .map_err(|error| error.to_string())?;
    Ok(Step::Metadata {
        resolved,
        pins: if entry.pin { pulled.pins } else { Vec::new() },
        layers: pulled.lazy_layers,
    })
}

/// `host/repository@digest` of what the reference names now.
async fn resolve(images: &ImageService, reference: &str) -> Result<String, String> {
    let parsed: Reference = reference.parse().map_err(|e| format!("{e}"))?;
    let digest = match &parsed.digest {
        Some(digest) => digest.clone(),
        None => {
            images
                .registry()
                .fetch_manifest(&parsed, &parsed.manifest_target())
                .await
                .map_err(|error| format!("resolving {reference}: {error}"))?
                .digest
        }
    };
    Ok(format!(
        "{}/{}@{digest}",
        parsed.registry, parsed.repository
    ))
}

async fn wait_all(layers: &[Arc<LazyLayer>]) {
    for layer in layers {
        layer.wait_complete().await;
    }
}

/// Records what a step did, if the entry is still in force.
fn record(
    applied: &Arc<Mutex<Applied>>,
    generation: u64,
    key: &(String, Option<String>),
    outcome: Result<Step, String>,
) {
    let mut applied = lock(applied);
    if applied.generation != generation {
        // Another manifest replaced this one meanwhile: a kept entry is redone by its pass.
        return;
    }
    let Some(tracked) = applied
        .images
        .iter_mut()
        .find(|tracked| tracked.entry.key() == *key)
    else {
        return;
    };
    match outcome {
        Ok(Step::Metadata {
            resolved,
            pins,
            layers,
        }) => {
            tracked.resolved = Some(resolved);
            tracked.pins = pins;
            tracked.metadata_done = true;
            tracked.error = None;
            if tracked.entry.prefetch == PrefetchLevel::All && !layers.is_empty() {
                tracked.state = PrefetchState::Queued;
                tracked.layers = layers;
            } else {
                // Metadata is all a `metadata` entry asks for; a `trace` entry's trace chunks
                // were queued by the pull (they arrive in the background).
                tracked.state = PrefetchState::Complete;
                tracked.completed_unix_ms = Some(now_ms());
            }
        }
        Ok(Step::Data) => {
            tracked.state = PrefetchState::Complete;
            tracked.completed_unix_ms = Some(now_ms());
            tracked.layers.clear();
        }
        Ok(Step::Partial(reason)) => {
            info!(image = %tracked.entry.reference, %reason, "left partial");
            tracked.state = PrefetchState::Partial;
            tracked.error = Some(reason);
            tracked.layers.clear();
        }
        Err(error) => {
            warn!(image = %tracked.entry.reference, %error, "cluster manifest prefetch failed");
            tracked.state = PrefetchState::Failed;
            tracked.error = Some(error);
        }
    }
}
