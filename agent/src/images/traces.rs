//! Startup traces at a cold start of a lazy image: replayed when the cache has one; otherwise
//! recorded during the next `lazy.trace_seconds`, and, for a registry image, looked for
//! beside the image (an OCI referrer another card pushed with `image trace --push`) at the
//! same time. Nothing here delays the start: the registry lookup and the recording run in the
//! background, and whichever trace is stored first stays.
//!
//! A trace from a registry is untrusted: its referrer and blob are verified by digest and
//! bounded in size (`gantry_oci::registry::referrers`), it must name this image's manifest,
//! and only chunk indexes inside the image's own lazy layers are prefetched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gantry_oci::registry::RegistryClient;
use gantry_oci::{Digest, Reference};
use tracing::{debug, info, warn};

use crate::cache::trace::{self, MAX_TRACE_BYTES, StartupTrace, TRACE_ARTIFACT_TYPE, TracedLayer};
use crate::lazy::LazyLayers;
use crate::lazy::fetcher::Fetcher;
use crate::lazy::layer::LazyLayer;

/// Where a trace missing from the cache may be found: the image's registry repository.
#[derive(Debug, Clone)]
pub struct RemoteTraces {
    /// The client (its credentials and insecure hosts).
    pub client: Arc<RegistryClient>,
    /// The image as pulled.
    pub reference: Reference,
}

/// Replays the trace of `manifest` if the cache (under `root`) has one; otherwise starts
/// recording one and, with `remote`, looks for one in the registry.
pub async fn start(
    lazy: &LazyLayers,
    root: PathBuf,
    manifest: Digest,
    layers: &[Arc<LazyLayer>],
    remote: Option<RemoteTraces>,
) {
    let found = {
        let (root, manifest) = (root.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || trace::read_trace(&root, &manifest)).await
    };
    match found {
        Ok(Ok(Some(trace))) => {
            replay(&lazy.fetcher(), &trace, layers);
            return;
        }
        Ok(Ok(None)) => {}
        Ok(Err(error)) => {
            warn!(%error, "ignoring an unusable startup trace");
            return;
        }
        Err(error) => {
            warn!(%error, "reading the startup trace");
            return;
        }
    }
    if let Some(remote) = remote.filter(|_| lazy.config().remote_traces) {
        let (fetcher, root, manifest, layers) = (
            lazy.fetcher(),
            root.clone(),
            manifest.clone(),
            layers.to_vec(),
        );
        tokio::spawn(async move {
            import(&remote, &fetcher, root, manifest, &layers).await;
        });
    }
    record(lazy.config().trace_seconds, root, manifest, layers);
}

/// Prefetches, in recorded order, the chunks of `trace` that `layers` lack.
fn replay(fetcher: &Fetcher, trace: &StartupTrace, layers: &[Arc<LazyLayer>]) {
    for traced in &trace.layers {
        let Some(layer) = layers.iter().find(|l| *l.digest() == traced.blob_digest) else {
            continue;
        };
        let chunks: Vec<usize> = traced
            .chunks
            .iter()
            .map(|&chunk| chunk as usize)
            .filter(|&chunk| chunk < layer.index().len() && !layer.is_present(chunk))
            .collect();
        if !chunks.is_empty() {
            fetcher.prefetch(Arc::clone(layer), chunks);
        }
    }
}

/// Looks for the image's trace in its registry; stores and replays the first usable one.
async fn import(
    remote: &RemoteTraces,
    fetcher: &Fetcher,
    root: PathBuf,
    manifest: Digest,
    layers: &[Arc<LazyLayer>],
) {
    let trace = match fetch_remote(remote, &manifest).await {
        Ok(Some(trace)) => trace,
        Ok(None) => {
            debug!(image = %remote.reference, "no startup trace beside the image");
            return;
        }
        Err(error) => {
            warn!(image = %remote.reference, %error, "cannot use the registry's startup traces");
            return;
        }
    };
    replay(fetcher, &trace, layers);
    let chunks = trace.chunk_count();
    let stored =
        tokio::task::spawn_blocking(move || trace::write_trace_if_absent(&root, &trace)).await;
    match stored {
        Ok(Ok(_)) => info!(image = %remote.reference, chunks, "startup trace from the registry"),
        Ok(Err(error)) => warn!(%error, "cannot store the registry's startup trace"),
        Err(error) => warn!(%error, "storing the registry's startup trace"),
    }
}

/// The first trace listed beside `manifest` that verifies and parses (others are skipped with
/// a warning: one bad referrer must not hide a good one).
pub async fn fetch_remote(
    remote: &RemoteTraces,
    manifest: &Digest,
) -> Result<Option<StartupTrace>, gantry_oci::registry::RegistryError> {
    let listed = remote
        .client
        .referrers(&remote.reference, manifest, TRACE_ARTIFACT_TYPE)
        .await?;
    for entry in listed {
        let fetched = match remote
            .client
            .fetch_referrer(
                &remote.reference,
                &entry,
                manifest,
                TRACE_ARTIFACT_TYPE,
                MAX_TRACE_BYTES,
            )
            .await
        {
            Ok(fetched) => fetched,
            Err(error) => {
                warn!(%error, "skipping a startup trace referrer");
                continue;
            }
        };
        match trace::decode_trace(&fetched.blob, manifest) {
            Ok(trace) => return Ok(Some(trace)),
            Err(reason) => {
                warn!(referrer = %fetched.digest, reason, "skipping an unusable startup trace");
            }
        }
    }
    Ok(None)
}

/// Records the chunks `layers` serve during the next `seconds` and stores them as the trace
/// of `manifest`, unless a trace arrived meanwhile.
fn record(seconds: f64, root: PathBuf, manifest: Digest, layers: &[Arc<LazyLayer>]) {
    if seconds <= 0.0 {
        return;
    }
    let window = Duration::from_secs_f64(seconds);
    for layer in layers {
        layer.record_trace(window);
    }
    let layers = layers.to_vec();
    tokio::spawn(async move {
        tokio::time::sleep(window).await;
        let trace = StartupTrace {
            version: trace::TRACE_VERSION,
            manifest_digest: manifest,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            recorded_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            layers: layers
                .iter()
                .map(|layer| TracedLayer {
                    blob_digest: layer.digest().clone(),
                    chunks: layer
                        .trace()
                        .into_iter()
                        .filter_map(|chunk| u32::try_from(chunk).ok())
                        .collect(),
                })
                .collect(),
        };
        if trace.chunk_count() == 0 {
            return;
        }
        let chunks = trace.chunk_count();
        let written =
            tokio::task::spawn_blocking(move || trace::write_trace_if_absent(&root, &trace)).await;
        match written {
            Ok(Ok(true)) => info!(chunks, "startup trace recorded"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => warn!(%error, "cannot store the startup trace"),
            Err(error) => warn!(%error, "storing the startup trace"),
        }
    });
}
